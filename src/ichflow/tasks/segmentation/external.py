"""Segmentation metrics of a served model on any labelled data (the ``evaluate`` entry point).

The pyfunc's probabilities of each scan go through the training run's own counting
(:func:`evaluate.collect`) and report of a split (:func:`report.log_split`: metrics, per-patient table,
metrics JSON, threshold sweep, pixel confusion, best/median/worst overlays), under ``prefix``.
Only the loss is missing (the pyfunc returns probabilities, not logits).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ichflow.data.manifest import MASK_READERS
from ichflow.data.images import read_mask
from ichflow.data.scans import iter_scans
from ichflow.errors import DataError
from ichflow.tasks.segmentation.evaluate import THRESHOLDS, collect
from ichflow.tasks.segmentation.metrics import SplitStats
from ichflow.tasks.segmentation.report import log_split


def _param(params: dict, key: str, default, cast=float):
    try:
        return cast(float(params[key])) if key in params else default
    except (TypeError, ValueError):
        return default


def _truth(group: pd.DataFrame, shape) -> np.ndarray:
    """(N, H, W) bool masks of a scan under the training cache's mask convention; no mask file = empty."""
    out = np.zeros((len(group), *shape), bool)
    for i, path in enumerate(group["mask_path"].fillna("").astype(str)):
        if path:
            m = read_mask(path)
            if m.shape != tuple(shape):
                raise DataError(path, f"mask size {m.shape[1]}x{m.shape[0]} differs from the image's "
                                      f"{shape[1]}x{shape[0]}")
            out[i] = m
    return out


def split_stats(model, part: pd.DataFrame, thresholds) -> SplitStats:
    """Counts of every patient of ``part`` at every threshold, from the pyfunc's whole-scan probabilities."""
    def scans():
        for pid, group, slices in iter_scans(part):
            probs = np.asarray(model.predict(slices), dtype=np.float32)
            if probs.shape != slices.shape:
                raise ValueError(f"the model returned shape {probs.shape} for a scan of shape {slices.shape}")
            yield pid, group["slice_index"].to_numpy(), slices, _truth(group, slices.shape[1:]), probs, None

    return collect(scans(), thresholds)


def check_data(model, part: pd.DataFrame) -> None:
    """DataError unless ``part`` holds PHE edema masks (what the model was trained to segment)."""
    readers = sorted(set(part["dataset"].astype(str))) if "dataset" in part.columns else []
    foreign = not readers or not set(readers) <= set(MASK_READERS)
    if foreign or not part["has_mask"].any():
        raise DataError("data", "segmentation evaluation needs PHE edema masks (a PHE-SICH-CT-IDS layout with "
                                f"label/ masks); this is {'/'.join(readers) or 'unknown'} data"
                                + ("" if foreign else " without masks"))


def evaluate_external(model, part: pd.DataFrame, prefix: str) -> dict:
    """Log the segmentation metric set of ``model`` (a LoadedModel) on ``part`` as ``<prefix>_*``."""
    check_data(model, part)
    params = model.train_params
    threshold = float(model.meta.get("threshold", 0.5))
    grid = sorted({*THRESHOLDS, round(threshold, 6)})
    pixel_mm = _param(params, "pixel_spacing_mm", float(model.meta.get("pixel_spacing_mm", 0.508)))
    slice_mm = _param(params, "slice_thickness_mm", float(model.meta.get("slice_thickness_mm", 5.0)))
    min_pixels = _param(params, "detect_min_pixels", 1, int)
    stats = split_stats(model.pyfunc, part, grid)
    return log_split(prefix, stats, threshold, 0, pixel_mm, slice_mm, min_pixels)
