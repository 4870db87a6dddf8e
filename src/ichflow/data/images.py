"""Decoding CT slices and masks, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ichflow.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
