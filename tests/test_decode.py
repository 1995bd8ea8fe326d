"""utils/decode.py against a slow per-pixel, per-pair Python reference, and hand-built edge cases."""
import math

import numpy as np
import pytest
import torch

from utils.decode import decode, heatmap_peaks, window_max


def reference_decode(out: dict, image: int, K: int, ae_threshold: float, num_dets: int) -> np.ndarray:
    """One image, loops over pixels, pairs and centers: the kept boxes (M, 8), highest score first."""

    def peaks(kind: str) -> list[dict]:
        heat = 1 / (1 + np.exp(-out[f"hm_{kind}"][image].numpy()))
        c, h, w = heat.shape
        found = []
        for k in range(c):
            for y in range(h):
                for x in range(w):
                    window = heat[k, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2]
                    if heat[k, y, x] == window.max():
                        point = dict(score=heat[k, y, x], label=k, x=x + out[f"off_{kind}"][image, 0, y, x].item(),
                                     y=y + out[f"off_{kind}"][image, 1, y, x].item())
                        if kind != "ct":
                            point["emb"] = out[f"emb_{kind}"][image, 0, y, x].item()
                        found.append(point)
        assert len(found) >= K, "the reference needs at least K peaks per map"
        return sorted(found, key=lambda p: -p["score"])[:K]

    tls, brs, cts = peaks("tl"), peaks("br"), peaks("ct")
    pairs = [
        (t, b) for t in tls for b in brs
        if t["label"] == b["label"] and abs(t["emb"] - b["emb"]) <= ae_threshold
        and b["x"] >= t["x"] and b["y"] >= t["y"]
    ]
    pairs = sorted(pairs, key=lambda tb: -(tb[0]["score"] + tb[1]["score"]) / 2)[:num_dets]
    rows = []
    for t, b in pairs:
        width, height = b["x"] - t["x"], b["y"] - t["y"]
        n = 3 if width * height * 16 <= 150**2 else 5
        cx, cy = (t["x"] + b["x"]) / 2, (t["y"] + b["y"]) / 2
        half_w, half_h = width / (2 * n), height / (2 * n)
        inside = [
            c["score"] for c in cts
            if c["label"] == t["label"] and cx - half_w < c["x"] < cx + half_w and cy - half_h < c["y"] < cy + half_h
        ]
        if inside:
            score = (t["score"] + b["score"] + max(inside)) / 3
            rows.append([t["x"], t["y"], b["x"], b["y"], score, t["score"], b["score"], t["label"]])
    rows = sorted(rows, key=lambda r: -r[4])
    return np.array(rows, dtype=np.float64).reshape(-1, 8)


def random_outputs(gen: torch.Generator, n: int, c: int, size: int) -> dict:
    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    out = {f"hm_{k}": rand(n, c, size, size) * 6 - 4 for k in ("tl", "br", "ct")}
    out.update({f"off_{k}": rand(n, 2, size, size) for k in ("tl", "br", "ct")})
    out.update({f"emb_{k}": rand(n, 1, size, size) * 3 for k in ("tl", "br")})
    # bottom-right corners and centers more likely lower right: more valid pairs and center hits
    ramp = torch.linspace(-1, 1, size, dtype=torch.float64)
    out["hm_br"] += 2 * (ramp[None, :] + ramp[:, None])
    out["hm_tl"] -= 2 * (ramp[None, :] + ramp[:, None])
    return out


@pytest.mark.parametrize("seed, K, num_dets", [(0, 12, 1000), (1, 20, 1000), (2, 20, 15), (4, 8, 40), (5, 30, 1000)])
def test_matches_reference(seed, K, num_dets):
    gen = torch.Generator().manual_seed(seed)
    out = random_outputs(gen, n=2, c=3, size=14)
    dets = decode(out, K=K, ae_threshold=0.5, num_dets=num_dets, kernel=3)
    assert dets.shape == (2, min(num_dets, K * K), 8) and dets.dtype == torch.float64
    kept_total = 0
    for image in range(2):
        want = reference_decode(out, image, K, 0.5, num_dets)
        rows = dets[image].numpy()
        assert np.all(np.diff(rows[:, 4]) <= 0)
        got = rows[rows[:, 4] >= 0]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
        assert np.all(rows[rows[:, 4] < 0, 4] == -1)
        kept_total += len(want)
    assert kept_total > 0 and kept_total < 2 * min(num_dets, K * K), "the data must keep some boxes and reject some"


def one_object(size: int, tl: tuple, br: tuple, ct: tuple, labels=(0, 0, 0), emb=(1.0, 1.0), c: int = 2) -> dict:
    """Outputs with a single peak per map (logit 2) at the cells of tl, br, ct (output units), exact offsets.

    The flat background (logit -10) is a plateau of tiny peaks; its embeddings (+100 for tl, -100 for br) keep
    background corners from pairing with anything, so only the object's own pair can form a box."""
    out = {}
    for kind, point, label in (("tl", tl, labels[0]), ("br", br, labels[1]), ("ct", ct, labels[2])):
        hm = torch.full((1, c, size, size), -10.0)
        off = torch.zeros(1, 2, size, size)
        x, y = int(point[0]), int(point[1])
        hm[0, label, y, x] = 2.0
        off[0, :, y, x] = torch.tensor([point[0] - x, point[1] - y])
        out[f"hm_{kind}"], out[f"off_{kind}"] = hm, off
        if kind != "ct":
            out[f"emb_{kind}"] = torch.full((1, 1, size, size), 100.0 if kind == "tl" else -100.0)
            out[f"emb_{kind}"][0, 0, y, x] = emb[0 if kind == "tl" else 1]
    return out


def kept(dets: torch.Tensor) -> torch.Tensor:
    """Boxes of image 0 that passed pairing and the center check."""
    return dets[0][dets[0, :, 4] >= 0]


def test_single_object_exact():
    out = one_object(32, tl=(2.25, 3.5), br=(20.75, 17.0), ct=(11.5, 10.25), labels=(1, 1, 1))
    boxes = kept(decode(out, K=5))
    s = 1 / (1 + math.exp(-2.0))
    assert boxes.shape == (1, 8)
    np.testing.assert_allclose(boxes[0].numpy(), [2.25, 3.5, 20.75, 17.0, s, s, s, 1], rtol=1e-6)


def test_no_valid_pair():
    cases = [
        dict(tl=(10.5, 3.5), br=(5.5, 17.0), ct=(8.0, 10.0)),  # br left of tl
        dict(tl=(2.5, 18.5), br=(20.5, 17.0), ct=(11.0, 17.7)),  # br above tl
        dict(tl=(2.5, 3.5), br=(20.5, 17.0), ct=(11.5, 10.25), labels=(0, 1, 0)),  # classes differ
        dict(tl=(2.5, 3.5), br=(20.5, 17.0), ct=(11.5, 10.25), emb=(0.0, 0.6)),  # embeddings too far apart
    ]
    for case in cases:
        dets = decode(one_object(32, **case), K=5)
        assert dets.shape == (1, 25, 8)
        assert len(kept(dets)) == 0, case
    assert len(kept(decode(one_object(32, (2.5, 3.5), (20.5, 17.0), (11.5, 10.25), emb=(0.0, 0.5)), K=5))) == 1


def test_center_check_rejects():
    tl, br = (2.0, 2.0), (20.0, 20.0)  # 18 x 18 cells = 72 x 72 input pixels: n = 3, region (8, 14)
    assert len(kept(decode(one_object(32, tl, br, (13.9, 8.1)), K=5))) == 1
    for ct in [(14.0, 11.0), (11.0, 8.0), (11.0, 11.0)]:
        labels = (0, 0, 1) if ct == (11.0, 11.0) else (0, 0, 0)  # on the border, or the wrong class
        assert len(kept(decode(one_object(32, tl, br, ct, labels=labels), K=5))) == 0, ct


def test_region_size_switches_at_150_pixels():
    # 37.5 cells = 150 input pixels: area 150^2 -> n = 3, region (12.5, 25); a bit larger -> n = 5, (15.0x, 22.5x)
    center = (13.0, 18.75)
    assert len(kept(decode(one_object(48, (0.0, 0.0), (37.5, 37.5), center), K=5))) == 1
    assert len(kept(decode(one_object(48, (0.0, 0.0), (37.6, 37.5), center), K=5))) == 0
    assert len(kept(decode(one_object(48, (0.0, 0.0), (37.6, 37.5), (16.0, 18.75)), K=5))) == 1


def test_half_precision_outputs_and_small_maps():
    out = {k: v.half() for k, v in one_object(4, (0.5, 0.5), (3.5, 3.5), (2.0, 2.0), c=1).items()}
    dets = decode(out, K=100, num_dets=1000)  # K above C * h * w = 16 and num_dets above 16^2
    assert dets.dtype == torch.float32 and dets.shape == (1, 256, 8)
    assert len(kept(dets)) == 1


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_window_max_is_max_pool(kernel):
    gen = torch.Generator().manual_seed(kernel)
    for shape in [(2, 3, 9, 14), (1, 1, 1, 5), (1, 2, 3, 2)]:
        x = torch.randint(-3, 3, shape, generator=gen).float()  # small integers: many ties
        want = torch.nn.functional.max_pool2d(x, kernel, stride=1, padding=kernel // 2)
        assert torch.equal(window_max(x, kernel), want)
    peaks = heatmap_peaks(x, kernel)
    assert torch.equal(peaks == x, want == x) and torch.all(peaks[want != x] == float("-inf"))
    with pytest.raises(ValueError, match="odd"):
        heatmap_peaks(x, 2)
