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

import numpy as np
import pandas as pd

from ichflow.data.scans import iter_scans
from ichflow.engine.stats import finite, patient_bootstrap_ci
from ichflow.errors import DataError
from ichflow.metric_names import log_metrics
from ichflow.tasks.multilabel import metrics as mm
from ichflow.tasks.multilabel.labels import with_derived
from ichflow.tasks.multilabel.report import log_per_class, log_predictions, log_split_figures

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
    part = with_derived(part, classes)
    missing = [c for c in classes if c not in part.columns or part[c].isna().all()]
    if missing:
        raise DataError("data", f"the model predicts {classes} but the data has no labels for {missing} "
                                "(PHE-SICH-CT-IDS has no subtype labels: use CT-ICH or a labels CSV)")


def served_probabilities(pyfunc, part: pd.DataFrame, classes: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """(rows of ``part`` in scan order, (n, k) probabilities of the served model), scan by scan."""
    rows, probs = [], []
    cols = [f"{c}_probability" for c in classes]
    for pid, group, slices in iter_scans(part):
        out = pyfunc.predict(slices)
        if not isinstance(out, pd.DataFrame) or not set(cols) <= set(out.columns) or len(out) != len(group):
            raise ValueError(f"the model's output for patient {pid} lacks per-slice columns {cols}")
        rows.append(group.index.to_numpy())
        probs.append(out[cols].to_numpy(float))
    return part.loc[np.concatenate(rows)].reset_index(drop=True), np.concatenate(probs)


def patient_cis(y: np.ndarray, p: np.ndarray, thresholds, classes: list[str], pids, metrics: dict,
                seed: int) -> dict:
    """``<name>_ci_low`` / ``_ci_high`` of the macro / micro scores, by a bootstrap over patients."""
    boot = pd.DataFrame({"patient_id": np.asarray(pids).astype(str), "i": np.arange(len(y))})
    out = {}
    for name in CI_METRICS:
        if metrics.get(name) != metrics.get(name):
            continue

        def stat(f, name=name):
            idx = f["i"].to_numpy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return mm.multilabel_metrics(y[idx], p[idx], thresholds, classes)[name]
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = patient_bootstrap_ci(boot, stat, n_boot=N_BOOT, seed=seed)
    return out


def evaluate_external(model, part: pd.DataFrame, prefix: str) -> dict:
    """Log the subtype metric set of ``model`` (a LoadedModel) on ``part`` as ``<prefix>_*``."""
    classes, thresholds = _classes_and_thresholds(model)
    part = with_derived(part, classes)
    check_data(model, part)
    frame, p = served_probabilities(model.pyfunc, part, classes)
    y = frame[classes].astype("Float64").fillna(0).to_numpy(dtype=np.float32)
    pred = p >= thresholds[None, :]
    pids = frame["patient_id"].to_numpy()
    metrics = mm.multilabel_metrics(y, p, thresholds, classes)
    metrics.update({f"{c}_threshold": float(t) for c, t in zip(classes, thresholds)})
    metrics.update({f"support_{k}": v for k, v in mm.support(frame, y, classes).items()})
    seed = int(float(model.train_params.get("seed", 0) or 0))
    metrics.update(patient_cis(y, p, thresholds, classes, pids, metrics, seed))
    out = {f"{prefix}_{k}": v for k, v in metrics.items()}
    log_metrics(finite(out))
    log_predictions(prefix, frame, y, p, pred, classes)
    log_per_class(prefix, metrics, thresholds, classes)
    log_split_figures(prefix, y, p, pred, pids, classes, title=prefix)
    return out
