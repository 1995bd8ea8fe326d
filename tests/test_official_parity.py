"""Our test-time pipeline against outputs recorded from the official CenterNet test code.

tests/data/official_parity.json holds, for a few images and test settings, the final detections (x1 y1 x2 y2
score label, after soft-NMS and the max-per-image cut) that the official `kp_detection` (test/coco.py, with
`_decode` of models/py_utils/kp_utils.py and external/nms.pyx) produced when its network was replaced by
`synthetic_outputs` below; tests/data/README.md says how. Here the same outputs go through `engine.inference.detect`.

Tolerances: the official code computes in float32 (a few roundings of numbers below 2000 px, relative 6e-8 each),
ours in float64 then float32, so boxes agree to 1e-3 px and scores to 1e-5; counts and classes exactly.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.transforms import eval_input
from engine.inference import InferenceConfig, detect

FIXTURE = Path(__file__).parent / "data" / "official_parity.json"
NUM_CLASSES = 3


def synthetic_outputs(seed: int, height: int, width: int, scale: float, num_objects: int = 10) -> dict:
    """Eval-mode outputs (batch 2: the test input and its flipped copy) for an image of height x width at `scale`:
    low background logits with random embeddings and offsets, and `num_objects` boxes (with near duplicates) whose
    corners and centers are peaks with matching embeddings, mirrored in the flipped copy. Uniform draws only
    (stable numpy streams)."""
    new_h, new_w = int(height * scale), int(width * scale)
    in_h, in_w = new_h | 127, new_w | 127
    oh, ow = (in_h + 1) // 4, (in_w + 1) // 4
    rng = np.random.default_rng(seed)
    out = {f"hm_{k}": rng.uniform(-8, -2, (2, NUM_CLASSES, oh, ow)) for k in ("tl", "br", "ct")}
    out.update({f"emb_{k}": rng.uniform(-4, 4, (2, 1, oh, ow)) for k in ("tl", "br")})
    out.update({f"off_{k}": rng.uniform(0, 1, (2, 2, oh, ow)) for k in ("tl", "br", "ct")})
    px, py = (in_w // 2 - new_w // 2) / 4, (in_h // 2 - new_h // 2) / 4  # the image on the map
    objects = []
    for _ in range(num_objects):
        bw, bh = rng.uniform(3, max(4, new_w / 5)), rng.uniform(3, max(4, new_h / 5))
        x1, y1 = px + rng.uniform(-2, max(-1, new_w / 4 - bw + 2)), py + rng.uniform(-2, max(-1, new_h / 4 - bh + 2))
        label, emb = int(rng.integers(NUM_CLASSES)), rng.uniform(-3, 3)
        objects.append((x1, y1, x1 + bw, y1 + bh, label, emb))
        for _ in range(int(rng.integers(0, 3))):
            d = rng.integers(-2, 3, 4)
            objects.append((x1 + d[0], y1 + d[1], x1 + bw + d[2], y1 + bh + d[3], label, emb + rng.uniform(-.1, .1)))
    for b in range(2):
        for x1, y1, x2, y2, label, emb in objects:
            if b == 1:
                x1, x2 = ow - x2, ow - x1
            emb += rng.uniform(-0.05, 0.05)
            for kind, x, y in (("tl", x1, y1), ("br", x2, y2), ("ct", (x1 + x2) / 2, (y1 + y2) / 2)):
                xi, yi = int(np.clip(np.floor(x), 0, ow - 1)), int(np.clip(np.floor(y), 0, oh - 1))
                hm = out[f"hm_{kind}"][b, label]
                hm[yi, xi] = max(hm[yi, xi], rng.uniform(-2.5, 3))
                out[f"off_{kind}"][b, :, yi, xi] = (x - xi, y - yi)
                if kind != "ct":
                    out[f"emb_{kind}"][b, 0, yi, xi] = emb
    return {k: torch.from_numpy(v.astype(np.float32)) for k, v in out.items()}


def case_seed(image: int, scale: float) -> int:
    return 1000 * image + int(round(100 * scale))


def run_ours(case: dict, inplace_nms: bool) -> np.ndarray:
    height, width = case["size"]
    cfg = InferenceConfig(merge=case["merge"], inplace_nms=inplace_nms)
    outputs = [synthetic_outputs(case_seed(case["image"], s), height, width, s) for s in case["scales"]]
    image = np.zeros((height, width, 3), np.uint8)  # the stub network does not look at the pixels
    inputs = [eval_input(image, s, flip=True) for s in case["scales"]]
    return detect(lambda images: outputs.pop(0), inputs, cfg, torch.device("cpu"))


def by_score(rows: np.ndarray) -> np.ndarray:
    """Rows in one canonical order: score, then class and coordinates (rounded well above the tolerances)."""
    keys = [np.round(rows[:, c], 2) for c in (3, 2, 1, 0)] + [rows[:, 5], -np.round(rows[:, 4], 4)]
    return rows[np.lexsort(keys)]


CASES = json.loads(FIXTURE.read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_inplace_nms_reproduces_the_official_detections(case):
    want = by_score(np.array(case["detections"], np.float64).reshape(-1, 6))
    got = by_score(run_ours(case, inplace_nms=True).astype(np.float64))
    assert len(got) == len(want) and len(want) > 20
    np.testing.assert_array_equal(got[:, 5], want[:, 5])
    np.testing.assert_allclose(got[:, :4], want[:, :4], atol=1e-3, rtol=0)
    np.testing.assert_allclose(got[:, 4], want[:, 4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if len(c["detections"]) < 100 and not c["merge"]],
                         ids=lambda c: c["name"])
def test_default_nms_keeps_the_official_rows_without_stale_copies(case):
    # Below the max-per-image cut and without merging (whose official form reads stale corner scores), the
    # official output is our soft-NMS result plus the stale rows.
    want = np.array(case["detections"], np.float64).reshape(-1, 6)
    got = run_ours(case, inplace_nms=False).astype(np.float64)
    assert 0 < len(got) < len(want)
    diff = np.abs(got[:, None, :] - want[None, :, :])  # (ours, official, 6)
    matched = ((diff[..., :4].max(-1) < 1e-3) & (diff[..., 4] < 1e-5) & (diff[..., 5] == 0)).any(axis=1)
    assert matched.all()


def test_defaults_are_the_official_configs():
    from engine.inference import build_eval_config, official_config

    # test.py by path: a plain `import test` could find the standard library's `test` package
    spec = importlib.util.spec_from_file_location("centernet47_test_flags", Path(__file__).parents[1] / "test.py")
    test_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_cli)

    def config(*flags):
        args = test_cli.get_args_parser().parse_args(["--log_name", "x", *flags])
        args.test_scales = test_cli.parse_scales(args.test_scales)
        return build_eval_config(args)

    single, multi = config(), config("--test_scales", "0.6,1,1.2,1.5,1.8")
    assert single == official_config(1) == InferenceConfig()
    assert (single.topk, single.nms_threshold, single.nms_method, single.sigma, single.max_per_image) == (70, 0.5, 2,
                                                                                                         0.5, 100)
    assert not single.merge and not single.inplace_nms
    assert multi == official_config(5) and multi.merge and multi.weight_exp == 10
    assert config("--merge", "on").merge and not config("--merge", "off", "--test_scales", "1,2").merge
    custom = config("--topk", "20", "--w_exp", "8", "--inplace_nms")
    assert (custom.topk, custom.weight_exp, custom.inplace_nms) == (20, 8, True)
