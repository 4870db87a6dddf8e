"""What every served model accepts as one scan: 8-bit slices (N, H, W) in axial order."""

from __future__ import annotations

import numpy as np
import pandas as pd


def as_scan(model_input) -> np.ndarray:
    """(N, H, W) uint8 from a served payload: an array of 8-bit slices (uint8, or float in 0..255), a single
    (H, W) slice, a one-tensor dict, or a one-column DataFrame of slices."""
    if isinstance(model_input, dict) and len(model_input) == 1:  # a named tensor from a serving payload
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise TypeError("expected a numpy array (N, H, W) of 8-bit slices, got a DataFrame")
        model_input = np.stack(model_input.iloc[:, 0].to_numpy())
    arr = np.asarray(model_input)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected the slices of one scan as (N, H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float32)), 0, 255).astype(np.uint8)
    return arr


def neighbours(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index of the slice below and above each of ``n`` slices of one scan (ends replicated)."""
    idx = np.arange(n)
    return np.maximum(idx - 1, 0), np.minimum(idx + 1, n - 1)
