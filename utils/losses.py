"""CenterNet's training loss: focal loss on the three heatmaps, pull / push on the corner embeddings,
smooth-L1 on the three offsets; summed over stacks.

Normalisation (CornerNet's, with one change): the focal loss of a heatmap is divided by its number of positives
in the batch (by 1 when there is none); offsets and pull are averaged over the objects of the batch, push over the
ordered pairs of distinct objects of the same image (an image with one object has no push term). CornerNet sums
per-image averages of pull and push over the images; averaging over the batch keeps the weights independent of
the batch size, and one process with batch B equal to N processes with B / N.
"""
import torch
import torch.nn.functional as F

PULL_WEIGHT, PUSH_WEIGHT, OFFSET_WEIGHT = 0.1, 0.1, 1.0
PUSH_MARGIN = 1.0


def focal_loss(logits: torch.Tensor, gt: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """(N, C, h, w) logits and gaussian targets (1 at keypoints) -> scalar."""
    p = logits.float().sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = gt.eq(1)
    pos_loss = (torch.log(p) * (1 - p).pow(alpha))[pos].sum()
    neg_loss = (torch.log(1 - p) * p.pow(alpha) * (1 - gt).pow(beta))[~pos].sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1)


def gather(maps: torch.Tensor, ind: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) maps, (N, K) flat indices -> (N, K, D) values at those cells."""
    n, d = maps.shape[:2]
    flat = maps.float().reshape(n, d, -1)
    return flat.gather(2, ind.unsqueeze(1).expand(n, d, ind.shape[1])).transpose(1, 2)


def pull_push_loss(emb_tl: torch.Tensor, emb_br: torch.Tensor, ind_tl: torch.Tensor, ind_br: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding maps (N, 1, h, w), indices (N, K), mask (N, K) -> (pull, push), unweighted."""
    e_tl, e_br = gather(emb_tl, ind_tl)[..., 0], gather(emb_br, ind_br)[..., 0]  # (N, K)
    mask = mask.bool()
    e_mean = (e_tl + e_br) / 2
    pull = (((e_tl - e_mean) ** 2 + (e_br - e_mean) ** 2) * mask).sum() / mask.sum().clamp(min=1)
    pairs = mask.unsqueeze(1) & mask.unsqueeze(2)
    pairs &= ~torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)  # (N, K, K), j != k
    gap = F.relu(PUSH_MARGIN - (e_mean.unsqueeze(1) - e_mean.unsqueeze(2)).abs())
    push = (gap * pairs).sum() / pairs.sum().clamp(min=1)
    return pull, push


def offset_loss(off: torch.Tensor, ind: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Offset map (N, 2, h, w), indices (N, K), targets (N, K, 2), mask (N, K) -> smooth-L1 summed over objects
    and both coordinates, divided by the number of objects."""
    mask = mask.bool()
    pred = gather(off, ind)
    loss = F.smooth_l1_loss(pred, target.float(), reduction="none") * mask.unsqueeze(2)
    return loss.sum() / mask.sum().clamp(min=1)


def centernet_loss(outputs: list[dict[str, torch.Tensor]], batch: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Outputs of every stack (see nets.hourglass) and a training batch -> (total, weighted terms
    `focal`, `pull`, `push`, `off`, which sum to total)."""
    terms = dict.fromkeys(("focal", "pull", "push", "off"), 0.0)
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
