"""Where the CPU forward's time goes: the prepared PyTorch network against onnxruntime on the same weights, op by
op, and what the process's memory allocator adds to it.

    .venv/bin/python bench/profile_infer.py [--archs tiny_hourglass] [--threads 1] [--repeats 5] [--sizes 511]
                                            [--top 12] [--skip_ops]

Allocator table: for each arch, a fresh process per setting runs --repeats forwards of the prepared network
(after one warm-up pass over --sizes; several sizes take turns, as test.py's multi-scale inputs do) and reports
per forward its CPU time, minor page faults and system time (getrusage), and the process's peak and final
resident memory, and the resident memory once the network is built, before its first forward. "glibc default" is
malloc as it comes; "kept" is utils/cpu_memory.py's keep_freed_memory(), which Detector and test.py set on the CPU;
both drop the trained network once it is prepared. "Detector" runs the network of an engine.Detector, which keeps
freed memory and holds the trained network (`detector.model`) beside the prepared one, as demo.py and test.py do.
The settings run one after the other, so on a loaded machine read the faults, not the times.

Per-op table (the first size, in this process, memory kept): self CPU time per forward of the prepared network's
ops (torch.profiler) beside onnxruntime's kernel times (its own profiler), the same number of threads; then the
convolutions by shape, ms per call in each (PyTorch's heads' output products are not convolutions there: "-").
"""
import argparse
import collections
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from bench.bench_infer import export_fixed
from bench.child import child_stdout
from engine.detector import Detector
from nets import ARCHS, build_model
from nets.inference import prepare_for_inference
from utils.checks import check_positive_int
from utils.cpu_memory import keep_freed_memory
from utils.errors import run_cli


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["tiny_hourglass"], choices=list(ARCHS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[511], help="square input sides, taking turns")
    parser.add_argument("--top", type=int, default=12, help="rows of the per-op table")
    parser.add_argument("--skip_ops", action="store_true", help="only the allocator table")
    parser.add_argument("--child", nargs=2, metavar=("SETTING", "ARCH"), help=argparse.SUPPRESS)
    return parser


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def allocator_child(setting: str, arch: str, args) -> None:
    """Runs in a fresh process: prints one JSON line of the measurements for `setting`."""
    kept = setting != "default" and keep_freed_memory()
    torch.manual_seed(0)
    model = build_model(arch, 80).eval()
    detector = Detector(model, [str(c) for c in range(80)], torch.device("cpu")) if setting == "detector" else None
    network = detector.network if detector else prepare_for_inference(model)
    del model  # held by the detector where there is one
    built = resident_mib()
    images = [torch.randn(1, 3, s, s) for s in args.sizes]
    for image in images:
        network(image)
    start, clock = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    for i in range(args.repeats):
        network(images[i % len(images)])
    end, spent = resource.getrusage(resource.RUSAGE_SELF), time.process_time() - clock
    n = args.repeats
    print(json.dumps({"kept": kept, "ms": spent / n * 1e3, "faults": (end.ru_minflt - start.ru_minflt) / n,
                      "sys_ms": (end.ru_stime - start.ru_stime) / n * 1e3, "built_mib": built,
                      "peak_mib": end.ru_maxrss / 1024, "final_mib": resident_mib()}))


def allocator_table(args) -> None:
    print(f"{'allocator':<34}{'ms/fwd':>9}{'faults/fwd':>12}{'sys ms/fwd':>12}{'built MiB':>11}{'peak MiB':>10}"
          f"{'final MiB':>10}")
    for arch in args.archs:
        for setting in ("default", "kept", "detector"):
            cmd = [sys.executable, __file__, "--child", setting, arch, "--threads", str(args.threads),
                   "--repeats", str(args.repeats), "--sizes", *map(str, args.sizes)]
            row = json.loads(child_stdout(cmd, f"the {setting} process of {arch}"))
            name = {"default": "glibc default", "kept": "kept", "detector": "Detector"}[setting]
            if setting != "default" and not row["kept"]:
                name += " (no glibc: default)"
            print(f"{arch + ' ' + name:<34}{row['ms']:>9.1f}{row['faults']:>12.0f}{row['sys_ms']:>12.1f}"
                  f"{row['built_mib']:>11.0f}{row['peak_mib']:>10.0f}{row['final_mib']:>10.0f}", flush=True)


def torch_ops(network, image: torch.Tensor, repeats: int) -> tuple[dict, dict]:
    """({op: (ms per forward, calls per forward)} of self CPU time, the same for each convolution shape)."""
    from torch.profiler import ProfilerActivity, profile

    network(image)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(repeats):
            network(image)
    ops = {e.key: (e.self_cpu_time_total / repeats / 1e3, e.count / repeats) for e in prof.key_averages()}
    convs = collections.defaultdict(lambda: [0.0, 0.0])
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key.startswith("mkldnn::_convolution_pointwise"):
            shapes = [s for s in e.input_shapes if len(s) == 4]  # input, [the summand,] weight
            key = conv_key(shapes[0], shapes[-1])
            convs[key][0] += e.self_cpu_time_total / repeats / 1e3
            convs[key][1] += e.count / repeats
    return ops, dict(convs)


def conv_key(x: list, weight: list) -> str:
    """'64x128x128 -> 64 3x3': input channels x height x width, output channels, kernel."""
    return f"{x[1]}x{x[2]}x{x[3]} -> {weight[0]} {weight[2]}x{weight[3]}"


def onnx_ops(model, image: torch.Tensor, repeats: int, folder: str) -> dict:
    """{op type: (ms per forward, calls per forward)} of onnxruntime's kernel times, after one warm-up run."""
    import onnxruntime

    path = export_fixed(model, image.shape[-1], folder)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.enable_profiling, options.profile_file_prefix = True, str(Path(folder) / "profile")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: image.numpy()}
    for _ in range(1 + repeats):
        session.run(None, feed)
    with open(session.end_profiling()) as f:
        nodes = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    ops, convs = collections.defaultdict(lambda: [0.0, 0.0]), collections.defaultdict(lambda: [0.0, 0.0])
    for e in nodes[len(nodes) // (1 + repeats):]:  # the runs after the warm-up
        name, ms = e["args"]["op_name"], e["dur"] / repeats / 1e3
        ops[name][0] += ms
        ops[name][1] += 1 / repeats
        if name == "Conv":
            x, weight = [next(iter(d.values())) for d in e["args"]["input_type_shape"][:2]]
            convs[conv_key(x, weight)][0] += ms
            convs[conv_key(x, weight)][1] += 1 / repeats
    return dict(ops), dict(convs)


def ops_table(args) -> None:
    keep_freed_memory()
    for arch in args.archs:
        torch.manual_seed(0)
        model = build_model(arch, 80).eval()
        image = torch.randn(1, 3, args.sizes[0], args.sizes[0])
        ours, our_convs = torch_ops(prepare_for_inference(model), image, args.repeats)
        with tempfile.TemporaryDirectory() as tmp:
            theirs, their_convs = onnx_ops(model, image, args.repeats, tmp)
        print(f"\n{arch} {args.sizes[0]}: prepared PyTorch {sum(t for t, _ in ours.values()):.1f} ms/fwd (self CPU), "
              f"onnxruntime {sum(t for t, _ in theirs.values()):.1f} ms/fwd (kernels)")
        print(f"{'PyTorch op':<40}{'ms/fwd':>9}{'calls':>7}   {'onnxruntime op':<24}{'ms/fwd':>9}{'calls':>7}")
        left = sorted(ours.items(), key=lambda kv: -kv[1][0])[:args.top]
        right = sorted(theirs.items(), key=lambda kv: -kv[1][0])[:args.top]
        for i in range(max(len(left), len(right))):
            a = f"{left[i][0][:39]:<40}{left[i][1][0]:>9.1f}{left[i][1][1]:>7.0f}" if i < len(left) else " " * 56
            b = f"{right[i][0]:<24}{right[i][1][0]:>9.1f}{right[i][1][1]:>7.0f}" if i < len(right) else ""
            print(f"{a}   {b}")
        print(f"{'convolution (in -> out kernel)':<32}{'PyTorch ms/call':>16}{'onnxruntime ms/call':>21}{'calls':>7}")
        for key in sorted(our_convs.keys() | their_convs.keys(),
                          key=lambda k: -max(our_convs.get(k, [0])[0], their_convs.get(k, [0])[0]))[:args.top]:
            per_call = [f"{t[key][0] / t[key][1]:.2f}" if key in t else "-" for t in (our_convs, their_convs)]
            calls = max(t[key][1] for t in (our_convs, their_convs) if key in t)
            print(f"{key:<32}{per_call[0]:>16}{per_call[1]:>21}{calls:>7.0f}")


def main(args: argparse.Namespace) -> None:
    for flag in ("threads", "repeats", "top"):
        check_positive_int(f"--{flag}", getattr(args, flag))
    for side in args.sizes:
        check_positive_int("--sizes", side)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.child:
        allocator_child(*args.child, args)
        return
    print(f"{torch.get_num_threads()} CPU threads, sizes {args.sizes}, {args.repeats} forwards per row")
    allocator_table(args)
    if not args.skip_ops:
        ops_table(args)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
