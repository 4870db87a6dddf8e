"""Segmentation metrics of a served model on any labelled data (the ``evaluate`` entry point).

The pyfunc's probabilities of each scan go through the training run's own counting and summary
(:func:`metrics.accumulate`, :class:`metrics.SplitStats`, :func:`metrics.summarise`) and its logging of a
split (per-patient table, metrics JSON, pixel confusion, best/median/worst overlays), under ``prefix``.
Only the loss is missing (the pyfunc returns probabilities, not logits).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ichflow.data.images import read_gray
from ichflow.errors import DataError
from ichflow.tasks.segmentation import evaluate as ev
from ichflow.tasks.segmentation.metrics import SplitStats, accumulate, summarise


def _param(params: dict, key: str, default, cast=float):
    try:
        return cast(float(params[key])) if key in params else default
    except (TypeError, ValueError):
        return default


def _truth(group: pd.DataFrame, shape) -> np.ndarray:
    """(N, H, W) bool masks of a scan, decoded like the training cache (>127); no mask file = empty."""
    out = np.zeros((len(group), *shape), bool)
    for i, path in enumerate(group["mask_path"].fillna("").astype(str)):
        if path:
            m = read_gray(path)
            if m.shape != tuple(shape):
                raise DataError(path, f"mask size {m.shape[1]}x{m.shape[0]} differs from the image's "
                                      f"{shape[1]}x{shape[0]}")
            out[i] = m > 127
    return out


def split_stats(model, part: pd.DataFrame, thresholds) -> SplitStats:
    """Counts of every patient of ``part`` at every threshold, from the pyfunc's whole-scan probabilities."""
    from ichflow.data.scans import iter_scans

    thresholds = np.asarray(thresholds, float)
    patients, counts, s_truth, s_pred, s_patient, s_index, examples = [], [], [], [], [], [], {}
    for p, (pid, group, slices) in enumerate(iter_scans(part)):
        truth = _truth(group, slices.shape[1:])
        probs = np.asarray(model.predict(slices), dtype=np.float32)
        if probs.shape != slices.shape:
            raise ValueError(f"the model returned shape {probs.shape} for a scan of shape {slices.shape}")
        c, st, sp = accumulate(probs, truth, thresholds)
        patients.append(pid)
        counts.append(c)
        s_truth.append(st)
        s_pred.append(sp)
        s_patient.append(np.full(len(group), p))
        s_index.append(group["slice_index"].to_numpy())
        k = int(np.argmax(st)) if st.max() > 0 else int(np.argmax(sp[:, len(thresholds) // 2]))
        examples[pid] = (slices[k].copy(), truth[k].copy(), probs[k].astype(np.float16),
                         int(group["slice_index"].iloc[k]))
    return SplitStats(patients=patients, thresholds=thresholds, counts=np.stack(counts),
                      slice_truth=np.concatenate(s_truth), slice_pred=np.concatenate(s_pred),
                      slice_patient=np.concatenate(s_patient), slice_index=np.concatenate(s_index),
                      examples=examples)


def check_data(model, part: pd.DataFrame) -> None:
    """DataError unless ``part`` holds PHE edema masks (what the model was trained to segment)."""
    readers = sorted(set(part["dataset"].astype(str))) if "dataset" in part.columns else []
    if readers != ["phe"] or not part["has_mask"].any():
        raise DataError("data", "segmentation evaluation needs PHE edema masks (a PHE-SICH-CT-IDS layout with "
                                f"label/ masks); this is {'/'.join(readers) or 'unknown'} data"
                                + ("" if readers != ["phe"] else " without masks"))


def evaluate_external(model, part: pd.DataFrame, prefix: str) -> dict:
    """Log the segmentation metric set of ``model`` (a LoadedModel) on ``part`` as ``<prefix>_*``."""
    from ichflow.tasks.segmentation.train import _log_split

    check_data(model, part)
    params = model.train_params
    threshold = float(model.meta.get("threshold", 0.5))
    grid = sorted({*ev.THRESHOLDS, round(threshold, 6)})
    pixel_mm = _param(params, "pixel_spacing_mm", float(model.meta.get("pixel_spacing_mm", 0.508)))
    slice_mm = _param(params, "slice_thickness_mm", float(model.meta.get("slice_thickness_mm", 5.0)))
    min_pixels = _param(params, "detect_min_pixels", 1, int)
    stats = split_stats(model.pyfunc, part, grid)
    metrics, table = summarise(stats, threshold, pixel_mm, slice_mm, min_pixels)
    _log_split(prefix, metrics, table, stats, threshold, step=0)
    return {f"{prefix}_{k}": v for k, v in metrics.items()}
