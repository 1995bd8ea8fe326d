"""CenterNet's training loss: focal loss on the three heatmaps, pull / push on the corner embeddings,
smooth-L1 on the three offsets; averaged over the stacks.

The objective is the official code's (github Duankaiwen/CenterNet: `_neg_loss`, `_ae_loss`, `_regr_loss` of
models/py_utils/kp_utils.py and `AELoss` of kp.py) at its published configuration, 8 GPUs x 6 images, where the
loss that is minimised is the mean over the GPUs of each GPU's loss (nnet/py_factory.py):
- focal: each heatmap's sum over the batch divided by its number of positives (gt == 1) in the batch; with no
  positive, the negative sum alone.
- offsets: smooth-L1 summed over both coordinates and all objects of the batch, divided by (objects + eps).
- pull: per image, the sum over its n objects divided by (n + eps); push: per image, the hinge summed over its
  ordered pairs of distinct objects divided by (n (n - 1) + eps), plus the constant n eps / ((n + eps)
  (n (n - 1) + eps)) that the official sum over the pairs (j, j) leaves (about 1 for n = 1, under 1e-4 for
  n > 1; it has no gradient).
  eps = `count_eps` (1e-4, the official value).
- The official code sums pull and push over the images of one GPU's batch; here they are averaged over the
  images of the batch and multiplied by `ae_images_per_gpu` (6, the published images per GPU). The mean over
  processes of that equals the official value at 8 x 6, and one process with batch B still equals N processes
  with B / N (see tests/test_official_training_parity.py for the algebra and the proof against official numbers).
- The total is the mean over the stacks (`stack_mean`), as the official `loss / len(tl_heats)`.
Runs started before these settings were flags of train.py trained with `OBJECTIVE_FLAGS_BEFORE` (pull / push
per-image means weighted 0.1, i.e. `ae_images_per_gpu` 1; stacks summed; no eps); their checkpoints resume with it
(`resumed_objective`).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.decode import gather_maps

PULL_WEIGHT, PUSH_WEIGHT, OFFSET_WEIGHT = 0.1, 0.1, 1.0
PUSH_MARGIN = 1.0
FOCAL_ALPHA, FOCAL_BETA = 2.0, 4.0
PROB_EPS = 1e-4  # sigmoid outputs are clamped to [eps, 1 - eps], as CornerNet's `_sigmoid`


@dataclass(frozen=True)
class LossConfig:
    """ae_images_per_gpu: weight of the per-image mean pull and push (the official code sums them over the
    images of one GPU); stack_mean: average the stacks (else sum them); count_eps: added to the object counts
    that divide the offset, pull and push sums (0: a count of 0 divides as 1)."""
    ae_images_per_gpu: float = 6.0
    stack_mean: bool = True
    count_eps: float = 1e-4


def build_loss_config(args) -> LossConfig:
    """From the flags `--ae_images_per_gpu`, `--stack_loss mean|sum` and `--count_eps` of train.py."""
    return LossConfig(ae_images_per_gpu=float(args.ae_images_per_gpu), stack_mean=args.stack_loss == "mean",
                      count_eps=float(args.count_eps))


def per_count(total: torch.Tensor, count: torch.Tensor, eps: float) -> torch.Tensor:
    """total / (count + eps); with eps 0, a count of 0 divides as 1 (its total is 0)."""
    return total / (count + eps) if eps else total / count.clamp(min=1)


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
                   mask: torch.Tensor, count_eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding maps (N, 1, h, w), indices (N, K), mask (N, K) -> (pull, push), unweighted, each the mean over
    the N images of the per-image value (see the module docstring)."""
    e_tl, e_br = gather_maps(emb_tl.float(), ind_tl)[..., 0], gather_maps(emb_br.float(), ind_br)[..., 0]  # (N, K)
    mask = mask.bool()
    num = mask.sum(1).float()  # (N,) objects per image
    e_mean = (e_tl + e_br) / 2
    pull_sum = (((e_tl - e_mean) ** 2 + (e_br - e_mean) ** 2) * mask).sum(1)
    pull = per_count(pull_sum, num, count_eps).mean()

    pairs = mask.unsqueeze(1) & mask.unsqueeze(2)
    pairs &= ~torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)  # (N, K, K), j != k
    gap = F.relu(PUSH_MARGIN - (e_mean.unsqueeze(1) - e_mean.unsqueeze(2)).abs())
    push_sum = (gap * pairs).sum((1, 2))
    if count_eps:
        # What the official pairs (j, j) and its - 1 / (n + eps) per pair add, gradient-free: n eps / (n + eps),
        # written as n - n^2 / (n + eps) so that float32 rounds it as the official code does (for n = 1 the
        # cancellation 1 - 1 / (1 + eps) leaves only ~4 significant digits either way).
        push_sum = push_sum + (num - num * num / (num + count_eps))
    push = per_count(push_sum, num * (num - 1), count_eps).mean()
    return pull, push


def offset_loss(off: torch.Tensor, ind: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                count_eps: float = 1e-4) -> torch.Tensor:
    """Offset map (N, 2, h, w), indices (N, K), targets (N, K, 2), mask (N, K) -> smooth-L1 summed over objects
    and both coordinates, divided by the number of objects of the batch (+ count_eps)."""
    mask = mask.bool()
    pred = gather_maps(off.float(), ind)
    loss = F.smooth_l1_loss(pred, target.float(), reduction="none") * mask.unsqueeze(2)
    return per_count(loss.sum(), mask.sum().float(), count_eps)


def centernet_loss(outputs: list[dict[str, torch.Tensor]], batch: dict[str, torch.Tensor],
                   config: LossConfig = LossConfig()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Outputs of every stack (nets.hourglass, training mode) and a training batch (docs/FORMAT.md) -> (total,
    weighted terms `focal`, `pull`, `push`, `off`, which sum to total). Outputs without a center heatmap (a network
    without a center branch: CornerNet's loss) leave out the center focal and offset terms; the batch's center
    targets are then unused."""
    if not isinstance(outputs, (list, tuple)) or not outputs:
        raise ValueError(f"utils/losses.py centernet_loss: `outputs` must be a non-empty list with one dict per "
                         f"stack (the model in training mode), got {type(outputs).__name__}")
    terms = {k: torch.zeros((), device=batch["mask"].device) for k in ("focal", "pull", "push", "off")}
    mask, eps = batch["mask"], config.count_eps
    for out in outputs:
        for k in ("tl", "br", "ct") if "hm_ct" in out else ("tl", "br"):
            terms["focal"] = terms["focal"] + focal_loss(out[f"hm_{k}"], batch[f"hm_{k}"])
            terms["off"] = terms["off"] + OFFSET_WEIGHT * offset_loss(out[f"off_{k}"], batch[f"ind_{k}"],
                                                                     batch[f"off_{k}"], mask, eps)
        pull, push = pull_push_loss(out["emb_tl"], out["emb_br"], batch["ind_tl"], batch["ind_br"], mask, eps)
        terms["pull"] = terms["pull"] + config.ae_images_per_gpu * PULL_WEIGHT * pull
        terms["push"] = terms["push"] + config.ae_images_per_gpu * PUSH_WEIGHT * push
    if config.stack_mean:
        terms = {k: v / len(outputs) for k, v in terms.items()}
    total = terms["focal"] + terms["pull"] + terms["push"] + terms["off"]
    return total, terms


# train.py's flags that define the training objective, with the values every run had before they were flags
# (pull / push per-image means weighted 0.1, stacks summed, no eps, boxes under 1 canvas pixel dropped).
OBJECTIVE_FLAGS_BEFORE = {"ae_images_per_gpu": 1.0, "stack_loss": "sum", "count_eps": 0.0, "min_box_size": 1.0}


def resumed_objective(saved_args: dict, args: dict) -> tuple[dict, list[str]]:
    """The objective flags a resumed run continues with, and log lines for those that differ from `args` (this
    command's flags): a run keeps the objective it was trained under, and a checkpoint whose `saved_args` lack a
    flag was trained with its value of `OBJECTIVE_FLAGS_BEFORE`."""
    values, lines = {}, []
    for flag, before in OBJECTIVE_FLAGS_BEFORE.items():
        values[flag] = saved_args.get(flag, before)
        if values[flag] != args.get(flag):
            origin = "it was trained with" if flag in saved_args else \
                "it predates the flag: the value its run was trained with"
            lines.append(f"resuming with --{flag} {values[flag]} ({origin}), not {args.get(flag)}")
    return values, lines
