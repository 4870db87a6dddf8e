"""The detection metric set of one split, logged the same way by the training run and by ``evaluate``.

``evaluate_split(part, outputs, threshold, split)`` scores the boxes of every slice of ``part`` (box metrics,
the slice decision at ``threshold``, patient-bootstrap CIs, support) and logs, under ``<split>``::

    <split>_map50, <split>_slice_f1, <split>_map50_ci_low, ...    metrics
    eval/<split>_predictions.csv      every box (slice_id = row of part, patient_id)
    eval/<split>_slices.csv           per-slice max score + truth (re-tune the threshold without retraining)
    eval/<split>_per_patient.csv      slice decision per patient
    eval/<split>_difficulty.md, eval/<split>_difficulty_boxes.csv
    figures/<split>_{confusion,slice_roc_pr,pr_curve,difficulty,overlays}.png
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from ichflow.engine.figures import confusion_figure, roc_pr_figure
from ichflow.engine.figures import log_figure as _log_figure
from ichflow.engine.stats import finite, patient_bootstrap_ci
from ichflow.metric_names import log_metrics
from ichflow.paths import eval_artifact, figure_artifact
from ichflow.tasks.detection import analysis
from ichflow.tasks.detection.metrics import (box_metrics, confusion, patient_bootstrap_map, predictions_frame,
                                             slice_metrics, slice_scores, truths_from_index)

BOX_KEYS = ("precision", "recall", "map50", "map50_95")
SLICE_KEYS = ("accuracy", "precision", "recall", "f1", "specificity")
METRIC_DEFINITION = ("boxes: greedy IoU matching per IoU threshold 0.50:0.95 + Ultralytics ap_per_class "
                     "(same code for both engines); slice: any box with score >= conf_threshold")


def slice_frame(part: pd.DataFrame, preds: pd.DataFrame) -> pd.DataFrame:
    """One row per slice of ``part``: its highest box score and its truth."""
    return pd.DataFrame({"slice_id": np.arange(len(part)), "patient_id": part["patient_id"].to_numpy(),
                         "slice_index": part["slice_index"].to_numpy(), "has_lesion": part["has_lesion"].to_numpy(bool),
                         "max_score": slice_scores(preds, len(part))})


def per_patient(slices: pd.DataFrame, threshold: float) -> pd.DataFrame:
    rows = []
    for pid, g in slices.groupby("patient_id", sort=True):
        m = slice_metrics(g["max_score"].to_numpy(), g["has_lesion"].to_numpy(), threshold)
        rows.append({"patient_id": pid, "slices": len(g), "lesion_slices": int(g["has_lesion"].sum()),
                     **{k: m[k] for k in ("tp", "fp", "fn", "tn")}, "slice_recall": m["recall"],
                     "slice_precision": m["precision"], "slice_f1": m["f1"]})
    return pd.DataFrame(rows)


def confidence_intervals(preds, truths, slices: pd.DataFrame, threshold: float, seed: int) -> dict:
    """95 % CIs resampling whole patients: mAP@0.5, mAP@0.5:0.95 and the slice F1 / recall / precision."""
    cis = patient_bootstrap_map(preds, truths, slices["patient_id"].to_numpy(), seed=seed)
    for key in ("f1", "recall", "precision"):
        cis[f"slice_{key}"] = patient_bootstrap_ci(
            slices, lambda f, k=key: slice_metrics(f["max_score"].to_numpy(), f["has_lesion"].to_numpy(),
                                                   threshold)[k], seed=seed)
    return cis


def split_metrics(part, preds, truths, slices, bm: dict, threshold: float, split: str, seed: int = 0) -> dict:
    """``<split>_*``: box metrics ``bm``, slice decision at ``threshold``, their CIs and the support."""
    sm = slice_metrics(preds, slices["has_lesion"].to_numpy(), threshold)
    out = {f"{split}_{k}": float(bm[k]) for k in BOX_KEYS}
    out.update({f"{split}_slice_{k}": float(sm[k]) for k in SLICE_KEYS})
    for k, (lo, hi) in confidence_intervals(preds, truths, slices, threshold, seed).items():
        out[f"{split}_{k}_ci_low"], out[f"{split}_{k}_ci_high"] = lo, hi
    out.update({f"{split}_slices": len(part), f"{split}_lesion_slices": int(slices["has_lesion"].sum()),
                f"{split}_boxes": int(sum(len(t) for t in truths))})
    return out


def log_tables(part, preds, slices, threshold: float, split: str) -> None:
    patient = part["patient_id"].to_numpy()[preds["slice_id"].to_numpy(int)] if len(preds) else []
    mlflow.log_text(preds.assign(patient_id=patient).to_csv(index=False), eval_artifact(split, "predictions"))
    mlflow.log_text(slices.to_csv(index=False), eval_artifact(split, "slices"))
    mlflow.log_text(per_patient(slices, threshold).to_csv(index=False), eval_artifact(split, "per_patient"))


def log_figure(fig, split: str, what: str) -> None:
    _log_figure(fig, figure_artifact(split, what))


def log_figures(part, preds, truths, slices, bm: dict, threshold: float, split: str, seed: int = 0,
                overlays: int = 8) -> None:
    y = slices["has_lesion"].to_numpy(bool)
    sm = slice_metrics(slices["max_score"].to_numpy(), y, threshold)
    log_figure(confusion_figure(confusion(sm), ["no lesion", "lesion"],
                                title=f"{split} slice-level (score >= {threshold:.3f})"), split, "confusion")
    if 0 < y.sum() < len(y):
        log_figure(roc_pr_figure(y, slices["max_score"].to_numpy(), title=f"{split} slice-level (max box score)",
                                 threshold=threshold), split, "slice_roc_pr")
    log_figure(analysis.pr_figure({split: bm}), split, "pr_curve")
    fig, text, gts, _ = analysis.difficulty(part, preds, truths, threshold, split)
    log_figure(fig, split, "difficulty")
    mlflow.log_text(text, eval_artifact(split, "difficulty", "md"))
    mlflow.log_text(gts.to_csv(index=False), eval_artifact(split, "difficulty_boxes"))
    if overlays > 0:
        log_figure(analysis.overlays(part, preds, truths, threshold, overlays, split, seed=seed), split, "overlays")


def evaluate_split(part: pd.DataFrame, outputs, threshold: float, split: str, seed: int = 0, overlays: int = 8,
                   step: int | None = None) -> dict:
    """Score and log the boxes ``outputs`` (one (boxes, scores) per row of ``part``); returns ``<split>_*``."""
    part = part.reset_index(drop=True)
    preds = predictions_frame(outputs)
    truths = truths_from_index(part)
    slices = slice_frame(part, preds)
    bm = box_metrics(preds, truths)
    metrics = split_metrics(part, preds, truths, slices, bm, threshold, split, seed)
    log_metrics(finite(metrics), step=step)
    log_tables(part, preds, slices, threshold, split)
    log_figures(part, preds, truths, slices, bm, threshold, split, seed, overlays)
    return metrics
