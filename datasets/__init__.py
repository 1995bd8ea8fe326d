"""COCO-format detection data: `build_dataset(args, split, train)` is the one place that reads the flags."""
from datasets.coco import CocoDetection


def build_dataset(args, split: str, train: bool) -> CocoDetection:
    """From the flags `--dataset coco --data_dir DIR --img_size N` (and `--test_scales`, `--test_flip` where the
    script has them): the data set of `split` (e.g. `args.train_split`), training or evaluation items.

    The built-in set: `--dataset coco --data_dir data/shapes --train_split train --val_split val` after
    `python -m datasets.shapes --out data/shapes`.
    """
    if args.dataset != "coco":
        raise ValueError(f"--dataset {args.dataset!r}: only 'coco' (any COCO-format folder) is supported")
    return CocoDetection(args.data_dir, split, train=train, img_size=getattr(args, "img_size", 511),
                         test_scales=tuple(getattr(args, "test_scales", None) or (1.0,)),
                         test_flip=getattr(args, "test_flip", False))
