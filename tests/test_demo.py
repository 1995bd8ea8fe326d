"""demo.py end to end: an untrained tiny_hourglass on raccoon photos, small images and a synthetic video."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import demo
import engine.detector
from datasets.image_io import drawing_names, write_image
from datasets.transforms import eval_input
from engine.inference import InferenceConfig, detect
from nets import build_model
from tests.test_faults import FullDisk
from utils import files
from utils.checkpoint import save_checkpoint
from utils.errors import ArgumentError, CheckpointError, DataError, MissingFileError, UserError, WriteError

RACCOON = Path(__file__).parent / "data" / "raccoon" / "val"
REPO = Path(__file__).resolve().parents[1]


def tiny(peaked: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("tiny_hourglass", 1)
    if peaked:  # heatmap logits over +-15 instead of ~-2.19 everywhere: distinct scores, stable orders
        with torch.no_grad():
            for name in ("hm_tl", "hm_br", "hm_ct"):
                getattr(model.branches[0], name)[-1].weight.mul_(1000)
    return model.eval()


def save(model: torch.nn.Module, path: Path) -> Path:
    save_checkpoint(path, {"model": model.state_dict(), "args": {"arch": "tiny_hourglass", "img_size": 127},
                           "class_names": ["raccoon"], "epoch": 1})
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save(tiny(peaked=False), tmp_path_factory.mktemp("ckpt") / "checkpoint.pt")


class Float64Net(torch.nn.Module):
    """The network in float64: batching changes its outputs by ~1e-16 instead of float32's ~1e-6, far below the
    gaps between the scores of distinct boxes, so batched and single runs must give the same boxes. (In float32
    an untrained net's near-equal scores can swap places, and soft-NMS then keeps other boxes.)"""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.double().eval()

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(image.double())


@pytest.fixture
def float64_demo(monkeypatch) -> Float64Net:
    """demo.py's model replaced by the float64 copy of the peaked tiny net (--ckpt is then only checked)."""
    net = Float64Net(tiny(peaked=True))
    monkeypatch.setattr(engine.detector, "load_network", lambda path, device, onnx=None: (net, ["raccoon"], [1]))
    return net


def run(ckpt: Path, images: Path, out: Path, *extra: str, source: str = "--images"):
    args = demo.get_args_parser().parse_args(["--ckpt", str(ckpt), source, str(images), "--out", str(out),
                                              "--device", "cpu", "--score_thresh", "0", *extra])
    return demo.main(args)


def detections_of(written: dict) -> list[dict]:
    """Every detection of an --images run, each with the name of its file."""
    return [{"file": Path(image["file"]).name, **d} for image in written["images"] for d in image["detections"]]


def small_photos(folder: Path, sizes=((90, 120), (90, 120), (100, 70))) -> list[Path]:
    """Raccoon photos resized to (height, width), small so that a forward is quick."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (src, (h, w)) in enumerate(zip(sorted(RACCOON.glob("*.jpg")), sizes)):
        paths.append(folder / f"photo{i}.jpg")
        cv2.imwrite(str(paths[-1]), cv2.resize(cv2.imread(str(src)), (w, h)))
    return paths


def same_detections(a: list[tuple], b: list[tuple], box_tol: float = 0.01, score_tol: float = 1e-4) -> bool:
    """Lists of (key, box, score) equal up to the json's rounding (boxes to 0.01 pixel, scores to 1e-4): each entry
    of `a` matches its own entry of `b`, in any order (equal scores may come in either order)."""
    unused = list(b)
    for key, box, score in a:
        match = next((e for e in unused if e[0] == key and abs(e[2] - score) <= score_tol
                      and np.allclose(e[1], box, atol=box_tol)), None)
        if match is None:
            return False
        unused.remove(match)
    return not unused


def test_folder_with_a_corrupt_file(ckpt, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    photos = sorted(RACCOON.glob("*.jpg"))[:2]
    for p in photos:
        shutil.copy(p, folder)
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    old_umask = os.umask(0o027)
    try:
        written = run(ckpt, folder, out, "--test_flip")
    finally:
        os.umask(old_umask)

    assert "broken.png" in capsys.readouterr().err
    results = detections_of(written)
    assert json.loads((out / "detections.json").read_text()) == {**json.loads(json.dumps(written)), "complete": True}
    assert written["skipped"] == [str(folder / "broken.png")] and len(results) > 0
    assert [image["file"] for image in written["images"]] == [str(folder / p.name) for p in photos]
    assert (out / "detections.json").stat().st_mode & 0o777 == 0o640  # the umask's mode, not mkstemp's 0600
    for p in photos:
        drawn = cv2.imread(str(out / p.name))
        h, w = cv2.imread(str(p)).shape[:2]
        assert drawn.shape[:2] == (h, w)
        for d in (d for d in results if d["file"] == p.name):
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h and d["class"] == "raccoon" and d["score"] >= 0
    assert not (out / "broken.png").exists()


def test_never_overwrites_without_force(ckpt, tmp_path):
    photo = small_photos(tmp_path / "in")[0]
    out = tmp_path / "out"
    run(ckpt, photo, out)
    before = (out / "detections.json").read_bytes()
    with pytest.raises(ArgumentError, match="not empty"):
        run(ckpt, photo, out)
    assert (out / "detections.json").read_bytes() == before
    run(ckpt, photo, out, "--force", "--score_thresh", "1")
    # an image without detections is listed too, by the same kind of path as a skipped file
    assert json.loads((out / "detections.json").read_text())["images"] == [{"file": str(photo), "detections": []}]


def test_never_writes_over_an_input_image_even_with_force(ckpt, tmp_path):
    folder = tmp_path / "photos"
    photos = small_photos(folder)
    before = [p.read_bytes() for p in photos]
    for source in (folder, photos[1]):
        with pytest.raises(ArgumentError, match="would write over the input image"):
            run(ckpt, source, folder, "--force")
    (tmp_path / "link").symlink_to(folder)
    with pytest.raises(ArgumentError, match="would write over the input image"):
        run(ckpt, folder, tmp_path / "link", "--force")  # the same folder by another name
    assert [p.read_bytes() for p in photos] == before and sorted(folder.iterdir()) == photos


def test_out_is_never_the_folder_of_an_input_image(ckpt, tmp_path):
    """Gray photos get drawings of other names (scan.pgm.png): none is overwritten, but --out X would still fill the
    input folder X, and the next run would read the drawings as inputs."""
    folder = tmp_path / "scans"
    scan = folder / "scan.pgm"
    folder.mkdir()
    cv2.imwrite(str(scan), cv2.cvtColor(cv2.imread(str(small_photos(tmp_path / "in")[0])), cv2.COLOR_BGR2GRAY))
    for source in (folder, scan):
        with pytest.raises(ArgumentError, match=f"--out {folder} is the folder of the input image {scan}"):
            run(ckpt, source, folder, "--force")
    assert list(folder.iterdir()) == [scan]


def test_batches_give_the_detections_of_single_images(ckpt, float64_demo, tmp_path):
    """Two photos of one size share a forward, the third (another size) gets its own: same detections as one
    image at a time."""
    folder = tmp_path / "photos"
    small_photos(folder)
    single = detections_of(run(ckpt, folder, tmp_path / "one", "--batch_size", "1"))
    batched = detections_of(run(ckpt, folder, tmp_path / "three", "--batch_size", "3"))
    assert len(batched) == len(single) > 10 and {d["file"] for d in single} == {f"photo{i}.jpg" for i in range(3)}
    assert same_detections([(d["file"], d["box"], d["score"]) for d in batched],
                           [(d["file"], d["box"], d["score"]) for d in single])


def test_max_per_image_keeps_the_best_and_topk_bounds_the_pairs(ckpt, float64_demo, tmp_path):
    """--max_per_image 3 keeps each image's 3 best detections of the default run (the peaked float64 net's scores
    are distinct); --topk 20 instead of 70 pairs fewer corners: this untrained net's 156 boxes become 1."""
    folder = tmp_path / "photos"
    small_photos(folder)
    default = run(ckpt, folder, tmp_path / "default")
    best3 = run(ckpt, folder, tmp_path / "best3", "--max_per_image", "3")
    for full, capped in zip(default["images"], best3["images"]):
        assert len(full["detections"]) > 3
        top = sorted(full["detections"], key=lambda d: -d["score"])[:3]
        assert same_detections([(0, d["box"], d["score"]) for d in capped["detections"]],
                               [(0, d["box"], d["score"]) for d in top])
    few_pairs = run(ckpt, folder, tmp_path / "topk20", "--topk", "20")
    assert len(detections_of(few_pairs)) * 10 < len(detections_of(default))
    with pytest.raises(ArgumentError, match="max_per_image"):
        run(ckpt, folder, tmp_path / "none", "--max_per_image", "0")


def test_a_failed_write_stops_with_the_file_and_keeps_the_detections(ckpt, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    small_photos(folder)
    out = tmp_path / "out"
    real_fdopen = os.fdopen

    def disk_full_for_photo1(fd: int, mode: str):
        f = real_fdopen(fd, mode)
        return FullDisk(f, room=0) if "photo1" in os.readlink(f"/proc/self/fd/{fd}") else f

    monkeypatch.setattr(files.os, "fdopen", disk_full_for_photo1)
    with pytest.raises(WriteError, match=r"cannot write .*photo1\.jpg: no space left on device"):
        run(ckpt, folder, out, "--batch_size", "1")
    saved = json.loads((out / "detections.json").read_text())
    assert saved["complete"] is False and [image["file"] for image in saved["images"]] == [str(folder / "photo0.jpg")]
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "photo0.jpg"]  # no half-written files


def test_errors_name_the_problem(ckpt, tmp_path):
    with pytest.raises(MissingFileError, match="no such file or folder"):
        run(ckpt, tmp_path / "nowhere", tmp_path / "out")
    os.mkfifo(tmp_path / "pipe")  # it exists: "no such file" was wrong
    with pytest.raises(UserError, match=f"--images {tmp_path / 'pipe'}: neither a regular file nor a folder"):
        run(ckpt, tmp_path / "pipe", tmp_path / "out")
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(UserError, match=f"--ckpt {onnx_file} is an ONNX file; pass it as --onnx {onnx_file}"):
        run(onnx_file, tmp_path / "nowhere", tmp_path / "out")
    for flag, value in [("--score_thresh", "nan"), ("--score_thresh", "1.5"), ("--batch_size", "0")]:
        with pytest.raises(UserError, match=f"{flag}: expected"):
            run(ckpt, tmp_path / "nowhere", tmp_path / "out", flag, value)
    photo = small_photos(tmp_path / "in")[0]
    with pytest.raises(UserError, match="--test_scales"):
        run(ckpt, photo, tmp_path / "out", "--test_scales", "1,x")
    with pytest.raises(UserError, match="--test_scales"):
        run(ckpt, photo, tmp_path / "out", "--test_scales", "0,1")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {broken}: the file is truncated or corrupt"):
        run(broken, photo, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_command_line_ends_a_mistake_in_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "demo.py"), "--ckpt", str(tmp_path / "any.pt"), "--images",
                           str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: --images {tmp_path / 'nowhere'}: no such file or folder"]


def test_amp_runs_the_16_bit_network_and_is_refused_for_onnx(ckpt, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(engine.detector, "network_for", lambda model, device, amp: built.append(amp) or model)
    photo = small_photos(tmp_path / "in")[0]
    assert run(ckpt, photo, tmp_path / "out", "--amp")["images"][0]["detections"]
    assert built == [True]
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"")
    args = demo.get_args_parser().parse_args(["--onnx", str(onnx_file), "--images", str(photo), "--out",
                                              str(tmp_path / "out2"), "--device", "cpu", "--amp"])
    with pytest.raises(UserError, match="--amp: an ONNX model runs in the precision it was exported in; drop --amp"):
        demo.main(args)
    assert not (tmp_path / "out2").exists()


def write_video(path: Path, frames: int = 7, size=(120, 90)) -> None:
    """A camera panning over a raccoon photo, mp4v in .mp4 (OpenCV's headless build writes it)."""
    w, h = size
    photo = cv2.imread(str(sorted(RACCOON.glob("*.jpg"))[1]))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (w, h))
    for i in range(frames):
        writer.write(np.ascontiguousarray(photo[20 + 3 * i:20 + 3 * i + h, 40 + 6 * i:40 + 6 * i + w]))
    writer.release()


def read_frames(path: Path) -> list[np.ndarray]:
    capture, frames = cv2.VideoCapture(str(path)), []
    while (frame := capture.read()[1]) is not None:
        frames.append(frame)
    return frames


def test_video(ckpt, float64_demo, tmp_path):
    video, out = tmp_path / "in.mp4", tmp_path / "res" / "out.mp4"
    write_video(video)
    written = run(ckpt, video, out, "--batch_size", "3", "--score_thresh", "0.05", source="--video")

    frames = read_frames(video)
    annotated = read_frames(out)
    assert len(frames) == len(annotated) == 7 and annotated[0].shape == frames[0].shape
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["complete"] is True and saved["fps"] == 10 and saved["frames_per_second"] > 0
    assert [f["frame"] for f in saved["frames"]] == list(range(7)) and saved["frames"] == written["frames"]
    for frame, record in zip(frames, saved["frames"]):
        dets = detect(float64_demo, [eval_input(frame, 1, False)], InferenceConfig(), torch.device("cpu"))
        dets = dets[dets[:, 4] >= 0.05]
        assert len(dets) > 0 and same_detections(  # batches of 3 frames there, one frame at a time here
            [(0, d["box"], d["score"]) for d in record["detections"]], [(0, d[:4], float(d[4])) for d in dets])

    before = out.read_bytes()
    with pytest.raises(ArgumentError, match="out.mp4 and .*out.json exist; choose another --out or pass --force to "
                                            "replace them$"):
        run(ckpt, video, out, source="--video")
    assert out.read_bytes() == before
    (tmp_path / "solo.json").write_text("{}")
    with pytest.raises(ArgumentError, match="solo.json exists; choose another --out or pass --force to replace it$"):
        run(ckpt, video, tmp_path / "solo.mp4", source="--video")
    with pytest.raises(MissingFileError, match="--video .*nowhere.mp4: no such file"):
        run(ckpt, tmp_path / "nowhere.mp4", tmp_path / "n.mp4", source="--video")
    with pytest.raises(ArgumentError, match="would write over the input video"):
        run(ckpt, video, video, "--force", source="--video")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(video.read_bytes()[: len(video.read_bytes()) // 3])
    with pytest.raises(DataError, match="corrupt.mp4: cannot open it"):
        run(ckpt, corrupt, tmp_path / "c.mp4", source="--video")
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.json", "out.mp4"]  # no temporary files
    assert not (tmp_path / "c.mp4").exists() and not (tmp_path / "c.json").exists()
    # A video OpenCV opens but whose frames do not decode (here: none at all) leaves no json behind either.
    empty = tmp_path / "empty.avi"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48)).release()
    assert cv2.VideoCapture(str(empty)).isOpened()
    with pytest.raises(DataError, match="empty.avi: no frame can be decoded"):
        run(ckpt, empty, tmp_path / "e" / "e.mp4", source="--video")
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())


def test_a_video_that_is_no_file_is_named_as_such(ckpt, tmp_path):
    """A folder or a named pipe given as --video exists: "no such file" was wrong."""
    with pytest.raises(UserError, match=f"--video {tmp_path} is a folder; give a video file"):
        run(ckpt, tmp_path, tmp_path / "n.mp4", source="--video")
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UserError, match=f"--video {tmp_path / 'pipe'}: not a regular file"):
        run(ckpt, tmp_path / "pipe", tmp_path / "n.mp4", source="--video")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_sigterm_keeps_the_json_and_leaves_no_temporary_video(ckpt, tmp_path):
    """A video run stopped by SIGTERM (a scheduler, `kill`) ends with status 143, its json saved with
    "complete": false and no hidden temporary video; the next run clears those of killed runs only."""
    video, out = tmp_path / "in.mp4", tmp_path / "res" / "out.mp4"
    write_video(video, frames=60)
    cmd = [sys.executable, str(REPO / "demo.py"), "--ckpt", str(ckpt), "--video", str(video), "--out", str(out),
           "--device", "cpu", "--batch_size", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".out.*.tmp.mp4")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.json"]
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["complete"] is False and len(saved["frames"]) < 60

    dead = out.with_name(".out.4194305.tmp.mp4")  # above Linux's largest process id: never running
    alive = out.with_name(f".out.{os.getppid()}.tmp.mp4")  # pytest's parent process: running
    for p in (dead, alive):
        p.write_bytes(b"partial video")
    short = tmp_path / "short.mp4"
    write_video(short, frames=2)
    run(ckpt, short, out, "--force", source="--video")
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([alive.name, "out.json", "out.mp4"])


def test_an_interrupted_force_run_leaves_no_old_video_beside_its_json(ckpt, tmp_path, monkeypatch):
    video, out = tmp_path / "in.mp4", tmp_path / "res" / "out.mp4"
    write_video(video, frames=4)
    run(ckpt, video, out, "--batch_size", "2", source="--video")
    real_detect, calls = demo.detect, []

    def interrupted_after_one_batch(detector, frames):
        calls.append(len(frames))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_detect(detector, frames)

    monkeypatch.setattr(demo, "detect", interrupted_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, video, out, "--batch_size", "2", "--force", source="--video")
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.json"]
    assert json.loads(out.with_suffix(".json").read_text())["complete"] is False


def test_a_force_run_replaces_the_old_json_before_any_work(ckpt, tmp_path, monkeypatch):
    """A run killed (SIGKILL, a power cut) before its first periodic save left the earlier run's json, "complete":
    true with all its frames, beside the new run's drawings or without its video: the json starts with the run."""
    video, out_video = tmp_path / "in.mp4", tmp_path / "res" / "out.mp4"
    write_video(video, frames=2)
    folder, out_folder = tmp_path / "photos", tmp_path / "drawn"
    small_photos(folder)
    run(ckpt, video, out_video, source="--video")
    run(ckpt, folder, out_folder)
    real_detect, on_disk = demo.detect, []

    def note_the_json_first(detector, frames):
        if not on_disk:
            for path in (out_video.with_suffix(".json"), out_folder / "detections.json"):
                on_disk.append(json.loads(path.read_text()) if path.exists() else None)
        return real_detect(detector, frames)

    monkeypatch.setattr(demo, "detect", note_the_json_first)
    run(ckpt, video, out_video, "--force", source="--video")
    assert on_disk[0] == {"video": str(video), "fps": 10, "frames": [], "complete": False}
    on_disk.clear()
    run(ckpt, folder, out_folder, "--force")
    assert on_disk[1] == {"images": [], "skipped": [], "complete": False}


def test_mistakes_end_in_one_clear_error_not_a_traceback_or_an_empty_success(ckpt, tmp_path):
    photo = small_photos(tmp_path / "in")[0]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(UserError, match="--out .*a_file is a file"):
        run(ckpt, photo, a_file)
    with pytest.raises(WriteError, match="--out .*a_file/sub: cannot create or read the folder"):
        run(ckpt, photo, a_file / "sub")
    write_video(tmp_path / "in.mp4", frames=2)
    with pytest.raises(WriteError, match="--out's folder .*a_file is a file"):
        run(ckpt, tmp_path / "in.mp4", a_file / "out.mp4", source="--video")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image files in this folder"):
        run(ckpt, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataError, match="none of the 1 files could be read as an image"):
        run(ckpt, a_file, tmp_path / "out_text")
    with pytest.raises(UserError, match=r"--score_thresh: expected a number in \[0, 1\], got 5.0"):
        run(ckpt, photo, tmp_path / "out", "--score_thresh", "5")
    assert not (tmp_path / "out").exists()


def test_a_folder_of_any_format_opencv_reads(ckpt, float64_demo, tmp_path):
    folder = tmp_path / "formats"
    folder.mkdir()
    image = cv2.imread(str(small_photos(tmp_path / "in")[0]))
    for suffix in (".bmp", ".webp", ".tif"):
        assert cv2.imwrite(str(folder / f"photo{suffix}"), image)
    written = run(ckpt, folder, tmp_path / "out")
    assert not written["skipped"] and {Path(image["file"]).name for image in written["images"]} == {
        "photo.bmp", "photo.webp", "photo.tif"}


def test_drawings_of_formats_without_8_bit_colour_are_png_and_other_files_are_counted(ckpt, float64_demo, tmp_path,
                                                                                      capsys):
    """Gray (.pgm), 1-bit (.pbm) and .pxm (no writer) inputs get a PNG drawing beside the others instead of stopping
    the run; .jfif is read as the JPEG it is; files without an image suffix are named in a note."""
    folder = tmp_path / "formats"
    folder.mkdir()
    image = cv2.imread(str(small_photos(tmp_path / "in")[0]))
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    jpeg = cv2.imencode(".jpg", image)[1].tobytes()
    files = {"scan.pgm": cv2.imencode(".pgm", gray)[1], "scan.pbm": cv2.imencode(".pbm", (gray > 127) * np.uint8(1))[1],
             "scan.pxm": cv2.imencode(".ppm", image)[1], "photo.jfif": jpeg, "photo.jpg": jpeg, "photo": jpeg,
             "notes.txt": b"not read"}
    for name, data in files.items():
        (folder / name).write_bytes(bytes(data))
    written = run(ckpt, folder, tmp_path / "out")
    assert [Path(image["file"]).name for image in written["images"]] == [
        "photo.jfif", "photo.jpg", "scan.pbm", "scan.pgm", "scan.pxm"] and not written["skipped"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "detections.json", "photo.jfif.png", "photo.jpg", "scan.pbm.png", "scan.pgm.png", "scan.pxm.png"]
    for name in ("scan.pbm.png", "scan.pgm.png", "scan.pxm.png", "photo.jfif.png"):
        assert cv2.imread(str(tmp_path / "out" / name), cv2.IMREAD_UNCHANGED).shape == image.shape, name
    note = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and note[0].startswith(f"note: 2 files of {folder} are not read, as their names end in no "
                                                 "image suffix (looked for .avif .bmp") and \
        note[0].endswith(": notes.txt, photo"), note


def test_an_image_named_as_another_images_drawing_keeps_its_name_and_the_other_takes_a_number(ckpt, tmp_path):
    """Before: the drawing of a.pgm (a.pgm.png) and that of the image a.pgm.png were one file, written twice."""
    folder = tmp_path / "in"
    photo = cv2.imread(str(small_photos(tmp_path / "photos")[0]))
    sizes = {"a.pgm": (90, 120), "a.pgm.png": (100, 70), "a.pgm.2.png": (80, 60)}  # (height, width), one each
    for name, (h, w) in sizes.items():
        image = cv2.resize(photo, (w, h))
        write_image(folder / name, cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if name.endswith(".pgm") else image)
    run(ckpt, folder, tmp_path / "out")
    drawings = {"a.pgm": "a.pgm.3.png", "a.pgm.png": "a.pgm.png", "a.pgm.2.png": "a.pgm.2.png"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*drawings.values(), "detections.json"])
    for name, drawing in drawings.items():
        assert cv2.imread(str(tmp_path / "out" / drawing)).shape == (*sizes[name], 3), name


def test_drawing_names_are_distinct_ignoring_case():
    """A case-insensitive file system (macOS, Windows) holds one of A.PGM.png and a.pgm.png."""
    assert drawing_names(["A.PGM", "a.pgm", "b.png", "B.PNG", "c.pbm"]) == [
        "A.PGM.png", "a.pgm.2.png", "b.png", "B.PNG", "c.pbm.png"]
    assert drawing_names(["a.pgm", "A.PGM", "SCAN.PGM.PNG", "scan.pgm"]) == [
        "a.pgm.png", "A.PGM.2.png", "SCAN.PGM.PNG", "scan.pgm.2.png"]  # the upper-case name second, and an image's own


def test_sub_folders_that_are_not_read_are_named_in_a_note(tmp_path, capsys):
    # A data set's val folder with images in cam1/ and cam2/ besides its own: those were left out without a word.
    for name in ("a.jpg", "cam1/b.jpg", "cam2/c.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert demo.list_images(tmp_path) == [tmp_path / "a.jpg"]
    assert capsys.readouterr().err.splitlines() == \
        [f"note: 2 sub-folders of {tmp_path} are not read (give each as --images): cam1, cam2"]


def test_a_suffix_opencv_has_no_writer_for_is_a_write_error_naming_the_file(tmp_path):
    image = np.zeros((20, 30, 3), np.uint8)
    for name in ("drawing.pxm", "drawing"):
        with pytest.raises(WriteError, match=f"{tmp_path / name}: OpenCV cannot encode an image with suffix"):
            write_image(tmp_path / name, image)
    assert not list(tmp_path.iterdir())
