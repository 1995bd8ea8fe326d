"""Slow pure-Python soft-NMS, the reference for lib/nms (used by tests/test_nms.py and bench/bench_nms.py).

Written from the definition, box by box with Python floats: keep the highest remaining score (ties: lowest
input row), decay the others by their IoU with it (+1 convention), drop scores below the threshold; with
`merge`, the kept box becomes the weighted mean of itself and the boxes it overlaps.
"""
import math

import numpy as np


def iou_plus_one(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1.0
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1.0
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area_a = (a[2] - a[0] + 1.0) * (a[3] - a[1] + 1.0)
    area_b = (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0)
    return inter / (area_a + area_b - inter)


def decay(iou: float, sigma: float, Nt: float, method: int) -> float:
    if method == 2:
        return math.exp(-iou * iou / sigma)
    if method == 1:
        return 1.0 - iou if iou > Nt else 1.0
    return 0.0 if iou > Nt else 1.0


def soft_nms_reference(dets, sigma=0.5, Nt=0.3, threshold=0.001, method=2, merge=False, weight_exp=6.0):
    """(N, 5) or, with merge, (N, 7) -> kept rows (M, same) float32, in the order they were taken."""
    rows = {i: [float(v) for v in row] for i, row in enumerate(np.asarray(dets, dtype=np.float64))}
    kept = []
    while rows:
        best = min(rows, key=lambda i: (-rows[i][4], i))
        if rows[best][4] < threshold:
            break
        box = rows.pop(best)
        sums = [box[0] * box[5], box[1] * box[5], box[2] * box[6], box[3] * box[6], box[5], box[6]] if merge else None
        for i in sorted(rows):
            other = rows[i]
            iou = iou_plus_one(box, other)
            if iou <= 0:
                continue
            w = decay(iou, sigma, Nt, method)
            if merge:
                mw = (1.0 - w) ** weight_exp
                for k, (col, corner) in enumerate(((0, 5), (1, 5), (2, 6), (3, 6))):
                    sums[k] += other[col] * other[corner] * mw
                sums[4] += other[5] * mw
                sums[5] += other[6] * mw
            other[4] *= w
            if other[4] < threshold:
                del rows[i]
        if merge:
            if sums[4] > 0:
                box[0], box[1] = sums[0] / sums[4], sums[1] / sums[4]
            if sums[5] > 0:
                box[2], box[3] = sums[2] / sums[5], sums[3] / sums[5]
        kept.append(box)
    width = 7 if merge else 5
    return np.array(kept, dtype=np.float32).reshape(-1, width)


def soft_nms_inplace_reference(dets, sigma=0.5, Nt=0.3, threshold=0.001, method=2, merge=False, weight_exp=6.0):
    """What the official code's in-place soft-NMS leaves in its (N, 5 or 7) array, from its description: positions
    0..n-1 are active, position i takes the best active box of i..n-1 (first position on ties) by exchanging
    columns 0-4 only; a box decayed below the threshold is overwritten by columns 0-4 of position n - 1 (whose
    old row stays behind, beyond the new n), and the box now at its position is examined next. -> float32 array
    of all N rows."""
    b = [[float(v) for v in row] for row in np.asarray(dets, dtype=np.float64)]
    n = len(b)
    i = 0
    while i < n:
        best = max(range(i, n), key=lambda p: (b[p][4], -p))
        b[i][:5], b[best][:5] = b[best][:5], b[i][:5]
        sums = [b[i][0] * b[i][5], b[i][1] * b[i][5], b[i][2] * b[i][6], b[i][3] * b[i][6], b[i][5], b[i][6]] \
            if merge else None
        pos = i + 1
        while pos < n:
            iou = iou_plus_one(b[i], b[pos])
            if iou > 0:
                w = decay(iou, sigma, Nt, method)
                if merge:
                    mw = (1.0 - w) ** weight_exp
                    for k, (col, corner) in enumerate(((0, 5), (1, 5), (2, 6), (3, 6))):
                        sums[k] += b[pos][col] * b[pos][corner] * mw
                    sums[4] += b[pos][5] * mw
                    sums[5] += b[pos][6] * mw
                b[pos][4] *= w
                if b[pos][4] < threshold:
                    n -= 1
                    b[pos][:5] = b[n][:5]
                    continue
            pos += 1
        if merge:
            b[i][0], b[i][1] = sums[0] / sums[4], sums[1] / sums[4]
            b[i][2], b[i][3] = sums[2] / sums[5], sums[3] / sums[5]
        i += 1
    return np.array(b, dtype=np.float32).reshape(len(b), -1)
