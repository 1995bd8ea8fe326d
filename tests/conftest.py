"""Fixtures shared by the test modules."""
from pathlib import Path

import pytest
import torch

from datasets.shapes import ShapesConfig, write_split
from tests.fixed_box import save_fixed_box_checkpoint, write_square_split


@pytest.fixture(autouse=True)
def torch_state_restored():
    """Tests that run a bench's main in this process (it turns autograd off and may set the thread count, for its
    whole process, as a script does) leave both as they found them: a later training test failed without a grad."""
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    yield
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A small built-in data set (8 train, 2 val images of 64-96 px), read-only for the tests that use it."""
    out = tmp_path_factory.mktemp("shapes")
    cfg = ShapesConfig(min_size=64, max_size=96, min_obj=16, max_obj=40, max_objects=3)
    write_split(out, "train", 8, seed=1, cfg=cfg)
    write_split(out, "val", 2, seed=1, cfg=cfg)
    return out


@pytest.fixture(scope="session")
def squares_dir(tmp_path_factory) -> Path:
    """8 train and 3 val images with one square each, where `fixed_box_checkpoint` finds it (tests/fixed_box.py);
    read-only for the tests that use it."""
    out = tmp_path_factory.mktemp("squares")
    write_square_split(out, "train", 8)
    write_square_split(out, "val", 3)
    return out


@pytest.fixture(scope="session")
def fixed_box_checkpoint(tmp_path_factory) -> Path:
    """The tiny_hourglass checkpoint of tests/fixed_box.py: one box per image, at the square of `squares_dir`."""
    return save_fixed_box_checkpoint(tmp_path_factory.mktemp("fixed_box") / "checkpoint.pt")
