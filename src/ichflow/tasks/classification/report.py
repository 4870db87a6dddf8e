"""Per-split evaluation of the bleed classifier, for the training run's ``report`` and the ``evaluate`` entry.

A split is a frame of slices (``row``, ``patient_id``, ``slice_index``, ``y``, ``score``) and the threshold
chosen on validation. :func:`evaluate_split` logs, under the split's name, the slice- and patient-level metrics
with patient-bootstrap CIs (``<split>_*``), ``eval/<split>_classification_report.txt``,
``eval/<split>_predictions.csv`` and ``figures/<split>_{confusion,patient_confusion,roc_pr}.png``.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from ichflow.engine import figures
from ichflow.engine.stats import finite
from ichflow.metric_names import log_metrics
from ichflow.paths import eval_artifact, figure_artifact
from ichflow.tasks import slice_classifier as sc
from ichflow.tasks.classification.config import CLASS_NAMES

CI_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc")


def prediction_frame(manifest: pd.DataFrame, rows: np.ndarray, y: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """The slices ``rows`` of ``manifest`` with their label ``y[rows]`` and ``scores`` (one per row)."""
    return pd.DataFrame({"row": rows, "patient_id": manifest.loc[rows, "patient_id"].astype(str).to_numpy(),
                         "slice_index": manifest.loc[rows, "slice_index"].to_numpy(),
                         "y": y[rows].astype(int), "score": np.asarray(scores, dtype=float)})


def evaluate_split(split: str, frame: pd.DataFrame, threshold: float, n_boot: int, seed: int,
                   threshold_goal: str, step: int = 0) -> dict:
    """Metrics of ``frame`` at ``threshold`` as ``<split>_*`` (logged at ``step``), report, predictions, figures."""
    frame = frame.assign(pred=(frame["score"] >= threshold).astype(int))
    slice_m = sc.metrics_with_ci(frame, threshold, n_boot=n_boot, seed=seed)
    patients = sc.patient_level(frame)
    patient_m = sc.metrics_with_ci(patients, threshold, n_boot=n_boot, seed=seed)
    out = {f"{split}_{k}": v for k, v in slice_m.items()}
    out.update({f"{split}_patient_{k}": v for k, v in patient_m.items()})
    out[f"{split}_patients"] = len(patients)
    out[f"{split}_positive_patients"] = int(patients["y"].sum())
    log_metrics(finite(out), step=step)
    text = report_text(frame, patients, slice_m, patient_m, threshold, threshold_goal, n_boot)
    mlflow.log_text(text, eval_artifact(split, "classification_report", "txt"))
    mlflow.log_text(frame.drop(columns="row").to_csv(index=False), eval_artifact(split, "predictions"))
    log_split_figures(split, frame, slice_m, patient_m, threshold)
    return out


def report_text(frame: pd.DataFrame, patients: pd.DataFrame, slice_m: dict, patient_m: dict, threshold: float,
                threshold_goal: str, n_boot: int) -> str:
    """sklearn's classification report per slice and per patient, and the bootstrap CIs."""
    from sklearn.metrics import classification_report

    def table(y, pred):
        return classification_report(y, pred, labels=[0, 1], target_names=CLASS_NAMES, digits=4, zero_division=0)

    lines = [f"Slice level (threshold {threshold:.4f}, chosen on val for goal {threshold_goal})",
             table(frame["y"], frame["pred"]),
             "Patient level (positive = any slice positive)",
             table(patients["y"], (patients["score"] >= threshold).astype(int)),
             f"95 % CIs: percentile bootstrap over patients ({n_boot} resamples)"]
    for k in CI_METRICS:
        for level, m in (("slice", slice_m), ("patient", patient_m)):
            if f"{k}_ci_low" in m:
                lines.append(f"  {level:7s} {k:9s} {m[k]:.4f}  [{m[k + '_ci_low']:.4f}, {m[k + '_ci_high']:.4f}]")
    return "\n".join(lines)


def log_split_figures(split: str, frame: pd.DataFrame, slice_m: dict, patient_m: dict, threshold: float) -> None:
    """Slice and patient confusion matrices; ROC / PR curves when both classes are present."""
    for what, m, title in (("confusion", slice_m, f"{split}: slices (threshold {threshold:.3f})"),
                           ("patient_confusion", patient_m, f"{split}: patients (any slice positive)")):
        cm = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
        _log_figure(figures.confusion_figure(cm, CLASS_NAMES, title=title), figure_artifact(split, what))
    if 0 < frame["y"].sum() < len(frame):
        _log_figure(figures.roc_pr_figure(frame["y"], frame["score"], title=f"{split}: slice level",
                                          threshold=threshold),
                    figure_artifact(split, "roc_pr"))


def _log_figure(fig, path: str) -> None:
    figures.log_figure(fig, path)
