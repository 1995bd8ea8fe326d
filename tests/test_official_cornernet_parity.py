"""Converted official CornerNet weights against outputs recorded from CornerNet's own model code.

tests/data/official_cornernet_parity.npz holds what princeton-vl/CornerNet's network (`kp` of
models/py_utils/kp.py with the layers of models/CornerNet.py: 2 stacks, 5 levels, the block counts of
Hourglass-104, at a few channels, 3 classes) gave in eval mode on `synthetic_image`, with its weights set to
`synthetic_weights` of the names and shapes of its own state dict (stored in the fixture, as its nnet/py_factory.py
saves them: a `module.` prefix, no BN counters): the six outputs that `kp._test` hands to `_decode`, and what its
`_decode` made of the outputs of tests/test_official_parity.py `synthetic_outputs`. tests/data/README.md says how
it was made. Here the same weights go through tools/convert_official.py into `--method cornernet` and our network,
and the same outputs through our decoding.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from nets import ARCHS, METHODS, build_model, model_from_checkpoint
from tests.test_official_parity import synthetic_outputs
from tools.convert_official import convert_state_dict, converted_checkpoint, detect_method
from utils.decode import decode

FIXTURE = Path(__file__).parent / "data" / "official_cornernet_parity.npz"
KEYS = Path(__file__).parent / "data" / "official_keys_CornerNet.txt"
WEIGHT_SEED, IMAGE_SEED = 25, 26
# The stripped network in our terms: CornerNet's corner pooling keeps its fixed 128 channels, its heads' middle
# width is the hourglass's first width.
STRIPPED = dict(num_classes=3, num_stacks=2, dims=[4, 4, 6, 6, 6, 8], blocks=ARCHS["large_hourglass"]["blocks"],
                stem_dim=4, cnv_dim=4, pool_dim=128, head_dim=4, **METHODS["cornernet"])
OUTPUTS = ("hm_tl", "hm_br", "emb_tl", "emb_br", "off_tl", "off_br")  # the order of kp._test's outputs


def synthetic_weights(names: list[str], shapes: list[tuple[int, ...]], seed: int = WEIGHT_SEED
                      ) -> dict[str, torch.Tensor]:
    """A value for every tensor of a state dict, drawn in its order: BN scales in [0.8, 1.2], running variances in
    [0.8, 1.25], running means and biases in [-0.1, 0.1], kernels in +-1.7 / sqrt(fan in): the output maps are of
    order 1 and vary over the image by 10-25% of their largest value (smaller kernels let the constant shifts
    drown the image within the 100-odd layers, larger ones grow the residual sums to 1e4 and more). Uniform draws
    only (stable numpy streams)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in zip(names, shapes):
        if name.endswith("running_var"):
            value = rng.uniform(0.8, 1.25, shape)
        elif name.endswith(("running_mean", "bias")):
            value = rng.uniform(-0.1, 0.1, shape)
        elif len(shape) == 1:
            value = rng.uniform(0.8, 1.2, shape)
        else:
            value = rng.uniform(-1.7, 1.7, shape) / np.sqrt(np.prod(shape[1:]))
        weights[name] = torch.from_numpy(value.astype(np.float32))
    return weights


def synthetic_image(seed: int = IMAGE_SEED) -> torch.Tensor:
    """(1, 3, 127, 127), uniform in [-2, 2], about the range of a normalised image."""
    return torch.from_numpy(np.random.default_rng(seed).uniform(-2, 2, (1, 3, 127, 127)).astype(np.float32))


@pytest.fixture(scope="module")
def fx() -> dict:
    with np.load(FIXTURE) as f:
        out = dict(f)
    out["names"] = str(out["names"]).split()
    out["shapes"] = [tuple(int(s) for s in shape.split(",") if s) for shape in str(out["shapes"]).split()]
    return out


def official_state(fx: dict) -> dict[str, torch.Tensor]:
    return synthetic_weights(fx["names"], fx["shapes"])


def test_converted_network_gives_cornernets_outputs(fx):
    """Tolerance: the same float32 layers in the same order give the same bits on one machine (measured: 0.0 on
    every output); another machine's convolution kernels may sum in another order, ~1e-6 of the output's scale per
    layer over ~100 layers. 1e-4 of each output's largest magnitude leaves a wide margin, and is far below what one
    misplaced pair of weights changes (the second half)."""
    official = official_state(fx)
    assert detect_method(official) == "cornernet"
    state = converted_checkpoint(official, "large_hourglass", "cornernet", "fixture", config=STRIPPED)
    state["class_names"], state["category_ids"] = ["a", "b", "c"], [1, 2, 3]
    model = model_from_checkpoint(state, "converted")
    assert (model.corner_pool, model.center_branch) == ("plain", "none")
    assert state["args"]["method"] == "cornernet" and state["args"]["center_branch"] == "none"
    with torch.no_grad():
        ours = model.eval()(synthetic_image())
    assert list(ours) == list(OUTPUTS)
    for k in OUTPUTS:
        want = torch.from_numpy(fx[f"out_{k}"])
        assert ours[k].shape == want.shape
        assert (ours[k] - want).abs().max().item() <= 1e-4 * want.abs().max().item(), k
    # What the tolerance tells apart: CornerNet's p1 branch pools vertically (TopPool in tl_pool); with its weights
    # given to our horizontal branch instead, the top-left heatmap moves far beyond it.
    swapped = dict(state["model"])
    for part in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        for stack in (0, 1):
            v, h = f"branches.{stack}.pool_tl.conv_v.{part}", f"branches.{stack}.pool_tl.conv_h.{part}"
            swapped[v], swapped[h] = state["model"][h], state["model"][v]
    model.load_state_dict(swapped)
    with torch.no_grad():
        wrong = model(synthetic_image())["hm_tl"]
    want = torch.from_numpy(fx["out_hm_tl"])
    assert (wrong - want).abs().max().item() > 1e-2 * want.abs().max().item()  # measured: 0.31 of it


def test_our_decoding_is_cornernets_decoding(fx):
    """`synthetic_outputs` of tests/test_official_parity.py (clear corner pairs, batch 2), less the center maps,
    through our decode against CornerNet's `_decode` (K 30, kernel 3, ae_threshold 0.5, 200 pairs): the same valid
    boxes with the same scores and classes. Both compute the same float32 operations on the same numbers (ours the
    sigmoid after the peak selection, which selects the same peaks), so 1e-6 in map units and scores; pairs of
    score -1 are in no defined order and are not compared."""
    out = {k: v for k, v in synthetic_outputs(7, 200, 150, 1.0).items() if k in OUTPUTS}
    boxes, centers = decode(out, topk=30, ae_threshold=0.5, num_dets=200, kernel=3)
    assert centers is None
    for want, got in zip(fx["detections"], boxes.numpy()):
        want, got = want[want[:, 4] > -1], got[got[:, 4] > -1]
        assert len(want) > 20 and len(got) == len(want)
        np.testing.assert_allclose(by_score(got), by_score(want), rtol=0, atol=1e-6)


def by_score(rows: np.ndarray) -> np.ndarray:
    """Rows best score first, ties by coordinates."""
    return rows[np.lexsort((rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], -rows[:, 4]))]


def test_full_size_keys_convert_to_large_hourglass_cornernet_one_to_one():
    """The names and shapes of CornerNet's Hourglass-104 state dict (its models/CornerNet.py, PyTorch 2): every
    tensor fills one of ours, every one of ours is filled, the auto-detection calls it cornernet, and CenterNet's
    network refuses it."""
    official = {}
    for line in KEYS.read_text().splitlines():
        key, shape = line.split(" ")
        official[key] = torch.empty([int(s) for s in shape.split(",")] if shape else [], device="meta")
    assert detect_method(official) == "cornernet"
    converted = convert_state_dict(official, "large_hourglass", method="cornernet")
    with torch.device("meta"):
        expected = build_model("large_hourglass", 80, **METHODS["cornernet"]).state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == v.shape for k, v in expected.items())
    assert sum(v.numel() for k, v in official.items()) == sum(
        v.numel() for k, v in expected.items() if not k.endswith("num_batches_tracked"))
    with pytest.raises(KeyError, match="lacks .* weights of large_hourglass \\(centernet\\)"):
        convert_state_dict(official, "large_hourglass", method="centernet")
