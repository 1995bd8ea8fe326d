"""The benchmarks' flags, errors and tables, from given timings (no timing is asserted)."""
import importlib
import sys

import pytest
import torch

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
    ("bench_cpool", ["--warmup", "-1"], "--warmup: expected a whole number of at least 0, got -1"),
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
    ("bench_finetune", ["--out", "unused", "--num_workers", "-1"], "--num_workers: expected a whole number of at "
                                                                   "least 0"),
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


DEVICE_BENCHES = ["bench_cpool", "bench_infer", "bench_memory", "bench_model", "bench_pipeline", "bench_train"]


def pretend_gpus(monkeypatch, count: int) -> list:
    """`count` GPUs visible (none: CUDA unavailable); returns the list that torch.cuda.set_device's calls go to."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    return current


@pytest.mark.parametrize("bench", DEVICE_BENCHES)
@pytest.mark.parametrize("device, gpus, message", [
    ("cuda", 0, "device cuda: no CUDA device is visible to this process"),
    ("cuda:7", 1, "device cuda:7: this process sees 1 CUDA device(s), cuda:0 to cuda:0"),
    ("gpu", 1, "device: expected auto, cpu, cuda or cuda:N, as a string or a torch.device, got 'gpu'"),
    ("cuda:x", 1, "device: expected auto, cpu, cuda or cuda:N, as a string or a torch.device, got 'cuda:x'"),
])
def test_every_bench_refuses_a_device_it_cannot_use_with_one_line_before_any_work(bench, device, gpus, message,
                                                                                   monkeypatch, capsys):
    """Each bench checked --device by hand, in two ways: four ended with their own SystemExit text, two with a
    DeviceError, and argparse's choices refused cuda:N with a usage message. Now all choose it as train.py and
    test.py do (utils.device.select_device), so each ends with the same one line, before printing anything."""
    from utils.errors import run_cli

    current = pretend_gpus(monkeypatch, gpus)
    module = importlib.import_module(f"bench.{bench}")
    with pytest.raises(SystemExit) as ended:
        run_cli(module.main, module.get_args_parser().parse_args(["--device", device]))
    assert ended.value.code == f"error: {message}"
    assert capsys.readouterr().out == "" and current == []


def test_a_bench_cli_ends_a_bad_device_with_its_one_line():
    from bench import bench_model
    from bench.child import child_stdout

    with pytest.raises(SystemExit, match="failed \\(exit status 1\\):\nerror: device: expected auto, cpu, cuda or "
                                         "cuda:N, as a string or a torch.device, got 'gpu'$"):
        child_stdout([sys.executable, bench_model.__file__, "--device", "gpu"], "bench_model")


def test_the_memory_bench_runs_on_the_gpu_it_names_and_says_so(monkeypatch, capsys):
    """With --device cuda:1 the header names cuda:1 and its peak counter, each measuring process gets cuda:1, and
    cuda:1 is the current GPU, which the measurement's synchronisations and peak counters act on."""
    import json

    from bench import bench_memory

    current = pretend_gpus(monkeypatch, 2)
    commands = []

    def child_stdout(cmd, what):
        commands.append(cmd)
        return json.dumps({"saved": 2**20, "peak": 2**20, "seconds": 1.0})

    monkeypatch.setattr(bench_memory, "child_stdout", child_stdout)
    bench_memory.main(bench_memory.get_args_parser().parse_args(["--device", "cuda:1", "--configs",
                                                                 "tiny_hourglass:127:2"]))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cuda:1, ") and "max allocated MiB" in lines[1]
    assert [cmd[cmd.index("--device") + 1] for cmd in commands] == ["cuda:1", "cuda:1"]
    assert current == [torch.device("cuda", 1)]


def test_the_train_bench_divides_by_the_old_rate_whatever_the_order_of_modes(monkeypatch, capsys):
    """"vs old" is each setting's images/s over the old way's (above 1: faster); with --modes fp32 old the fp32 row
    ran first and had no ratio. The other modes keep the order given (sorting them as MODES timed fp32 before the bf16
    that gpu_check's levers plan names first). Peak memory is in MiB (2**20 bytes), as printed."""
    from bench import bench_train

    rates = {"old": 10.0, "fp32": 25.0, "bf16": 40.0}
    monkeypatch.setattr(bench_train, "bench", lambda arch, mode, *rest: (rates[mode], 1434.0, 2.5))
    bench_train.main(bench_train.get_args_parser().parse_args(["--modes", "bf16", "fp32", "old"]))
    lines = capsys.readouterr().out.splitlines()
    assert "peak MiB" in lines[1]
    rows = [line.split() for line in lines[2:]]
    assert [r[1] for r in rows] == ["old", "bf16", "fp32"]  # the others in the order given
    assert [r[5] for r in rows] == ["1.00x", "4.00x", "2.50x"] and all(r[6] == "1434" for r in rows)


def test_the_memory_bench_table_in_mib_and_the_change_against_the_plain_row(monkeypatch, capsys):
    """The columns said MB over values in MiB (bytes / 2**20); the checkpointed row's changes are against the plain
    row (-13% saved: 215 MiB kept for 248)."""
    import json

    from bench import bench_memory

    measured = iter([{"saved": 248 * 2**20, "peak": 1255 * 2**20, "seconds": 16.0},
                     {"saved": 215 * 2**20, "peak": 1242 * 2**20, "seconds": 20.0}])
    monkeypatch.setattr(bench_memory, "child_stdout", lambda cmd, what: json.dumps(next(measured)))
    bench_memory.main(bench_memory.get_args_parser().parse_args(["--configs", "tiny_hourglass:127:16"]))
    lines = capsys.readouterr().out.splitlines()
    assert "saved activations MiB | peak RSS MiB | s / step" in lines[1]
    assert lines[3:] == ["| tiny_hourglass | 127 | 16 | no | 248 | 1255 | 16.00 |",
                         "| tiny_hourglass | 127 | 16 | yes | 215 (-13%) | 1242 (-1%) | 20.00 (+25%) |"]


def assert_rows_as_wide_as_their_header(lines: list[str], header_starts: tuple[str, ...],
                                        row_starts: tuple[str, ...]) -> None:
    """Each row (fixed-width columns, the last one right-aligned) ends where the header above it ends, so no label
    pushes its row's numbers out of their columns."""
    header, rows = None, 0
    for line in lines:
        if line.startswith(header_starts):
            header = line
        elif line.startswith(row_starts):
            assert header is not None and len(line) == len(header), f"\n{header}\n{line}"
            rows += 1
    assert rows


def test_the_inference_bench_rows_stay_under_their_headers(monkeypatch, capsys):
    """The large nets' labels ("forward large_hourglass 511 bf16 prepared (--amp)", "pipeline small_hourglass 511
    single") were wider than their column, and the '% of peak' cells one character wider than theirs."""
    import numpy as np

    from bench import bench_infer

    monkeypatch.setattr(bench_infer, "matmul_peaks", lambda clock: {"fp32": 100.0, "bf16": 200.0})
    monkeypatch.setattr(bench_infer, "build_model", lambda arch, classes: torch.nn.Identity())
    monkeypatch.setattr(bench_infer, "conv_gflop", lambda model, image: 30.0)
    monkeypatch.setattr(bench_infer, "prepare_for_inference", lambda model, dtype=None: model)
    monkeypatch.setattr(bench_infer, "side_by_side", lambda fns, *args, **kwargs: dict.fromkeys(fns, 300.0))
    monkeypatch.setattr(bench_infer, "postprocess", lambda *args: [])
    monkeypatch.setattr(bench_infer, "detect", lambda *args: np.zeros((3, 6), np.float32))
    bench_infer.main(bench_infer.get_args_parser().parse_args(
        ["--archs", "large_hourglass", "small_hourglass", "--no-onnx", "--compile"]))
    lines = capsys.readouterr().out.splitlines()
    bf16 = next(line for line in lines if line.startswith("forward large_hourglass 511 bf16 prepared (--amp)"))
    assert bf16.split()[-4:] == ["300.0", "1.00x", "100.0", "50%"]  # 30 GFLOP in 0.3 s, of 200 GFLOP/s
    assert_rows_as_wide_as_their_header(lines, ("stage", "forward  "), ("post-processing", "forward ", "pipeline"))


def test_the_pipeline_bench_rows_stay_under_their_headers(monkeypatch, capsys):
    """Each part's cell, 'ms (share)', was one character narrower than its header's column. The shares are of the
    image's whole time, and 'rest' is what the parts leave of it."""
    from bench import bench_pipeline

    def time_setting(wrapped, timer, inputs, amp, repeats, device):
        return 200.0, {"forward": 150.0, "decode": 30.0, "soft-NMS": 2.0, "rest": 18.0}, 7

    monkeypatch.setattr(bench_pipeline, "time_setting", time_setting)
    bench_pipeline.main(bench_pipeline.get_args_parser().parse_args(["--archs", "tiny_hourglass"]))
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["tiny_hourglass", "single", "200.0", "150.0", "(", "75%)", "30.0", "(", "15%)", "2.0",
                                "(", "1%)", "18.0", "(", "9%)", "7"]
    assert_rows_as_wide_as_their_header(lines, ("pipeline",), ("tiny_hourglass",))


def test_the_pipeline_bench_names_the_precision_that_runs(monkeypatch, capsys):
    """On the CPU --amp fp16 runs the prepared network in bf16 (network_for, as test.py --amp): the header said
    'forward fp16'."""
    from bench import bench_pipeline

    networks = []

    def time_setting(wrapped, timer, inputs, amp, repeats, device):
        networks.append(wrapped.model)
        return 1.0, dict.fromkeys(bench_pipeline.PARTS + ["rest"], 0.25), 0

    monkeypatch.setattr(bench_pipeline, "time_setting", time_setting)
    bench_pipeline.main(bench_pipeline.get_args_parser().parse_args(["--archs", "tiny_hourglass", "--amp", "fp16"]))
    assert "forward bf16," in capsys.readouterr().out.splitlines()[0]
    assert {network.dtype for network in networks} == {torch.bfloat16}
