"""Keypoint-triplet decoding (models/py_utils/kp_utils.py `_decode` of the official CenterNet) and the center
check (test/coco.py `kp_detection`).

`decode`, in torch, on the eval-mode outputs of one forward (format: docs/FORMAT.md):
- heatmaps: sigmoid, 3x3 max-pool NMS (a peak keeps its score, everything else becomes 0), top K over classes
  and positions, for top-left corners, bottom-right corners and centers alike (here: NMS and top K on the
  logits, then the sigmoid of the K kept, which selects the same peaks);
- a (tl, br) pair is a box when both have the same class, |e_tl - e_br| <= ae_threshold and br_x >= tl_x,
  br_y >= tl_y (the official code rejects only br < tl); its score is (s_tl + s_br) / 2, the other pairs get -1,
  and the best `num_dets` pairs are returned in score order, with the K centers. Outputs without a center
  heatmap (a network without a center branch) decode as CornerNet's `_decode` (github princeton-vl/CornerNet,
  models/py_utils/kp_utils.py): the same pairs, and no centers.
- a cell where any output of a keypoint kind is NaN or infinite (a diverged network, 16-bit overflow) holds no
  keypoint of that kind: its logits count as -inf, so that it neither suppresses its neighbours in the max-pool nor
  ranks above them, and a keypoint taken there all the same (a map with fewer than K finite cells) makes no box and
  matches no box (center label -1). The other cells decode as they would without it.

`center_check`, in numpy, runs once per image on the boxes of every forward (all scales, both flips) after they
were mapped to the original image (engine/inference.py), as the official code does: the central region of a box
is the middle 1/n of its width and height, n = 3 when its area in original pixels is at most 150^2 and n = 5
otherwise, with strict inequalities. A box is kept only when a center of its class lies inside; its score becomes
(2 s + s_ct) / 3 with s_ct the score of the first such center in the given order (the official `argmax`). All K
centers take part, with no score threshold.
"""
import numpy as np
import torch
import torch.nn.functional as F

SMALL_BOX_AREA = 150**2  # original pixels: boxes up to this area use the 1/3 central region, larger ones 1/5


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


def topk_keypoints(heat: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, C, h, w) -> scores (N, K), labels (N, K) int64, flat spatial indices y * w + x (N, K) int64,
    K = min(topk, C h w)."""
    n, c, h, w = heat.shape
    scores, inds = heat.reshape(n, -1).topk(min(topk, c * h * w))
    return scores, inds // (h * w), inds % (h * w)


def gather_maps(maps: torch.Tensor, inds: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) at flat spatial indices (N, K) -> (N, K, D)."""
    n, d = maps.shape[:2]
    flat = maps.reshape(n, d, -1)
    return flat.gather(2, inds.unsqueeze(1).expand(n, d, inds.shape[1])).transpose(1, 2)


# The finiteness check below tests sums, which take a tenth of the time of torch.isfinite on every value: a sum is
# NaN or infinite when one of its terms is, and otherwise only when finite terms overflow it (outputs near 1e31),
# which no network outputs.
def finite_cells(out: dict, kind: str) -> torch.Tensor:
    """(N, h, w) bool: True at the cells where every output map of `kind` (heatmap logits, offsets, embedding) is
    finite in every channel."""
    return sum(value.sum(dim=1) for key, value in out.items() if key.endswith(f"_{kind}")).isfinite()


def keypoints(out: dict, kind: str, topk: int, kernel: int) -> dict[str, torch.Tensor]:
    """Top K keypoints of `kind` (tl, br or ct): score, label, x, y (cell + offset, output units), all (N, K), and
    `finite` (N, K), False for a keypoint taken at a cell whose outputs are not finite (its x and y are then the
    cell's, without the offset; pair_corners pairs it with nothing), and `image_finite` (N,), whether every output
    of `kind` is finite in the image."""
    cells = finite_cells(out, kind).flatten(1)
    heat = out[f"hm_{kind}"]
    image_finite = cells.all(dim=1)
    if not image_finite.all():
        heat = heat.masked_fill(~cells.view(heat.shape[0], 1, *heat.shape[2:]), float("-inf"))
    logits, labels, inds = topk_keypoints(heatmap_peaks(heat, kernel), topk)
    finite = cells.gather(1, inds)
    scores = torch.sigmoid(logits)
    width = heat.shape[3]
    offsets = gather_maps(out[f"off_{kind}"], inds).masked_fill(~finite[..., None], 0)  # (N, K, 2) x, y
    points = dict(score=scores, label=labels, x=(inds % width).to(scores.dtype) + offsets[..., 0],
                  y=(inds // width).to(scores.dtype) + offsets[..., 1], finite=finite, image_finite=image_finite)
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
        | ~(tl["finite"][:, :, None] & br["finite"][:, None, :])
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


@torch.no_grad()
def decode(out: dict, topk: int = 70, ae_threshold: float = 0.5, num_dets: int = 1000, kernel: int = 3
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eval-mode network outputs ((N, *, h, w), docs/FORMAT.md) -> (boxes, centers) in output-map units:
    boxes (N, D, 8) x1 y1 x2 y2 score tl_score br_score label, D = min(num_dets, K^2), highest score first,
    score -1 for pairs that failed; centers (N, K, 4) x y label score, highest score first (label -1 at a cell whose
    outputs are not finite), or None for outputs without `hm_ct`. K = min(topk, C h w): a map smaller than topk
    keypoints gives all it has."""
    boxes, centers, _ = decode_checked(out, topk, ae_threshold, num_dets, kernel)
    return boxes, centers


@torch.no_grad()
def decode_checked(out: dict, topk: int = 70, ae_threshold: float = 0.5, num_dets: int = 1000, kernel: int = 3
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`decode`'s (boxes, centers) and (N,) bool, True for the images whose outputs are all finite (every output
    map belongs to one keypoint kind: docs/FORMAT.md), from the checks decoding makes anyway."""
    # Summed in float32 at least: fp16 sums of finite maps overflow (2 classes of 32 x 32 logits of -20: -40960).
    out = {key: value.to(torch.promote_types(value.dtype, torch.float32)) for key, value in out.items()}
    kinds = [keypoints(out, kind, topk, kernel) for kind in ("tl", "br", "ct") if f"hm_{kind}" in out]
    finite = torch.stack([points["image_finite"] for points in kinds]).all(dim=0)
    boxes = pair_corners(kinds[0], kinds[1], ae_threshold, num_dets)
    if len(kinds) == 2:
        return boxes, None, finite
    ct = kinds[2]
    label = ct["label"].masked_fill(~ct["finite"], -1).to(ct["score"].dtype)  # -1: no box has it
    return boxes, torch.stack([ct["x"], ct["y"], label, ct["score"]], dim=2), finite


def center_check(boxes: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(M, 8) boxes x1 y1 x2 y2 score tl_score br_score label and (C, 4) centers x y label score, both in original
    pixels -> (M, 8) float32 with the fused score (2 s + s_ct) / 3 for boxes with a same-class center in their
    central region and -1 for the others (and for boxes already at -1). Computed in float32 with the official
    formulas, so that a center on a region's edge falls on the same side."""
    boxes = np.asarray(boxes, np.float32)
    centers = np.asarray(centers, np.float32).reshape(-1, 4)
    x1, y1, x2, y2, score = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    small = (x2 - x1) * (y2 - y1) <= SMALL_BOX_AREA
    # the middle 1/n is [(p x1 + q x2) / n, (q x1 + p x2) / n], p = (n + 1) / 2, q = (n - 1) / 2
    n = np.where(small, np.float32(3), np.float32(5))
    p = np.where(small, np.float32(2), np.float32(3))
    q = np.where(small, np.float32(1), np.float32(2))
    left, right = (p * x1 + q * x2) / n, (q * x1 + p * x2) / n
    top, bottom = (p * y1 + q * y2) / n, (q * y1 + p * y2) / n
    cx, cy = centers[:, 0], centers[:, 1]
    inside = (
        (cx > left[:, None]) & (cx < right[:, None]) & (cy > top[:, None]) & (cy < bottom[:, None])
        & (centers[:, 2] == boxes[:, 7, None])
    )  # (M, C)
    fused = np.full_like(score, -1)
    if len(centers):
        hit = inside.any(axis=1) & (score > -1)
        first = inside.argmax(axis=1)
        fused[hit] = (score[hit] * 2 + centers[first[hit], 3]) / 3
    return np.concatenate([boxes[:, :4], fused[:, None], boxes[:, 5:]], axis=1)
