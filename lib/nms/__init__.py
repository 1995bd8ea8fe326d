"""Soft-NMS for one class's boxes (Cython, `lib.nms._soft_nms`, built by `make setup`).

    soft_nms(dets (N, 5) x1 y1 x2 y2 score, sigma=0.5, Nt=0.3, threshold=0.001, method=2, inplace=False) -> (M, 5)
    soft_nms_merge(dets (N, 7) ... tl_score br_score, sigma, Nt, threshold, method, weight_exp=6, inplace=False)
        -> (M, 7)

method 0 = hard NMS, 1 = linear, 2 = gaussian; `inplace=True` returns all N rows as the official code leaves
them (kept boxes, then stale copies). See lib/nms/soft_nms.pyx for the exact rules.
"""
try:
    from ._soft_nms import soft_nms, soft_nms_merge
except ImportError as e:
    raise ImportError("lib/nms: the Cython extension lib.nms._soft_nms is not built; run `make setup`") from e

__all__ = ["soft_nms", "soft_nms_merge"]
