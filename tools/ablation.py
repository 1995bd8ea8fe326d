"""The paper's ablation (section 4.5, Table 4) in one command: CornerNet; with cascade corner pooling (CCP) alone;
with central region exploration (CRE); then center pooling (CTP) and CCP added in turn. Each row is trained with
the same schedule and seed and evaluated by test.py on the same split; prints AP, AP50, AR100, FD, FD5, FD50 and
the time of each row.

    python tools/ablation.py --name shapes_ablation --data_dir data/shapes --train_split train --val_split val \
        --schedule shapes_cpu --device cpu
    torchrun --nproc_per_node 8 tools/ablation.py --dist --name coco_ablation --schedule coco_hg52

Everything goes to CKPT_DIR/NAME/: one run folder per row (cornernet/, ccp/, cre/, cre_ctp/, cre_ctp_ccp/), each with
its test.py results and metrics json, and ablation.json with the table. Rerunning the same command continues where
it stopped: finished rows are kept, a row whose training stopped resumes from its checkpoint (its time then counts
this command's part only, marked *). Other settings under the same --name are refused.

--schedule picks the network and schedule; --arch, --img_size, --batch_size, --lr, --lr_step and --num_epochs
override its values. Flags this script does not know go to train.py unchanged (e.g. --accum_steps 2, --amp,
--grad_checkpoint, --val_interval 5); --dist and a launcher's processes work as for train.py and test.py.
"""
import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import the repo
import train
from datasets.coco import check_split_files
from engine.inference import parse_scales
from utils import dist
from utils.errors import ArgumentError, DataError, run_cli
from utils.files import write_json

ROWS = {  # folder: (the paper's row, --corner_pool, --center_branch), in the order of the paper's Table 4
    "cornernet": ("CornerNet", "plain", "none"),
    "ccp": ("+CCP", "cascade", "none"),
    "cre": ("+CRE", "plain", "conv"),
    "cre_ctp": ("+CRE+CTP", "plain", "pool"),
    "cre_ctp_ccp": ("+CRE+CTP+CCP", "cascade", "pool"),
}
SCHEDULES = {
    # `make demo`'s network and schedule on the built-in shapes data (its last row is the demo's run)
    "shapes_cpu": {"arch": "tiny_hourglass", "img_size": 127, "batch_size": 16, "lr": 2e-3, "lr_step": "30",
                   "num_epochs": 36},
    # the paper's ablation network, CenterNet511-52, on the official schedule (README "Train and evaluate on COCO")
    "coco_hg52": {"arch": "small_hourglass", "img_size": 511, "batch_size": 48, "lr": 2.5e-4, "lr_step": "183",
                  "num_epochs": 195},
}
COLUMNS = ("AP", "AP50", "AR100", "FD", "FD5", "FD50")
OWN_TRAIN_FLAGS = ("--log_name", "--method", "--corner_pool", "--center_branch", "--resume")
TABLE = "ablation.json"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("centernet47 ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="folder under --ckpt_dir for the runs and the table")
    p.add_argument("--ckpt_dir", default="ckpt")
    p.add_argument("--schedule", default="shapes_cpu", choices=list(SCHEDULES))
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--dataset", default="coco", choices=["coco"])
    p.add_argument("--data_dir", default="data/coco")
    p.add_argument("--train_split", default="train2017")
    p.add_argument("--val_split", default="val2017")
    for flag, kind in (("arch", str), ("img_size", int), ("batch_size", int), ("lr", float), ("lr_step", str),
                       ("num_epochs", int)):
        p.add_argument(f"--{flag}", type=kind, help="overrides the --schedule's value")
    p.add_argument("--seed", type=int, default=train.get_args_parser().get_default("seed"))
    p.add_argument("--test_flip", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate with the flipped image too, as the paper's single-scale test does")
    p.add_argument("--test_scales", default="1")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--num_workers", type=int, default=2, help="data loading workers per process")
    p.add_argument("--dist", action="store_true",
                   help="DistributedDataParallel, as train.py's (implied when a launcher starts several processes)")
    return p


def load_test_cli():
    """test.py as a module (its name would otherwise clash with Python's own `test` package)."""
    spec = importlib.util.spec_from_file_location("centernet47_test_cli", ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def settings(args: argparse.Namespace, train_extra: list[str]) -> dict:
    """What makes two ablations comparable: the schedule with its overrides, the data, the seed and the test. The
    data folder as Path spells it: a rerun with `data/shapes/` (a shell's completion) or `./data/shapes` continues."""
    schedule = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SCHEDULES[args.schedule].items()}
    return {"schedule": args.schedule, **schedule, "seed": args.seed, "dataset": args.dataset,
            "data_dir": str(Path(args.data_dir)), "train_split": args.train_split, "val_split": args.val_split,
            "test_flip": args.test_flip, "test_scales": args.test_scales, "train_extra": train_extra}


def check_args(args: argparse.Namespace, train_extra: list[str]) -> list[str]:
    """The rows to run; refuses flags this script sets itself and unknown rows before anything is written."""
    own = [f for f in train_extra if f.split("=")[0] in OWN_TRAIN_FLAGS]
    if own:
        raise ArgumentError(f"{' '.join(own)}: set by tools/ablation.py for each row (folders under --ckpt_dir/--name,"
                            " the variant of each row, --resume to continue); drop them")
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise ArgumentError(f"--rows {args.rows}: expected some of {', '.join(ROWS)}")
    if args.name in ("", ".", "..") or "/" in args.name:
        raise ArgumentError(f"--name {args.name!r}: expected a folder name, without path separators")
    parse_scales(args.test_scales)
    return [r for r in ROWS if r in rows]


def read_table(path: Path, wanted: dict) -> dict:
    """The rows already measured under `wanted` settings; refuses a table made with other ones."""
    if not path.exists():
        return {}
    try:
        table = json.loads(path.read_text())
        table["settings"], table["rows"]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not a table of tools/ablation.py ({error!r}); move it away to start again") from None
    differ = {k: (table["settings"].get(k), v) for k, v in wanted.items() if table["settings"].get(k) != v}
    if differ:
        listed = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
        raise ArgumentError(f"{path} holds an ablation with other settings ({listed}); pick another --name")
    return table["rows"]


def train_args(args: argparse.Namespace, run_root: Path, row: str, setting: dict,
               train_extra: list[str]) -> argparse.Namespace:
    """train.py's flags for `row`; refuses (ArgumentError) a flag in `train_extra` that train.py does not know
    either: a misspelt flag of this script or of train.py, which train.py's parser would end with its own usage."""
    _, corner_pool, center_branch = ROWS[row]
    flags = ["--log_name", row, "--ckpt_dir", str(run_root), "--dataset", args.dataset, "--data_dir",
             str(args.data_dir), "--train_split", args.train_split, "--val_split", args.val_split, "--corner_pool",
             corner_pool, "--center_branch", center_branch, "--seed", str(args.seed), "--device", args.device,
             "--num_workers", str(args.num_workers), "--val_interval", "0", "--resume"] + ["--dist"] * args.dist
    for key in ("arch", "img_size", "batch_size", "lr", "lr_step", "num_epochs"):
        flags += [f"--{key}", str(setting[key])]
    known, unknown = train.get_args_parser().parse_known_args(flags + train_extra)
    if unknown:
        raise ArgumentError(f"{' '.join(unknown)}: neither tools/ablation.py nor train.py has this flag (see the "
                            "--help of each)")
    return known


def train_row(args: argparse.Namespace, run_root: Path, row: str, setting: dict, train_extra: list[str]) -> None:
    train.main(train_args(args, run_root, row, setting, train_extra))


def test_row(args: argparse.Namespace, run_root: Path, row: str) -> dict:
    test_cli = load_test_cli()
    flags = ["--log_name", row, "--ckpt_dir", str(run_root), "--dataset", args.dataset, "--data_dir",
             str(args.data_dir), "--val_split", args.val_split, "--test_scales", args.test_scales, "--device",
             args.device, "--num_workers", str(args.num_workers), "--force"]  # a rerun of a row it did not finish
    return test_cli.main(test_cli.get_args_parser().parse_args(flags + ["--test_flip"] * args.test_flip))


def format_table(rows: dict) -> str:
    """A Markdown table of the measured rows, in the paper's order: COCO numbers and FD in percent, times in min."""
    lines = ["| row | " + " | ".join(COLUMNS) + " | train (min) | test (min) |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for row, (label, _, _) in ROWS.items():
        if row not in rows:
            continue
        r = rows[row]
        values = [r[c] * (1 if c.startswith("FD") else 100) if r[c] is not None else None for c in COLUMNS]
        mark = "*" if r["resumed"] else ""
        lines.append(f"| {label} | " + " | ".join("n/a" if v is None else f"{v:.1f}" for v in values) +
                     f" | {r['train_s'] / 60:.1f}{mark} | {r['test_s'] / 60:.1f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace, train_extra: list[str] = ()) -> dict:
    """Trains and evaluates the --rows not yet in CKPT_DIR/NAME/ablation.json; returns all its rows."""
    train_extra = list(train_extra)
    wanted_rows = check_args(args, train_extra)
    setting = settings(args, train_extra)
    run_root = Path(args.ckpt_dir) / args.name
    table_path = run_root / TABLE
    # train.py's flags are checked before the table is written: a table records settings it is bound to, and one
    # written for a typing error would refuse the corrected command ("pick another --name"). Checked before an
    # earlier table is read too, whose "other settings" would hide the typing error.
    train.check_args(train_args(args, run_root, wanted_rows[0], setting, train_extra))
    for split in (args.train_split, args.val_split):  # a misspelt or forgotten --data_dir, likewise
        check_split_files(Path(args.data_dir), split)
    rows = read_table(table_path, setting)
    # One process group for every row's training and test (utils/dist.py cleanup says why).
    dist.init_distributed(args.dist or dist.launched(), device=args.device)
    # Here, not in each row's train.py: --test_flip or --test_scales differing came to light after the first row's
    # training, --rows differing left processes waiting for rows that the others skipped.
    dist.check_same_flags(vars(args), {"data_dir", "ckpt_dir"}, {"num_workers", "dist"})
    if dist.is_main() and not table_path.exists():  # the settings before any row: a rerun with others is refused
        write_json(table_path, {"settings": setting, "rows": rows})
    for row in wanted_rows:
        if row in rows:
            continue
        resumed = (run_root / row / "checkpoint.pt").exists()
        start = time.perf_counter()
        try:
            train_row(args, run_root, row, setting, train_extra)
        except SystemExit:  # a signal stopped the row, which train.py saved; its advice names train.py's command
            if dist.is_main():
                print(f"{args.name}: stopped in row {row}; run the same tools/ablation.py command again (without "
                      "--resume) to continue it", flush=True)
            raise
        trained = time.perf_counter()
        stats = test_row(args, run_root, row)
        rows[row] = {**{c: None if math.isnan(stats[c]) else stats[c] for c in COLUMNS},  # undefined: null
                     "train_s": trained - start, "test_s": time.perf_counter() - trained, "resumed": resumed}
        rows = {r: rows[r] for r in ROWS if r in rows}
        if dist.is_main():
            write_json(table_path, {"settings": setting, "rows": rows})
    if dist.is_main():
        print(f"{args.name}: {setting['arch']} on {args.data_dir} ({args.train_split} -> {args.val_split}), "
              f"schedule {args.schedule}, seed {args.seed}; table in {table_path}")
        print(format_table(rows), flush=True)
    dist.cleanup()
    return rows


if __name__ == "__main__":
    known, extra = get_args_parser().parse_known_args()
    run_cli(lambda a: main(a, extra), known)
