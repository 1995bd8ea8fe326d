"""The pipeline above the data (datasets/) and the network (nets/): test-time detection and evaluation
(inference.py), the training loop with its checkpoints and resume (trainer.py, run_folder.py), fine-tuning from
another run's weights (pretrained.py), drawing (visualize.py), the onnxruntime backend (onnx_backend.py), and
`Detector`, the Python API (detector.py)."""
from engine.detector import Detections, Detector

__all__ = ["Detections", "Detector"]
