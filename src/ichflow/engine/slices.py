"""Decode slices once into a memory-mapped uint8 cache; neighbours for 2.5D input.

A cache file is keyed by the image paths and the target size, so it is rebuilt when the manifest
changes and reused across runs and processes (DataLoader workers map the same file).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pandas as pd
from PIL import Image

from ichflow.data.images import read_gray
from ichflow.paths import cache_dir


def _decode(path: str, size: int | None, is_mask: bool) -> np.ndarray:
    arr = read_gray(path)
    if is_mask:
        arr = np.where(arr > 127, 255, 0).astype(np.uint8)  # JPEG masks carry noise around 0/255
    if size and arr.shape != (size, size):
        resample = Image.NEAREST if is_mask else Image.BILINEAR
        arr = np.asarray(Image.fromarray(arr).resize((size, size), resample))
    return arr


def slice_cache(paths: list[str], size: int | None = None, is_mask: bool = False) -> np.ndarray:
    """(N, H, W) uint8 memmap of the given files ('' paths give zero images, e.g. missing masks)."""
    key = hashlib.sha1(("\n".join(paths) + f"|{size}|{is_mask}").encode()).hexdigest()[:16]
    target = cache_dir() / "slices" / f"{key}.npy"
    if target.exists():
        return np.load(target, mmap_mode="r")
    first = next((p for p in paths if p), None)
    if first is None:
        raise ValueError("no files to cache")
    shape = _decode(first, size, is_mask).shape
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), *shape))
    for i, p in enumerate(paths):
        if p:
            arr = _decode(p, size, is_mask)
            if arr.shape != shape:
                raise ValueError(f"{p}: size {arr.shape} differs from {shape}; pass a size to resize")
            out[i] = arr
        else:
            out[i] = 0
    out.flush()
    del out
    os.replace(tmp, target)
    return np.load(target, mmap_mode="r")


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
    """(H, W, C) uint8 input for row i: C=1 the slice, C=3 (below, slice, above)."""
    if channels == 1:
        return images[i][..., None]
    if channels == 3:
        return np.stack([images[prev_idx[i]], images[i], images[next_idx[i]]], axis=-1)
    raise ValueError(f"in_channels must be 1 or 3 (2.5D), got {channels}")
