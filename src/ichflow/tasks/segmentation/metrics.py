"""Segmentation metrics from pixel counts, per patient (3D) and pooled, with the edge cases defined.

Conventions (tested in tests/test_segmentation_metrics.py)
-----------------------------------------------------------
* A prediction is ``probability >= threshold``.
* Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN). When truth AND prediction are both empty
  (TP + FP + FN = 0) both are 1.0: nothing to find and nothing found is perfect agreement. Empty truth
  with any predicted pixel gives 0.0.
* Sensitivity = TP / (TP + FN) is undefined (NaN) for an empty truth; specificity = TN / (TN + FP) is
  undefined (NaN) when there is no background pixel (never in practice).
* Per-patient means (Dice, IoU, sensitivity) are taken over the patients WITH edema in the truth volume.
  A patient without edema would score exactly 1 or 0 depending on a single false-positive pixel, which
  would swamp the mean; such patients are counted in ``n_patients_no_truth`` instead, and how many of
  them got a false-positive prediction in ``n_patients_no_truth_with_fp``. Specificity and the volume
  error are averaged over all patients.
* Pooled metrics sum the counts over every pixel of every slice of the split (negative slices included).
* Volume (mL) = voxels x pixel spacing^2 x slice thickness / 1000 (PHE-SICH-CT-IDS: 0.508 mm, 5 mm).
* Slice-level detection derived from the masks: a slice is positive when it has >= ``min_pixels``
  foreground pixels (truth: >= 1). Precision is NaN without predicted positives, recall NaN without
  true positives, F1 = 2TP / (2TP + FP + FN) is NaN when neither side has a positive slice.
* Surface metrics (MONAI ``monai.metrics``, euclidean, no sub-voxels) on each patient's 3D volume: the
  slices stacked in axial order (gaps in the slice numbering are not filled), voxel spacing
  (slice thickness, pixel spacing, pixel spacing) in mm. Edges are the mask voxels that a 3D cross
  erosion removes; distances go from every edge voxel of one mask to the nearest edge voxel of the other.
  HD95 (``hd95_mm``) = max of the two directed 95th percentiles (MONAI ``compute_hausdorff_distance``,
  ``percentile=95``). NSD (``nsd``) = edge voxels of both masks within ``nsd_tolerance_mm`` of the
  other mask's edge / all edge voxels of both (MONAI ``compute_surface_dice``). Default tolerance 2 mm
  (about 4 in-plane pixels, under one 5 mm slice: it rewards in-plane outline agreement of the thin
  edema rim); it is a parameter and recorded as ``nsd_tolerance_mm``.
* Surface edge cases follow MONAI: both masks empty -> HD95 and NSD NaN; exactly one empty -> NSD 0
  and HD95 NaN (undefined: MONAI's distances to an empty mask are infinite, and it returns NaN).
  Means, medians and CIs are over patients with truth, like Dice; ``n_patients_hd95_undefined`` counts
  the patients with truth whose HD95 is undefined (nothing predicted). Pooled NSD = edge voxels within
  tolerance summed over all patients / all edge voxels (patients without truth included: their
  false-positive edges count as misses). Pooled HD95 = max of the two directed 95th percentiles of all
  patients' edge distances together, over the patients where both masks are non-empty (elsewhere the
  distances are infinite). Computed for the split report only, not in the per-epoch validation.
* NaN means "undefined": dropped from means and bootstrap CIs, not logged to MLflow, shown as "n/a".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ichflow.engine.stats import bootstrap_ci

NAN = float("nan")


def confusion_counts(pred, truth) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of two boolean arrays of the same shape."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    return tp, fp, fn, int(pred.size) - tp - fp - fn


def dice(tp, fp, fn) -> float:
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def iou(tp, fp, fn) -> float:
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def sensitivity(tp, fn) -> float:
    return NAN if tp + fn == 0 else tp / (tp + fn)


def specificity(tn, fp) -> float:
    return NAN if tn + fp == 0 else tn / (tn + fp)


def precision(tp, fp) -> float:
    return NAN if tp + fp == 0 else tp / (tp + fp)


def f1(tp, fp, fn) -> float:
    denom = 2 * tp + fp + fn
    return NAN if denom == 0 else 2.0 * tp / denom


def volume_ml(voxels, pixel_mm: float = 0.508, slice_mm: float = 5.0) -> float:
    return float(voxels) * pixel_mm * pixel_mm * slice_mm / 1000.0


def detection_metrics(truth_pos, pred_pos) -> dict:
    """Slice-level detection (positive = non-empty mask): accuracy, precision, recall, F1 and counts."""
    truth_pos, pred_pos = np.asarray(truth_pos, bool), np.asarray(pred_pos, bool)
    tp = int(np.sum(truth_pos & pred_pos))
    fp = int(np.sum(~truth_pos & pred_pos))
    fn = int(np.sum(truth_pos & ~pred_pos))
    tn = int(np.sum(~truth_pos & ~pred_pos))
    n = tp + fp + fn + tn
    return {"slice_accuracy": NAN if n == 0 else (tp + tn) / n, "slice_precision": precision(tp, fp),
            "slice_recall": sensitivity(tp, fn), "slice_f1": f1(tp, fp, fn),
            "slice_tp": tp, "slice_fp": fp, "slice_fn": fn, "slice_tn": tn}


def patient_metrics(tp, fp, fn, tn) -> dict:
    return {"dice": dice(tp, fp, fn), "iou": iou(tp, fp, fn), "sensitivity": sensitivity(tp, fn),
            "specificity": specificity(tn, fp)}


@dataclass
class SplitStats:
    """Pixel counts of one split at every threshold of a grid, enough to summarise at any of them.

    ``counts[p, t] = (TP, FP, FN, TN)`` of patient p's volume at thresholds[t]; ``slice_pred[s, t]`` the
    predicted pixels of slice s; ``slice_truth[s]`` its truth pixels; ``slice_patient[s]`` its patient row.
    """

    patients: list[str]
    thresholds: np.ndarray
    counts: np.ndarray             # (P, T, 4) int64
    slice_truth: np.ndarray        # (S,) int64
    slice_pred: np.ndarray         # (S, T) int64
    slice_patient: np.ndarray      # (S,) int
    slice_index: np.ndarray        # (S,) slice number within the patient
    loss: float = NAN
    examples: dict = field(default_factory=dict)  # patient -> (image, truth, prob) of its largest-truth slice
    surfaces: dict = field(default_factory=dict)  # patient -> (truth, grid level) crops of surface_crop()

    def threshold_index(self, threshold: float) -> int:
        hits = np.flatnonzero(np.isclose(self.thresholds, threshold))
        if len(hits) == 0:
            raise ValueError(f"threshold {threshold} not in the evaluated grid {self.thresholds.tolist()}")
        return int(hits[0])


def accumulate(probs: np.ndarray, truth: np.ndarray, thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts of one patient's volume: ((T, 4) counts, (S,) truth pixels, (S, T) predicted pixels)."""
    truth = np.asarray(truth, bool)
    thresholds = np.asarray(thresholds, float)
    counts = np.zeros((len(thresholds), 4), np.int64)
    slice_pred = np.zeros((len(truth), len(thresholds)), np.int64)
    for t, thr in enumerate(thresholds):
        pred = probs >= thr
        counts[t] = confusion_counts(pred, truth)
        slice_pred[:, t] = pred.reshape(len(pred), -1).sum(axis=1)
    return counts, truth.reshape(len(truth), -1).sum(axis=1).astype(np.int64), slice_pred


def surface_crop(probs, truth, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """What the surface metrics need of one patient's (S, H, W) volume at every threshold of the grid:
    (truth, level) cropped to the box of ``truth | probs >= min(thresholds)`` plus one voxel, where
    level = how many grid thresholds the probability reaches (prediction at the k-th smallest threshold
    = level >= k, compared as :func:`accumulate` compares). Surface distances do not depend on the crop."""
    truth = np.asarray(truth, bool)
    probs = np.asarray(probs)
    grid = np.sort(np.asarray(thresholds, float))
    region = truth | (probs >= grid[0])
    box = []
    for axis in range(region.ndim):
        hit = np.flatnonzero(region.any(axis=tuple(a for a in range(region.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2) if len(hit) else slice(0, 0))
    box = tuple(box)
    crop = probs[box]
    level = np.zeros(crop.shape, np.uint8)
    for thr in grid:
        level += crop >= thr
    return truth[box].copy(), level


def _level_rank(thresholds, threshold: float) -> int:
    return int(np.sum(np.asarray(thresholds, float) <= threshold))


def surface_distances(pred, truth, spacing) -> tuple[np.ndarray, np.ndarray, int, int]:
    """MONAI's edge-to-edge distances (mm) of two boolean volumes with voxel ``spacing``:
    (pred edge -> nearest truth edge, truth edge -> nearest pred edge, pred edge voxels, truth edge voxels).
    Both distance arrays are empty when either mask is empty (MONAI would give infinities)."""
    import torch   # imported here: MONAI takes seconds to import, and only the surface metrics need it
    from monai.metrics.utils import get_edge_surface_distance, get_mask_edges

    pred_t, truth_t = torch.from_numpy(np.asarray(pred, bool)), torch.from_numpy(np.asarray(truth, bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # MONAI's own use of a deprecated argument
        if pred_t.any() and truth_t.any():
            (ep, eg), (d_pg, d_gp), _ = get_edge_surface_distance(pred_t, truth_t, spacing=list(spacing),
                                                                  symmetric=True, warn_empty=False)
            return np.asarray(d_pg, np.float64), np.asarray(d_gp, np.float64), int(ep.sum()), int(eg.sum())
        ep, eg = get_mask_edges(pred_t, truth_t, crop=True)
    return np.zeros(0), np.zeros(0), int(ep.sum()), int(eg.sum())


def hd95(d_pred_truth, d_truth_pred) -> float:
    """Symmetric 95th-percentile Hausdorff distance (MONAI's linear quantile); NaN when a side is empty."""
    if len(d_pred_truth) == 0 or len(d_truth_pred) == 0:
        return NAN
    return float(max(np.quantile(d_pred_truth, 0.95), np.quantile(d_truth_pred, 0.95)))


def nsd_counts(d_pred_truth, d_truth_pred, pred_edges: int, truth_edges: int, tolerance_mm: float) -> tuple[int, int]:
    """(edge voxels within ``tolerance_mm`` of the other mask's edge, all edge voxels of both masks)."""
    within = int(np.sum(np.asarray(d_pred_truth) <= tolerance_mm) + np.sum(np.asarray(d_truth_pred) <= tolerance_mm))
    return within, int(pred_edges + truth_edges)


def _surfaces_at(stats: SplitStats, t: int, pixel_mm: float, slice_mm: float) -> list:
    """Per patient (in ``stats.patients`` order) :func:`surface_distances` at thresholds[t]; [] without crops."""
    if not stats.surfaces:
        return []
    rank, spacing = _level_rank(stats.thresholds, stats.thresholds[t]), (slice_mm, pixel_mm, pixel_mm)
    out = []
    for pid in stats.patients:
        truth, level = stats.surfaces[pid]
        out.append(surface_distances(level >= rank, truth, spacing))
    return out


def per_patient_table(stats: SplitStats, t: int, pixel_mm: float, slice_mm: float, surfaces=(),
                      nsd_tolerance_mm: float = 2.0) -> pd.DataFrame:
    """One row per patient; ``hd95_mm``, ``nsd`` and their edge counts when ``surfaces`` (from
    :func:`_surfaces_at`) are given."""
    rows = []
    for p, pid in enumerate(stats.patients):
        tp, fp, fn, tn = (int(v) for v in stats.counts[p, t])
        truth_ml, pred_ml = volume_ml(tp + fn, pixel_mm, slice_mm), volume_ml(tp + fp, pixel_mm, slice_mm)
        rows.append({"patient_id": pid, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                     "has_truth": tp + fn > 0, **patient_metrics(tp, fp, fn, tn),
                     "truth_ml": truth_ml, "pred_ml": pred_ml, "volume_abs_err_ml": abs(pred_ml - truth_ml)})
        if len(surfaces):
            d_pg, d_gp, n_pred, n_truth = surfaces[p]
            within, edges = nsd_counts(d_pg, d_gp, n_pred, n_truth, nsd_tolerance_mm)
            rows[-1].update({"hd95_mm": hd95(d_pg, d_gp), "nsd": NAN if edges == 0 else within / edges,
                             "surface_edges": edges, "surface_edges_within_tol": within})
    return pd.DataFrame(rows)


def _pooled_surface(surfaces: list, table: pd.DataFrame) -> dict:
    pairs = [(d_pg, d_gp) for d_pg, d_gp, _, _ in surfaces if len(d_pg) and len(d_gp)]
    edges = int(table["surface_edges"].sum())
    return {"nsd_pooled": NAN if edges == 0 else int(table["surface_edges_within_tol"].sum()) / edges,
            "hd95_mm_pooled": hd95(np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs]))
            if pairs else NAN}


def _describe(values, name: str, seed: int = 0) -> dict:
    vals = np.asarray([v for v in values if v == v], float)
    if len(vals) == 0:
        return {}
    lo, hi = bootstrap_ci(vals, seed=seed)
    return {name: float(vals.mean()), f"{name}_median": float(np.median(vals)), f"{name}_ci_low": lo,
            f"{name}_ci_high": hi}


def summarise(stats: SplitStats, threshold: float, pixel_mm: float = 0.508, slice_mm: float = 5.0,
              min_pixels: int = 1, nsd_tolerance_mm: float = 2.0,
              surface: bool = False) -> tuple[dict, pd.DataFrame]:
    """(metrics without split prefix, per-patient table) at one threshold of the grid.

    HD95 / NSD only with ``surface=True`` (the split report; the per-epoch validation skips them, as the
    scattered false positives of an early-epoch model make them slow) and ``stats.surfaces`` (filled by
    ``evaluate.collect``)."""
    t = stats.threshold_index(threshold)
    surfaces = _surfaces_at(stats, t, pixel_mm, slice_mm) if surface else []
    table = per_patient_table(stats, t, pixel_mm, slice_mm, surfaces, nsd_tolerance_mm)
    with_truth = table[table["has_truth"]]
    out: dict = {"threshold": float(threshold), "n_patients": len(table),
                 "n_patients_no_truth": int((~table["has_truth"]).sum()),
                 "n_patients_no_truth_with_fp": int(((~table["has_truth"]) & (table["fp"] > 0)).sum())}
    for name in ("dice", "iou", "sensitivity"):
        out.update(_describe(with_truth[name], name))
    if surfaces:
        out.update(_describe(with_truth["hd95_mm"], "hd95_mm"))
        out.update(_describe(with_truth["nsd"], "nsd"))
        out.update(_pooled_surface(surfaces, table))
        out.update({"n_patients_hd95_undefined": int(with_truth["hd95_mm"].isna().sum()),
                    "nsd_tolerance_mm": float(nsd_tolerance_mm),
                    "surface_edges": int(table["surface_edges"].sum()),
                    "surface_edges_within_tol": int(table["surface_edges_within_tol"].sum())})
    out.update(_describe(table["specificity"], "specificity"))
    out.update(_describe(table["volume_abs_err_ml"], "volume_abs_err_ml"))
    out["volume_truth_ml_mean"] = float(table["truth_ml"].mean()) if len(table) else NAN
    tp, fp, fn, tn = (int(v) for v in stats.counts[:, t].sum(axis=0))
    pooled = patient_metrics(tp, fp, fn, tn)
    out.update({f"{k}_pooled": v for k, v in pooled.items()})
    out.update({"pixels_tp": tp, "pixels_fp": fp, "pixels_fn": fn, "pixels_tn": tn})
    out.update(detection_metrics(stats.slice_truth > 0, stats.slice_pred[:, t] >= max(1, min_pixels)))
    if stats.loss == stats.loss:
        out["loss"] = float(stats.loss)
    return out, table


def select_threshold(stats: SplitStats) -> tuple[float, np.ndarray]:
    """Threshold of the grid with the best mean per-patient Dice (ties -> the lower threshold).

    Returns (threshold, mean Dice per threshold). Only ever called on the validation split.
    """
    has_truth = (stats.counts[:, 0, 0] + stats.counts[:, 0, 2]) > 0
    c = stats.counts[has_truth]
    if len(c) == 0:
        return 0.5, np.full(len(stats.thresholds), NAN)
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    denom = 2 * tp + fp + fn
    d = np.where(denom == 0, 1.0, 2.0 * tp / np.maximum(denom, 1))
    means = d.mean(axis=0)
    return float(stats.thresholds[int(np.argmax(means))]), means

