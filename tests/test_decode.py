"""utils/decode.py against slow per-pixel, per-pair and per-center Python references, and hand-built edge cases."""
import math

import numpy as np
import pytest
import torch

from utils.decode import center_check, decode, heatmap_peaks, window_max


def reference_pairs(out: dict, image: int, topk: int, ae_threshold: float, num_dets: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One image, loops over pixels and pairs: (valid pairs (M, 8) best first, centers (K, 4) x y label score)."""

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
        assert len(found) >= topk, "the reference needs at least K peaks per map"
        return sorted(found, key=lambda p: -p["score"])[:topk]

    tls, brs, cts = peaks("tl"), peaks("br"), peaks("ct")
    pairs = [
        (t, b) for t in tls for b in brs
        if t["label"] == b["label"] and abs(t["emb"] - b["emb"]) <= ae_threshold
        and b["x"] >= t["x"] and b["y"] >= t["y"]
    ]
    pairs = sorted(pairs, key=lambda tb: -(tb[0]["score"] + tb[1]["score"]) / 2)[:num_dets]
    rows = [[t["x"], t["y"], b["x"], b["y"], (t["score"] + b["score"]) / 2, t["score"], b["score"], t["label"]]
            for t, b in pairs]
    centers = [[c["x"], c["y"], c["label"], c["score"]] for c in cts]
    return np.array(rows, dtype=np.float64).reshape(-1, 8), np.array(centers, dtype=np.float64)


def reference_center_check(boxes: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Box by box, center by center: the fused score with the first center inside the central region, else -1."""
    out = boxes.astype(np.float64).copy()
    for row in out:
        x1, y1, x2, y2, score = row[:5]
        n = 3 if (x2 - x1) * (y2 - y1) <= 150**2 else 5
        cx, cy, half_w, half_h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / (2 * n), (y2 - y1) / (2 * n)
        row[4] = -1
        for x, y, label, s in centers:
            if score > -1 and label == row[7] and cx - half_w < x < cx + half_w and cy - half_h < y < cy + half_h:
                row[4] = (2 * score + s) / 3
                break
    return out


def random_outputs(gen: torch.Generator, n: int, c: int, h: int, w: int) -> dict:
    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    out = {f"hm_{k}": rand(n, c, h, w) * 6 - 4 for k in ("tl", "br", "ct")}
    out.update({f"off_{k}": rand(n, 2, h, w) for k in ("tl", "br", "ct")})
    out.update({f"emb_{k}": rand(n, 1, h, w) * 3 for k in ("tl", "br")})
    # bottom-right corners and centers more likely lower right: more valid pairs and center hits
    ramp = torch.linspace(-1, 1, h, dtype=torch.float64)[:, None] + torch.linspace(-1, 1, w, dtype=torch.float64)
    out["hm_br"] += 2 * ramp
    out["hm_tl"] -= 2 * ramp
    return out


@pytest.mark.parametrize("seed, topk, num_dets", [(0, 12, 1000), (1, 20, 1000), (2, 20, 15), (4, 8, 40)])
def test_pairs_and_centers_match_reference(seed, topk, num_dets):
    gen = torch.Generator().manual_seed(seed)
    out = random_outputs(gen, n=2, c=3, h=13, w=17)  # not square: x and y cannot stand in for each other
    boxes, centers = decode(out, topk=topk, ae_threshold=0.5, num_dets=num_dets, kernel=3)
    assert boxes.shape == (2, min(num_dets, topk * topk), 8) and boxes.dtype == torch.float64
    assert centers.shape == (2, topk, 4)
    valid_total = 0
    for image in range(2):
        want, want_centers = reference_pairs(out, image, topk, 0.5, num_dets)
        rows = boxes[image].numpy()
        assert np.all(np.diff(rows[:, 4]) <= 0)
        np.testing.assert_allclose(rows[rows[:, 4] >= 0], want, rtol=1e-9, atol=1e-9)
        assert np.all(rows[rows[:, 4] < 0, 4] == -1)
        np.testing.assert_allclose(centers[image].numpy(), want_centers, rtol=1e-9, atol=1e-9)
        valid_total += len(want)
    assert valid_total > 0, "the data must pair some corners"
    if num_dets >= topk * topk:
        assert valid_total < 2 * topk * topk, "the data must reject some pairs"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_center_check_matches_reference(seed):
    # Boxes and centers in pixels, small and large boxes, several classes, some boxes already rejected (-1).
    rng = np.random.default_rng(seed)
    n, k = 300, 60
    xy = rng.uniform(0, 400, (n, 2))
    wh = rng.uniform(1, 300, (n, 2))
    boxes = np.concatenate([xy, xy + wh, rng.choice([-1, 0.3, 0.5, 0.7], (n, 1)), rng.uniform(0, 1, (n, 2)),
                            rng.integers(0, 3, (n, 1))], axis=1).astype(np.float32)
    centers = np.concatenate([rng.uniform(0, 600, (k, 2)), rng.integers(0, 3, (k, 1)), rng.uniform(0, 1, (k, 1))],
                             axis=1).astype(np.float32)
    got = center_check(boxes, centers)
    want = reference_center_check(boxes, centers)
    assert got.dtype == np.float32 and got.shape == (n, 8)
    np.testing.assert_array_equal(got[:, [0, 1, 2, 3, 5, 6, 7]], boxes[:, [0, 1, 2, 3, 5, 6, 7]])
    np.testing.assert_allclose(got[:, 4], want[:, 4], rtol=1e-6)
    hits = (got[:, 4] > -1).sum()
    assert 0 < hits < (boxes[:, 4] > -1).sum(), "the data must keep some boxes and reject some"
    assert center_check(boxes, np.zeros((0, 4), np.float32))[:, 4].tolist() == [-1] * n


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


def kept(out: dict, topk: int = 5, num_dets: int = 1000) -> np.ndarray:
    """Boxes of image 0 that passed pairing and the center check, the output cells taken as 4 x 4 pixels."""
    boxes, centers = decode(out, topk=topk, num_dets=num_dets)
    boxes, centers = boxes[0].float().numpy(), centers[0].float().numpy()
    boxes[:, :4] *= 4
    centers[:, :2] *= 4
    rows = center_check(boxes, centers)
    return rows[rows[:, 4] > -1]


def test_single_object_exact():
    out = one_object(32, tl=(2.25, 3.5), br=(20.75, 17.0), ct=(11.5, 10.25), labels=(1, 1, 1))
    boxes = kept(out)
    s = 1 / (1 + math.exp(-2.0))
    assert boxes.shape == (1, 8)
    np.testing.assert_allclose(boxes[0], [9, 14, 83, 68, s, s, s, 1], rtol=1e-6)


def test_no_valid_pair():
    cases = [
        dict(tl=(10.5, 3.5), br=(5.5, 17.0), ct=(8.0, 10.0)),  # br left of tl
        dict(tl=(2.5, 18.5), br=(20.5, 17.0), ct=(11.0, 17.7)),  # br above tl
        dict(tl=(2.5, 3.5), br=(20.5, 17.0), ct=(11.5, 10.25), labels=(0, 1, 0)),  # classes differ
        dict(tl=(2.5, 3.5), br=(20.5, 17.0), ct=(11.5, 10.25), emb=(0.0, 0.6)),  # embeddings too far apart
    ]
    for case in cases:
        boxes, _ = decode(one_object(32, **case), topk=5)
        assert boxes.shape == (1, 25, 8) and (boxes[..., 4] == -1).all(), case
    assert len(kept(one_object(32, (2.5, 3.5), (20.5, 17.0), (11.5, 10.25), emb=(0.0, 0.5)))) == 1


def test_center_check_rejects():
    tl, br = (2.0, 2.0), (20.0, 20.0)  # 18 x 18 cells = 72 x 72 pixels: n = 3, region (8, 14) in cells
    assert len(kept(one_object(32, tl, br, (13.9, 8.1)))) == 1
    for ct in [(14.0, 11.0), (11.0, 8.0), (11.0, 11.0)]:
        labels = (0, 0, 1) if ct == (11.0, 11.0) else (0, 0, 0)  # on the border, or the wrong class
        assert len(kept(one_object(32, tl, br, ct, labels=labels))) == 0, ct


def test_region_size_switches_at_150_pixels():
    # 37.5 cells = 150 pixels: area 150^2 -> n = 3, region (12.5, 25); a bit larger -> n = 5, (15.0x, 22.5x)
    center = (13.0, 18.75)
    assert len(kept(one_object(48, (0.0, 0.0), (37.5, 37.5), center))) == 1
    assert len(kept(one_object(48, (0.0, 0.0), (37.6, 37.5), center))) == 0
    assert len(kept(one_object(48, (0.0, 0.0), (37.6, 37.5), (16.0, 18.75)))) == 1


def test_half_precision_outputs_and_small_maps():
    out = {k: v.half() for k, v in one_object(4, (0.5, 0.5), (3.5, 3.5), (2.0, 2.0), c=1).items()}
    boxes, centers = decode(out, topk=100, num_dets=1000)  # K above C * h * w = 16 and num_dets above 16^2
    assert boxes.dtype == torch.float32 and boxes.shape == (1, 256, 8) and centers.shape == (1, 16, 4)
    assert len(kept(out, topk=100)) == 1


def test_a_non_finite_center_taken_into_the_top_k_keeps_no_box():
    # One class of 6 x 6 cells and K = 100: every cell is a keypoint, a non-finite one too. The box's central
    # region (2.17, 3.83)^2 holds one cell, (3, 3), its center's; a NaN offset there leaves the box no center.
    out = one_object(6, tl=(0.5, 0.5), br=(5.5, 5.5), ct=(3.0, 3.0), c=1)
    assert len(kept(out, topk=100)) == 1
    out["off_ct"][0, 0, 3, 3] = float("nan")
    boxes, centers = decode(out, topk=100)
    assert torch.isfinite(boxes).all() and torch.isfinite(centers).all()
    # its keypoint is at the cell itself, without the offset, of no class, with score 0
    assert centers[0][centers[0, :, 2] == -1].tolist() == [[3.0, 3.0, -1.0, 0.0]]
    assert len(kept(out, topk=100)) == 0


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
