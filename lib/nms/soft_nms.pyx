# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Soft-NMS (Bodla et al., ICCV 2017) and the box-merging variant of the CenterNet code, on one class's boxes.

Both functions copy their input to a float64 work array; the caller's array is never changed. Each round takes
the remaining box with the highest score (ties: the lowest input row), keeps it, and decays every other remaining
box by its IoU with the kept one:

    method 0 (hard):     w = 0 if iou > Nt else 1
    method 1 (linear):   w = 1 - iou if iou > Nt else 1
    method 2 (gaussian): w = exp(-iou^2 / sigma)

A box whose score is below `threshold` (from the start, or after a decay) is dropped. IoU follows the official
convention: widths and heights are x2 - x1 + 1 and y2 - y1 + 1, and boxes overlap when both are positive.
The kept boxes come out in the order they were taken, which is by decreasing score.

`inplace=True` reproduces what the official test code gets from its in-place call (external/nms.pyx, whose
returned keep list test/coco.py ignores): every input row comes back. Rows 0..M-1 are the kept boxes as above;
the rest are stale copies, because a dropped box is overwritten by the last active row (a copy, not a swap), and
that row's old place keeps its values and the score it had then. Also as there: only columns 0-4 move (the merge
variant reads the tl / br scores of whatever row sits at a position), boxes below `threshold` from the start are
not dropped (only a decay drops a box), and ties go to the box at the lowest current position.
"""
import numpy as np

cimport numpy as cnp
from libc.math cimport exp, pow

cnp.import_array()


cdef inline double _iou(double[:, ::1] b, Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    """IoU of rows i and j with the +1 convention; 0 when they do not overlap."""
    cdef double iw = min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0]) + 1.0
    if iw <= 0:
        return 0.0
    cdef double ih = min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1]) + 1.0
    if ih <= 0:
        return 0.0
    cdef double area_i = (b[i, 2] - b[i, 0] + 1.0) * (b[i, 3] - b[i, 1] + 1.0)
    cdef double area_j = (b[j, 2] - b[j, 0] + 1.0) * (b[j, 3] - b[j, 1] + 1.0)
    cdef double inter = iw * ih
    return inter / (area_i + area_j - inter)


cdef inline double _decay(double iou, double sigma, double Nt, int method) noexcept nogil:
    if method == 2:
        return exp(-(iou * iou) / sigma)
    if iou > Nt:
        return 1.0 - iou if method == 1 else 0.0
    return 1.0


cdef inline void _swap_rows(double[:, ::1] b, long long[::1] idx, Py_ssize_t i, Py_ssize_t j,
                            Py_ssize_t columns) noexcept nogil:
    cdef Py_ssize_t c
    cdef double t
    cdef long long k
    if i == j:
        return
    for c in range(columns):
        t = b[i, c]
        b[i, c] = b[j, c]
        b[j, c] = t
    k = idx[i]
    idx[i] = idx[j]
    idx[j] = k


cdef Py_ssize_t _run(double[:, ::1] b, long long[::1] idx, double sigma, double Nt, double threshold,
                     int method, bint merge, double weight_exp, bint inplace) noexcept nogil:
    """Soft-NMS in place on the rows of `b`; returns M, the kept boxes being rows 0..M-1."""
    cdef Py_ssize_t n = b.shape[0]
    cdef Py_ssize_t columns = 5 if inplace else b.shape[1]
    cdef Py_ssize_t i = 0, pos, best, c
    cdef double iou, w, mw
    cdef double sx1 = 0, sy1 = 0, sx2 = 0, sy2 = 0, stl = 0, sbr = 0
    while i < n:
        best = i
        for pos in range(i + 1, n):
            if b[pos, 4] > b[best, 4] or (not inplace and b[pos, 4] == b[best, 4] and idx[pos] < idx[best]):
                best = pos
        if b[best, 4] < threshold and not inplace:  # every remaining box is below the threshold
            break
        _swap_rows(b, idx, i, best, columns)
        if merge:
            stl = b[i, 5]
            sbr = b[i, 6]
            sx1 = b[i, 0] * stl
            sy1 = b[i, 1] * stl
            sx2 = b[i, 2] * sbr
            sy2 = b[i, 3] * sbr
        pos = i + 1
        while pos < n:
            iou = _iou(b, i, pos)
            if iou <= 0:
                pos += 1
                continue
            w = _decay(iou, sigma, Nt, method)
            if merge:
                mw = pow(1.0 - w, weight_exp)
                sx1 += b[pos, 0] * b[pos, 5] * mw
                sy1 += b[pos, 1] * b[pos, 5] * mw
                sx2 += b[pos, 2] * b[pos, 6] * mw
                sy2 += b[pos, 3] * b[pos, 6] * mw
                stl += b[pos, 5] * mw
                sbr += b[pos, 6] * mw
            b[pos, 4] *= w
            if b[pos, 4] < threshold:  # drop: the last active row takes its place and is examined next
                n -= 1
                if inplace:
                    for c in range(columns):
                        b[pos, c] = b[n, c]
                else:
                    _swap_rows(b, idx, pos, n, columns)
            else:
                pos += 1
        if merge:
            # corner scores of 0 give no weight to average with: the kept box keeps its own corners
            if stl > 0:
                b[i, 0] = sx1 / stl
                b[i, 1] = sy1 / stl
            if sbr > 0:
                b[i, 2] = sx2 / sbr
                b[i, 3] = sy2 / sbr
        i += 1
    return i


def _prepare(dets, int columns, str name, int method, double sigma):
    """Checks shape and parameters; returns a float64 C-contiguous copy of `dets`."""
    arr = np.asarray(dets)
    if arr.ndim != 2 or arr.shape[1] != columns:
        raise ValueError(f"lib/nms {name}: dets must have shape (N, {columns}), got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"lib/nms {name}: dets must hold real numbers (float32 expected), got dtype {arr.dtype}")
    if method not in (0, 1, 2):
        raise ValueError(f"lib/nms {name}: method must be 0 (hard), 1 (linear) or 2 (gaussian), got {method}")
    if method == 2 and not sigma > 0:
        raise ValueError(f"lib/nms {name}: sigma must be > 0 for the gaussian method, got {sigma}")
    return np.array(arr, dtype=np.float64, order="C", copy=True)


def _soft_nms(dets, int columns, str name, double sigma, double Nt, double threshold, int method,
              bint merge, double weight_exp, bint inplace):
    b = _prepare(dets, columns, name, method, sigma)
    idx = np.arange(b.shape[0], dtype=np.int64)
    cdef double[:, ::1] bv = b
    cdef long long[::1] iv = idx
    cdef Py_ssize_t m
    with nogil:
        m = _run(bv, iv, sigma, Nt, threshold, method, merge, weight_exp, inplace)
    return (b if inplace else b[:m]).astype(np.float32)


def soft_nms(dets, double sigma=0.5, double Nt=0.3, double threshold=0.001, int method=2, bint inplace=False):
    """(N, 5) x1 y1 x2 y2 score -> (M, 5) kept boxes with their decayed scores, highest first; with `inplace`,
    (N, 5): the kept boxes followed by the stale rows of the official code (see the module docstring).

    `dets` may be any real dtype (float32 expected); it is not modified. The result is float32.
    """
    return _soft_nms(dets, 5, "soft_nms", sigma, Nt, threshold, method, False, 0.0, inplace)


def soft_nms_merge(dets, double sigma=0.5, double Nt=0.3, double threshold=0.001, int method=2,
                   double weight_exp=6, bint inplace=False):
    """(N, 7) x1 y1 x2 y2 score tl_score br_score -> (M, 7), soft-NMS whose kept boxes are merged.

    Each kept box becomes the weighted mean of itself (weight 1) and every box that overlaps it among those
    still remaining when it is taken, each weighted by (1 - w) ** weight_exp with w its decay factor (so before
    the decay drops it): x1, y1 additionally weighted by the top-left score, x2, y2 by the bottom-right score.
    Scores and corner scores of a kept box are its own. `inplace`: as in `soft_nms`.
    """
    return _soft_nms(dets, 7, "soft_nms_merge", sigma, Nt, threshold, method, True, weight_exp, inplace)
