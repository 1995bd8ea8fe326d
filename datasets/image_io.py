"""Image decoding to 8-bit BGR with errors that name the file.

Grayscale, gray + alpha, RGBA and 16-bit images are converted to 3-channel 8-bit BGR (alpha dropped, 16-bit values
keep their high byte). The EXIF orientation of a JPEG is applied, as image viewers (and most annotation tools) show the
image: a phone's portrait photo is upright, its boxes are drawn where one sees the objects, and the width / height
an annotation file gives are those of the upright image (a 90-degree mismatch fails the loader's size check).
Every image is read here: training, evaluation, demo.py, datasets.check and tools/analyze.py agree. A JPEG cut
short (which libjpeg would otherwise decode with gray rows at the bottom) is an error.
"""
from pathlib import Path

import cv2
import numpy as np

from utils.errors import DataError, MissingFileError

_FLAGS = cv2.IMREAD_COLOR  # which applies the EXIF orientation (IMREAD_UNCHANGED would not)
# The file name endings of the formats cv2.imread documents (those missing from a given OpenCV build are reported
# as undecodable when read).
IMAGE_SUFFIXES = frozenset({".bmp", ".dib", ".jpeg", ".jpg", ".jpe", ".jp2", ".png", ".webp", ".avif", ".pbm",
                            ".pgm", ".ppm", ".pxm", ".pnm", ".pfm", ".sr", ".ras", ".tiff", ".tif", ".exr", ".hdr",
                            ".pic"})
_JPEG_SOI, _JPEG_SOS, _JPEG_EOI = b"\xff\xd8", b"\xff\xda", b"\xff\xd9"


def is_truncated_jpeg(data: bytes) -> bool:
    """True for JPEG bytes whose last scan has no end-of-image marker after it. Entropy-coded data never holds
    0xFFD9 (0xFF is stuffed), and an EXIF thumbnail's markers all come before the main image's scans."""
    return data[:2] == _JPEG_SOI and data.rfind(_JPEG_EOI) < data.rfind(_JPEG_SOS)


def load_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 BGR image at `path`; FileNotFoundError or ValueError naming the file otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"{path}: image file not found") from None
    if not data:
        raise DataError(f"{path}: image file is empty")
    if is_truncated_jpeg(data):
        raise DataError(f"{path}: truncated JPEG (no end-of-image marker after the last scan)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), _FLAGS)
    if image is None:
        raise DataError(f"{path}: cannot decode the image (not an image format OpenCV reads, or corrupt)")
    return image
