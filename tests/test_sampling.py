"""The order of the training samples (datasets/sampling.py) over epochs, processes and resumes, with the processes
given as explicit ranks; tests/test_train.py checks that a real 2-process run of train.py uses exactly these."""
import random

import numpy as np
import pytest
import torch

from datasets.sampling import MAX_REPLACEMENTS, EpochSampler, TrainSamples, epoch_order
from engine.trainer import EpochProgress
from utils.errors import DataError

NUM_ITEMS, GLOBAL_BATCH = 103, 12  # 8 steps; 7 images left out of each epoch


def test_every_epoch_has_its_own_order_and_the_same_one_after_a_resume():
    orders = [epoch_order(NUM_ITEMS, GLOBAL_BATCH, seed=317, epoch=e) for e in (1, 2, 3)]
    for order in orders:
        assert len(order) == 96 and len(set(order.tolist())) == 96 and set(order.tolist()) <= set(range(NUM_ITEMS))
    # two equal orders of 96 out of 103 images by chance: probability below 1e-150
    assert len({tuple(order) for order in orders}) == 3
    assert not np.array_equal(epoch_order(NUM_ITEMS, GLOBAL_BATCH, seed=318, epoch=2), orders[1])
    # A resumed run draws other random numbers before it (no epochs trained, other augmentations): the same order.
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    assert np.array_equal(epoch_order(NUM_ITEMS, GLOBAL_BATCH, seed=317, epoch=2), orders[1])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_the_processes_shares_are_disjoint_and_cover_each_step(world_size):
    order = epoch_order(NUM_ITEMS, GLOBAL_BATCH, seed=0, epoch=1)
    shares = [EpochSampler(order, GLOBAL_BATCH, rank, world_size).indices for rank in range(world_size)]
    per_process = GLOBAL_BATCH // world_size
    for step in range(len(order) // GLOBAL_BATCH):
        images = [i for share in shares for i in share[step * per_process:(step + 1) * per_process]]
        assert sorted(images) == sorted(order[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH].tolist())
    assert sum(len(share) for share in shares) == len(order)


@pytest.mark.parametrize("before, after", [(2, 2), (1, 4), (4, 2)])
def test_a_resume_mid_epoch_continues_with_the_images_left(before, after):
    """Saved after 3 steps with `before` processes, resumed with `after`: the position in the checkpoint gives the
    same order, and the new processes' shares cover exactly the images of steps 4 to 8."""
    progress = EpochProgress(1, epoch_order(NUM_ITEMS, GLOBAL_BATCH, seed=0, epoch=1), GLOBAL_BATCH, 3, step=3)
    seen = [i for rank in range(before) for i in EpochSampler(progress.order, GLOBAL_BATCH, rank, before).indices
            [:3 * GLOBAL_BATCH // before]]
    resumed = EpochProgress.from_position(progress.position())
    assert np.array_equal(resumed.order, progress.order) and resumed.step == 3
    left = [i for rank in range(after) for i in EpochSampler(resumed.order, GLOBAL_BATCH, rank, after, resumed.step)
            .indices]
    assert sorted(seen + left) == sorted(progress.order.tolist()) and not set(seen) & set(left)


class MissingImages:
    """A data set of `size` images whose files are all missing."""

    img_dir = "data/train"

    def __init__(self, size: int):
        self.size, self.read = size, []

    def __len__(self) -> int:
        return self.size

    def train_sample(self, index: int, rng: np.random.Generator) -> dict:
        self.read.append(index)
        raise DataError(f"data/train/{index}.jpg: image file not found")


@pytest.mark.parametrize("size, message", [
    (1, r"all 1 training images of data/train cannot be used \(the last: data/train/0\.jpg: image file not found\)"),
    (3, r"all 3 training images of data/train cannot be used \(the last: data/train/1\.jpg: "),
    (MAX_REPLACEMENTS + 50, rf"{MAX_REPLACEMENTS} training images in a row from index 2 of data/train cannot be used "
                            rf"\(the last: data/train/{MAX_REPLACEMENTS + 1}\.jpg: ")])
def test_a_split_whose_images_all_fail_says_how_many_it_tried(size, message):
    images = MissingImages(size)
    with pytest.raises(DataError, match=message), pytest.warns(UserWarning, match="image file not found"):
        TrainSamples(images, seed=0, epoch=1)[2 % size]
    assert sorted(images.read) == sorted(set(images.read)) and len(images.read) == min(size, MAX_REPLACEMENTS)


class RecordedDraws:
    """A data set of `size` images whose `missing` ones fail; each item holds the first draw of its generator."""

    img_dir = "data/train"

    def __init__(self, size: int, missing: set[int]):
        self.size, self.missing = size, missing

    def __len__(self) -> int:
        return self.size

    def train_sample(self, index: int, rng: np.random.Generator) -> dict:
        if index in self.missing:
            raise DataError(f"data/train/{index}.jpg: image file not found")
        return {"image_index": index, "draw": rng.random()}


def test_each_item_draws_its_own_augmentation_apart_from_the_epoch_order():
    """Item 1 stands in for unreadable image 1 with image 2, which item 2 reads too: both were seeded with image 2's
    index, the same crop twice in one epoch. And item 0's seed (seed, epoch, 0) was the epoch order's (seed, epoch),
    since numpy's seeding drops trailing zeros."""
    samples = TrainSamples(RecordedDraws(4, missing={1}), seed=317, epoch=3)
    with pytest.warns(UserWarning, match="1.jpg: image file not found"):
        items = [samples[i] for i in range(4)]
    assert [item["image_index"] for item in items] == [0, 2, 2, 3]
    draws = [item["draw"] for item in items] + [np.random.default_rng([317, 3]).random()]
    assert len(set(draws)) == len(draws)
    assert [samples[i]["draw"] for i in (0, 2, 3)] == [draws[0], draws[2], draws[3]]  # the same after a resume


def test_each_unreadable_image_is_counted_once_by_its_own_item():
    """Images 1 and 2 fail: item 1 reads image 3 after two tries, item 2 after one; both count their own image,
    and the items that read a replacement without their own image failing (3, and 0) count nothing."""
    samples = TrainSamples(RecordedDraws(5, missing={1, 2}), seed=0, epoch=1)
    with pytest.warns(UserWarning, match="image file not found"):
        items = [samples[i] for i in range(5)]
    assert [item["image_index"] for item in items] == [0, 3, 3, 3, 4]
    assert [int(item["unreadable"]) for item in items] == [0, 1, 1, 0, 0]
