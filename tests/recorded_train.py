"""train.py as its own `__main__` (`torchrun -m tests.recorded_train ARGS` = `torchrun train.py ARGS`), with each
process writing down its training samples: for every epoch, the data set indices its loader yields, one json line
in SAMPLES_DIR/rank<r>.jsonl (an environment variable); and at each validation, the batch-norm running statistics
it validates with, in SAMPLES_DIR/val_rank<r>.jsonl. What tests/test_train.py checks about a real multi-process
run; nothing else changes."""
import json
import os
import runpy
import sys
from pathlib import Path

from engine import trainer
from utils import dist

ROOT = Path(__file__).resolve().parents[1]
make_train_loader = trainer.make_train_loader
evaluate = trainer.evaluate


def recording_train_loader(dataset, progress, *args, **kwargs):
    loader = make_train_loader(dataset, progress, *args, **kwargs)
    with open(Path(os.environ["SAMPLES_DIR"]) / f"rank{dist.rank()}.jsonl", "a") as f:
        f.write(json.dumps({"epoch": progress.epoch, "samples": list(loader.sampler)}) + "\n")
    return loader


def recording_evaluate(model, *args, **kwargs):
    statistics = {k: v.double().sum().item() for k, v in model.state_dict().items() if "running_" in k}
    with open(Path(os.environ["SAMPLES_DIR"]) / f"val_rank{dist.rank()}.jsonl", "a") as f:
        f.write(json.dumps(statistics) + "\n")
    return evaluate(model, *args, **kwargs)


if __name__ == "__main__":
    trainer.make_train_loader = recording_train_loader
    trainer.evaluate = recording_evaluate
    sys.argv[0] = str(ROOT / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
