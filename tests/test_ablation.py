"""tools/ablation.py on a few built-in images: each row trains its variant with the one schedule and seed, the table
holds test.py's own metrics of each row, a rerun continues (finished rows kept, a stopped row resumed) instead of
retraining, other settings and flags the script sets itself are refused, and 2 torchrun processes run it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train import free_port, sent_in_first_gather
from tools import ablation
from utils import dist
from utils.checkpoint import load_checkpoint
from utils.errors import ArgumentError, DataError, MissingFileError

REPO = Path(__file__).resolve().parents[1]
METRICS = "results_val_checkpoint_s1_flip_metrics.json"


def flags(shapes_dir: Path, ckpt_dir: Path, *extra: str) -> list[str]:
    return ["--name", "abl", "--ckpt_dir", str(ckpt_dir), "--data_dir", str(shapes_dir), "--train_split", "train",
            "--val_split", "val", "--num_epochs", "2", "--lr_step", "1", "--batch_size", "4", "--num_workers", "0",
            "--device", "cpu", *extra]


def run(argv: list[str]) -> dict:
    known, extra = ablation.get_args_parser().parse_known_args(argv)
    return ablation.main(known, extra)


def printed_rows(text: str) -> dict[str, list[str]]:
    """The table's cells by row label, from what main printed."""
    return {cells[0]: cells[1:] for line in text.splitlines() if line.startswith("| +") or line.startswith("| Corner")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_each_row_trains_its_variant_and_the_table_is_test_py_s(shapes_dir, tmp_path, capsys):
    root = tmp_path / "abl"
    rows = run(flags(shapes_dir, tmp_path, "--rows", "cre_ctp_ccp,cornernet", "--min_box_size", "1"))
    assert list(rows) == ["cornernet", "cre_ctp_ccp"]  # the paper's order, whatever the order asked
    states = {row: load_checkpoint(root / row / "checkpoint.pt") for row in rows}
    for row, state in states.items():
        args = state["args"]
        assert (args["corner_pool"], args["center_branch"]) == ablation.ROWS[row][1:]
        assert (args["arch"], args["img_size"], args["lr"], args["lr_step"], args["seed"], args["min_box_size"]) == \
            ("tiny_hourglass", 127, 2e-3, "1", 317, 1.0)  # the schedule, its overrides and a train.py flag
        assert state["epoch"] == 2
    table = json.loads((root / "ablation.json").read_text())
    shown = printed_rows(capsys.readouterr().out)
    for row in rows:
        measured = json.loads((root / row / METRICS).read_text())
        assert {c: table["rows"][row][c] for c in ablation.COLUMNS} == {c: measured[c] for c in ablation.COLUMNS}
        # AP, AP50 and AR100 are fractions in COCO's json and percent in the table; FD is percent in both
        percent = [measured[c] * (1 if c.startswith("FD") else 100) for c in ablation.COLUMNS]
        assert shown[ablation.ROWS[row][0]][:6] == [f"{v:.1f}" for v in percent]
        assert not table["rows"][row]["resumed"] and table["rows"][row]["train_s"] > 0

    # A row stopped after its first epoch resumes; the finished rows are neither trained nor evaluated again.
    setting = ablation.settings(ablation.get_args_parser().parse_known_args(flags(shapes_dir, tmp_path))[0],
                                ["--min_box_size", "1"])
    known = ablation.get_args_parser().parse_known_args(flags(shapes_dir, tmp_path))[0]
    ablation.train_row(known, root, "cre", {**setting, "num_epochs": 1}, ["--min_box_size", "1"])
    finished = {row: (root / row / "checkpoint.pt").read_bytes() for row in rows}
    rows = run(flags(shapes_dir, tmp_path, "--min_box_size", "1"))
    assert list(rows) == list(ablation.ROWS)
    assert {row: (root / row / "checkpoint.pt").read_bytes() for row in finished} == finished
    assert rows["cre"]["resumed"] and load_checkpoint(root / "cre" / "checkpoint.pt")["epoch"] == 2
    assert "resuming" in (root / "cre" / "train.log").read_text()
    assert re.search(r"^\| \+CRE \|.* \| [0-9.]+\* \| [0-9.]+ \|$", capsys.readouterr().out, re.MULTILINE)

    before = (root / "ablation.json").read_bytes()
    with pytest.raises(ArgumentError, match=r"other settings \(lr: 0.002 there, 0.001 now; train_extra: "):
        run(flags(shapes_dir, tmp_path, "--lr", "1e-3"))
    assert (root / "ablation.json").read_bytes() == before
    (root / "ablation.json").write_text('{"rows": {}}')
    with pytest.raises(DataError, match="ablation.json: not a table of tools/ablation.py"):
        run(flags(shapes_dir, tmp_path, "--min_box_size", "1"))


def test_a_rerun_with_other_settings_is_refused_even_before_a_row_finished(shapes_dir, tmp_path, monkeypatch,
                                                                          capsys):
    """The table's settings are written before the first row trains: a row stopped part-way (here at once, by
    SIGTERM's SystemExit from train.py) is never continued under another schedule; the stop names the command
    that continues it, not train.py's."""
    def stopped(*args, **kwargs):
        raise SystemExit(143)

    monkeypatch.setattr(ablation, "train_row", stopped)
    with pytest.raises(SystemExit):
        run(flags(shapes_dir, tmp_path, "--rows", "cornernet"))
    assert "abl: stopped in row cornernet; run the same tools/ablation.py command again (without --resume)" in \
        capsys.readouterr().out
    with pytest.raises(ArgumentError, match=r"other settings \(lr_step: '1' there, '2' now\)"):
        run(flags(shapes_dir, tmp_path, "--rows", "cornernet", "--lr_step", "2"))
    # the same folder spelt with a trailing slash is the same data: the rerun continues (here: stops again)
    with pytest.raises(SystemExit):
        run(flags(shapes_dir, tmp_path, "--rows", "cornernet", "--data_dir", f"{shapes_dir}/"))
    # a misspelt flag or data folder is named as such, not as other settings that call for another --name
    with pytest.raises(ArgumentError, match="^--rwos cornernet: neither tools/ablation.py nor train.py"):
        run(flags(shapes_dir, tmp_path, "--rwos", "cornernet"))
    with pytest.raises(MissingFileError, match="shapes: data directory not found"):
        run(flags(shapes_dir, tmp_path, "--rows", "cornernet", "--data_dir", str(tmp_path / "shapes")))


@pytest.mark.parametrize("extra, message", [(["--method", "cornernet"], "--method: set by tools/ablation.py"),
                                            (["--log_name=x"], "--log_name=x: set by"),
                                            (["--rows", "cre,ctp"], "--rows cre,ctp: expected some of cornernet"),
                                            (["--test_scales", "0"], r"--test_scales: expected a number in \(0, 8\]"),
                                            # train.py's own checks: each wrote a table that refused the corrected
                                            # command (other settings), then failed in the first row
                                            (["--seed", "-1"], r"--seed must be a whole number in \[0"),
                                            (["--accum_steps", "0"], "--accum_steps: expected a whole number"),
                                            # the data, which bound the table's --name to it before training failed
                                            (["--data_dir", "no/such/folder"], "folder: data directory not found"),
                                            (["--val_split", "vall"], "instances_vall.json: annotation file not fo")])
def test_flags_that_cannot_work_are_refused_before_anything_is_written(shapes_dir, tmp_path, extra, message):
    with pytest.raises((ArgumentError, MissingFileError), match=message):
        run(flags(shapes_dir, tmp_path / "ckpt", *extra))
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("typo", [["--acum_steps", "2"], ["--rwos", "cornernet"]])
def test_a_flag_neither_script_knows_is_one_error_before_anything_is_written(shapes_dir, tmp_path, typo):
    """A misspelt flag of train.py or of this script is one error line naming it, not train.py's usage."""
    with pytest.raises(ArgumentError, match=f"^{' '.join(typo)}: neither tools/ablation.py nor train.py has this"):
        run(flags(shapes_dir, tmp_path / "ckpt", *typo))
    assert not (tmp_path / "ckpt").exists()


def test_processes_given_different_test_flags_are_refused_before_any_row(shapes_dir, tmp_path, monkeypatch):
    """A node given --no-test_flip trained the first row with the others (train.py's flags agreed) and was refused
    only by that row's test.py, after the training. The gather over two processes is played by one."""
    rank_1 = sent_in_first_gather(run, flags(shapes_dir, tmp_path, "--no-test_flip"), monkeypatch)
    monkeypatch.setattr(dist, "all_gather_object", lambda values: [values, rank_1])
    with pytest.raises(ArgumentError, match=r"given different flags: --test_flip True on rank 0, False on rank 1\. "):
        run(flags(shapes_dir, tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_the_process_group_lasts_until_its_last_holder_leaves(monkeypatch):
    """utils/dist.py: a script that joins first keeps the group through the inner init/cleanup pairs of train.py and
    test.py (a group made again in the same processes failed to connect under torchrun)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dist.init_distributed(True, device="cpu")  # the script's
    for _ in range(2):  # a row's train.py, then its test.py
        group = torch.distributed.group.WORLD
        assert dist.init_distributed(True, device="cpu")
        dist.cleanup()
        assert dist.is_dist() and torch.distributed.group.WORLD is group
    dist.cleanup()
    assert not dist.is_dist()


def test_two_torchrun_processes_run_the_ablation_with_dist(shapes_dir, tmp_path):
    """train.py and test.py each join and leave the process group: the script runs them one after the other in the
    same processes, and only the first process writes and prints the table."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "tools/ablation.py", "--dist", *flags(shapes_dir, tmp_path, "--rows", "cornernet,cre_ctp_ccp")]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("| CornerNet |") == 1 and result.stdout.count("| +CRE+CTP+CCP |") == 1
    table = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert list(table["rows"]) == ["cornernet", "cre_ctp_ccp"]
    for row in table["rows"]:
        state = load_checkpoint(tmp_path / "abl" / row / "checkpoint.pt")
        assert state["args"]["dist"] and state["epoch"] == 2
        assert "2 process(es)" in (tmp_path / "abl" / row / "train.log").read_text()
