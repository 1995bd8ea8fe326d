"""The order of training samples and the random draw of each one's augmentation, both resumable mid-epoch.

- `epoch_order(n, global_batch, seed, epoch)`: one permutation of the data set per epoch, cut to whole global
  batches. Optimizer step s of the epoch uses positions [s * B, (s + 1) * B) of it, split over the processes
  (`EpochSampler`), so one process with batch B and N processes with B / N see the same images at every step, and
  a run resumed at step s (even with another number of processes) continues with exactly the images it had left.
- `TrainSamples`: the augmentation of item i in epoch e is drawn from a generator seeded with (seed, epoch, i, 1),
  not from a process-wide generator. Every sample of a step thus gets its own draw, whichever process or data
  loading worker reads it (the processes of a DDP run never repeat each other's crops), and the draw is the same
  after a resume. The seeds end in a non-zero attempt number, since numpy's seeding ignores trailing zeros: (seed,
  epoch, 0) would draw what the epoch's order (seed, epoch) draws.
- One unreadable image in a large training set does not end the run: it is replaced by the next readable one, drawn
  with the item's seed and the attempt's number (not as that image's own item, which would repeat it exactly in the
  epoch), with a warning that names the file, and counted once (`unreadable` in its own item) so that the training
  loop can stop when too many fail. Evaluation reads the data set directly and stays strict.
"""
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from utils.errors import DataError, DataWarning, MissingFileError

MAX_REPLACEMENTS = 100


def epoch_order(num_items: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    """(steps * global_batch,) int64 indices: a permutation of range(num_items) cut to whole global batches."""
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    return order[:num_items // global_batch * global_batch]


class EpochSampler(Sampler[int]):
    """This process's share of `order` from optimizer step `start_step` on: at each step, process `rank` of
    `world_size` takes every world_size-th index of that step's global batch."""

    def __init__(self, order: np.ndarray, global_batch: int, rank: int, world_size: int, start_step: int = 0):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.indices = order[start_step * global_batch:][rank::world_size].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TrainSamples(Dataset):
    """Training items of `dataset` (a CocoDetection) for one epoch, each augmented with its own seeded generator
    (see the module docstring). Items carry `unreadable`: 1 when the item's own image could not be used (it then
    holds the next one that can), else 0: each unreadable image is counted once, by its own item, not again by the
    items that skip past it."""

    def __init__(self, dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tries = min(MAX_REPLACEMENTS, len(self.dataset))  # no image is tried twice for one item
        for skipped in range(tries):
            i = (index + skipped) % len(self.dataset)
            try:
                rng = np.random.default_rng([self.seed, self.epoch, index, skipped + 1])
                item = self.dataset.train_sample(i, rng)
            except (DataError, MissingFileError) as e:
                warnings.warn(f"skipping a training image that cannot be used: {e}", DataWarning)
                last_error = e
                continue
            item["unreadable"] = torch.tensor(int(skipped > 0))
            return item
        which = f"all {tries} training images" if tries == len(self.dataset) else \
            f"{tries} training images in a row from index {index}"
        raise DataError(f"{which} of {self.dataset.img_dir} cannot be used (the last: {last_error}); check the data "
                        "set with `python -m datasets.check --data_dir DIR --split NAME`")
