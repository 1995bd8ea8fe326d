"""train.py end to end on a few built-in images: checkpoints, resume, refusal to overwrite, non-finite loss,
and DistributedDataParallel (2 gloo processes on CPU) against one process with the same global batch."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

import train
from datasets.shapes import ShapesConfig, write_split
from datasets.targets import make_targets
from nets import build_model
from utils import dist
from utils.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    cfg = ShapesConfig(min_size=64, max_size=96, min_obj=16, max_obj=40, max_objects=3)
    write_split(out, "train", 8, seed=1, cfg=cfg)
    write_split(out, "val", 2, seed=1, cfg=cfg)
    return out


def args_for(shapes_dir: Path, ckpt_dir: Path, *extra: str):
    return train.get_args_parser().parse_args([
        "--log_name", "run", "--ckpt_dir", str(ckpt_dir), "--data_dir", str(shapes_dir), "--train_split", "train",
        "--val_split", "val", "--arch", "tiny_hourglass", "--img_size", "127", "--batch_size", "4",
        "--num_workers", "0", "--device", "cpu", "--lr", "1e-3", "--lr_step", "2", "--val_interval", "2", *extra])


def test_checkpoint_contents_and_resume_equals_an_uninterrupted_run(shapes_dir, tmp_path):
    train.main(args_for(shapes_dir, tmp_path / "a", "--num_epochs", "3"))
    train.main(args_for(shapes_dir, tmp_path / "b", "--num_epochs", "2"))
    first = load_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")
    assert first["epoch"] == 2 and first["scheduler"]["last_epoch"] == 2
    assert set(first) >= {"model", "optimizer", "scheduler", "scaler", "epoch", "args", "class_names", "best_ap"}
    assert first["class_names"] == ["rectangle", "ellipse", "triangle", "cross"]
    assert (tmp_path / "b" / "run" / "best.pt").is_file() and (tmp_path / "b" / "run" / "train.log").is_file()

    train.main(args_for(shapes_dir, tmp_path / "b", "--num_epochs", "3", "--resume"))
    resumed = load_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")["model"]
    straight = load_checkpoint(tmp_path / "a" / "run" / "checkpoint.pt")["model"]
    assert resumed.keys() == straight.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0, msg=k)
    log = (tmp_path / "b" / "run" / "train.log").read_text()
    assert "resuming" in log and "epoch 3:" in log


def test_a_new_run_never_overwrites_an_existing_one(shapes_dir, tmp_path):
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    with pytest.raises(SystemExit, match="no checkpoint to resume"):
        train.main(args_for(shapes_dir, tmp_path / "other", "--num_epochs", "1", "--resume"))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(shapes_dir, tmp_path, monkeypatch):
    train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1"))
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    real_loss = train.centernet_loss

    def exploding_loss(outputs, batch):
        total, terms = real_loss(outputs, batch)
        return total * float("nan"), terms

    monkeypatch.setattr(train, "centernet_loss", exploding_loss)
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 2"):
        train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "2", "--resume"))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_bf16_autocast_on_cpu(shapes_dir, tmp_path):
    ap = train.main(args_for(shapes_dir, tmp_path, "--num_epochs", "1", "--amp"))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["args"]["amp"] and 0 <= ap <= 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert "loss" in (tmp_path / "run" / "train.log").read_text()


def test_bad_arguments_are_clear_errors(shapes_dir, tmp_path):
    with pytest.raises(SystemExit, match="--lr_step"):
        train.main(args_for(shapes_dir, tmp_path, "--lr_step", "ten"))
    with pytest.raises(SystemExit, match="larger than the training set"):
        train.main(args_for(shapes_dir, tmp_path / "x", "--batch_size", "64", "--num_epochs", "1"))


class OneBoxImages(Dataset):
    """Fixed images with one box each, so that every process normalises its loss by the same object count."""

    def __init__(self, n: int, size: int = 63, num_classes: int = 2):
        rng = np.random.default_rng(0)
        self.items = []
        for i in range(n):
            x1, y1 = rng.uniform(0, 20, 2)
            w, h = rng.uniform(16, 40, 2)
            boxes = np.array([[x1, y1, min(x1 + w, size), min(y1 + h, size)]])
            item = make_targets(boxes, np.array([i % num_classes]), num_classes, size, size)
            item["image"] = rng.standard_normal((3, size, size)).astype(np.float32)
            self.items.append({k: torch.from_numpy(v) for k, v in item.items()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def without_batchnorm(model: nn.Module) -> nn.Module:
    """Batch statistics differ between one batch of B and N batches of B / N (SyncBatchNorm needs a GPU), so
    the comparison runs on the network with its BN layers removed."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.Identity())
        else:
            without_batchnorm(child)
    return model


def three_steps(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_distributed(True, device="cpu")
    torch.manual_seed(0)
    model = without_batchnorm(build_model("tiny_hourglass", 2))
    ddp = nn.parallel.DistributedDataParallel(model) if dist.is_dist() else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    loader = train.make_train_loader(OneBoxImages(12), 4, 0, seed=0, epoch=1, device=torch.device("cpu"))
    logger = train.RunLogger(Path(out), enabled=False)
    train.train_one_epoch(ddp, loader, optimizer, scaler, torch.device("cpu"), False, 1, logger, 0)
    if dist.is_main():
        torch.save(model.state_dict(), Path(out) / f"world{world}.pt")
    dist.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    mp.spawn(three_steps, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    three_steps(0, 1, free_port(), str(tmp_path))
    two = torch.load(tmp_path / "world2.pt")
    one = torch.load(tmp_path / "world1.pt")
    torch.manual_seed(0)
    initial = without_batchnorm(build_model("tiny_hourglass", 2)).state_dict()
    moved = 0
    for k in one:
        # Adam steps of ~1e-3 per parameter; summation order differs between the all-reduce and one batch.
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)
        moved += int(not torch.equal(one[k], initial[k]))
    assert moved > 0


def test_torchrun_launch(shapes_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "train.py", "--dist", "--log_name", "ddp", "--ckpt_dir", str(tmp_path), "--data_dir",
           str(shapes_dir), "--train_split", "train", "--val_split", "val", "--arch", "tiny_hourglass",
           "--img_size", "127", "--batch_size", "4", "--num_epochs", "1", "--num_workers", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert state["epoch"] == 1 and state["args"]["dist"]
    assert "2 process(es)" in (tmp_path / "ddp" / "train.log").read_text()
