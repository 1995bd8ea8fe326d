"""The library as a program embeds it: nothing below the command lines ends the program (SystemExit); errors are
exceptions of utils.errors that `except Exception` (and the builtin kind) catches, with messages for a Python user;
arguments are checked when a Detector is made; image arrays in any layout a file may have are read as files are."""
import ast
import json
import math
import os
import re
import socket
import zlib
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import onnx
import PIL.Image
import pytest
import torch
from onnx import TensorProto, helper

import datasets.transforms as transforms
import demo
from datasets.coco import CocoDetection
from datasets.image_io import load_image
import test as test_cli
from engine import Detector
from engine.inference import InferenceConfig, parse_scales
from nets import build_model
from utils.checkpoint import save_checkpoint
from utils.device import select_device
from utils.errors import ArgumentError, CheckpointError, DataError, DeviceError, MissingFileError, UserError

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ["engine", "datasets", "nets", "utils", "lib"]
# The command lines' own way out, kept in utils so that every script shares it.
CLI_EXITS = {("utils/errors.py", "run_cli"), ("utils/errors.py", "_terminated")}
EXITS = {"exit", "quit", "sys.exit", "os._exit", "SystemExit"}


def exits_in(source: str, relative: str) -> list[str]:
    """`file:line code` of each SystemExit raised, or exit function called, in the `source` of file `relative`,
    outside an `if __name__ == "__main__":` block and the functions of CLI_EXITS."""
    tree, found = ast.parse(source), {}  # by line: `raise SystemExit(...)` is a raise and a call

    def visit(node, function: str | None):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        target = node.exc if isinstance(node, ast.Raise) else node.func if isinstance(node, ast.Call) else None
        if isinstance(target, ast.Call):
            target = target.func
        if target is not None and ast.unparse(target) in EXITS and (relative, function) not in CLI_EXITS:
            found.setdefault(node.lineno, f"{relative}:{node.lineno} {ast.unparse(node)}")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return [found[line] for line in sorted(found)]


def test_no_module_below_the_scripts_ends_the_program():
    files = [p for package in LIBRARY for p in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 30
    assert [hit for path in files for hit in exits_in(path.read_text(), path.relative_to(REPO).as_posix())] == []


def test_the_scan_finds_each_way_out():
    sample = ("import sys\ndef f():\n    raise SystemExit('x')\ndef g():\n    sys.exit(1)\ndef h():\n    exit()\n"
              "def run_cli():\n    raise SystemExit\nif __name__ == '__main__':\n    sys.exit(f())\n")
    assert [hit.split(" ")[0] for hit in exits_in(sample, "utils/sample.py")] == [
        "utils/sample.py:3", "utils/sample.py:5", "utils/sample.py:7", "utils/sample.py:9"]
    assert [hit.split(" ")[0] for hit in exits_in(sample, "utils/errors.py")] == [
        "utils/errors.py:3", "utils/errors.py:5", "utils/errors.py:7"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("api") / "checkpoint.pt"
    save_checkpoint(path, {"model": build_model("tiny_hourglass", 1).state_dict(), "class_names": ["thing"],
                           "category_ids": [1], "args": {"arch": "tiny_hourglass", "img_size": 127}})
    return path


def onnx_without_metadata(path: Path) -> Path:
    """A valid ONNX model (one Identity node) that tools/export_onnx.py did not write."""
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["out"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 127, 127])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 127, 127])])
    onnx.save(helper.make_model(graph), path)
    return path


def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("case, kind, message", [
    ("cuda without a GPU", DeviceError, "device cuda: no CUDA device is visible"),
    ("missing .onnx", MissingFileError, "ONNX file not found: .*nowhere.onnx"),
    ("random bytes named .onnx", CheckpointError, "random.onnx: onnxruntime cannot load it as an ONNX model"),
    ("ONNX without our metadata", CheckpointError, "plain.onnx is an ONNX model without the 'centernet47' metadata"),
    ("missing checkpoint", MissingFileError, "checkpoint not found: .*nowhere.pt"),
    ("a folder named .onnx", CheckpointError, "folder.onnx is a folder, not a file"),  # was an ArgumentError
    ("a FIFO named .onnx", CheckpointError, r"fifo\.onnx is not a regular file"),  # was 'not found'
])
def test_detector_errors_are_exceptions_a_program_catches(ckpt, tmp_path, monkeypatch, case, kind, message):
    (tmp_path / "random.onnx").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "folder.onnx").mkdir()
    os.mkfifo(tmp_path / "fifo.onnx")
    path = {"cuda without a GPU": ckpt, "missing .onnx": tmp_path / "nowhere.onnx",
            "random bytes named .onnx": tmp_path / "random.onnx",
            "ONNX without our metadata": onnx_without_metadata(tmp_path / "plain.onnx"),
            "missing checkpoint": tmp_path / "nowhere.pt", "a folder named .onnx": tmp_path / "folder.onnx",
            "a FIFO named .onnx": tmp_path / "fifo.onnx"}[case]
    no_gpu(monkeypatch)
    with pytest.raises(Exception) as caught:  # what a service catches; a SystemExit would pass through it
        Detector.from_checkpoint(path, device="cuda" if case == "cuda without a GPU" else "cpu")
    assert isinstance(caught.value, kind) and isinstance(caught.value, UserError)
    assert re.search(message, str(caught.value)), str(caught.value)
    assert "--" not in str(caught.value), "a message for a Python user names no command-line flag"


def test_devices_by_name_index_and_torch_device(monkeypatch):
    assert select_device(torch.device("cpu")) == select_device(torch.device("cpu", 0)) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("cuda:1") == select_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="device cuda:2: this process sees 2 CUDA device"):
        select_device("cuda:2")
    for bad in ("gpu", "cuda:x", "cuda:-1", "cpu:1", torch.device("meta"), 0, None):
        with pytest.raises(ArgumentError, match="device: expected auto, cpu, cuda or cuda:N, as a string or a "
                                                "torch.device, got"):
            select_device(bad)


@pytest.mark.parametrize("name, value, message", [
    ("score_thresh", math.nan, r"score_thresh: expected a number in \[0, 1\], got nan"),
    ("score_thresh", 1.5, "score_thresh"), ("score_thresh", -0.1, "score_thresh"), ("score_thresh", "0.3", "got '0.3'"),
    ("batch_size", 0, "batch_size: expected a whole number of at least 1"), ("batch_size", 2.5, "batch_size"),
    ("batch_size", True, "batch_size"),
    ("test_scales", "1", "test_scales: expected a number or a sequence"), ("test_scales", [], "test_scales"),
    ("test_scales", (0, 1), r"test_scales: expected a number in \(0, 8\], got 0"),
    ("test_scales", (1, math.inf), "test_scales"), ("test_scales", [math.nan], "test_scales"),
    ("test_scales", (1, 0.5, 1.0), r"test_scales: scale 1 is given more than once in 1,0.5,1;"),
    ("test_flip", "yes", "test_flip: expected True or False"), ("amp", 1, "amp: expected True or False"),
    ("device", "gpu", "device: expected auto, cpu, cuda"),
])
def test_api_arguments_are_checked_when_the_detector_is_made(tmp_path, name, value, message):
    """Before the file is read: the path given does not exist (test_flip and amp were checked after reading)."""
    with pytest.raises(ArgumentError, match=message):
        Detector.from_checkpoint(tmp_path / "absent.pt", **{"device": "cpu", name: value})


def test_api_arguments_in_their_range_are_taken(ckpt):
    detector = Detector.from_checkpoint(ckpt, device=torch.device("cpu"), test_scales=0.75, score_thresh=np.float32(1),
                                        batch_size=np.int64(2))
    assert detector.test_scales == [0.75] and detector.score_thresh == 1 and detector.batch_size == 2


@pytest.mark.parametrize("field, value", [("nms_threshold", math.nan), ("nms_threshold", 0), ("ae_threshold", -1),
                                          ("ae_threshold", math.inf), ("weight_exp", math.nan), ("sigma", 0),
                                          ("score_threshold", 2), ("topk", 0), ("topk", 1001), ("kernel", 4), ("nms_method", 3),
                                          ("merge", "yes"), ("max_per_image", 1.5)])
def test_inference_settings_that_cannot_work_are_refused(field, value):
    with pytest.raises(ArgumentError, match=f"{field}: expected"):
        InferenceConfig(**{field: value})


def png_of(array: np.ndarray, path: Path) -> np.ndarray:
    assert cv2.imwrite(str(path), array)
    return load_image(path)


@pytest.mark.parametrize("layout", ["gray", "gray (H, W, 1)", "BGRA", "16-bit BGR", "16-bit gray", "16-bit BGRA"])
def test_image_arrays_are_read_as_files_of_them_are(ckpt, tmp_path, layout):
    """Each layout gives the pixels, and so the detections, of the same image written as a PNG and read back."""
    rng = np.random.default_rng(1)
    dtype, high = (np.uint16, 65536) if layout.startswith("16-bit") else (np.uint8, 256)
    shape = {"gray": (40, 50), "gray (H, W, 1)": (40, 50, 1), "BGRA": (40, 50, 4), "16-bit BGR": (40, 50, 3),
             "16-bit gray": (40, 50), "16-bit BGRA": (40, 50, 4)}[layout]
    array = rng.integers(0, high, shape, dtype=dtype)
    from_file = png_of(array, tmp_path / "image.png")
    detector = Detector.from_checkpoint(ckpt, device="cpu")
    np.testing.assert_array_equal(detector.read(array), from_file)
    np.testing.assert_array_equal(detector(array).rows(), detector(tmp_path / "image.png").rows())


def test_images_that_cannot_be_read_are_clear_errors(ckpt, tmp_path):
    detector = Detector.from_checkpoint(ckpt, device="cpu")
    with pytest.raises(ArgumentError, match=r"no pixels \(shape \(0, 50, 3\)\)"):
        detector(np.zeros((0, 50, 3), np.uint8))
    with pytest.raises(ArgumentError, match=r"shape \(20, 30, 2\) and dtype uint8"):
        detector(np.zeros((20, 30, 2), np.uint8))
    with pytest.raises(ArgumentError, match="dtype float32"):
        detector(np.zeros((20, 30, 3), np.float32))
    with pytest.raises(ArgumentError, match=r"shape \(2, 20, 30, 3\).*a Detector takes a list of them: list\(images\)"):
        detector(np.zeros((2, 20, 30, 3), np.uint8))
    with pytest.raises(ArgumentError, match=r"shape \(3, 20, 30\).*channels come last"):
        detector(np.zeros((3, 20, 30), np.uint8))
    with pytest.raises(DataError, match=f"{tmp_path} is a folder, not an image file"):
        detector(tmp_path)


def test_other_image_objects_are_refused_naming_the_colour_order_and_any_path_object_is_read(ckpt, tmp_path):
    """A PIL image or a tensor is refused with the layout and colour order expected; the conversion the message
    gives a PIL image (which is RGB) yields the detections of its file, where np.asarray alone would silently
    feed RGB. Any os.PathLike is a path: a PurePath was refused as not an image."""
    array = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    assert cv2.imwrite(str(path), array)
    detector = Detector.from_checkpoint(ckpt, device="cpu")
    with PIL.Image.open(path) as image:
        with pytest.raises(ArgumentError, match=re.escape(
                "numpy array in BGR order ((H, W, 3) uint8, as cv2.imread gives) or an image path, got PngImageFile; "
                "a PIL image is RGB: pass np.asarray(image.convert('RGB'))[:, :, ::-1]")):
            detector(image)
        converted = np.asarray(image.convert("RGB"))[:, :, ::-1]
    np.testing.assert_array_equal(converted, array)
    np.testing.assert_array_equal(detector(converted).rows(), detector(path).rows())
    with pytest.raises(ArgumentError, match=r"numpy array in BGR order .* got Tensor$"):
        detector(torch.from_numpy(array))
    np.testing.assert_array_equal(detector(PurePosixPath(path)).rows(), detector(path).rows())


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height 8-bit gray pixels, followed by a few bytes of zeros: what a
    decompression bomb (a few hundred KB of deflated zeros) shows before its first pixel is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000)))
                     + chunk(b"IEND", b""))
    return path


def test_image_files_that_would_fill_the_memory_or_block_are_refused(tmp_path, monkeypatch):
    """A 20000 x 20000 PNG is refused from its header (decoded, it took 2.9 GB of memory before the network saw
    it); a device, or a file over 1 GiB, is refused before it is read (/dev/zero would be read until the memory
    runs out, the file whole into memory); a file the process may not read is a DataError naming it (it was a
    PermissionError traceback)."""
    with pytest.raises(DataError, match=r"bomb\.png: the image has 400000000 pixels by its header"):
        load_image(png_header_only(tmp_path / "bomb.png", 20000, 20000))
    with pytest.raises(DataError, match=r"over\.png: the image has 134217729 pixels by its header, more than the "
                                        r"134217728 read"):  # one over the limit
        load_image(png_header_only(tmp_path / "over.png", 2**27 + 1, 1))
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(2**30 + 1)  # sparse: nothing written, 1 GiB read
    with pytest.raises(DataError, match=r"huge\.png: a file of 1073741825 bytes, more than the 1073741824"):
        load_image(huge)
    device = tmp_path / "zero.png"
    device.symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"zero\.png: a device or socket, not an image file"):
        load_image(device)  # read, it would fill the memory
    image = tmp_path / "locked.png"
    assert cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))

    def refused(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refused)  # chmod 000 does not stop root, who may run the tests
    with pytest.raises(DataError, match=r"locked\.png: cannot read the image file \(Permission denied\)"):
        load_image(image)


def memory_filling_files(folder: Path) -> dict[str, str]:
    """{file name: what its refusal says} of the image files that would fill the memory, made in `folder`."""
    folder.mkdir(exist_ok=True)
    (folder / "zero.png").symlink_to("/dev/zero")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(folder / "sock.png"))
    with open(folder / "huge.png", "wb") as f:
        f.truncate(2**30 + 1)
    png_header_only(folder / "bomb.png", 20000, 20000)
    return {"zero.png": "a device or socket, not an image file", "sock.png": "a device or socket, not an image file",
            "huge.png": "a file of 1073741825 bytes, more than",
            "bomb.png": "the image has 400000000 pixels by its header"}


def test_every_image_reader_refuses_files_that_would_fill_the_memory(ckpt, tmp_path, capsys):
    """README: such a file given to Detector, demo.py and the data loader is a DataError naming it (load_image is
    what each of them reads with); demo.py skips and lists it, with an image whose test input is too large (a device
    or socket in a folder was passed over without a word)."""
    refusals = memory_filling_files(tmp_path / "in")
    detector = Detector.from_checkpoint(ckpt, device="cpu")
    for name, message in refusals.items():
        with pytest.raises(DataError, match=rf"in/{re.escape(name)}: {message}"):
            detector(tmp_path / "in" / name)

    assert cv2.imwrite(str(tmp_path / "in" / "thin.png"), np.zeros((200000, 1, 3), np.uint8))
    assert cv2.imwrite(str(tmp_path / "in" / "good.png"), np.zeros((40, 50, 3), np.uint8))
    (tmp_path / "in" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a broken link was passed over in silence
    written = demo.main(demo.get_args_parser().parse_args(["--ckpt", str(ckpt), "--images", str(tmp_path / "in"),
                                                           "--out", str(tmp_path / "out"), "--device", "cpu"]))
    assert sorted(Path(path).name for path in written["skipped"]) == sorted([*refusals, "thin.png", "gone.png"])
    assert [Path(image["file"]).name for image in written["images"]] == ["good.png"]
    err = capsys.readouterr().err
    for name, message in refusals.items():
        assert f"skipped: {tmp_path / 'in' / name}: {message}" in err
    assert f"skipped: {tmp_path / 'in' / 'thin.png'}: an image of 1 x 200000 pixels at test scale 1 makes a network " \
           "input of 127 x 200063 pixels" in err

    names = sorted(refusals)
    data = {"images": [{"id": i + 1, "file_name": name} for i, name in enumerate(names)],
            "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_in.json").write_text(json.dumps(data))
    dataset = CocoDetection(tmp_path, "in", train=False)
    for i, name in enumerate(names):
        with pytest.raises(DataError, match=rf"in/{re.escape(name)}: {refusals[name]}"):
            dataset.load(i)


def test_an_image_whose_test_input_is_too_large_is_refused_before_the_forward(ckpt, monkeypatch):
    """The padding to 128k - 1 makes a 1 x 200000 image a 127 x 200063 input (25 M pixels; 1 x 100000 took 3.8 GB
    for tiny_hourglass), and a 20000 x 20000 array at scale 1 one of 404 M pixels: each is an ArgumentError naming
    the image's size, the scale and the input's size, before anything of that size is allocated: the detector is
    given both. Its scales and demo.py's check (`check_size`) are then tried with the limit lowered."""
    with pytest.raises(ArgumentError, match=r"1 x 200000 pixels at test scale 1 makes a network input of 127 x "
                                            r"200063 pixels"):
        transforms.check_input_size(1, 200000, 1.0)
    with pytest.raises(ArgumentError, match="20000 x 20000 pixels at test scale 0.5"):
        transforms.check_input_size(20000, 20000, 0.5)
    transforms.check_input_size(511, 511, 8.0)  # COCO's images at the largest test scale fit
    detector = Detector.from_checkpoint(ckpt, device="cpu")
    with pytest.raises(ArgumentError, match=r"^an image of 1 x 200000 pixels at test scale 1 makes a network input of "
                                            r"127 x 200063 pixels"):
        detector(np.zeros((200000, 1, 3), np.uint8))
    with pytest.raises(ArgumentError, match=r"^an image of 20000 x 20000 pixels at test scale 1 makes a network input "
                                            r"of 20095 x 20095 pixels"):
        detector(np.zeros((20000, 20000, 3), np.uint8))  # zeros: pages the refusal never touches take no memory
    monkeypatch.setattr(transforms, "MAX_INPUT_PIXELS", 127 * 383, raising=False)
    detector = Detector.from_checkpoint(ckpt, device="cpu", test_scales=(1.0, 2.0))
    thin = np.zeros((1, 300, 3), np.uint8)  # 127 x 383 at scale 1, 127 x 639 at scale 2
    with pytest.raises(ArgumentError, match="an image of 300 x 1 pixels at test scale 2 makes a network input of "
                                            "639 x 127 pixels"):
        detector.check_size(thin)
    with pytest.raises(ArgumentError, match="300 x 1 pixels at test scale 2"):
        detector(thin)
    found = Detector.from_checkpoint(ckpt, device="cpu")(thin)  # at scale 1 it fits: detected, not refused
    assert found.boxes.shape == (len(found), 4) and (found.boxes[:, [2, 3]] <= [300, 1]).all()


def test_a_checkpoint_path_that_is_a_folder_or_fifo_is_named_as_such(tmp_path):
    """test.py --ckpt FOLDER said `checkpoint not found`, as if nothing were there."""
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path} is a folder, not a file"):
        test_cli.main(test_cli.get_args_parser().parse_args(["--ckpt", str(tmp_path), "--device", "cpu"]))
    with pytest.raises(CheckpointError, match=r"fifo\.pt is not a regular file"):
        Detector.from_checkpoint(fifo, device="cpu")


def test_a_test_scale_given_twice_is_refused():
    """`--test_scales 1,1` ran the same forward twice and doubled its boxes, which turned box merging on."""
    with pytest.raises(ArgumentError, match=r"--test_scales: scale 1 is given more than once in 1,1;"):
        parse_scales("1,1")
    with pytest.raises(ArgumentError, match="scale 0.5 is given more than once"):
        parse_scales("0.5,1,0.50")
    assert parse_scales("0.5,1,1.5") == [0.5, 1.0, 1.5]
    for scales in ("8.5", "1,nan", "0"):  # README: the Detector's range, (0, 8], for test.py's and demo.py's flag too
        with pytest.raises(ArgumentError, match=r"--test_scales: expected a number in \(0, 8\]"):
            parse_scales(scales)
    assert parse_scales("8") == [8.0]


def test_an_image_of_a_list_that_cannot_be_detected_is_named_by_its_position(ckpt, monkeypatch):
    """cv2.imread gives None for a file it cannot read: in a list of its results, the error said `got NoneType`,
    leaving the user to find which one; so for an array of another shape or one too large to test."""
    detector = Detector.from_checkpoint(ckpt, device="cpu", batch_size=2)
    image = np.zeros((40, 50, 3), np.uint8)
    with pytest.raises(ArgumentError, match=r"^images\[3\]: expected a numpy array .* got NoneType; cv2.imread gives "
                                            r"None for a file it cannot read$"):
        detector([image, image, image, None])
    with pytest.raises(ArgumentError, match=r"^images\[1\]: expected a \(H, W, 3\) BGR.* shape \(3, 40, 50\)"):
        detector((image, image.transpose(2, 0, 1)))
    monkeypatch.setattr(transforms, "MAX_INPUT_PIXELS", 127 * 127, raising=False)
    with pytest.raises(ArgumentError, match=r"^images\[2\]: an image of 200 x 40 pixels at test scale 1"):
        detector([image, image, np.zeros((40, 200, 3), np.uint8)])
    with pytest.raises(ArgumentError, match=r"^expected a numpy array .* got NoneType; cv2.imread gives None"):
        detector(None)  # one image alone: no position
