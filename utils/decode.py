"""Keypoint-triplet decoding: network outputs of one forward -> scored boxes in output-map units, batched in torch.

Facts from the official CenterNet (models/py_utils/kp_utils.py `_decode`, test/coco.py `kp_detection`):
- heatmaps: sigmoid, 3x3 max-pool NMS (a peak keeps its score, everything else becomes 0), top K over classes
  and positions, for top-left corners, bottom-right corners and centers alike (here: NMS and top K on the
  logits, then the sigmoid of the K kept, which selects the same peaks);
- a (tl, br) pair is a box when both have the same class, |e_tl - e_br| <= ae_threshold and br_x >= tl_x,
  br_y >= tl_y (the official code rejects only br < tl); its corner score is (s_tl + s_br) / 2 and the best
  `num_dets` pairs are kept;
- center check: the central region of a box is the middle 1/n of its width and height, n = 3 when its area in
  input pixels is at most 150^2 and n = 5 otherwise, with strict inequalities. A box is kept only when one of
  the K centers of its class lies inside; its score becomes (s_tl + s_br + s_ct) / 3. The official code takes
  the first matching center in its list; ours takes the best-scoring one, which is the same for one image.
  All K centers take part, with no score threshold (as in the official code).
Differences: the official code checks centers after rescaling to the original image (150^2 original pixels,
centers of the flipped image included); here each forward's boxes are checked against its own centers in
output units, so that one function serves every scale and flip.
"""
import torch
import torch.nn.functional as F

STRIDE = 4  # input pixels per output cell
SMALL_BOX_AREA = 150**2  # input pixels: boxes up to this area use the 1/3 central region, larger ones 1/5


def window_max(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """(N, C, h, w) -> the maximum over each kernel x kernel window (odd kernel, padded with -inf): the same as
    F.max_pool2d(x, kernel, 1, kernel // 2), as two separable passes (10x faster on the CPU)."""
    r = kernel // 2
    h, w = x.shape[-2:]
    padded = F.pad(x, (r, r, r, r), value=float("-inf"))
    rows = padded[..., :, :w]
    for s in range(1, kernel):
        rows = torch.maximum(rows, padded[..., :, s:s + w])
    out = rows[..., :h, :]
    for s in range(1, kernel):
        out = torch.maximum(out, rows[..., s:s + h, :])
    return out


def heatmap_peaks(logits: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """(N, C, h, w) logits -> same, -inf everywhere except at the maxima of their kernel x kernel window.
    On logits rather than probabilities: the sigmoid is monotonic, so the peaks are the same (without the ties
    that saturated probabilities would make), and only the top K need a sigmoid."""
    if kernel % 2 != 1:
        raise ValueError(f"utils/decode.py: the NMS kernel must be odd, got {kernel}")
    return logits.masked_fill(window_max(logits, kernel) != logits, float("-inf"))


def topk_keypoints(heat: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, C, h, w) -> scores (N, K), labels (N, K) int64, flat spatial indices y * w + x (N, K) int64."""
    n, c, h, w = heat.shape
    scores, inds = heat.reshape(n, -1).topk(min(K, c * h * w))
    return scores, inds // (h * w), inds % (h * w)


def gather_maps(maps: torch.Tensor, inds: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) at flat spatial indices (N, K) -> (N, K, D)."""
    n, d = maps.shape[:2]
    flat = maps.reshape(n, d, -1)
    return flat.gather(2, inds.unsqueeze(1).expand(n, d, inds.shape[1])).transpose(1, 2)


def keypoints(out: dict, kind: str, K: int, kernel: int) -> dict[str, torch.Tensor]:
    """Top K keypoints of `kind` (tl, br or ct): score, label, x, y (cell + offset, output units), all (N, K)."""
    logits, labels, inds = topk_keypoints(heatmap_peaks(out[f"hm_{kind}"], kernel), K)
    scores = torch.sigmoid(logits)
    width = out[f"hm_{kind}"].shape[3]
    offsets = gather_maps(out[f"off_{kind}"], inds)  # (N, K, 2) x, y
    points = dict(score=scores, label=labels, x=(inds % width).to(scores.dtype) + offsets[..., 0],
                  y=(inds // width).to(scores.dtype) + offsets[..., 1])
    if kind != "ct":
        points["emb"] = gather_maps(out[f"emb_{kind}"], inds)[..., 0]
    return points


def pair_corners(tl: dict, br: dict, ae_threshold: float, num_dets: int) -> torch.Tensor:
    """Top-left x bottom-right pairs -> (N, D, 8) rows x1 y1 x2 y2 score tl_score br_score label, best D =
    min(num_dets, K * K) by mean corner score; invalid pairs have score -1."""
    n, k = tl["score"].shape
    scores = (tl["score"][:, :, None] + br["score"][:, None, :]) / 2  # (N, K_tl, K_br)
    invalid = (
        (tl["label"][:, :, None] != br["label"][:, None, :])
        | ((tl["emb"][:, :, None] - br["emb"][:, None, :]).abs() > ae_threshold)
        | (br["x"][:, None, :] < tl["x"][:, :, None])
        | (br["y"][:, None, :] < tl["y"][:, :, None])
    )
    scores = scores.masked_fill(invalid, -1).reshape(n, -1)
    scores, pair = scores.topk(min(num_dets, scores.shape[1]))
    corner = {"tl": pair // k, "br": pair % k}
    cols = [
        torch.stack([p["x"], p["y"], p["score"]], dim=2).gather(1, corner[name][..., None].expand(-1, -1, 3))
        for name, p in (("tl", tl), ("br", br))
    ]  # (N, D, 3) x, y, score of each corner
    label = tl["label"].gather(1, corner["tl"]).to(scores.dtype)
    return torch.stack([cols[0][..., 0], cols[0][..., 1], cols[1][..., 0], cols[1][..., 1], scores,
                        cols[0][..., 2], cols[1][..., 2], label], dim=2)


def center_check(dets: torch.Tensor, ct: dict) -> torch.Tensor:
    """(N, D, 8) boxes from `pair_corners` and the top K centers -> (N, D, 8) with the fused score
    (s_tl + s_br + s_ct) / 3 for boxes with a same-class center in their central region, -1 for the others."""
    x1, y1, x2, y2, score, _, _, label = dets.unbind(2)
    area = (x2 - x1) * (y2 - y1) * STRIDE**2
    parts = torch.where(area <= SMALL_BOX_AREA, 3.0, 5.0).to(dets.dtype)
    # the middle 1/n spans 1/(2n) of the size on each side of the box center: for n = 3, (2 x1 + x2) / 3 ...
    a, b = parts + 1, parts - 1
    left, right = (a * x1 + b * x2) / (2 * parts), (b * x1 + a * x2) / (2 * parts)
    top, bottom = (a * y1 + b * y2) / (2 * parts), (b * y1 + a * y2) / (2 * parts)
    cx, cy = ct["x"][:, None, :], ct["y"][:, None, :]  # (N, 1, K)
    inside = (
        (cx > left[..., None]) & (cx < right[..., None]) & (cy > top[..., None]) & (cy < bottom[..., None])
        & (ct["label"][:, None, :] == label.long()[..., None])
    )  # (N, D, K)
    best_ct = ct["score"][:, None, :].expand_as(inside).masked_fill(~inside, -1).amax(dim=2)
    keep = (best_ct >= 0) & (score >= 0)
    fused = torch.where(keep, (2 * score + best_ct) / 3, torch.full_like(score, -1))
    return torch.cat([dets[..., :4], fused[..., None], dets[..., 5:]], dim=2)


@torch.no_grad()
def decode(out: dict, K: int = 70, ae_threshold: float = 0.5, num_dets: int = 1000, kernel: int = 3) -> torch.Tensor:
    """Eval-mode network outputs (CONTRACT.md keys, (N, *, h, w)) -> (N, D, 8) rows
    x1 y1 x2 y2 score tl_score br_score label in output-map units, D = min(num_dets, K^2), highest score first;
    boxes that failed pairing or the center check have score -1 (and come last)."""
    out = {key: value.to(torch.promote_types(value.dtype, torch.float32)) for key, value in out.items()}
    tl = keypoints(out, "tl", K, kernel)
    br = keypoints(out, "br", K, kernel)
    ct = keypoints(out, "ct", K, kernel)
    dets = center_check(pair_corners(tl, br, ae_threshold, num_dets), ct)
    order = dets[..., 4].argsort(dim=1, descending=True, stable=True)
    return dets.gather(1, order[..., None].expand_as(dets))
