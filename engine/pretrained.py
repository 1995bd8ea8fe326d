"""Starting a run from another run's weights (`train.py --pretrained CKPT`): fine-tuning, not resuming.

Every weight of the checkpoint whose name and shape match the new network is copied into it. The class heatmap
outputs (the last conv of hm_tl, hm_br and hm_ct, one channel per class) are matched by class name instead: a class
the checkpoint has under the same name takes its channel (COCO weights fine-tuned on data with a `person` class
start that class from COCO's person), and a new class keeps the freshly built network's channel, with the prior
bias `nets.hourglass.HEATMAP_BIAS`. Optimizer, scheduler and epoch are not read: the run starts at epoch 1.
"""
from dataclasses import dataclass, field

import torch
from torch import nn

from nets import refuse_non_finite
from nets.hourglass import HEATMAP_HEADS
from utils.checkpoint import load_checkpoint, saved_args
from utils.errors import CheckpointError, MissingFileError

MIN_WEIGHT_SHARE = 0.5  # of the network's kernels a fine-tuning checkpoint must fill (ours: all of them)


@dataclass
class PretrainedReport:
    """What `load_pretrained` did, by state-dict key of the new network."""
    loaded: list[str] = field(default_factory=list)
    class_outputs: list[str] = field(default_factory=list)  # filled channel by channel, by class name
    known_classes: list[str] = field(default_factory=list)  # their channels taken from the checkpoint
    new_classes: list[str] = field(default_factory=list)  # their channels left at the fresh initialisation
    shape_differs: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)  # key: (checkpoint, network) shape
    missing: list[str] = field(default_factory=list)  # in the network, not in the checkpoint
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not in the network

    def lines(self) -> list[str]:
        """A summary line, then one line per key that was not loaded (for the run log)."""
        out = [f"pretrained: loaded {len(self.loaded)} tensors; kept fresh: {len(self.shape_differs)} of another "
               f"shape, {len(self.missing)} missing from the checkpoint; {len(self.unused)} checkpoint tensors unused"]
        if self.class_outputs:
            out.append(f"pretrained: the {len(self.class_outputs)} class outputs by class name: "
                       f"{len(self.known_classes)} classes from the checkpoint, {len(self.new_classes)} new")
        out += [f"  class from the checkpoint: {name}" for name in self.known_classes]
        out += [f"  fresh (new class): {name}" for name in self.new_classes]
        out += [f"  fresh (shape {tuple(a)} in the checkpoint, {tuple(b)} here): {k}"
                for k, (a, b) in self.shape_differs.items()]
        out += [f"  fresh (not in the checkpoint): {k}" for k in self.missing]
        out += [f"  unused: {k}" for k in self.unused]
        return out


def class_output_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the layers with one channel per class: the last conv of each heatmap head."""
    keys = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in HEATMAP_HEADS:
            last = f"{name}.{len(module) - 1}"
            keys += [f"{last}.{p}" for p, _ in module[-1].named_parameters()]
    return keys


def class_rows(saved_names: list[str], class_names: list[str]) -> list[int | None]:
    """For each of `class_names`, the index of the checkpoint's class of that name in `saved_names`; None for a
    name the checkpoint lacks, or that either list gives twice (which of them would it be?)."""
    def once(names: list[str]) -> dict[str, int]:
        return {name: i for i, name in enumerate(names) if names.count(name) == 1}
    saved, wanted = once(saved_names), once(class_names)
    return [saved.get(name) if name in wanted else None for name in class_names]


@torch.no_grad()
def load_pretrained(model: nn.Module, state_dict: dict[str, torch.Tensor], saved_names: list[str],
                    class_names: list[str]) -> PretrainedReport:
    """Copies into the freshly built `model` (of `class_names`) every tensor of `state_dict` (of `saved_names`)
    whose key and shape match; the class outputs whole when the class names are the same in the same order, else
    channel by channel for the classes the checkpoint has by name. Returns what was and was not loaded."""
    own = model.state_dict()
    class_keys = set(class_output_keys(model))
    rows = class_rows(saved_names, class_names)
    same_classes = list(saved_names) == list(class_names)
    report = PretrainedReport(unused=[k for k in state_dict if k not in own])
    for key, target in own.items():
        if key not in state_dict:
            report.missing.append(key)
        elif key in class_keys and not same_classes and \
                state_dict[key].shape == (len(saved_names), *target.shape[1:]):  # one channel per saved class
            for row, saved_row in enumerate(rows):
                if saved_row is not None:
                    target[row] = state_dict[key][saved_row]
            report.class_outputs.append(key)
        elif state_dict[key].shape != target.shape:
            report.shape_differs[key] = (tuple(state_dict[key].shape), tuple(target.shape))
        else:
            target.copy_(state_dict[key])
            report.loaded.append(key)
    if report.class_outputs:
        report.known_classes = [name for name, row in zip(class_names, rows) if row is not None]
        report.new_classes = [name for name, row in zip(class_names, rows) if row is None]
    return report


def load_pretrained_checkpoint(model: nn.Module, path: str, class_names: list[str], arch: str
                               ) -> PretrainedReport:
    """`load_pretrained` from one of our checkpoint files (training runs and tools/convert_official.py output) into
    `model`, a fresh network of `arch`. A checkpoint of another --arch, or one that fills less than MIN_WEIGHT_SHARE
    of the network's weight tensors (convolution kernels, outside the class outputs: another code's names), is
    refused with a CheckpointError; after the second, `model` is partly overwritten (build a fresh one)."""
    try:
        state = load_checkpoint(path, map_location="cpu")
    except (MissingFileError, CheckpointError) as e:
        raise type(e)(f"--pretrained: {e}") from None
    saved = saved_args(state).get("arch", "unknown")
    # By name, not only by the weights that match: large_hourglass's first stack has small_hourglass's names and
    # shapes, so either fills half of the other or more, which the count below lets through (half of the network
    # would train from scratch, or half of the checkpoint be dropped).
    if saved not in (arch, "unknown"):
        raise CheckpointError(f"--pretrained {path}: the checkpoint's --arch is {saved}, not {arch}; pass a "
                              f"checkpoint of --arch {arch}, or train with --arch {saved}")
    report = load_pretrained(model, state["model"], list(state.get("class_names", [])), list(class_names))
    # Batch-norm counters and biases match between any two of our networks; only the kernels say it is the same one.
    class_keys = set(class_output_keys(model))
    weights = [k for k, v in model.state_dict().items() if v.dim() >= 2 and k not in class_keys]
    matched = len(set(weights) & set(report.loaded))
    if matched < MIN_WEIGHT_SHARE * len(weights):
        raise CheckpointError(f"--pretrained {path}: only {matched} of the {len(weights)} weight tensors of this "
                              f"{arch} network match the checkpoint by name and shape (the checkpoint's --arch is "
                              f"{saved}); pass a checkpoint of --arch {arch}")
    refuse_non_finite({key: state["model"][key] for key in report.loaded + report.class_outputs},
                      f"--pretrained {path}")
    return report
