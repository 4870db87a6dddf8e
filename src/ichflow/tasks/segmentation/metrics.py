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
* NaN means "undefined": dropped from means and bootstrap CIs, not logged to MLflow, shown as "n/a".
"""

from __future__ import annotations

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


def per_patient_table(stats: SplitStats, t: int, pixel_mm: float, slice_mm: float) -> pd.DataFrame:
    rows = []
    for p, pid in enumerate(stats.patients):
        tp, fp, fn, tn = (int(v) for v in stats.counts[p, t])
        truth_ml, pred_ml = volume_ml(tp + fn, pixel_mm, slice_mm), volume_ml(tp + fp, pixel_mm, slice_mm)
        rows.append({"patient_id": pid, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                     "has_truth": tp + fn > 0, **patient_metrics(tp, fp, fn, tn),
                     "truth_ml": truth_ml, "pred_ml": pred_ml, "volume_abs_err_ml": abs(pred_ml - truth_ml)})
    return pd.DataFrame(rows)


def _describe(values, name: str, seed: int = 0) -> dict:
    vals = np.asarray([v for v in values if v == v], float)
    if len(vals) == 0:
        return {}
    lo, hi = bootstrap_ci(vals, seed=seed)
    return {name: float(vals.mean()), f"{name}_median": float(np.median(vals)), f"{name}_ci_low": lo,
            f"{name}_ci_high": hi}


def summarise(stats: SplitStats, threshold: float, pixel_mm: float = 0.508, slice_mm: float = 5.0,
              min_pixels: int = 1) -> tuple[dict, pd.DataFrame]:
    """(metrics without split prefix, per-patient table) at one threshold of the grid."""
    t = stats.threshold_index(threshold)
    table = per_patient_table(stats, t, pixel_mm, slice_mm)
    with_truth = table[table["has_truth"]]
    out: dict = {"threshold": float(threshold), "n_patients": len(table),
                 "n_patients_no_truth": int((~table["has_truth"]).sum()),
                 "n_patients_no_truth_with_fp": int(((~table["has_truth"]) & (table["fp"] > 0)).sum())}
    for name in ("dice", "iou", "sensitivity"):
        out.update(_describe(with_truth[name], name))
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

