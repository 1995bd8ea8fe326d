"""An exported network (tools/export_onnx.py) run by onnxruntime, called like our model in eval mode, so that the
decoding and soft-NMS of engine/inference.py run unchanged on its outputs.

    model = OnnxModel("model.onnx", torch.device("cpu"))
    out = model(images)   # (N, 3, H, W) float32 -> the eval dict: hm_* (N, C, h, w), emb_*, off_*, on CPU

Runs on onnxruntime's CUDA provider for a CUDA device when the installed onnxruntime has it (onnxruntime-gpu),
otherwise on its CPU provider.
"""
import json
import reprlib
import warnings
from pathlib import Path

import numpy as np
import torch

from datasets.transforms import MIN_TEST_INPUT
from utils.checkpoint import check_regular_file
from utils.checks import are_distinct_ids
from utils.errors import ArgumentError, CheckpointError

METADATA_KEY = "centernet47"  # the metadata entry tools/export_onnx.py writes and this class reads


def is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_size(value) -> bool:
    return is_whole(value) and value >= 1


def is_strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# What each entry of the metadata must be (a test and its description); the optional ones may also be absent (files
# exported before they were stored) or, for category_ids, null.
METADATA_FIELDS = {
    "arch": (lambda v: isinstance(v, str), "a string"),
    "class_names": (is_strings, "a list of strings"),
    "img_size": (is_size, "a whole number of at least 1"),
    "size_unit": (is_size, "a whole number of at least 1"),
    "max_size": (is_size, "a whole number of at least 1"),
    "dynamic": (lambda v: isinstance(v, bool), "true or false"),
    "outputs": (is_strings, "a list of output names"),
}
OPTIONAL_FIELDS = {
    # ids past 64 bits failed at the first image, where they become an int64 array
    "category_ids": (lambda v: v is None or isinstance(v, list) and are_distinct_ids(v),
                     "a list of whole numbers that fit 64 bits, none twice"),
    "corner_pool": (lambda v: isinstance(v, str), "a string"),
    "center_branch": (lambda v: isinstance(v, str), "a string"),
}


def read_metadata(path: Path, text: str) -> dict:
    """The METADATA_KEY json of the file `path`, each entry checked against METADATA_FIELDS; a CheckpointError
    naming the file and the entry otherwise (the metadata is text anyone can edit)."""
    def malformed(detail: str) -> CheckpointError:
        return CheckpointError(f"{path}: its '{METADATA_KEY}' metadata is malformed ({detail}); export it again with "
                               "tools/export_onnx.py")

    try:
        info = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; nesting past Python's limit
        raise malformed(f"not json: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(info, dict):
        raise malformed(f"a json {type(info).__name__}, not an object")
    missing = [key for key in METADATA_FIELDS if key not in info]
    if missing:
        raise malformed(f"no '{missing[0]}'")
    for key, (valid, expected) in {**METADATA_FIELDS, **OPTIONAL_FIELDS}.items():
        if key in info and not valid(info[key]):
            raise malformed(f"'{key}' is {reprlib.repr(info[key])}, expected {expected}")
    return info


class OnnxModel:
    """Callable (N, 3, H, W) -> dict of CPU float32 tensors. Attributes from the file's metadata: arch,
    class_names, category_ids, img_size, size_unit, dynamic, max_size, output_keys, corner_pool, center_branch
    (files exported before the variants existed are centernet's)."""

    def __init__(self, path: str | Path, device: torch.device, threads: int = 0):
        import onnxruntime as ort

        path = Path(path)
        check_regular_file(path, "ONNX file", "; expected an .onnx file of tools/export_onnx.py")
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
            raise CheckpointError(f"{path}: onnxruntime cannot load it as an ONNX model ({str(e).splitlines()[0]})") \
                from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise CheckpointError(f"{path} is an ONNX model without the '{METADATA_KEY}' metadata (classes, input "
                                  "sizes) that tools/export_onnx.py writes; export the checkpoint with it")
        self.path = path
        info = read_metadata(path, meta[METADATA_KEY])
        self.arch, self.class_names, self.img_size = info["arch"], info["class_names"], info["img_size"]
        self.size_unit, self.dynamic = info["size_unit"], info["dynamic"]
        self.max_size, self.outputs = info["max_size"], info["outputs"]
        self.category_ids = info.get("category_ids")  # None in files exported before they were stored
        self.output_keys = tuple(self.outputs)
        self.corner_pool = info.get("corner_pool", "cascade")
        self.center_branch = info.get("center_branch", "pool")
        graph_outputs = [o.name for o in self.session.get_outputs()]
        missing = [name for name in self.outputs if name not in graph_outputs]
        if missing:
            raise CheckpointError(f"{path}: its '{METADATA_KEY}' metadata names outputs {missing} that the network "
                                  f"does not have (it has {graph_outputs}); export it again with tools/export_onnx.py")
        # The heatmaps have one channel per class: metadata naming another number of classes would index past them.
        channels = {o.name: o.shape[1] for o in self.session.get_outputs() if o.name.startswith("hm_")}
        wrong = {name: c for name, c in channels.items() if isinstance(c, int) and c != len(self.class_names)}
        if wrong:
            name, count = next(iter(wrong.items()))
            raise CheckpointError(f"{path}: its metadata names {len(self.class_names)} classes, but the network's "
                                  f"{name} output has {count} class channels; export it again with "
                                  "tools/export_onnx.py")
        if self.category_ids is not None and len(self.category_ids) != len(self.class_names):
            raise CheckpointError(f"{path}: its metadata has {len(self.category_ids)} category ids for "
                                  f"{len(self.class_names)} classes; export it again with tools/export_onnx.py")
        self.providers = self.session.get_providers()

    def __getstate__(self):
        raise TypeError(f"{self.path}: an onnxruntime session cannot be pickled (sent to a process started by spawn or "
                        "forkserver, a DataLoader worker of theirs included): make the Detector in that process, "
                        "e.g. in the Pool's initializer or the DataLoader's worker_init_fn")

    training = False  # inference only; eval() and train(False) are accepted as for an nn.Module

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        if mode:
            raise RuntimeError(f"{self.path}: an exported network cannot be trained")
        return self

    def require_dynamic(self, inputs: str) -> None:
        """A clear error (ArgumentError: the file does not fit the use) before any work unless the file takes the
        test inputs of images of any size (padded to the next 128k - 1 by datasets.transforms.eval_input): `inputs`
        names what has other sizes."""
        if not self.dynamic:
            raise ArgumentError(f"{self.path} takes {self.img_size} x {self.img_size} inputs only; {inputs} need "
                                "other sizes: export it with --dynamic")
        if self.max_size < MIN_TEST_INPUT:
            raise ArgumentError(f"{self.path} was exported with --max_size {self.max_size}, below the smallest "
                                f"test input ({MIN_TEST_INPUT}): export it again with a larger --max_size")

    def fit_scale(self, height: int, width: int, scales: list[float]) -> float:
        """The factor (at most 1) by which the test `scales` of a height x width image shrink so that its largest
        input fits the export: eval_input pads a side to the next 128k - 1, which must not exceed max_size."""
        largest = (self.max_size + 1) // 128 * 128 - 1
        return min(1.0, largest / (max(height, width) * max(scales)))

    def check_size(self, height: int, width: int) -> None:
        """A clear error for input sizes the file does not take (the network's own rule, and the export's)."""
        if self.dynamic:
            if (height + 1) % self.size_unit or (width + 1) % self.size_unit:
                raise ArgumentError(f"{self.path}: input height and width must be of the form k * {self.size_unit} - 1,"
                                 f" got {height} x {width}")
            if max(height, width) > self.max_size:
                raise ArgumentError(f"{self.path} was exported for inputs up to {self.max_size} pixels, got "
                                 f"{height} x {width}; export again with a larger --max_size")
        elif (height, width) != (self.img_size, self.img_size):
            raise ArgumentError(f"{self.path} takes {self.img_size} x {self.img_size} inputs only, got {height} x "
                             f"{width}; export it with --dynamic for images of other sizes")

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_size(*images.shape[-2:])
        feed = {"image": np.ascontiguousarray(images.detach().float().cpu().numpy())}
        return {k: torch.from_numpy(v) for k, v in zip(self.outputs, self.session.run(self.outputs, feed))}
