"""Subtype (multi-label) metrics of a served model on any labelled data (the ``evaluate`` entry point).

Per-class probabilities come from the pyfunc (``<class>_probability``, each scan in axial order); the per-class
thresholds are the ones the model carries (chosen on its inner validation fold). Metrics are the training
code's :func:`metrics.multilabel_metrics` (per class precision/recall/F1/ROC-AUC/PR-AUC, macro and micro) on
the whole evaluated set, so ``eval_macro_auc`` is comparable with the training run's ``test_macro_auc`` (there a
mean over the cross-validation folds); plus support, 95 % CIs of the macro/micro scores by a bootstrap over
patients, the per-class confusion matrices, label co-occurrence and ROC/PR curves.
"""

from __future__ import annotations

import logging
import warnings

import mlflow
import numpy as np
import pandas as pd

from ichflow.engine import figures
from ichflow.engine.stats import patient_bootstrap_ci
from ichflow.errors import DataError
from ichflow.tasks import slice_classifier as sc
from ichflow.tasks.multilabel import metrics as mm

log = logging.getLogger(__name__)

CI_METRICS = ("macro_auc", "macro_f1", "micro_f1")
N_BOOT = 200


def _classes_and_thresholds(model) -> tuple[list[str], np.ndarray]:
    inner = model.unwrap()
    config = getattr(inner, "config", None) or {}
    classes = list(config.get("classes") or model.meta.get("classes") or [])
    if not classes:
        raise ValueError(f"{model.uri}: the subtype model does not say its classes")
    thresholds = config.get("thresholds")
    if thresholds is None or len(thresholds) != len(classes):
        log.warning("%s: per-class thresholds not found in the model; 0.5 is used", model.uri)
        thresholds = [0.5] * len(classes)
    return classes, np.asarray(thresholds, float)


def check_data(model, part: pd.DataFrame) -> None:
    """DataError unless the data has labels for every class the model predicts."""
    classes, _ = _classes_and_thresholds(model)
    missing = [c for c in classes if c not in part.columns or part[c].isna().all()]
    if missing:
        raise DataError("data", f"the model predicts {classes} but the data has no labels for {missing} "
                                "(PHE-SICH-CT-IDS has no subtype labels: use CT-ICH or a labels CSV)")


def evaluate_external(model, part: pd.DataFrame, prefix: str) -> dict:
    """Log the subtype metric set of ``model`` (a LoadedModel) on ``part`` as ``<prefix>_*``."""
    from ichflow.data.scans import iter_scans

    check_data(model, part)
    classes, thresholds = _classes_and_thresholds(model)
    rows, probs = [], []
    for pid, group, slices in iter_scans(part):
        out = model.pyfunc.predict(slices)
        cols = [f"{c}_probability" for c in classes]
        if not isinstance(out, pd.DataFrame) or not set(cols) <= set(out.columns) or len(out) != len(group):
            raise ValueError(f"the model's output for patient {pid} lacks per-slice columns {cols}")
        rows.append(group.index.to_numpy())
        probs.append(out[cols].to_numpy(float))
    order = np.concatenate(rows)
    frame = part.loc[order].reset_index(drop=True)
    P = np.concatenate(probs)
    Y = frame[classes].astype("Float64").fillna(0).to_numpy(dtype=np.float32)
    pred = P >= thresholds[None, :]

    metrics = mm.multilabel_metrics(Y, P, thresholds, classes)
    metrics.update({f"{c}_threshold": float(t) for c, t in zip(classes, thresholds)})
    metrics.update({f"support_{k}": v for k, v in mm.support(frame, Y, classes).items()})
    boot = pd.DataFrame({"patient_id": frame["patient_id"].astype(str).to_numpy(), "i": np.arange(len(frame))})
    seed = int(float(model.train_params.get("seed", 0) or 0))
    for name in CI_METRICS:
        if metrics.get(name) != metrics.get(name):
            continue

        def stat(f, name=name):
            idx = f["i"].to_numpy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return mm.multilabel_metrics(Y[idx], P[idx], thresholds, classes)[name]
        metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = patient_bootstrap_ci(boot, stat, n_boot=N_BOOT,
                                                                                       seed=seed)
    out = {f"{prefix}_{k}": v for k, v in metrics.items()}
    mlflow.log_metrics(sc.finite(out))

    table = frame[["patient_id", "slice_index"]].copy()
    for j, c in enumerate(classes):
        table[c] = Y[:, j].astype(int)
        table[f"{c}_probability"] = P[:, j]
        table[f"{c}_pred"] = pred[:, j].astype(int)
    mlflow.log_text(table.to_csv(index=False), f"eval/{prefix}_predictions.csv")
    per_class = pd.DataFrame([{"class": c, "threshold": thresholds[j],
                               **{k: metrics[f"{c}_{k}"] for k in mm.PER_CLASS},
                               "slices": metrics[f"support_{c}_slices"], "patients": metrics[f"support_{c}_patients"]}
                              for j, c in enumerate(classes)])
    mlflow.log_text(per_class.to_csv(index=False), f"eval/{prefix}_per_class.csv")
    fig = mm.multilabel_confusion_figure(Y, P, thresholds, classes, title=f"{prefix}: per-class confusion")
    mlflow.log_figure(fig, f"figures/{prefix}_multilabel_confusion.png")
    figures.close(fig)
    fig = mm.cooccurrence_figure(Y, frame["patient_id"].to_numpy(), classes, pred)
    mlflow.log_figure(fig, f"figures/{prefix}_cooccurrence.png")
    figures.close(fig)
    for j, c in enumerate(classes):
        t = Y[:, j] > 0
        if 0 < t.sum() < len(t):
            fig = figures.roc_pr_figure(t, P[:, j], title=f"{c}: {prefix}")
            mlflow.log_figure(fig, f"figures/{prefix}_roc_pr_{c}.png")
            figures.close(fig)
    return out
