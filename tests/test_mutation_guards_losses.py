"""centernet_loss assembled from its public parts, with the weights of the paper (SPEC: pull 0.1, push 0.1,
offsets 1; by default pull and push also carry the official 6 images per GPU, --ae_images_per_gpu): a term fed the
wrong map, index or weight was a planted bug that the term-by-term references let through. One image and one
stack, where any averaging over images or stacks leaves the numbers unchanged."""
import pytest
import torch

from utils.losses import centernet_loss, focal_loss, offset_loss, pull_push_loss

PULL, PUSH, OFFSET = 0.1 * 6, 0.1 * 6, 1.0  # the default objective: the official code at 6 images per GPU


def one_image_case(seed: int, num_classes: int = 2, h: int = 5, w: int = 6, max_objects: int = 6, n: int = 4):
    """Random single-stack outputs and a batch of one image with `n` objects, every map and index distinct."""
    g = torch.Generator().manual_seed(seed)
    batch = {"mask": torch.arange(max_objects)[None] < n}
    out = {}
    for k in ("tl", "br", "ct"):
        hm = torch.rand(1, num_classes, h, w, generator=g) * 0.9
        ind = torch.randperm(h * w, generator=g)[:max_objects][None]
        hm.view(1, num_classes, -1)[0, 0, ind[0, :n]] = 1.0
        batch[f"hm_{k}"], batch[f"ind_{k}"] = hm, ind
        batch[f"off_{k}"] = torch.rand(1, max_objects, 2, generator=g)
        out[f"hm_{k}"] = torch.randn(1, num_classes, h, w, generator=g) * 2
        out[f"off_{k}"] = torch.randn(1, 2, h, w, generator=g)
    out.update({f"emb_{k}": torch.randn(1, 1, h, w, generator=g) for k in ("tl", "br")})
    return out, batch


@pytest.mark.parametrize("seed", [0, 1])
def test_each_weighted_term_is_its_function_on_its_own_maps(seed):
    out, batch = one_image_case(seed)
    total, terms = centernet_loss([out], batch)
    focal = sum(focal_loss(out[f"hm_{k}"], batch[f"hm_{k}"]) for k in ("tl", "br", "ct"))
    off = sum(offset_loss(out[f"off_{k}"], batch[f"ind_{k}"], batch[f"off_{k}"], batch["mask"])
              for k in ("tl", "br", "ct"))
    pull, push = pull_push_loss(out["emb_tl"], out["emb_br"], batch["ind_tl"], batch["ind_br"], batch["mask"])
    assert pull > 0.05 and push > 0.05 and off > 0.05  # each term counts in the total
    want = {"focal": focal, "pull": PULL * pull, "push": PUSH * push, "off": OFFSET * off}
    for k, v in want.items():
        assert terms[k].item() == pytest.approx(v.item(), rel=1e-6), k
    assert total.item() == pytest.approx(sum(v.item() for v in want.values()), rel=1e-6)


def test_focal_loss_reads_logits_then_targets():
    # Not symmetric: logits 0 (p = 0.5) against a target 1 give log(2) / 4 per positive; swapped they do not.
    logits = torch.zeros(1, 1, 1, 2)
    gt = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    assert focal_loss(logits, gt).item() == pytest.approx(0.25 * 0.6931472 + 0.25 * 0.6931472, rel=1e-6)
