"""Training targets and loss against numbers recorded from the official CenterNet training code.

tests/data/official_training_parity.npz holds what the official `kp_detection` (sample/coco.py, with
sample/utils.py) produced for 12 images of given sizes and boxes with its random draws fixed (scale, crop center,
flip; input 127, 2 classes): the boxes after its crop, clip and flip and the targets drawn from them; and what
its `AELoss` (models/py_utils/kp.py, kp_utils.py) gave on `synthetic_outputs` below for those targets, split in
2 chunks of 6 images as its DataParallel does, averaged as nnet/py_factory.py does: every term and the output
gradients. tests/data/README.md says how it was made. The tests below feed the same inputs to our code.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.targets import make_targets
from datasets.transforms import RAND_SCALES, CropParams, clip_boxes, crop_matrix, warp_boxes
from utils.decode import gather_maps
from utils.losses import centernet_loss

FIXTURE = Path(__file__).parent / "data" / "official_training_parity.npz"
IMG_SIZE, MAP_SIZE, NUM_CLASSES, IMAGES_PER_GPU = 127, 32, 2, 6
OUTPUT_SEED = 17


def synthetic_outputs(seed: int, num_images: int, num_stacks: int = 2) -> list[dict[str, torch.Tensor]]:
    """Training-mode outputs of `num_stacks` stacks for `num_images` images on the 32 x 32 map: heatmap logits
    mostly in [-7, 3] with a few saturated at +-12 (where the official [1e-4, 1 - 1e-4] clamp applies), embeddings
    in [-1.5, 1.5] (pairs within and beyond the push margin), offsets in [-0.5, 1.5] (both branches of smooth-L1).
    Uniform draws only (stable numpy streams)."""
    rng = np.random.default_rng(seed)
    shape = (num_images, NUM_CLASSES, MAP_SIZE, MAP_SIZE)
    stacks = []
    for _ in range(num_stacks):
        out = {}
        for k in ("tl", "br", "ct"):
            logits = rng.uniform(-7, 3, shape)
            extreme = rng.uniform(0, 1, shape)
            out[f"hm_{k}"] = np.where(extreme < 0.03, -12.0, np.where(extreme > 0.98, 12.0, logits))
        for k in ("tl", "br"):
            out[f"emb_{k}"] = rng.uniform(-1.5, 1.5, (num_images, 1, MAP_SIZE, MAP_SIZE))
        for k in ("tl", "br", "ct"):
            out[f"off_{k}"] = rng.uniform(-0.5, 1.5, (num_images, 2, MAP_SIZE, MAP_SIZE))
        stacks.append({k: torch.from_numpy(v.astype(np.float32)) for k, v in out.items()})
    return stacks


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as f:
        return dict(f)


def official_batch(fx: dict, images: slice = slice(None)) -> dict[str, torch.Tensor]:
    """The official targets of `images`, as our training batch."""
    return {k: torch.from_numpy(fx[f"target_{k}"][images]) for k in
            ("hm_tl", "hm_br", "hm_ct", "off_tl", "off_br", "off_ct", "ind_tl", "ind_br", "ind_ct", "mask")}


def rows_of(table: np.ndarray, image: int) -> np.ndarray:
    return table[table[:, 0] == image, 1:]


def test_targets_equal_the_official_for_the_same_boxes(fx):
    """make_targets of the boxes the official augmentation produced (after its clip and flip) gives its targets:
    tiny boxes as radius-0 peaks, border boxes, a whole-image box, overlapping same-class boxes (sharing cells),
    a one-object image and images left empty by the crop. Heatmaps: the official gaussian is one float64 exp
    rounded to float32, ours the float32 product of two rounded 1-D factors: 2 roundings of 2^-24 apart, so
    rtol 3e-7; the positives (gt == 1, what the focal loss counts) exactly."""
    n = len(fx["spec_size"])
    for i in range(n):
        boxes = rows_of(fx["official_boxes"], i)
        ours = make_targets(boxes[:, :4], boxes[:, 4].astype(np.int64) - 1, NUM_CLASSES, IMG_SIZE, IMG_SIZE)
        for k in ("tl", "br", "ct"):
            want = fx[f"target_hm_{k}"][i]
            np.testing.assert_array_equal(ours[f"hm_{k}"] == 1, want == 1, err_msg=f"image {i} {k}")
            np.testing.assert_allclose(ours[f"hm_{k}"], want, rtol=3e-7, atol=0, err_msg=f"image {i} {k}")
            np.testing.assert_array_equal(ours[f"ind_{k}"], fx[f"target_ind_{k}"][i])
            np.testing.assert_allclose(ours[f"off_{k}"], fx[f"target_off_{k}"][i], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(ours["mask"], fx["target_mask"][i])
    counts = fx["target_mask"].sum(1)
    assert (counts == 0).any() and (counts == 1).any()
    sides = fx["official_boxes"][:, 3:5] - fx["official_boxes"][:, 1:3]
    assert (sides.max(1) < 1).any(), "a box under one pixel (a radius-0 peak) is part of the fixture"


def test_augmentation_geometry_is_the_official_one_up_to_the_documented_pixel(fx):
    """Our crop, scale, clip and flip of each image's boxes, with the official draws, against the official boxes.
    The one documented departure (README "Notes on the method"): the official code clips to [0, S - 1] and
    mirrors about S - 1 (x -> S - 1 - x), ours clips to [0, S] and mirrors about S, S = 127 here. Undoing each
    flip about its own axis, the official boxes are ours clipped at S - 1. Ours are rounded to float32 once (half
    an ulp below 128: 3.8e-6 px), so atol 1e-5."""
    s = IMG_SIZE
    for i, ((h, w), scale, (cx, cy), flip) in enumerate(zip(fx["spec_size"], fx["spec_scale"], fx["spec_center"],
                                                             fx["spec_flip"])):
        det = rows_of(fx["spec_detections"], i)
        p = CropParams(crop=int(s * scale), center_x=int(cx), center_y=int(cy), flip=bool(flip))
        ours, keep = clip_boxes(warp_boxes(det[:, :4], crop_matrix(p, s)), s, s)
        ours, official = ours[keep].astype(np.float64), rows_of(fx["official_boxes"], i)
        np.testing.assert_array_equal(det[keep, 4], official[:, 4])  # the same boxes are kept, in order
        if flip:
            ours[:, [0, 2]] = s - ours[:, [2, 0]]
            official[:, [0, 2]] = (s - 1) - official[:, [2, 0]]
        np.testing.assert_allclose(np.minimum(ours, s - 1), official[:, :4], rtol=0, atol=1e-5, err_msg=f"image {i}")
    assert fx["spec_flip"].any() and (fx["official_clipped"][:, 3:5] == s - 1).any()


def test_the_official_scales_are_ours_but_scale_1_crops_one_pixel_less():
    """np.arange(0.6, 1.4, 0.1) of the official config holds 0.9999999999999999 for 1: its crop at scale 1 is
    S - 1 pixels (resized by S / (S - 1), 1.002 at 511); ours is S. The other seven crops agree."""
    official = np.arange(0.6, 1.4, 0.1)
    for size in (127, 511):
        crops = [int(size * s) for s in official]
        ours = [int(size * s) for s in RAND_SCALES]
        assert [o - c for o, c in zip(ours, crops)] == [0, 0, 0, 0, 1, 0, 0, 0]


def test_loss_and_gradients_equal_the_official_mean_over_gpus(fx):
    """The published recipe is 8 GPUs x 6 images: nnet/py_factory.py minimises the mean over the GPUs of each
    GPU's `AELoss` on its 6 images. Here 12 images, 2 chunks of 6 (chunk_sizes [6, 6]), on a 2-stack output.

    Algebra, per GPU g with images I_g (|I_g| = 6) and S stacks; official:
        L_g = (1/S) sum_s [ sum_kind F(g, s, kind) + sum_{i in I_g} (0.1 pull_i + 0.1 push_i)
                            + sum_kind R(g, s, kind) ]
    F normalised by the positives of I_g, R by its objects + 1e-4, pull_i / push_i by (n_i + 1e-4) and
    (n_i (n_i - 1) + 1e-4). Ours on the 6 images of one process: the same F and R, pull and push as
    6 x (1/6) sum_{i in I_g} (--ae_images_per_gpu 6 times the per-image mean), and the same 1/S. So our loss of one
    process holding I_g is L_g term by term, and DistributedDataParallel, which averages the processes'
    gradients, follows the gradient of mean_g L_g: the official objective, exactly. Equally so one process with
    --batch_size 6 --accum_steps 8 (each micro-batch's loss / 8, summed). That is what is checked: the mean of our
    loss over the two chunks against the official mean, each term and the gradient of every output.

    Tolerances: each term is a sum of at most 6 x 2 x 32 x 32 float32 products of a few float32 operations,
    accumulated pairwise: relative error below (2 log2(12288) + 10) 2^-24 ~ 2.3e-6; 5e-6 is used. Gradients are
    elementwise (relative ~10 x 2^-24) and compared at the objects, at the positives, and as sums over rows and
    columns of each heatmap (32 terms: within 2^-24 x 32 x 16 of the largest gradient, 3e-5 x max)."""
    n = len(fx["spec_size"])
    outputs = synthetic_outputs(OUTPUT_SEED, n)
    chunks = [slice(c, c + IMAGES_PER_GPU) for c in range(0, n, IMAGES_PER_GPU)]
    leaves = [{k: v.clone().requires_grad_(True) for k, v in o.items()} for o in outputs]
    per_chunk = [centernet_loss([{k: v[sl] for k, v in o.items()} for o in leaves], official_batch(fx, sl))
                 for sl in chunks]
    total = sum(t for t, _ in per_chunk) / len(chunks)
    terms = {k: sum(t[k] for _, t in per_chunk) / len(chunks) for k in ("focal", "pull", "push", "off")}
    want = dict(zip(("loss", "focal", "pull", "push", "off"), fx["loss_emulated"].tolist()))
    got = {"loss": total.item(), **{k: v.item() for k, v in terms.items()}}
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=5e-6), k
    for c, (t, _) in enumerate(per_chunk):  # and each GPU's loss on its own
        assert t.item() == pytest.approx(float(fx["loss_per_chunk"][c, 0]), rel=5e-6)

    total.backward()
    batch = official_batch(fx)
    for s, stack in enumerate(leaves):
        for k in ("tl", "br", "ct"):
            g = stack[f"hm_{k}"].grad.numpy()
            scale = np.abs(fx[f"grad{s}_hm_{k}_rows"]).max()
            np.testing.assert_allclose(g.sum(3), fx[f"grad{s}_hm_{k}_rows"], rtol=0, atol=3e-5 * scale)
            np.testing.assert_allclose(g.sum(2), fx[f"grad{s}_hm_{k}_cols"], rtol=0, atol=3e-5 * scale)
            np.testing.assert_allclose(g[fx[f"target_hm_{k}"] == 1], fx[f"grad{s}_hm_{k}_pos"], rtol=1e-5, atol=0)
        for k in ("emb_tl", "emb_br", "off_tl", "off_br", "off_ct"):
            g = gather_maps(stack[k].grad, batch[f"ind_{k[-2:]}"]).numpy()
            want_g = fx[f"grad{s}_{k}_at_objects"]
            np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6 * np.abs(want_g).max(), err_msg=f"{s} {k}")
            assert stack[k].grad.abs().sum().item() == pytest.approx(float(fx[f"grad{s}_{k}_total"]), rel=1e-5)


def test_one_process_with_the_whole_batch(fx):
    """One process with all 12 images (or N processes with 12 / N each, for which DDP averages to the same):
    pull and push are per-image means, so they equal the official mean over the two GPUs for any split; focal
    and offsets are normalised by the positives (objects) of the whole batch, so they are the official per-GPU
    values weighted by each GPU's positives: equal to the official mean over GPUs when the GPUs hold equally many
    (here they do not: 14 and 7 positives)."""
    n = len(fx["spec_size"])
    _, terms = centernet_loss(synthetic_outputs(OUTPUT_SEED, n), official_batch(fx))
    assert terms["pull"].item() == pytest.approx(float(fx["loss_emulated"][2]), rel=5e-6)
    assert terms["push"].item() == pytest.approx(float(fx["loss_emulated"][3]), rel=5e-6)
    kinds = fx["per_chunk_kind"]  # (chunks, kind, [focal, positives, offsets, objects]), sums over the 2 stacks
    stacks = 2
    focal = (kinds[..., 0] * kinds[..., 1]).sum(0) / kinds[..., 1].sum(0)
    off = (kinds[..., 2] * (kinds[..., 3] + 1e-4)).sum(0) / (kinds[..., 3].sum(0) + 1e-4)
    assert terms["focal"].item() == pytest.approx(focal.sum() / stacks, rel=5e-6)
    assert terms["off"].item() == pytest.approx(off.sum() / stacks, rel=5e-6)
    assert focal.sum() / stacks != pytest.approx(float(fx["loss_emulated"][1]), rel=1e-2)
