"""CenterNet's training loss: focal loss on the three heatmaps, pull / push on the corner embeddings,
smooth-L1 on the three offsets; summed over stacks.

Normalisation follows CornerNet's `_neg_loss`, `_ae_loss` and `_regr_loss`:
- focal: each heatmap's sum over the batch divided by its number of positives (gt == 1) in the batch; with no
  positive, the negative sum alone.
- offsets: smooth-L1 summed over both coordinates and all objects of the batch, divided by the number of objects.
- pull: per image, averaged over its n objects; push: per image, averaged over its n (n - 1) ordered pairs of
  distinct objects (an image with fewer than two objects has no push term).
Three deliberate differences:
- CornerNet sums the per-image pull and push over the images of each process's batch; here they are averaged
  over the batch (CornerNet / B), so that one process with batch B equals N processes with B / N and the
  weights do not grow with the batch size.
- CornerNet's +1e-4 in the denominators is left out (with it, an image with a single object gets a constant,
  gradient-free push of about 1).
- The official code averages the total over the stacks; here the stacks are summed, as the paper states its loss.
"""
import torch
import torch.nn.functional as F

from utils.decode import gather_maps

PULL_WEIGHT, PUSH_WEIGHT, OFFSET_WEIGHT = 0.1, 0.1, 1.0
PUSH_MARGIN = 1.0
FOCAL_ALPHA, FOCAL_BETA = 2.0, 4.0
PROB_EPS = 1e-4  # sigmoid outputs are clamped to [eps, 1 - eps], as CornerNet's `_sigmoid`


def focal_loss(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) logits and gaussian targets (1 exactly at keypoints) -> scalar."""
    p = logits.float().sigmoid().clamp(PROB_EPS, 1 - PROB_EPS)
    gt = gt.float()
    pos = gt.eq(1)
    # The negative term needs no mask: its weight (1 - gt)^4 is exactly 0 at the positives.
    neg = (torch.log1p(-p) * p.pow(FOCAL_ALPHA) * (1 - gt).pow(FOCAL_BETA)).sum()
    p_pos = p[pos]
    pos_sum = (torch.log(p_pos) * (1 - p_pos).pow(FOCAL_ALPHA)).sum()
    return -(pos_sum + neg) / pos.sum().clamp(min=1)


def pull_push_loss(emb_tl: torch.Tensor, emb_br: torch.Tensor, ind_tl: torch.Tensor, ind_br: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding maps (N, 1, h, w), indices (N, K), mask (N, K) -> (pull, push), unweighted, each the mean over
    the N images of the per-image average (see the module docstring)."""
    e_tl, e_br = gather_maps(emb_tl.float(), ind_tl)[..., 0], gather_maps(emb_br.float(), ind_br)[..., 0]  # (N, K)
    mask = mask.bool()
    num = mask.sum(1).float()  # (N,) objects per image
    e_mean = (e_tl + e_br) / 2
    pull_sum = (((e_tl - e_mean) ** 2 + (e_br - e_mean) ** 2) * mask).sum(1)
    pull = (pull_sum / num.clamp(min=1)).mean()

    pairs = mask.unsqueeze(1) & mask.unsqueeze(2)
    pairs &= ~torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)  # (N, K, K), j != k
    gap = F.relu(PUSH_MARGIN - (e_mean.unsqueeze(1) - e_mean.unsqueeze(2)).abs())
    push_sum = (gap * pairs).sum((1, 2))
    push = (push_sum / (num * (num - 1)).clamp(min=1)).mean()
    return pull, push


def offset_loss(off: torch.Tensor, ind: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Offset map (N, 2, h, w), indices (N, K), targets (N, K, 2), mask (N, K) -> smooth-L1 summed over objects
    and both coordinates, divided by the number of objects of the batch."""
    mask = mask.bool()
    pred = gather_maps(off.float(), ind)
    loss = F.smooth_l1_loss(pred, target.float(), reduction="none") * mask.unsqueeze(2)
    return loss.sum() / mask.sum().clamp(min=1)


def centernet_loss(outputs: list[dict[str, torch.Tensor]], batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Outputs of every stack (nets.hourglass, training mode) and a training batch (docs/FORMAT.md) -> (total,
    weighted terms `focal`, `pull`, `push`, `off`, which sum to total)."""
    if not isinstance(outputs, (list, tuple)) or not outputs:
        raise ValueError(f"utils/losses.py centernet_loss: `outputs` must be a non-empty list with one dict per "
                         f"stack (the model in training mode), got {type(outputs).__name__}")
    terms = {k: torch.zeros((), device=batch["mask"].device) for k in ("focal", "pull", "push", "off")}
    mask = batch["mask"]
    for out in outputs:
        for k in ("tl", "br", "ct"):
            terms["focal"] = terms["focal"] + focal_loss(out[f"hm_{k}"], batch[f"hm_{k}"])
            terms["off"] = terms["off"] + OFFSET_WEIGHT * offset_loss(out[f"off_{k}"], batch[f"ind_{k}"],
                                                                     batch[f"off_{k}"], mask)
        pull, push = pull_push_loss(out["emb_tl"], out["emb_br"], batch["ind_tl"], batch["ind_br"], mask)
        terms["pull"] = terms["pull"] + PULL_WEIGHT * pull
        terms["push"] = terms["push"] + PUSH_WEIGHT * push
    total = terms["focal"] + terms["pull"] + terms["push"] + terms["off"]
    return total, terms
