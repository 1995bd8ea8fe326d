"""The test-time pipeline, shared by test.py, demo.py and validation during training; it follows the official
CenterNet test code (test/coco.py `kp_detection`) step by step.

For one image: each test scale's input and its flipped copy -> forward -> `decode` (pairs of corners, centers) ->
boxes and centers mapped to original pixels (`datasets.transforms.boxes_to_resized`: boxes more than 5 px
outside the resized image are rejected, the others clipped); then the boxes of all scales and flips together ->
`center_check` against the centers of the scale-1 forwards (both flips) -> soft-NMS per class -> the boxes
scoring at least the `max_per_image`-th best score. A network without a center branch (`--method cornernet`),
or `center_check` off, keeps the boxes with their corner score, as CornerNet's test code does. `evaluate` runs
it over a data set (split across processes under torchrun) and scores it with pycocotools (or faster-coco-eval:
`backend`).

Defaults are those of the official configs (db/detection.py with config/CenterNet-104.json): top_k 70,
ae_threshold 0.5, nms_kernel 3, num_dets 1000, nms_threshold 0.5, gaussian soft-NMS (sigma 0.5), max_per_image 100,
no box merging; `official_config(num_scales)` turns merging on (weight_exp 10) for several scales, as
CenterNet-104-multi_scale.json. `inplace_nms` reproduces the official soft-NMS call exactly, stale rows included
(lib/nms/soft_nms.pyx); it is off by default: README.md gives its measured effect.
"""
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from datasets.coco_eval import evaluate_detections
from datasets.transforms import EvalMeta, boxes_to_original, boxes_to_resized, far_outside, resized_to_original
from lib.nms import soft_nms, soft_nms_merge
from nets.hourglass import CenterNet
from nets.inference import PreparedNetwork, prepare_for_inference
from utils.decode import center_check, decode_checked
from utils.device import autocast, cudnn_benchmark
from utils.checks import check_number, check_positive_int
from utils.errors import ArgumentError, UserError
from utils.dist import all_gather_object, is_main, rank, world_size
from utils.stopping import ignore_stop_signals


MAX_TOPK = 1000  # decoding pairs every top-left corner with every bottom-right one: memory grows with topk^2


@dataclass(frozen=True)
class InferenceConfig:
    """The post-processing settings of test.py's flags of the same names (the defaults are the official ones, box
    merging off: `official_config` turns it on for several scales); fields that cannot work are an ArgumentError."""
    topk: int = 70
    ae_threshold: float = 0.5
    num_dets: int = 1000
    kernel: int = 3
    nms_threshold: float = 0.5
    sigma: float = 0.5
    nms_method: int = 2  # 0 hard, 1 linear, 2 gaussian
    merge: bool = False
    weight_exp: float = 10.0
    score_threshold: float = 0.001  # soft-NMS drops boxes below it
    max_per_image: int = 100
    inplace_nms: bool = False  # the official in-place soft-NMS, stale rows included
    center_check: bool = True  # only where the network has a center branch

    def __post_init__(self):
        """Refuses settings that cannot work (ArgumentError naming the field), NaN and infinity included."""
        for name in ("topk", "num_dets", "kernel", "max_per_image"):
            check_positive_int(name, getattr(self, name))
        if self.topk > MAX_TOPK:  # 100000 took 9 GB and 11 s per image on 4 classes; on COCO, the OOM killer
            raise ArgumentError(f"topk: expected a whole number in [1, {MAX_TOPK}] (decoding pairs every top-left "
                                f"with every bottom-right corner: memory grows with topk squared), got {self.topk}")
        if self.kernel % 2 == 0:
            raise ArgumentError(f"kernel: expected an odd window size, got {self.kernel}")
        check_number("ae_threshold", self.ae_threshold, 0)
        check_number("nms_threshold", self.nms_threshold, 0, 1, above=True)
        check_number("sigma", self.sigma, 0, above=True)
        check_number("weight_exp", self.weight_exp, 0)
        check_number("score_threshold", self.score_threshold, 0, 1)
        if self.nms_method not in (0, 1, 2):
            raise ArgumentError(f"nms_method: expected 0 (hard), 1 (linear) or 2 (gaussian), got {self.nms_method!r}")
        for name in ("merge", "inplace_nms", "center_check"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentError(f"{name}: expected True or False, got {getattr(self, name)!r}")


def official_config(num_scales: int) -> InferenceConfig:
    """The official settings for `num_scales` test scales: box merging only with several scales."""
    return InferenceConfig(merge=num_scales > 1)


def build_eval_config(args) -> InferenceConfig:
    """From test.py's flags --topk --ae_threshold --nms_threshold --weight_exp --merge auto|on|off --inplace_nms
    --center_check on|off (None: on) (and --test_scales, already a list, for --merge auto)."""
    merge = {"auto": len(args.test_scales) > 1, "on": True, "off": False}[args.merge]
    return InferenceConfig(topk=args.topk, ae_threshold=args.ae_threshold, nms_threshold=args.nms_threshold,
                           weight_exp=args.weight_exp, merge=merge, inplace_nms=args.inplace_nms,
                           center_check=getattr(args, "center_check", None) != "off")


def changed_settings(cfg: InferenceConfig, num_scales: int, amp: bool | str) -> dict:
    """The settings of `cfg` (and autocast: False, True or 'fp16', 'bf16') that differ from
    `official_config(num_scales)` in fp32: {name: value}; they change the detections, so test.py names its results
    after them. fp16 is `amp` True, the name its results had before bf16 could be chosen."""
    official = asdict(official_config(num_scales))
    changed = {k: v for k, v in asdict(cfg).items() if v != official[k]}
    if not amp:
        return changed
    return {**changed, "amp": "bf16" if amp == "bf16" else True}


# The largest test scale: a network input's memory grows with the square of the scale (8: 64 times the pixels of
# the image; the official multi-scale test goes to 1.8), and a scale far above it fails in OpenCV or the
# kernel's out-of-memory killer, after the work has started.
MAX_TEST_SCALE = 8.0


def parse_scales(text: str) -> list[float]:
    """--test_scales of test.py and demo.py: "0.5,1,1.5" -> [0.5, 1.0, 1.5]; anything else (an empty entry, a
    scale outside (0, MAX_TEST_SCALE]) is an ArgumentError saying what was expected."""
    try:
        scales = [float(s) for s in text.split(",")]
    except ValueError:
        raise ArgumentError(f"--test_scales: expected comma-separated numbers such as 0.5,1,1.5, got {text!r}") \
            from None
    return check_distinct("--test_scales", [check_number("--test_scales", s, 0, MAX_TEST_SCALE, above=True)
                                            for s in scales])


def check_distinct(name: str, scales: list[float]) -> list[float]:
    """`scales` when no scale is given twice, else an ArgumentError naming it: a repeated scale runs the same
    forward again and doubles its boxes, which turns box merging on (--merge auto) and changes the detections."""
    repeated = sorted({s for s in scales if scales.count(s) > 1})
    if repeated:
        given = ",".join(f"{s:g}" for s in scales)
        raise ArgumentError(f"{name}: scale {repeated[0]:g} is given more than once in {given}; give each scale once")
    return scales


def nms_per_class(rows: np.ndarray, cfg: InferenceConfig) -> np.ndarray:
    """(N, 8) x1 y1 x2 y2 score tl_score br_score label -> (M, 6) x1 y1 x2 y2 score label after soft-NMS in each
    class, best first: those scoring at least the `max_per_image`-th best score (ties may add a few, as in the
    official code)."""
    kept = []
    for label in np.unique(rows[:, 7]):
        boxes = rows[rows[:, 7] == label, :7]
        if cfg.merge:
            boxes = soft_nms_merge(boxes, cfg.sigma, cfg.nms_threshold, cfg.score_threshold, cfg.nms_method,
                                   cfg.weight_exp, cfg.inplace_nms)
        else:
            boxes = soft_nms(boxes[:, :5], cfg.sigma, cfg.nms_threshold, cfg.score_threshold, cfg.nms_method,
                             cfg.inplace_nms)
        kept.append(np.concatenate([boxes[:, :5], np.full((len(boxes), 1), label, np.float32)], axis=1))
    if not kept:
        return np.zeros((0, 6), np.float32)
    kept = np.concatenate(kept)
    if len(kept) > cfg.max_per_image:
        kth = np.partition(kept[:, 4], len(kept) - cfg.max_per_image)[len(kept) - cfg.max_per_image]
        kept = kept[kept[:, 4] >= kth]
    return kept[np.argsort(-kept[:, 4], kind="stable")]


def to_original(boxes: torch.Tensor, centers: torch.Tensor | None, meta: EvalMeta, flipped: bool
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """One input's decoded boxes (D, 8) and centers (K, 4) in output-map units -> the same in original pixels,
    float32; boxes far outside the image get score -1. No centers (None) stay None."""
    boxes = boxes.float().cpu().numpy()
    resized = boxes_to_resized(boxes[:, :4], meta, flipped)
    boxes[far_outside(resized, meta), 4] = -1
    boxes[:, :4] = resized_to_original(resized, meta)
    if centers is None:
        return boxes, None
    centers = centers.float().cpu().numpy()
    centers[:, :2] = boxes_to_original(centers[:, [0, 1, 0, 1]], meta, flipped)[:, :2]
    return boxes, centers


def network_for(model, device: torch.device, amp: bool = False):
    """What the detect functions should run for `model`: on the CPU, a CenterNet prepared for inference
    (nets/inference.py: batch norm folded, ReLU and sums fused, channels_last; bf16 weights and activations with
    `amp`); elsewhere, and for other models (ONNX), `model` itself, which `detect` autocasts when `amp`."""
    if device.type != "cpu" or not isinstance(model, CenterNet):
        return model
    return prepare_for_inference(model, torch.bfloat16 if amp else torch.float32)


@torch.no_grad()
def detect(model, inputs: list, cfg: InferenceConfig, device: torch.device, amp: bool | str = False) -> np.ndarray:
    """One eval sample's `inputs` ([(images (1 or 2, 3, H, W), meta) per test scale], image 1 flipped) ->
    (M, 6) float32 x1 y1 x2 y2 score label in original-image pixels, best first. `model` maps an image batch to
    the eval-mode output dict of docs/FORMAT.md. The centers come from the scale-1 inputs (or, without scale 1,
    from the scale nearest to it). Cells where the network output NaN or infinity hold no keypoint (utils/decode.py)."""
    return detect_batch(model, [inputs], cfg, device, amp)[0][0]


@torch.no_grad()
def detect_batch(model, samples: list[list], cfg: InferenceConfig, device: torch.device,
                 amp: bool | str = False) -> tuple[list[np.ndarray], int]:
    """`detect` for several samples at once (frames of a video, photos of one size): their inputs at each test
    scale must have the same shape; one forward per scale on the batch of all their images. One (M, 6) array per
    sample, as `detect` gives for it alone (up to the rounding of a batched convolution), and the number of
    samples for which the network output NaN or infinity (a diverged network, 16-bit overflow), for the caller to
    report: their detections come from the finite cells alone."""
    # Each sample's own: demo.py shrinks the scales of images too large for an ONNX export.
    center_scales = [min((meta.scale for _, meta in sample), key=lambda s: abs(s - 1)) for sample in samples]
    boxes, centers = [[] for _ in samples], [[] for _ in samples]
    non_finite = [False for _ in samples]
    for scale_inputs in zip(*samples):  # [(images, meta) of each sample] at one test scale
        images = torch.cat([im for im, _ in scale_inputs])
        # A prepared network has its dtype; otherwise `amp` as given: train.py validates with its --amp_dtype.
        with autocast(device, False if isinstance(model, PreparedNetwork) else amp):
            out = model(images.to(device, non_blocking=True))
        dets, points, finite = decode_checked(out, topk=cfg.topk, ae_threshold=cfg.ae_threshold,
                                              num_dets=cfg.num_dets, kernel=cfg.kernel)
        per_sample = len(scale_inputs[0][0])  # 2 with the flipped copy
        finite = finite.view(-1, per_sample).all(dim=1).tolist()
        for j, (_, meta) in enumerate(scale_inputs):
            non_finite[j] |= not finite[j]
            for i in range(per_sample):
                c = None if points is None else points[j * per_sample + i]
                b, c = to_original(dets[j * per_sample + i], c, meta, flipped=i == 1)
                boxes[j].append(b)
                if c is not None and meta.scale == center_scales[j]:
                    centers[j].append(c)
    results = []
    for b, c in zip(boxes, centers):
        rows = np.concatenate(b)
        if cfg.center_check and c:  # no centers: a network without a center branch
            rows = center_check(rows, np.concatenate(c))
        rows = rows[rows[:, 4] > -1]
        results.append(nms_per_class(rows[np.argsort(-rows[:, 4], kind="stable")], cfg))
    return results, sum(non_finite)


def first_item(batch: list):
    """DataLoader collate for batches of one eval sample: the sample itself."""
    return batch[0]


class ErrorsAsItems(Dataset):
    """`dataset`, whose user errors (an image missing or corrupt) are returned as the item, for the main process
    to raise as they are: DataLoader re-raises a worker's exception with the worker's traceback in its message."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except UserError as error:
            return error


class EvaluationStopped(Exception):
    """A stop request (SIGTERM, Ctrl-C: `stop()` true on some process) ended an evaluation before every image was
    scored; raised on every process alike."""


def detect_dataset(model, dataset, cfg: InferenceConfig, device: torch.device, num_workers: int = 2,
                   amp: bool | str = False, progress: bool = True, stop=None) -> dict[int, np.ndarray]:
    """{image_id: (M, 6)} over the whole `dataset`; each process runs every world_size-th image and the results
    of all processes are gathered into every one of them. `stop` (a callable, or None) is asked before each image;
    once it is true the process stops, and EvaluationStopped is raised on every process at the gathering, which
    each reaches once whatever its share (no collective per image, which shares of unequal length would hang).
    Images for which the network output NaN or infinity are counted in one warning."""
    loader = DataLoader(ErrorsAsItems(Subset(dataset, range(rank(), len(dataset), world_size()))), batch_size=1,
                        shuffle=False, num_workers=num_workers, collate_fn=first_item, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals)  # a stop is the main process's to handle
    was_training = model.training
    model.eval()
    network = network_for(model, device, amp)
    detections, error, stopped, non_finite = {}, None, False, 0
    try:
        for sample in tqdm(loader, desc="eval", disable=not (progress and is_main()), dynamic_ncols=True):
            if stop is not None and stop():
                stopped = True
                break
            if isinstance(sample, UserError):
                raise sample
            (dets,), bad = detect_batch(network, [sample["inputs"]], cfg, device, amp)
            detections[int(sample["image_id"])] = dets
            non_finite += bad
    except UserError as e:  # raised below on every process alike: the others must not wait for this one
        error = e
    model.train(was_training)
    parts = all_gather_object((detections, error, stopped, non_finite))
    for _, part_error, _, _ in parts:
        if part_error is not None:
            raise part_error
    if any(part_stopped for _, _, part_stopped, _ in parts):
        raise EvaluationStopped("evaluation stopped by a stop request")
    non_finite = sum(part_non_finite for *_, part_non_finite in parts)
    if non_finite and is_main():
        print(non_finite_warning(non_finite, len(dataset)))
    return {image_id: dets for part, *_ in parts for image_id, dets in part.items()}


def non_finite_warning(count: int, total: int) -> str:
    """The warning for `count` of `total` images whose network outputs held NaN or infinity."""
    return (f"warning: the network output NaN or infinity for {count} of {total} images (diverged weights, or "
            "16-bit activations that overflowed: try without --amp); their detections come from the cells with "
            "finite outputs alone")


def evaluate(model, dataset, cfg: InferenceConfig, device: torch.device, num_workers: int = 2,
             amp: bool | str = False, out_json=None, progress: bool = True, backend: str = "pycocotools",
             stop=None) -> dict:
    """Detects over `dataset` and scores with `backend` (datasets/coco_eval.py) on the main process (which prints
    the tables and writes `out_json` when given); every process returns the metrics dict of `evaluate_detections`.
    `stop`: see `detect_dataset`."""
    with cudnn_benchmark(False):  # every image has its own size
        detections = detect_dataset(model, dataset, cfg, device, num_workers, amp, progress, stop)
    stats = None
    if is_main():
        stats = evaluate_detections(dataset.coco, detections, dataset.cat_ids, dataset.class_names,
                                    out_json=out_json, backend=backend)
    return all_gather_object(stats)[0]
