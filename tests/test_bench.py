"""The benchmarks' flags, errors and tables, from given timings (no timing is asserted)."""
import importlib
import sys

import pytest

from utils.errors import ArgumentError, MissingFileError

ARCH_FLAGS = [("bench_train", "--archs"), ("bench_infer", "--archs"), ("bench_pipeline", "--archs"),
              ("bench_model", "--train_archs"), ("bench_model", "--forward_archs"), ("profile_infer", "--archs")]


@pytest.mark.parametrize("bench, flag", ARCH_FLAGS)
def test_an_unknown_arch_is_a_usage_error(bench, flag, capsys):
    """It was a ValueError traceback from inside build_model, after other rows had run (bench_model skipped it
    silently: its table loops over the known archs)."""
    parser = importlib.import_module(f"bench.{bench}").get_args_parser()
    assert parser.parse_args([flag, "tiny_hourglass"])
    with pytest.raises(SystemExit):
        parser.parse_args([flag, "tiny"])
    assert "invalid choice: 'tiny'" in capsys.readouterr().err


@pytest.mark.parametrize("bench, flags, message", [
    ("bench_cpool", ["--repeats", "0"], "--repeats"),
    ("bench_cpool", ["--shape", "2", "0", "8", "8"], "--shape C"),
    ("bench_nms", ["--repeats", "0"], "--repeats"),
    ("bench_nms", ["--sizes", "100", "0"], "--sizes"),
    ("bench_train", ["--steps", "0"], "--steps"),
    ("bench_infer", ["--forward_repeats", "0"], "--forward_repeats"),
    ("bench_infer", ["--threads", "-1"], "--threads"),
    ("bench_pipeline", ["--repeats", "0"], "--repeats"),
    ("bench_model", ["--train_steps", "0"], "--train_steps"),
    ("bench_memory", ["--steps", "0"], "--steps"),
    ("bench_memory", ["--configs", "tiny_hourglass"], "arch:input:batch"),
    ("bench_memory", ["--configs", "tiny:127:2"], "arch:input:batch"),
    ("bench_memory", ["--configs", "tiny_hourglass:127:0"], "arch:input:batch"),
    ("bench_data", ["--rounds", "0"], "--rounds"),
    ("profile_infer", ["--repeats", "0"], "--repeats"),
    ("bench_finetune", ["--out", "unused", "--epochs", "0"], "--epochs"),
    ("bench_finetune", ["--out", "unused", "--target_images", "15"], "--target_images"),
])
def test_a_count_that_cannot_time_anything_is_an_argument_error(bench, flags, message, tmp_path, monkeypatch):
    """Zero repeats or steps ended in statistics.median's "no median for empty data" (or an IndexError, a
    ZeroDivisionError in a child process) after the set-up; now an ArgumentError names the flag before any work."""
    monkeypatch.chdir(tmp_path)  # bench_finetune's --out
    module = importlib.import_module(f"bench.{bench}")
    with pytest.raises(ArgumentError, match=message):
        module.main(module.get_args_parser().parse_args(flags))


def test_the_finetune_bench_refuses_a_missing_checkpoint_before_writing(tmp_path):
    from bench import bench_finetune

    args = bench_finetune.get_args_parser().parse_args(["--out", str(tmp_path / "out"),
                                                        "--pre_ckpt", str(tmp_path / "none.pt")])
    with pytest.raises(MissingFileError, match="--pre_ckpt"):
        bench_finetune.main(args)
    assert not (tmp_path / "out").exists()


def test_a_failed_measuring_process_shows_its_error():
    """bench_memory and profile_infer measure in child processes: a failing one was a CalledProcessError whose
    traceback hid the child's own message."""
    from bench.child import child_stdout

    assert child_stdout([sys.executable, "-c", "print('{}')"], "a child") == "{}\n"
    with pytest.raises(SystemExit, match="a child failed \\(exit status 1\\):\nerror: no GPU"):
        child_stdout([sys.executable, "-c", "import sys; sys.exit('error: no GPU')"], "a child")
