"""pytest set-up for the whole repository: the `cuda` marker for tests that need a GPU (`pytest -m cuda` runs
only them); they are skipped when no GPU is visible, so the suite passes on CPU-only machines and CI. Every test
starts with the global random generators seeded from its own name, so that a test drawing without a generator of
its own draws the same data whichever tests ran before it: its failure can be reproduced by running it alone."""
import random
import zlib

import numpy as np
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped when torch.cuda.is_available() is false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded_by_test_name(request):
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
