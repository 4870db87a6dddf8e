"""Decoding CT slices and masks, with errors that name the file.

The mask convention, one rule for every reader, cache and metric (:func:`read_mask`): any non-zero pixel of a
lossless mask (PNG) is lesion, so 0/1 and 0/255 exports mean the same. JPEG masks carry compression noise
around 0/255, so there a pixel is lesion above half range; a JPEG mask with values that never pass half range
(a 0/1 export, or a lesion of a few pixels blurred by the compression) is empty under that rule, and the
readers report it (:func:`decode_mask` says so).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ichflow.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
LOSSY_MASK_LEVEL = 127   # JPEG masks: 0/255 with compression noise, foreground above half range


def read_gray(path: str | Path) -> np.ndarray:
    """Read an 8-bit slice as a (H, W) uint8 array. Colour files are reduced to luminance.

    Raises DataError for a missing, non-image, truncated or corrupt file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # forces a full decode: a truncated file fails here, not later in training
            if im.mode not in ("L", "P", "RGB", "RGBA", "LA", "I;16", "I"):
                raise DataError(path, f"unsupported image mode {im.mode!r}")
            if im.mode in ("I;16", "I"):
                raise DataError(path, f"{im.mode} image: expected 8-bit, windowed slices")
            arr = np.asarray(im.convert("L"))
    except FileNotFoundError as exc:
        raise DataError(path, "file not found") from exc
    except UnidentifiedImageError as exc:
        raise DataError(path, "not an image file (cannot identify format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(path, f"unreadable or truncated image ({exc})") from exc
    except ImportError as exc:  # Ultralytics patches Image.open to retry unknown formats with an optional plugin
        raise DataError(path, "not an image file (cannot identify format)") from exc
    return arr


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after a full decode (so truncation is detected)."""
    arr = read_gray(path)
    return arr.shape[1], arr.shape[0]


def mask_foreground(mask: np.ndarray, lossy: bool = False) -> np.ndarray:
    """Lesion pixels of a decoded mask as a bool array: any non-zero pixel (above half range if ``lossy``)."""
    mask = np.asarray(mask)
    return mask > LOSSY_MASK_LEVEL if lossy else mask != 0


def decode_mask(path: str | Path) -> tuple[np.ndarray, int]:
    """(lesion mask, faint): the (H, W) bool mask of a mask file under the one convention (module doc), and
    the largest value of a JPEG mask that has non-zero pixels but none above half range (else 0): those
    pixels are not lesion, which a reader must report. Raises DataError like :func:`read_gray`."""
    path = Path(path)
    arr = read_gray(path)
    lossy = path.suffix.lower() in LOSSY_SUFFIXES
    peak = int(arr.max())
    return mask_foreground(arr, lossy), (peak if lossy and 0 < peak <= LOSSY_MASK_LEVEL else 0)


def faint_mask_detail(peak: int) -> str:
    """The readers' warning for a faint JPEG mask (see :func:`decode_mask`)."""
    return (f"JPEG mask with values only up to {peak}: no pixel passes half range, so it is empty (a 0/1 mask "
            "cannot be told from JPEG noise: export masks as 0/255 or PNG)")


def read_mask(path: str | Path) -> np.ndarray:
    """(H, W) bool lesion mask of a mask file under the one convention (see the module doc)."""
    return decode_mask(path)[0]
