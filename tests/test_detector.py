"""engine.Detector, the Python API: for an image path, a numpy image and a list of them it gives the detections of
test.py's pipeline (the evaluation sample of datasets.coco through engine.inference.detect), and an exported .onnx
file gives those of its checkpoint."""
import copy
import json
import multiprocessing
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.coco import CocoDetection
from datasets.coco_eval import detections_to_coco
from datasets.image_io import load_image
from engine import Detections, Detector
from engine.inference import detect, network_for, official_config
from nets import build_model, model_config
from tests.test_demo import same_detections
from tests.test_export_onnx import peaked_tiny
from tools import export_onnx
from utils.checkpoint import save_checkpoint
from utils.errors import ArgumentError, CheckpointError, MissingFileError

RACCOON = Path(__file__).parent / "data" / "raccoon"
CLASSES = ["raccoon"]
CATEGORY_IDS = [7]  # the data set's id of the class, not its index
SIZES = {"raccoon-102.jpg": (194, 259), "raccoon-148.jpg": (375, 500), "raccoon-166.jpg": (154, 328),
         "raccoon-198.jpg": (194, 259)}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A checkpoint of an untrained tiny_hourglass with distinct scores, and the network."""
    model = peaked_tiny(len(CLASSES), seed=1)
    ckpt = tmp_path_factory.mktemp("detector") / "checkpoint.pt"
    save_checkpoint(ckpt, {"model": model.state_dict(), "class_names": CLASSES, "category_ids": CATEGORY_IDS,
                           "args": {"arch": "tiny_hourglass", "img_size": 127}})
    return ckpt, model


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory) -> Path:
    """The `tiny` checkpoint exported with dynamic input sizes."""
    path = tmp_path_factory.mktemp("detector_onnx") / "tiny.onnx"
    export_onnx.main(export_onnx.get_args_parser().parse_args(
        ["--ckpt", str(tiny[0]), "--out", str(path), "--dynamic", "--max_size", "511"]))
    return path


def rows_of(found: list[Detections]) -> list[tuple]:
    """(image index, box, score) of every detection, for same_detections."""
    return [(i, box, float(score)) for i, f in enumerate(found) for box, score in zip(f.boxes, f.scores)]


def test_path_array_and_list_give_the_test_py_detections(tiny):
    ckpt, model = tiny
    scales = (0.5, 1.0)
    dataset = CocoDetection(RACCOON, "val", train=False, img_size=127, test_scales=scales, test_flip=True)
    index = {im["file_name"]: i for i, im in enumerate(dataset.images)}
    # test.py's detections (on the CPU it runs the prepared network) of two images of different sizes: each is one
    # forward per scale in both pipelines, so the same float32 operations on the same inputs give the same bits.
    names = ["raccoon-102.jpg", "raccoon-148.jpg"]
    network = network_for(model, CPU)
    expected = [detect(network, dataset[index[name]]["inputs"], official_config(len(scales)), CPU) for name in names]
    assert all(len(e) > 10 for e in expected)

    detector = Detector.from_checkpoint(ckpt, device="cpu", test_flip=True, test_scales=scales)
    assert detector.class_names == CLASSES and detector.config.merge  # several scales: the official merging
    paths = [RACCOON / "val" / name for name in names]
    by_path, by_str = detector(paths[0]), detector(str(paths[0]))
    by_array = detector(load_image(paths[0]))
    listed = detector([paths[0], load_image(paths[1])])
    assert isinstance(listed, list) and len(listed) == 2
    for found, k in [(by_path, 0), (by_str, 0), (by_array, 0), (listed[0], 0), (listed[1], 1)]:
        want, (h, w) = expected[k], SIZES[names[k]]
        np.testing.assert_array_equal(found.rows(), want)
        assert found.boxes.shape == (len(want), 4) and found.scores.shape == found.labels.shape == (len(want),)
        assert found.boxes.dtype == found.scores.dtype == np.float32 and found.labels.dtype == np.int64
        assert found.names == ["raccoon"] * len(want) and len(found) == len(want)
        assert found.category_ids.tolist() == [7] * len(want)
        assert (found.boxes >= 0).all() and (found.boxes[:, [0, 2]] <= w).all() and (found.boxes[:, [1, 3]] <= h).all()


def test_labels_name_their_classes():
    rows = np.array([[1, 2, 30, 40, 0.75, 2], [5, 6, 7, 8, 0.5, 0]], np.float32)  # x1 y1 x2 y2 score label
    found = Detections.from_rows(rows, ["cat", "dog", "fox"])
    assert found.names == ["fox", "cat"] and found.labels.tolist() == [2, 0] and found.scores.tolist() == [0.75, 0.5]
    assert found.boxes.tolist() == [[1, 2, 30, 40], [5, 6, 7, 8]]
    np.testing.assert_array_equal(found.rows(), rows)


def test_a_batch_gives_the_detections_of_single_images_and_the_threshold_applies(tiny):
    """The first and last photos have one size and share a forward: float32 convolutions of a batch of two round
    differently from those of one image (~1e-6 of the scores), far below the gaps between the peaked net's scores,
    so the same boxes come out up to that rounding."""
    ckpt, _ = tiny
    images = [load_image(RACCOON / "val" / name) for name in ("raccoon-102.jpg", "raccoon-166.jpg", "raccoon-198.jpg")]
    settings = {"device": "cpu", "test_flip": True, "test_scales": (0.5, 1)}
    single = Detector.from_checkpoint(ckpt, batch_size=1, **settings)
    batched = Detector.from_checkpoint(ckpt, batch_size=3, **settings)
    one_by_one = [single(image) for image in images]
    assert len(one_by_one[0]) > 10 and len(one_by_one[2]) > 10
    assert same_detections(rows_of(batched(images)), rows_of(one_by_one), box_tol=1e-3, score_tol=1e-5)

    threshold = float(np.median(one_by_one[0].scores))
    kept = Detector.from_checkpoint(ckpt, score_thresh=threshold, **settings)(images[0])
    np.testing.assert_array_equal(kept.rows(), one_by_one[0].rows()[one_by_one[0].scores >= threshold])


def test_a_list_is_read_one_batch_at_a_time(tiny, monkeypatch):
    """A list of paths holds at most `batch_size` decoded images at a time, in order: all of them were read before
    the first forward (200 paths of a 1920 x 1080 JPEG grew the process by 1.19 GB)."""
    ckpt, _ = tiny
    detector = Detector.from_checkpoint(ckpt, device="cpu", batch_size=3)
    events = []
    read, detect_rows = detector.read, detector.detect_rows
    monkeypatch.setattr(detector, "read", lambda image: events.append(("read", image.name)) or read(image))
    monkeypatch.setattr(detector, "detect_rows", lambda arrays: events.append(("forward", len(arrays)))
                        or detect_rows(arrays))
    names = ["raccoon-102.jpg", "raccoon-148.jpg", "raccoon-166.jpg", "raccoon-198.jpg"]
    found = detector([RACCOON / "val" / name for name in names])
    assert events == [("read", names[0]), ("read", names[1]), ("read", names[2]), ("forward", 3),
                      ("read", names[3]), ("forward", 1)]
    assert same_detections(rows_of(found), rows_of([detector(RACCOON / "val" / name) for name in names]),
                           box_tol=1e-3, score_tol=1e-5)


def test_a_callers_autocast_region_does_not_change_the_detections(tiny):
    """Detector(amp=False) runs in float32 inside a bf16 autocast region of the calling program too (its network's
    head convolutions ran in bf16 there: 32 detections of this image instead of 27)."""
    ckpt, _ = tiny
    detector = Detector.from_checkpoint(ckpt, device="cpu", test_flip=True, test_scales=(0.5, 1))
    image = load_image(RACCOON / "val" / "raccoon-102.jpg")
    alone = detector(image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = detector(image)
    assert len(alone) > 10
    np.testing.assert_array_equal(inside.rows(), alone.rows())


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Constant folding")
def test_an_exported_onnx_file_gives_the_checkpoint_detections(tiny, tiny_onnx):
    ckpt, _ = tiny
    onnx_path = tiny_onnx
    photos = [RACCOON / "val" / name for name in ("raccoon-102.jpg", "raccoon-148.jpg")]
    from_pt = Detector.from_checkpoint(ckpt, device="cpu", test_flip=True)(photos)
    onnx_detector = Detector.from_checkpoint(onnx_path, device="cpu", test_flip=True)
    from_onnx = onnx_detector(photos)
    assert onnx_detector.class_names == CLASSES and sum(len(f) for f in from_pt) > 20
    assert onnx_detector.category_ids == CATEGORY_IDS and from_onnx[0].category_ids.tolist() == [7] * len(from_onnx[0])
    # onnxruntime sums the convolutions in another order: outputs within ~1e-5 of their scale
    # (tests/test_export_onnx.py), so boxes within 1e-2 pixel and scores within 1e-5.
    assert same_detections(rows_of(from_onnx), rows_of(from_pt), box_tol=1e-2, score_tol=1e-5)


def test_bad_input_names_the_problem(tiny, tmp_path):
    ckpt, _ = tiny
    detector = Detector.from_checkpoint(ckpt, device="cpu")
    with pytest.raises(ValueError, match=r"expected a \(H, W, 3\) BGR, .* shape \(20, 30, 2\)"):
        detector(np.zeros((20, 30, 2), np.uint8))
    with pytest.raises(ValueError, match="dtype float32"):
        detector(np.zeros((20, 30, 3), np.float32))
    with pytest.raises(MissingFileError, match="nowhere.jpg"):
        detector([RACCOON / "val" / "raccoon-102.jpg", tmp_path / "nowhere.jpg"])
    with pytest.raises(ValueError, match="test_scales"):
        Detector.from_checkpoint(ckpt, device="cpu", test_scales=(0, 1))
    with pytest.raises(ValueError, match=r"test_scales: expected a number in \(0, 8\], got 1000000000.0"):
        Detector.from_checkpoint(ckpt, device="cpu", test_scales=1e9)  # was a cv2.error on the first image
    with pytest.raises(ValueError, match="batch_size"):
        Detector.from_checkpoint(ckpt, device="cpu", batch_size=0)


def test_coco_results_and_json_use_the_category_ids_of_the_data_set():
    """COCO's category ids have gaps: class 2 of ["person", "bicycle", "car"] may be id 3 or, here, 7."""
    rows = np.array([[10.5, 20.25, 30.125, 60, 0.875, 2], [0, 1, 2, 3, 0.5, 0]], np.float32)
    found = Detections.from_rows(rows, ["person", "bicycle", "car"], [1, 2, 7])
    assert found.category_ids.tolist() == [7, 1]
    assert json.dumps(found.to_coco(np.int64(42)))  # an id taken from a numpy array (was not json-serialisable)
    assert found.to_coco(image_id=42) == [
        {"image_id": 42, "category_id": 7, "bbox": [10.5, 20.25, 19.62, 39.75], "score": 0.875},  # 19.625: float32
        {"image_id": 42, "category_id": 1, "bbox": [0.0, 1.0, 2.0, 2.0], "score": 0.5}]
    as_dict = found.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict == {
        "boxes": [[10.5, 20.25, 30.125, 60.0], [0.0, 1.0, 2.0, 3.0]], "scores": [0.875, 0.5], "labels": [2, 0],
        "names": ["car", "person"], "category_ids": [7, 1]}
    for image_id in (3.7, None, "5", True, 2**64):  # 3.7 was image 3, None a TypeError that was no UserError
        with pytest.raises(ArgumentError, match=f"image_id: expected a whole number within 64 bits .*, got "
                                                f"{re.escape(repr(image_id))}$"):
            found.to_coco(image_id)
    without = Detections.from_rows(rows, ["person", "bicycle", "car"])
    assert without.to_dict()["category_ids"] is None
    with pytest.raises(ArgumentError, match="no category ids.*tools/upgrade_checkpoint.py --category_ids"):
        without.to_coco(1)
    empty = Detections.from_rows(np.zeros((0, 6), np.float32), ["a"], [3])
    assert empty.to_coco(1) == [] and empty.to_dict()["boxes"] == []


def test_the_api_writes_the_coco_entries_test_py_writes():
    """Detections.to_coco and test.py's results json (datasets.coco_eval.detections_to_coco) on the same rows:
    identical entries. Its own float32 subtraction differed in the second decimal for 39 of 20000 random boxes."""
    rng = np.random.default_rng(0)
    corners = np.sort(rng.uniform(0, 1000, (20000, 2, 2)), axis=1).reshape(-1, 4)[:, [0, 2, 1, 3]]
    rows = np.concatenate([corners, rng.uniform(0, 1, (20000, 1)), rng.integers(0, 3, (20000, 1))], axis=1)
    rows = rows.astype(np.float32)
    found = Detections.from_rows(rows, ["a", "b", "c"], [1, 5, 9])
    assert found.to_coco(3) == detections_to_coco({3: rows}, [1, 5, 9])


def test_a_checkpoint_that_does_not_fit_its_network_is_refused_with_numbers(tmp_path):
    model = build_model("tiny_hourglass", 1)
    args = {"arch": "tiny_hourglass", "img_size": 127}
    path = tmp_path / "checkpoint.pt"
    cases = [
        ({"model_config": model_config("tiny_hourglass", 1), "class_names": ["a", "b"]},
         "'class_names' lists 2 classes, but the network has 1 class outputs"),
        ({"class_names": ["a", "b"]},  # built from args.arch and the 2 names
         r"branches.0.hm_tl.2.weight has shape \(1, 64, 1, 1\) in the checkpoint, \(2, 64, 1, 1\) in the network"),
        ({"class_names": ["a"], "model": {k: v for k, v in model.state_dict().items() if k != "stem.0.0.weight"}},
         r"stem.0.0.weight \(shape \(32, 3, 7, 7\)\) is missing from the checkpoint"),
        ({"class_names": ["a"], "model": {**model.state_dict(), "extra.bias": torch.zeros(2)}},
         "extra.bias is in the checkpoint but not in the network"),
        ({"class_names": ["a"], "category_ids": [1, 2]}, "expected 'category_ids' to list one whole number per class"),
        ({"class_names": ["a"], "category_ids": [2**64]},  # was an OverflowError at the first image
         r"one whole number per class \(1\), each within 64 bits and none twice, got \[18446744073709551616\]"),
        ({"class_names": ["a", "b"], "category_ids": [3, 3]},  # both classes were category 3 in to_coco
         r"one whole number per class \(2\), each within 64 bits and none twice, got \[3, 3\]"),
    ]
    for entries, message in cases:
        save_checkpoint(path, {"model": model.state_dict(), "args": args, **entries})
        with pytest.raises(CheckpointError, match=message) as refused:
            Detector.from_checkpoint(path, device="cpu")
        assert str(refused.value).startswith(f"{path}: ")  # README: naming the file and the key


@pytest.mark.parametrize("amp, dtype", [(False, None), (True, torch.float16), ("fp16", torch.float16),
                                        ("bf16", torch.bfloat16)])
def test_detection_autocasts_to_the_amp_dtype_it_is_given(monkeypatch, amp, dtype):
    """train.py validates with its --amp_dtype ("bf16" on CUDA must stay bf16: a network trained in bf16 may
    overflow fp16's range). The autocast call is recorded by the dtype it would pick on a GPU."""
    import engine.inference
    from datasets.transforms import eval_input
    from utils.device import amp_dtype

    picked = []

    def recording_autocast(device, amp):
        picked.append(amp_dtype(torch.device("cuda"), amp))
        return torch.autocast("cpu", enabled=False)

    def network(images):  # an eval dict of zeros: no detection, which is not what this test is about
        n, _, h, w = images.shape
        channels = {"hm_tl": 1, "hm_br": 1, "hm_ct": 1, "emb_tl": 1, "emb_br": 1, "off_tl": 2, "off_br": 2,
                    "off_ct": 2}
        return {k: torch.zeros(n, c, (h + 1) // 4, (w + 1) // 4) for k, c in channels.items()}

    monkeypatch.setattr(engine.inference, "autocast", recording_autocast)
    inputs = [eval_input(np.zeros((40, 50, 3), np.uint8), 1.0, True)]
    assert detect(network, inputs, official_config(1), CPU, amp).shape == (0, 6)
    assert picked == [dtype]


def test_a_detector_pickles_and_copies_after_its_first_image(tiny):
    """A Detector given to a spawned process (a Pool's argument, the dataset of a DataLoader's workers) is pickled:
    after its first image this failed with 'Cannot access storage of OpaqueTensorImpl' (its weights packed for
    oneDNN). The copies detect as the original does."""
    ckpt, _ = tiny
    detector = Detector.from_checkpoint(ckpt, device="cpu", test_flip=True, test_scales=(0.5, 1))
    image = load_image(RACCOON / "val" / "raccoon-102.jpg")
    expected = detector(image).rows()
    assert len(expected) > 10
    for copied in (pickle.loads(pickle.dumps(detector)), copy.deepcopy(detector)):
        np.testing.assert_array_equal(copied(image).rows(), expected)
    np.testing.assert_array_equal(detector(image).rows(), expected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Constant folding")
def test_an_onnx_detector_says_what_to_do_instead_of_pickling(tiny_onnx):
    detector = Detector.from_checkpoint(tiny_onnx, device="cpu")
    with pytest.raises(TypeError, match=r"tiny.onnx: an onnxruntime session cannot be pickled .* make the Detector "
                                        r"in that process, e.g. in the Pool's initializer"):
        pickle.dumps(detector)


def test_a_process_forked_after_a_forward_detects_as_its_parent(tiny):
    """GNU OpenMP's threads do not survive a fork: a child forked after the parent's first forward (a Pool of the
    fork start method, a server's preforked workers) waited forever in its own first one. Children run torch on
    one thread, as DataLoader's workers do; the parent's two threads make the hang reproducible on one core."""
    ckpt, _ = tiny
    detector = Detector.from_checkpoint(ckpt, device="cpu", test_flip=True, test_scales=(0.5, 1))
    image = load_image(RACCOON / "val" / "raccoon-102.jpg")
    torch.set_num_threads(2)  # the fixture torch_state_restored sets the count back
    detector(image)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=lambda: results.put((torch.get_num_threads(), detector(image).rows())))
    child.start()
    try:
        threads, found = results.get(timeout=120)  # a hung child sends nothing
    finally:
        child.kill()
        child.join()
    torch.set_num_threads(1)
    expected = detector(image).rows()  # on one thread, as in the child
    assert threads == 1 and len(expected) > 10
    np.testing.assert_array_equal(found, expected)


# the first two of one size: a buffer shared by calls of one shape would mix them
PHOTOS = ["raccoon-102.jpg", "raccoon-198.jpg", "raccoon-148.jpg"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Constant folding")
@pytest.mark.parametrize("backend", ["pt", "onnx"])
def test_threads_sharing_a_detector_get_what_calls_one_at_a_time_get(tiny, tiny_onnx, backend):
    """A service calls one Detector from several threads: each call gets the detections that the same call gets
    alone. The detector starts fresh, so that its first calls (which pack the weights) run side by side too."""
    path = tiny[0] if backend == "pt" else tiny_onnx
    images = [load_image(RACCOON / "val" / name) for name in PHOTOS]
    settings = {"device": "cpu", "test_flip": True, "test_scales": (0.5, 1)}
    alone = [Detector.from_checkpoint(path, **settings)(image).rows() for image in images]
    shared = Detector.from_checkpoint(path, **settings)
    with ThreadPoolExecutor(4) as threads:
        found = list(threads.map(lambda i: (i, shared(images[i]).rows()), [0, 1, 2] * 4))
    assert all(len(rows) > 10 for rows in alone)
    for i, rows in found:
        np.testing.assert_array_equal(rows, alone[i])
