"""An exported network (tools/export_onnx.py) run by onnxruntime, called like our model in eval mode, so that the
decoding and soft-NMS of engine/inference.py run unchanged on its outputs.

    model = OnnxModel("model.onnx", torch.device("cpu"))
    out = model(images)   # (N, 3, H, W) float32 -> the eval dict: hm_* (N, C, h, w), emb_*, off_*, on CPU

Runs on onnxruntime's CUDA provider for a CUDA device when the installed onnxruntime has it (onnxruntime-gpu),
otherwise on its CPU provider.
"""
import json
import warnings
from pathlib import Path

import numpy as np
import torch

METADATA_KEY = "centernet47"  # as tools/export_onnx.py writes it


class OnnxModel:
    """Callable (N, 3, H, W) -> dict of CPU float32 tensors. Attributes from the file's metadata: arch,
    class_names, img_size, size_unit, dynamic, max_size."""

    def __init__(self, path: str | Path, device: torch.device, threads: int = 0):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise SystemExit(f"--onnx {path}: no such file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            else:
                warnings.warn(f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu); "
                              f"{path} runs on the CPU", RuntimeWarning, stacklevel=2)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise SystemExit(f"--onnx {path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise SystemExit(f"--onnx {path}: no '{METADATA_KEY}' metadata; export it with tools/export_onnx.py")
        info = json.loads(meta[METADATA_KEY])
        self.path = path
        self.arch, self.class_names, self.img_size = info["arch"], info["class_names"], info["img_size"]
        self.size_unit, self.dynamic, self.max_size = info["size_unit"], info["dynamic"], info["max_size"]
        self.outputs = info["outputs"]
        self.providers = self.session.get_providers()

    training = False  # inference only; eval() and train(False) are accepted as for an nn.Module

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        if mode:
            raise RuntimeError(f"{self.path}: an exported network cannot be trained")
        return self

    def check_size(self, height: int, width: int) -> None:
        """A clear error for input sizes the file does not take (the network's own rule, and the export's)."""
        if self.dynamic:
            if (height + 1) % self.size_unit or (width + 1) % self.size_unit:
                raise ValueError(f"{self.path}: input height and width must be of the form k * {self.size_unit} - 1,"
                                 f" got {height} x {width}")
            if max(height, width) > self.max_size:
                raise ValueError(f"{self.path} was exported for inputs up to {self.max_size} pixels, got "
                                 f"{height} x {width}; export again with a larger --max_size")
        elif (height, width) != (self.img_size, self.img_size):
            raise ValueError(f"{self.path} takes {self.img_size} x {self.img_size} inputs only, got {height} x "
                             f"{width}; export it with --dynamic for images of other sizes")

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_size(*images.shape[-2:])
        feed = {"image": np.ascontiguousarray(images.detach().float().cpu().numpy())}
        return {k: torch.from_numpy(v) for k, v in zip(self.outputs, self.session.run(self.outputs, feed))}
