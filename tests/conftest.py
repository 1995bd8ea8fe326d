"""Fixtures shared by the test modules."""
from pathlib import Path

import pytest

from datasets.shapes import ShapesConfig, write_split


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """A small built-in data set (8 train, 2 val images of 64-96 px), read-only for the tests that use it."""
    out = tmp_path_factory.mktemp("shapes")
    cfg = ShapesConfig(min_size=64, max_size=96, min_obj=16, max_obj=40, max_objects=3)
    write_split(out, "train", 8, seed=1, cfg=cfg)
    write_split(out, "val", 2, seed=1, cfg=cfg)
    return out
