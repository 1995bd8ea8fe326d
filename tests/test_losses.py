"""Each loss term against a slow per-pixel / per-object reference written with Python loops (the formulas of the
official code, with its eps = 1e-4 in the object counts); tests/test_official_training_parity.py compares with
numbers of the official code itself."""
import math
from types import SimpleNamespace

import pytest
import torch

from utils.losses import (OBJECTIVE_FLAGS_BEFORE, PULL_WEIGHT, PUSH_WEIGHT, LossConfig, build_loss_config,
                          centernet_loss, focal_loss, offset_loss, pull_push_loss, resumed_objective)

EPS = 1e-4
LEGACY_LOSS = build_loss_config(SimpleNamespace(**OBJECTIVE_FLAGS_BEFORE))  # the loss of runs before the flags


def ref_focal(logits, gt):
    pos_sum, neg_sum, num_pos = 0.0, 0.0, 0
    for lg, y in zip(logits.flatten().tolist(), gt.flatten().tolist()):
        p = min(max(1 / (1 + math.exp(-lg)), 1e-4), 1 - 1e-4)
        if y == 1:
            pos_sum += math.log(p) * (1 - p) ** 2
            num_pos += 1
        else:
            neg_sum += math.log(1 - p) * p ** 2 * (1 - y) ** 4
    return -(pos_sum + neg_sum) / max(num_pos, 1)


def ref_pull_push(emb_tl, emb_br, ind_tl, ind_br, mask):
    """CornerNet's per-image pull (over objects, divided by n + eps) and push (over all ordered pairs of objects,
    the pairs (j, j) included, each hinge minus 1 / (n + eps), divided by n (n - 1) + eps), averaged over the
    images of the batch."""
    pull, push = 0.0, 0.0
    width = emb_tl.shape[-1]
    for b in range(mask.shape[0]):
        pulls, means = [], []
        for k in range(mask.shape[1]):
            if not mask[b, k]:
                continue
            i, j = int(ind_tl[b, k]), int(ind_br[b, k])
            t = float(emb_tl[b, 0, i // width, i % width])
            r = float(emb_br[b, 0, j // width, j % width])
            m = (t + r) / 2
            pulls.append((t - m) ** 2 + (r - m) ** 2)
            means.append(m)
        n = len(means)
        gaps = [max(0.0, 1 - abs(means[a] - means[c])) - 1 / (n + EPS) for a in range(n) for c in range(n)]
        pull += sum(pulls) / (n + EPS)
        push += sum(gaps) / (n * (n - 1) + EPS)
    return pull / mask.shape[0], push / mask.shape[0]


def ref_offset(off, ind, target, mask):
    total, objects = 0.0, 0
    width = off.shape[-1]
    for b in range(mask.shape[0]):
        for k in range(mask.shape[1]):
            if not mask[b, k]:
                continue
            i = int(ind[b, k])
            for d in range(2):
                diff = abs(float(off[b, d, i // width, i % width]) - float(target[b, k, d]))
                total += 0.5 * diff ** 2 if diff < 1 else diff - 0.5
            objects += 1
    return total / (objects + EPS)


def random_case(counts, num_classes=3, h=6, w=7, max_objects=8, seed=0):
    """Random outputs and targets for images with the given object counts."""
    g = torch.Generator().manual_seed(seed)
    n = len(counts)
    gt = torch.rand(n, num_classes, h, w, generator=g) * 0.9
    gt[torch.rand(gt.shape, generator=g) < 0.3] = 0  # far from every object: only the focal weight p^2 is left
    # just below 1 (the largest float32 below it, and 0.9999): negatives all the same, as only gt == 1 is a positive
    near_one = torch.rand(gt.shape, generator=g)
    gt[near_one < 0.03] = 1 - 2**-24
    gt[(near_one >= 0.03) & (near_one < 0.06)] = 0.9999
    mask = torch.zeros(n, max_objects, dtype=torch.bool)
    batch = {"mask": mask}
    for k in ("tl", "br", "ct"):
        hm = gt.clone()
        ind = torch.randint(0, h * w, (n, max_objects), generator=g)
        for b, c in enumerate(counts):
            for o in range(c):
                hm[b, o % num_classes].view(-1)[ind[b, o]] = 1.0
        batch[f"hm_{k}"], batch[f"ind_{k}"] = hm, ind
        batch[f"off_{k}"] = torch.rand(n, max_objects, 2, generator=g)
    for b, c in enumerate(counts):
        mask[b, :c] = True
    out = {}
    for k in ("tl", "br", "ct"):
        logits = torch.randn(n, num_classes, h, w, generator=g) * 3
        extreme = torch.rand(logits.shape, generator=g) < 0.1  # saturated: the [1e-4, 1 - 1e-4] clamp applies
        out[f"hm_{k}"] = torch.where(extreme, 30 * logits.sign(), logits)
    out.update({f"emb_{k}": torch.randn(n, 1, h, w, generator=g) for k in ("tl", "br")})
    out.update({f"off_{k}": torch.randn(n, 2, h, w, generator=g) * 1.5 for k in ("tl", "br", "ct")})
    return out, batch


@pytest.mark.parametrize("counts", [[3, 1, 0, 5], [0], [1], [2, 2], [8, 6]])
def test_each_term_matches_the_slow_reference(counts):
    out, batch = random_case(counts, seed=len(counts) * 10 + sum(counts))
    for k in ("tl", "br", "ct"):
        assert focal_loss(out[f"hm_{k}"], batch[f"hm_{k}"]).item() == pytest.approx(
            ref_focal(out[f"hm_{k}"], batch[f"hm_{k}"]), rel=1e-5)
        assert offset_loss(out[f"off_{k}"], batch[f"ind_{k}"], batch[f"off_{k}"], batch["mask"]).item() == \
            pytest.approx(ref_offset(out[f"off_{k}"], batch[f"ind_{k}"], batch[f"off_{k}"], batch["mask"]), abs=1e-5)
    pull, push = pull_push_loss(out["emb_tl"], out["emb_br"], batch["ind_tl"], batch["ind_br"], batch["mask"])
    ref_pull, ref_push = ref_pull_push(out["emb_tl"], out["emb_br"], batch["ind_tl"], batch["ind_br"], batch["mask"])
    assert pull.item() == pytest.approx(ref_pull, abs=1e-6)
    # An image with one object has push (1 - 1 / (1 + eps)) / eps: float32 (ours, and the official code's) keeps
    # ~4 digits of that difference, 2^-24 / eps = 6e-4 of error per such image.
    assert push.item() == pytest.approx(ref_push, abs=1e-6 + 6e-4 * counts.count(1) / len(counts))


def test_no_object_and_single_object():
    out, batch = random_case([0, 0])
    _, terms = centernet_loss([out], batch)
    assert terms["pull"].item() == 0 and terms["push"].item() == 0 and terms["off"].item() == 0
    assert terms["focal"].item() > 0

    out, batch = random_case([1])
    out = {k: v.requires_grad_(True) for k, v in out.items()}
    _, terms = centernet_loss([out], batch)
    # As the official code: one object leaves a push of 1 / (1 + eps) ~ 1, a constant without gradient.
    assert terms["push"].item() == pytest.approx(6 * PUSH_WEIGHT / (1 + EPS), abs=6 * PUSH_WEIGHT * 6e-4)
    assert terms["pull"].item() > 0
    emb_grads = torch.autograd.grad(terms["push"], [out["emb_tl"], out["emb_br"]], allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in emb_grads)
    _, legacy = centernet_loss([out], batch, LEGACY_LOSS)
    assert legacy["push"].item() == 0


def test_push_is_zero_beyond_the_margin_and_pull_zero_for_equal_embeddings():
    emb_tl = torch.tensor([0.0, 0.0, 3.0, 3.0]).view(1, 1, 1, 4)
    emb_br = emb_tl.clone()
    ind_tl = torch.tensor([[0, 2]])
    ind_br = torch.tensor([[1, 3]])
    pull, push = pull_push_loss(emb_tl, emb_br, ind_tl, ind_br, torch.tensor([[True, True]]), count_eps=0.0)
    assert pull.item() == 0 and push.item() == 0
    emb_br = torch.tensor([0.0, 1.0, 3.0, 3.5]).view(1, 1, 1, 4)
    pull, push = pull_push_loss(emb_tl, emb_br, ind_tl, ind_br, torch.tensor([[True, True]]), count_eps=0.0)
    # means 0.5 and 3.25: gap 2.75 > margin; pull = (0.25 + 0.25 + 0.0625 + 0.0625) / 2
    assert pull.item() == pytest.approx(0.3125) and push.item() == 0


@pytest.mark.parametrize("config", [LossConfig(), LEGACY_LOSS, LossConfig(ae_images_per_gpu=2.5, count_eps=0.0)],
                         ids=["official", "legacy", "custom"])
def test_total_averages_or_sums_the_weighted_terms_over_stacks(config):
    out1, batch = random_case([2, 3], seed=1)
    out2, _ = random_case([2, 3], seed=2)
    total, terms = centernet_loss([out1, out2], batch, config)
    _, t1 = centernet_loss([out1], batch, config)
    _, t2 = centernet_loss([out2], batch, config)
    stacks = 2 if config.stack_mean else 1
    for k in terms:
        assert terms[k].item() == pytest.approx((t1[k].item() + t2[k].item()) / stacks, rel=1e-6)
    assert total.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)
    pull, push = pull_push_loss(out1["emb_tl"], out1["emb_br"], batch["ind_tl"], batch["ind_br"], batch["mask"],
                                config.count_eps)
    assert t1["pull"].item() == pytest.approx(config.ae_images_per_gpu * PULL_WEIGHT * pull.item())
    assert t1["push"].item() == pytest.approx(config.ae_images_per_gpu * PUSH_WEIGHT * push.item())
    off = offset_loss(out1["off_tl"], batch["ind_tl"], batch["off_tl"], batch["mask"], config.count_eps)
    assert off.item() == pytest.approx(ref_offset(out1["off_tl"], batch["ind_tl"], batch["off_tl"], batch["mask"])
                                       * (5 + EPS) / (5 + config.count_eps), rel=1e-5)


def test_gradients_are_finite_without_objects():
    out, batch = random_case([0, 0])
    for v in out.values():
        v.requires_grad_(True)
    total, _ = centernet_loss([out], batch)
    total.backward()
    for k, v in out.items():
        assert torch.isfinite(v.grad).all(), k
    assert out["hm_tl"].grad.abs().sum() > 0


def test_pull_push_are_normalised_per_image_then_averaged_over_the_batch():
    # image 0: two objects, embedding means 0 and 0.5; image 1: three objects, all embeddings 0.
    emb_tl = torch.zeros(2, 1, 1, 4)
    emb_br = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).view(2, 1, 1, 4)
    ind = torch.tensor([[0, 1, 0], [0, 1, 2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    pull, push = pull_push_loss(emb_tl, emb_br, ind, ind, mask, count_eps=0.0)
    # pull: image 0 (0 + 0.5) / 2 objects, image 1 zero; push: image 0 two pairs at gap 0.5, image 1 six at 1.
    assert pull.item() == pytest.approx((0.25 + 0.0) / 2)
    assert push.item() == pytest.approx(((0.5 + 0.5) / 2 + 6 / 6) / 2)


def test_pull_push_of_a_batch_are_the_mean_of_its_halves():
    out, batch = random_case([4, 0, 2, 7], seed=3)
    keys = ("emb_tl", "emb_br", "ind_tl", "ind_br", "mask")
    full = pull_push_loss(*(out.get(k, batch.get(k)) for k in keys))
    halves = [pull_push_loss(*(out.get(k, batch.get(k))[s] for k in keys)) for s in (slice(0, 2), slice(2, 4))]
    for i in range(2):
        assert full[i].item() == pytest.approx((halves[0][i].item() + halves[1][i].item()) / 2, rel=1e-6)


def test_eval_mode_outputs_are_refused():
    out, batch = random_case([1])
    with pytest.raises(ValueError, match="one dict per stack"):
        centernet_loss(out, batch)


def test_a_resumed_run_keeps_the_objective_it_was_trained_under():
    current = {"ae_images_per_gpu": 6.0, "stack_loss": "mean", "count_eps": 1e-4, "min_box_size": 0.0}
    values, lines = resumed_objective({"arch": "x"}, current)  # a checkpoint from before the flags
    assert values == OBJECTIVE_FLAGS_BEFORE == {"ae_images_per_gpu": 1.0, "stack_loss": "sum", "count_eps": 0.0,
                                                "min_box_size": 1.0}
    assert len(lines) == 4 and all("predates the flag" in line for line in lines)
    values, lines = resumed_objective({**current, "ae_images_per_gpu": 3.0}, current)
    assert values == {**current, "ae_images_per_gpu": 3.0}
    assert lines == ["resuming with --ae_images_per_gpu 3.0 (it was trained with), not 6.0"]
    assert resumed_objective(current, current) == (current, [])
