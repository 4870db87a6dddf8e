"""Post-processing chosen on validation: drop predicted 3D components smaller than a size.

A scan's prediction at the threshold is split into 3D connected components (26-connectivity: slices are
5 mm apart, so a rim that shifts between slices still counts as one lesion). Components with fewer than
``min_voxels`` voxels have their probability set to 0, so ``probability >= threshold`` is the post-processed
mask everywhere it is used (reports, ``evaluate``, the served model). ``min_voxels=0`` changes nothing.

The threshold and the size are chosen together on the validation split (or out-of-fold predictions) by the
mean per-patient Dice over patients with edema (:func:`select_postprocessing`); the test split never sees
a candidate.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ichflow.errors import ParameterError

MIN_VOXEL_GRID = (0, 10, 25, 50, 100, 200, 400, 800, 1600)
_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)


def drop_small_components(probs: np.ndarray, threshold: float, min_voxels: int) -> np.ndarray:
    """``probs`` (N, H, W) with the components of ``probs >= threshold`` under ``min_voxels`` voxels set to 0."""
    if min_voxels <= 0:
        return probs
    labels, n = ndimage.label(probs >= threshold, structure=_CONNECTIVITY)
    if n == 0:
        return probs
    small = np.flatnonzero(np.bincount(labels.ravel()) < min_voxels)
    small = small[small > 0]
    if len(small) == 0:
        return probs
    out = probs.copy()
    out[np.isin(labels, small)] = 0.0
    return out


def _component_counts(probs: np.ndarray, truth: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, true-positive voxels) of every predicted component at ``threshold``."""
    labels, n = ndimage.label(probs >= threshold, structure=_CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    hits = np.bincount(labels[truth].ravel(), minlength=n + 1)[1:]
    return sizes, hits


def dice_grid(scans, thresholds, min_voxel_grid=MIN_VOXEL_GRID) -> np.ndarray:
    """(T, S) mean per-patient Dice over the patients with truth, at every (threshold, minimum size) pair.

    ``scans``: ``(truth, probs)`` (N, H, W) per patient. NaN everywhere when no patient has truth.
    """
    grid = np.asarray(min_voxel_grid)
    scores = []
    for truth, probs in scans:
        truth = np.asarray(truth, bool)
        n_truth = int(truth.sum())
        if n_truth == 0:
            continue
        per = np.empty((len(thresholds), len(grid)))
        for t, thr in enumerate(thresholds):
            sizes, hits = _component_counts(probs, truth, thr)
            kept = sizes[None, :] >= grid[:, None]                     # (S, components)
            tp, pred = (kept * hits).sum(axis=1), (kept * sizes).sum(axis=1)
            per[t] = 2.0 * tp / (pred + n_truth)
        scores.append(per)
    return np.mean(scores, axis=0) if scores else np.full((len(thresholds), len(grid)), np.nan)


def select_postprocessing(scans, thresholds, min_voxel_grid=MIN_VOXEL_GRID, fixed_threshold=None,
                          fixed_min_voxels=None) -> tuple[float, int, np.ndarray]:
    """(threshold, min_voxels, (T, S) mean Dice grid): the best pair, with either one fixed when given.

    Ties go to the lower threshold, then the smaller size (the least post-processing).
    """
    thresholds, grid = np.asarray(thresholds, float), np.asarray(min_voxel_grid)
    scores = dice_grid(scans, thresholds, grid)
    allowed = np.ones_like(scores, bool)
    if fixed_threshold is not None:
        allowed &= np.isclose(thresholds, fixed_threshold)[:, None]
    if fixed_min_voxels is not None:
        allowed &= (grid == fixed_min_voxels)[None, :]
    masked = np.where(allowed & ~np.isnan(scores), scores, -np.inf)
    if not np.isfinite(masked).any():   # nothing to score (no truth): the fixed values or the neutral ones
        return (float(fixed_threshold) if fixed_threshold is not None else 0.5,
                int(fixed_min_voxels) if fixed_min_voxels is not None else 0, scores)
    t, s = np.unravel_index(int(np.argmax(masked)), masked.shape)
    return float(thresholds[t]), int(grid[s]), scores


def parse_min_voxels(text) -> int | None:
    """None for 'auto' (chosen on validation), else a size on the grid (0 = no post-processing)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        value = -1
    if value not in MIN_VOXEL_GRID:
        raise ParameterError("min_component_voxels", f"must be 'auto' or one of {', '.join(map(str, MIN_VOXEL_GRID))}"
                                                     f" (0 = keep every component); got {text!r}")
    return value
