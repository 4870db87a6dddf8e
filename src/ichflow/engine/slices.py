"""Decode slices once into a memory-mapped uint8 cache; neighbours for 2.5D input.

A cache file is keyed by the image paths, their size and modification time, the target size and the mask
convention, so it is rebuilt when the manifest or a file changes and reused across runs and processes
(DataLoader workers map the same file).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ichflow.data.images import read_gray, read_mask
from ichflow.errors import DataError
from ichflow.paths import cache_dir

MASK_CACHE_RULE = "nonzero-v2"   # changes the key of mask caches written under an older convention


def _stamp(path: str) -> str:
    """Size and mtime of a file ('' for none/missing): a rewritten file gets a new cache."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}" if st else ""


def _decode(path: str, size: int | None, is_mask: bool) -> np.ndarray:
    # masks are cached as 0/255 under the one mask convention (ichflow.data.images.read_mask)
    arr = np.where(read_mask(path), 255, 0).astype(np.uint8) if is_mask else read_gray(path)
    return resize_square(arr, size, nearest=is_mask) if size else arr


def resize_square(arr: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """(H, W) or (H, W, C) uint8 -> (size, size[, C]), each channel resized as the slice cache resizes a slice
    (PIL bilinear; nearest for masks). Models that resize at inference use this, so a served model sees the
    pixels its training run saw."""
    if arr.shape[:2] == (size, size):
        return arr
    resample = Image.NEAREST if nearest else Image.BILINEAR
    if arr.ndim == 2:
        return np.asarray(Image.fromarray(arr).resize((size, size), resample))
    return np.stack([resize_square(arr[..., c], size, nearest) for c in range(arr.shape[-1])], axis=-1)


def slice_cache(paths: list[str], size: int | None = None, is_mask: bool = False) -> np.ndarray:
    """(N, H, W) uint8 memmap of the given files ('' paths give zero images, e.g. missing masks)."""
    stamps = "\n".join(f"{p}|{_stamp(p)}" for p in paths)
    rule = f"|mask:{MASK_CACHE_RULE}" if is_mask else ""
    key = hashlib.sha1((stamps + f"|{size}|{is_mask}{rule}").encode()).hexdigest()[:16]
    target = cache_dir() / "slices" / f"{key}.npy"
    if target.exists():
        return np.load(target, mmap_mode="r")
    first = next((p for p in paths if p), None)
    if first is None:
        raise ValueError("no files to cache")
    shape = _decode(first, size, is_mask).shape
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:  # a failed decode (or a signal) must not leave a full-size temporary file behind
        _fill(tmp, paths, size, is_mask, shape)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return np.load(target, mmap_mode="r")


def _fill(tmp: Path, paths: list[str], size: int | None, is_mask: bool, shape: tuple[int, ...]) -> None:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), *shape))
    for i, p in enumerate(paths):
        if p:
            arr = _decode(p, size, is_mask)
            if arr.shape != shape:
                raise DataError(p, f"size {arr.shape[1]}x{arr.shape[0]} differs from the first slice's "
                                   f"{shape[1]}x{shape[0]}")
            out[i] = arr
        else:
            out[i] = 0
    out.flush()
    del out


def neighbour_indices(manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row index of the slice below and above each row, within the same patient.

    At the first/last slice of a patient the slice itself is repeated (edge replication), so 2.5D input
    never mixes patients.
    """
    prev_idx = np.arange(len(manifest))
    next_idx = np.arange(len(manifest))
    for _, group in manifest.groupby("patient_id", sort=False):
        order = group.sort_values("slice_index").index.to_numpy()
        prev_idx[order[1:]] = order[:-1]
        next_idx[order[:-1]] = order[1:]
    return prev_idx, next_idx


def stack_channels(images: np.ndarray, i: int, prev_idx: np.ndarray, next_idx: np.ndarray,
                   channels: int) -> np.ndarray:
    """(H, W, C) uint8 input for row i: C=1 the slice, C=3 (below, slice, above), C=5 two slices either side
    (a neighbour missing at the end of a scan repeats the last one there)."""
    if channels not in (1, 3, 5):
        raise ValueError(f"in_channels must be 1, 3 or 5 (2.5D), got {channels}")
    below, above, rows = i, i, [i]
    for _ in range(channels // 2):
        below, above = int(prev_idx[below]), int(next_idx[above])
        rows = [below, *rows, above]
    return images[i][..., None] if channels == 1 else np.stack([images[r] for r in rows], axis=-1)
