"""Converts a Pascal VOC folder to the COCO layout that train.py and test.py read.

    python tools/voc_to_coco.py --voc_dir VOCdevkit/VOC2007 --out data/voc2007 --splits trainval test

reads `Annotations/<id>.xml`, `JPEGImages/<id>.jpg` and the image lists `ImageSets/Main/<split>.txt`, and writes
`OUT/annotations/instances_<split>.json` with `OUT/<split>/` holding the images (symbolic links to the VOC files,
or copies with --copy). Boxes: VOC's 1-based inclusive pixel corners (xmin, ymin, xmax, ymax) become COCO's
[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]. Objects marked `difficult` become `iscrowd` 1: left out of
training and ignored by the COCO evaluation, close to VOC's own rule (COCO matches a crowd box by the share of the
detection inside it: a small detection inside a difficult object is ignored too, where VOC counts it as a false
positive; --keep_difficult: ordinary objects). Classes: the 20 VOC classes in their usual order when every name is
one of them, else the names found in all splits, sorted (--classes fixes the list and its order); category ids are
1..C. An existing split in OUT is never overwritten.
"""
import argparse
import math
import shutil
import stat
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from xml.parsers import expat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: import the repo
from utils.errors import ArgumentError, DataError, MissingFileError, run_cli
from utils.files import make_folder, write_coco_splits

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
MAX_XML_BYTES = 16 * 2**20  # a VOC annotation file holds a few KB; ElementTree keeps some 10 times a file in memory


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc_dir", required=True, help="folder with Annotations/, JPEGImages/, ImageSets/Main/")
    p.add_argument("--out", required=True, help="output folder (COCO layout)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="names of ImageSets/Main/<split>.txt")
    p.add_argument("--classes", help="comma-separated class names, in label order (default: see above)")
    p.add_argument("--keep_difficult", action="store_true", help="difficult objects as ordinary ones")
    p.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    return p


def _text(node: ET.Element, path: str, xml_path: Path, where: str) -> str:
    found = node.find(path)
    if found is None or found.text is None or not found.text.strip():
        raise DataError(f"{xml_path}: {where} lacks <{path}>")
    return found.text.strip()


def _number(node: ET.Element, path: str, xml_path: Path, where: str) -> float:
    text = _text(node, path, xml_path, where)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # 'nan', 'inf' and '1e400' parse, but would reach the json as NaN and Infinity
        raise DataError(f"{xml_path}: {where} <{path}> is {text[:40]!r}, expected a finite number")
    return value


def _refuse_entities(data: bytes, xml_path: Path) -> None:
    """DataError when the XML document `data` declares an entity (<!ENTITY ...> in its DOCTYPE)."""
    def declared(name, *_):
        raise DataError(f"{xml_path}: declares the XML entity {name!r}; VOC annotations declare none, and expanding "
                        "entities can fill the memory, so such files are refused")
    parser = expat.ParserCreate()
    parser.EntityDeclHandler = declared
    parser.Parse(data, True)


def read_voc_xml(xml_path: Path) -> dict:
    """One VOC annotation file -> {"width", "height", "objects": [(name, [x, y, w, h] COCO, difficult)]}.
    Files over MAX_XML_BYTES, files that are not regular files and XML that declares entities are refused unparsed:
    VOC files declare none, and expanding them can fill the memory (billion laughs)."""
    try:
        info = xml_path.stat()
        if not stat.S_ISREG(info.st_mode):  # a folder, or a pipe or device that would be read forever
            raise DataError(f"{xml_path}: not a regular file, expected a VOC annotation (.xml)")
        if info.st_size > MAX_XML_BYTES:
            raise DataError(f"{xml_path}: {info.st_size} bytes, more than a VOC annotation holds (at most "
                            f"{MAX_XML_BYTES})")
        data = xml_path.read_bytes()
    except OSError as e:  # most often a listed id without its xml file
        error = MissingFileError if isinstance(e, FileNotFoundError) else DataError
        raise error(f"{xml_path}: cannot read the annotation ({e.strerror})") from None
    try:
        _refuse_entities(data, xml_path)
        root = ET.fromstring(data)
    except (expat.ExpatError, ET.ParseError, LookupError) as e:  # LookupError: an <?xml encoding="..."?> unknown here
        raise DataError(f"{xml_path}: not valid XML ({e})") from None
    width, height = (_number(root, f"size/{k}", xml_path, "<annotation>") for k in ("width", "height"))
    if width <= 0 or height <= 0 or not width.is_integer() or not height.is_integer():
        raise DataError(f"{xml_path}: <size> is {width:g} x {height:g}, expected positive whole numbers")
    objects = []
    for i, obj in enumerate(root.findall("object")):
        where = f"object {i + 1}"
        name = _text(obj, "name", xml_path, where)
        x1, y1, x2, y2 = (_number(obj, f"bndbox/{k}", xml_path, f"{where} ({name})")
                          for k in ("xmin", "ymin", "xmax", "ymax"))
        if x2 < x1 or y2 < y1:
            raise DataError(f"{xml_path}: {where} ({name}) has xmin..xmax {x1:g}..{x2:g}, ymin..ymax {y1:g}..{y2:g};"
                            " expected xmin <= xmax and ymin <= ymax")
        box = [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]
        if not all(map(math.isfinite, box + [box[2] * box[3]])):  # -1e308..1e308: each finite, not its width
            raise DataError(f"{xml_path}: {where} ({name}) has xmin..xmax {x1:g}..{x2:g}, ymin..ymax {y1:g}..{y2:g}, "
                            "a box too large for a number")
        difficult = obj.find("difficult")
        objects.append((name, box,
                        difficult is not None and (difficult.text or "0").strip() == "1"))
    return {"width": int(width), "height": int(height), "objects": objects}


def is_plain_name(name: str) -> bool:
    """A file or folder name that stays in the folder it is joined to: no '/', NUL byte, '.' or '..'."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def read_split(voc_dir: Path, split: str) -> list[tuple[str, dict]]:
    """[(image id, read_voc_xml)] of the ids listed in ImageSets/Main/<split>.txt, in its order."""
    list_path = voc_dir / "ImageSets" / "Main" / f"{split}.txt"
    if not list_path.is_file():
        raise MissingFileError(f"{list_path}: image list of split {split!r} not found")
    try:
        text = list_path.read_bytes().decode()
    except UnicodeDecodeError as e:
        raise DataError(f"{list_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{list_path}: cannot read the image list ({e.strerror})") from None
    line_of = {}  # image id: its line number
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        image_id = line.split()[0]
        if not is_plain_name(image_id):  # Annotations/<id>.xml, JPEGImages/<id>.jpg and OUT/<split>/<id>.jpg
            raise DataError(f"{list_path}: line {number}: image id {image_id[:80]!r} is not a file name (a path "
                            "would read and write files outside the VOC and output folders)")
        if image_id in line_of:  # its image would be linked twice and counted twice by the evaluation
            raise DataError(f"{list_path}: image id {image_id} is listed twice, on lines {line_of[image_id]} and "
                            f"{number}")
        line_of[image_id] = number
    if not line_of:
        raise DataError(f"{list_path}: no image ids listed")
    return [(i, read_voc_xml(voc_dir / "Annotations" / f"{i}.xml")) for i in line_of]


def choose_classes(names: set[str], given: str | None) -> list[str]:
    if given:
        classes = [c.strip() for c in given.split(",") if c.strip()]
        repeated = sorted({c for c in classes if classes.count(c) > 1})
        if repeated:  # each would be a category of its own, the earlier ones without any object
            raise ArgumentError(f"--classes: {', '.join(repeated)} is listed more than once; list each class once")
        unknown = sorted(names - set(classes))
        if unknown:
            raise ArgumentError(f"--classes: the annotations also name {', '.join(unknown)}; add them to the list")
        return classes
    return list(VOC_CLASSES) if names <= set(VOC_CLASSES) else sorted(names)


def to_coco(items: list[tuple[str, dict]], classes: list[str], keep_difficult: bool) -> dict:
    cat_id = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations = [], []
    for image_id, (name, ann) in enumerate(items, start=1):
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": ann["width"], "height": ann["height"]})
        for cls, box, difficult in ann["objects"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[cls],
                                "bbox": box, "area": box[2] * box[3], "iscrowd": int(difficult and not keep_difficult)})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "voc"} for i, n in enumerate(classes)]}


def main(args: argparse.Namespace) -> None:
    voc_dir, out = Path(args.voc_dir), Path(args.out)
    if not (voc_dir / "Annotations").is_dir():
        raise MissingFileError(f"{voc_dir}: no Annotations/ folder (expected a VOC folder such as VOCdevkit/VOC2007)")
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"--out {out} is a file; give a folder")
    for split in args.splits:
        if not is_plain_name(split):
            raise ArgumentError(f"--splits: {split!r} is not a name (ImageSets/Main/<split>.txt, OUT/<split>/)")
        if (out / "annotations" / f"instances_{split}.json").exists() or (out / split).exists():
            raise ArgumentError(f"{out} already holds split {split!r}; choose another --out or remove it")
    splits = {split: read_split(voc_dir, split) for split in args.splits}
    for split, items in splits.items():
        missing = [voc_dir / "JPEGImages" / f"{i}.jpg" for i, _ in items
                   if not (voc_dir / "JPEGImages" / f"{i}.jpg").is_file()]
        if missing:
            raise MissingFileError(f"{missing[0]}: image of split {split!r} not found ({len(missing)} missing in all)")
    classes = choose_classes({o[0] for items in splits.values() for _, a in items for o in a["objects"]},
                             args.classes)
    make_folder(out, "--out")
    fills = {split: image_filler(voc_dir, [name for name, _ in items], to_coco(items, classes, args.keep_difficult),
                                 args.copy) for split, items in splits.items()}
    write_coco_splits(out, fills, report=lambda split, data: print(
        f"{out / split}: {len(data['images'])} images, {len(data['annotations'])} objects, {len(classes)} classes"))


def image_filler(voc_dir: Path, names: list[str], data: dict, copy: bool) -> Callable[[Path], dict]:
    """The `fill` of utils.files.write_coco_split for a split of images `names` and json `data`: it links (or
    copies) the images into the folder it is given and returns `data`."""
    def fill(folder: Path) -> dict:
        for name in names:
            src, dst = (voc_dir / "JPEGImages" / f"{name}.jpg").absolute(), folder / f"{name}.jpg"
            if copy:
                shutil.copy2(src, dst)
            else:
                dst.symlink_to(src)
        return data

    return fill


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
