"""Image decoding to 8-bit BGR with errors that name the file.

Grayscale, gray + alpha, RGBA and 16-bit images are converted to 3-channel 8-bit BGR (alpha dropped, 16-bit values
keep their high byte); so are such arrays given to engine.Detector (`as_bgr8`), as a PNG file of them is read. The
EXIF orientation of a JPEG, PNG, WebP or TIFF file is applied, as image viewers (and most annotation tools) show the
image: a phone's portrait photo is upright, its boxes are drawn where one sees the objects, and the width / height an
annotation file gives are those of the upright image (a 90-degree mismatch fails the loader's size check). Every
image is read here: training, evaluation, demo.py, datasets.check and tools/analyze.py agree. A JPEG cut short (which
libjpeg would otherwise decode with gray rows at the bottom) is an error. `exif_orientation` reads the turn an
image's EXIF asks for. Drawn images are written here too (`write_image`)."""
import io
import re
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import PIL.Image

from utils.errors import ArgumentError, DataError, MissingFileError, WriteError
from utils.files import atomic_write

# The most pixels an image file may decode to (3 bytes each: 384 MiB), checked from its header: a 108-megapixel
# photo fits, a decompression bomb does not.
MAX_IMAGE_PIXELS = 2**27
# The largest image file read (1 GiB: MAX_IMAGE_PIXELS pixels of uncompressed 16-bit RGBA), checked before it is
# read whole into memory.
MAX_IMAGE_FILE_BYTES = 8 * MAX_IMAGE_PIXELS
_FLAGS = cv2.IMREAD_COLOR  # which applies the EXIF orientation (IMREAD_UNCHANGED would not)
# The file name endings of the formats cv2.imread documents (those missing from a given OpenCV build are reported
# as undecodable when read), and .jfif, another ending of JPEG files (imread goes by the content, not the name).
IMAGE_SUFFIXES = frozenset({".bmp", ".dib", ".jpeg", ".jpg", ".jpe", ".jfif", ".jp2", ".png", ".webp", ".avif",
                            ".pbm", ".pgm", ".ppm", ".pxm", ".pnm", ".pfm", ".sr", ".ras", ".tiff", ".tif", ".exr",
                            ".hdr", ".pic"})
# Those whose format cv2.imwrite writes an 8-bit colour image in: a drawing keeps its input's format. Not .pbm
# (1-bit), .pgm (gray), .pfm / .hdr / .pic (float), .pxm and .jfif (no writer goes by them), .exr.
DRAWING_SUFFIXES = frozenset({".bmp", ".dib", ".jpeg", ".jpg", ".jpe", ".jp2", ".png", ".webp", ".avif", ".ppm",
                              ".pnm", ".sr", ".ras", ".tiff", ".tif"})
_JPEG_SOI, _JPEG_SOS, _JPEG_EOI = b"\xff\xd8", 0xDA, b"\xff\xd9"
_ORIENTATION_TAG = 0x0112


def jpeg_header_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """Yields (marker, payload start, payload end) for each marker segment of JPEG `data` from its start-of-image
    up to and including the first start-of-scan (SOS), whose scan data begins at its payload end. Stops early where
    the bytes leave the segment layout, or at the data's end."""
    pos = len(_JPEG_SOI)
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        yield marker, pos + 4, end
        if marker == _JPEG_SOS:
            return
        pos = end


def is_truncated_jpeg(data: bytes) -> bool:
    """True for JPEG bytes with no end-of-image marker after the start of their first scan. The header is walked
    segment by segment, because the bytes around the image may hold markers of their own: an EXIF thumbnail before
    it, a phone's "motion photo" video appended after it. Entropy-coded data never holds 0xFFD9 (0xFF is stuffed)."""
    if data[:2] != _JPEG_SOI:
        return False
    scan_start = next((end for marker, _, end in jpeg_header_segments(data) if marker == _JPEG_SOS), None)
    return scan_start is not None and data.find(_JPEG_EOI, scan_start) < 0


def exif_orientation(path: Path) -> int:
    """The EXIF Orientation (1 to 8) that imread applies: the tag of the Exif block of a JPEG, PNG or WebP file, or of
    a TIFF file's own tags; 1 (as stored) when the file has none or Pillow cannot parse its header. 5 to 8 turn the
    image by 90 or 270 degrees: it is read with its stored width and height swapped. Only the header is read (an
    Exif block behind large ICC profiles or other APPn data included), and not XMP metadata, which imread ignores."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: no pixel is decoded here
        try:
            with PIL.Image.open(path) as image:
                tags = getattr(image, "tag_v2", None)  # a TIFF's directory
                if tags is None:
                    tags = PIL.Image.Exif()
                    tags.load(image.info.get("exif", b""))
                value = tags.get(_ORIENTATION_TAG, 1)
        except Exception:  # a format Pillow does not read, or a header it cannot parse: no turn known
            return 1
    return value if value in range(1, 9) else 1


def load_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 BGR image at `path`; MissingFileError, or DataError naming the file and the reason otherwise:
    a folder, a device or socket (a FIFO is read, blocking until it is written), a file over MAX_IMAGE_FILE_BYTES,
    unreadable (permission),
    not decodable, or of more than MAX_IMAGE_PIXELS pixels by its header (checked before any pixel is decoded: a
    PNG of a few hundred KB can hold 20000 x 20000 zeros, gigabytes decoded)."""
    path = Path(path)
    try:
        status = path.stat()  # one look at what the path is, behind any symbolic link
        if stat.S_ISDIR(status.st_mode):
            raise DataError(f"{path} is a folder, not an image file")
        # /dev/zero (behind a symbolic link, say) would be read until the memory runs out. A named pipe is read, as
        # `cat` reads one: a test holds a loader worker on one (tests/test_faults.py).
        if stat.S_ISCHR(status.st_mode) or stat.S_ISBLK(status.st_mode) or stat.S_ISSOCK(status.st_mode):
            raise DataError(f"{path}: a device or socket, not an image file")
        if stat.S_ISREG(status.st_mode) and status.st_size > MAX_IMAGE_FILE_BYTES:
            raise DataError(f"{path}: a file of {status.st_size} bytes, more than the {MAX_IMAGE_FILE_BYTES} an "
                            "image file is read with (that of the largest image read, uncompressed)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"{path}: image file not found") from None
    except OSError as e:  # permission denied, a name too long, a symbolic link loop, a file used as a folder
        raise DataError(f"{path}: cannot read the image file ({e.strerror or e})") from None
    if not data:
        raise DataError(f"{path}: image file is empty")
    if is_truncated_jpeg(data):
        raise DataError(f"{path}: truncated JPEG (no end-of-image marker after the last scan)")
    pixels = header_pixels(data)
    if pixels is not None and pixels > MAX_IMAGE_PIXELS:
        raise DataError(f"{path}: the image has {pixels} pixels by its header, more than the {MAX_IMAGE_PIXELS} read "
                        f"(decoded, it would take {3 * pixels / 2**30:.1f} GiB); scale it down first")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), _FLAGS)
    if image is None:
        raise DataError(f"{path}: cannot decode the image (not an image format OpenCV reads, or corrupt)")
    return image


def header_pixels(data: bytes) -> int | None:
    """Width x height of encoded image `data` from its header alone (Pillow's parsers: PNG, JPEG, WebP, TIFF, BMP,
    ...), None for a format Pillow does not know or a header it cannot parse (the decoder then judges the file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's own DecompressionBombWarning: the caller decides
        try:
            with PIL.Image.open(io.BytesIO(data)) as image:
                return image.size[0] * image.size[1]
        except PIL.Image.DecompressionBombError as e:  # beyond twice Pillow's limit: the count is in its message
            found = re.search(r"\((\d+) pixels\)", str(e))
            return int(found.group(1)) if found else MAX_IMAGE_PIXELS + 1
        except Exception:  # a format Pillow does not read, or bytes it cannot parse, fail with whatever they lead to
            return None


def layout_hint(shape: tuple[int, ...]) -> str:
    """What an array of `shape` most likely is when it is not one image in channels-last order: the two layouts a
    user of other frameworks passes by habit."""
    if len(shape) == 4 and shape[-1] in (1, 3, 4):
        return "; several images stacked: pass one at a time (a Detector takes a list of them: list(images))"
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4):
        return "; channels come last: pass image.transpose(1, 2, 0)"
    return ""


def as_bgr8(image: np.ndarray) -> np.ndarray:
    """An image array converted as `load_image` converts a PNG file of it: (H, W) or (H, W, 1) gray to BGR,
    (H, W, 4) BGRA without its alpha, 16-bit values to their high byte; (H, W, 3) uint8 BGR comes back as it is.
    Anything else, and an image without pixels, is an ArgumentError naming its shape and dtype."""
    if not isinstance(image, np.ndarray):
        hint = ""
        if isinstance(image, PIL.Image.Image):
            # The conversion a user reaches for first, np.asarray(image), gives RGB: no error, other detections.
            hint = "; a PIL image is RGB: pass np.asarray(image.convert('RGB'))[:, :, ::-1]"
        elif image is None:
            hint = "; cv2.imread gives None for a file it cannot read"
        raise ArgumentError(f"expected a numpy array in BGR order ((H, W, 3) uint8, as cv2.imread gives) or an image "
                            f"path, got {type(image).__name__}{hint}")
    shape = image.shape + (1,) if image.ndim == 2 else image.shape
    if len(shape) != 3 or shape[2] not in (1, 3, 4) or image.dtype not in (np.uint8, np.uint16):
        raise ArgumentError(f"expected a (H, W, 3) BGR, (H, W, 4) BGRA or (H, W) gray image of dtype uint8 or "
                            f"uint16, or an image path; got an array of shape {image.shape} and dtype {image.dtype}"
                            f"{layout_hint(image.shape)}")
    if image.size == 0:
        raise ArgumentError(f"the image array has no pixels (shape {image.shape})")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    image = image.reshape(shape)
    if shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(image[:, :, :3])


def drawing_names(names: list[str]) -> list[str]:
    """The file names of the drawings over the images `names` (the distinct names of one folder), in their order:
    an image's own name where its format holds 8-bit colour, else with .png added (scan.pgm.png, apart from a
    scan.png beside it), or, where another image has that name (ignoring case), .2.png, .3.png, ... instead: scan.pgm
    beside an image scan.pgm.png is drawn as scan.pgm.2.png."""
    own = {name for name in names if Path(name).suffix.lower() in DRAWING_SUFFIXES}
    taken = {name.casefold() for name in own}
    drawings = []
    for name in names:
        drawing, copy = name, 1
        if name not in own:
            drawing = name + ".png"
            while drawing.casefold() in taken:
                copy += 1
                drawing = f"{name}.{copy}.png"
            taken.add(drawing.casefold())
        drawings.append(drawing)
    return drawings


def write_image(path: Path, image: np.ndarray) -> None:
    """Encodes `image` in the format of `path`'s suffix and writes it atomically, so a failure (a format that cannot
    hold the image, full disk, no permission) is a WriteError naming the file, and never leaves a half-written
    image."""
    try:
        ok, data = cv2.imencode(path.suffix, image)
    except cv2.error as e:  # raised instead of returning False for a suffix without any writer
        raise WriteError(f"{path}: OpenCV cannot encode an image with suffix {path.suffix!r} ({e.err})") from None
    if not ok:
        raise WriteError(f"{path}: OpenCV cannot encode an image with suffix {path.suffix!r}")
    atomic_write(path, lambda f: f.write(data.tobytes()))
