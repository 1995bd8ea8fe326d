"""COCO-format detection data: `build_dataset(args, split, train)` is the one place that reads the flags."""
from typing import Sequence

from datasets.coco import CocoDetection


def build_dataset(args, split: str, train: bool, test_scales: Sequence[float] = (1.0,),
                  min_box_size: float = 0.0) -> CocoDetection:
    """From the flags `--dataset coco --data_dir DIR --img_size N --test_flip` (all required in `args`): the data
    set of `split` (e.g. `args.train_split`), training or evaluation items; evaluation items at `test_scales`;
    training boxes with a side under `min_box_size` canvas pixels dropped.

    The built-in set: `--dataset coco --data_dir data/shapes --train_split train --val_split val` after
    `python -m datasets.shapes --out data/shapes`.
    """
    if args.dataset != "coco":
        raise ValueError(f"--dataset {args.dataset!r}: only 'coco' (any COCO-format folder) is supported")
    return CocoDetection(args.data_dir, split, train=train, img_size=args.img_size, test_scales=tuple(test_scales),
                         test_flip=args.test_flip, min_box_size=min_box_size)
