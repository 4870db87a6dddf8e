"""Per-split logging of the subtype model, for the training run's ``report`` and the ``evaluate`` entry point.

Split ``<split>`` (``oof`` = pooled out-of-fold, ``eval`` = an external evaluation, ``heldout`` = a fold's
held-out patients): ``eval/<split>_predictions.csv`` (truth, probability and prediction per class and slice),
``eval/<split>_per_class.csv``, ``figures/<split>_multilabel_confusion.png``, ``figures/<split>_cooccurrence.png``
and ``figures/<split>_roc_pr_<class>.png``. The cross-validation tables are split ``cv``: ``eval/cv_folds.csv``
(fold of every patient), ``eval/cv_fold_metrics.csv``, ``eval/cv_support_per_fold.csv``, ``eval/cv_summary.md``
(the pooled out-of-fold headline with CIs first, the fold means beside).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from ichflow.engine import figures
from ichflow.paths import eval_artifact, figure_artifact
from ichflow.tasks.multilabel import metrics as mm


def log_predictions(split: str, slices: pd.DataFrame, y: np.ndarray, p: np.ndarray, pred: np.ndarray,
                    classes: list[str]) -> None:
    """``eval/<split>_predictions.csv``: patient_id, slice_index and per class truth / probability / 0-1."""
    table = slices[["patient_id", "slice_index"]].reset_index(drop=True)
    for j, c in enumerate(classes):
        table[c] = np.asarray(y)[:, j].astype(int)
        table[f"{c}_probability"] = np.asarray(p)[:, j]
        table[f"{c}_pred"] = np.asarray(pred)[:, j].astype(int)
    mlflow.log_text(table.to_csv(index=False), eval_artifact(split, "predictions"))


def log_per_class(split: str, metrics: dict, thresholds, classes: list[str]) -> None:
    """``eval/<split>_per_class.csv``: threshold, metrics and support of every class (un-prefixed metrics)."""
    rows = [{"class": c, "threshold": float(t), **{k: metrics[f"{c}_{k}"] for k in mm.PER_CLASS},
             "slices": metrics[f"support_{c}_slices"], "patients": metrics[f"support_{c}_patients"]}
            for c, t in zip(classes, thresholds)]
    mlflow.log_text(pd.DataFrame(rows).to_csv(index=False), eval_artifact(split, "per_class"))


def log_split_figures(split: str, y: np.ndarray, p: np.ndarray, pred: np.ndarray, pids: np.ndarray,
                      classes: list[str], title: str) -> None:
    """Per-class confusion (of ``pred``), label co-occurrence, and ROC / PR per class with both outcomes."""
    _log(mm.multilabel_confusion_figure(y, np.asarray(pred, dtype=float), np.full(len(classes), 0.5), classes,
                                        title=f"{title}: per-class confusion"),
         figure_artifact(split, "multilabel_confusion"))
    _log(mm.cooccurrence_figure(y, np.asarray(pids), classes, pred), figure_artifact(split, "cooccurrence"))
    for j, c in enumerate(classes):
        t = np.asarray(y)[:, j] > 0
        if 0 < t.sum() < len(t):
            _log(figures.roc_pr_figure(t, np.asarray(p)[:, j], title=f"{c}: {title}"),
                 figure_artifact(split, f"roc_pr_{c}"))


def log_fold_table(table: pd.DataFrame) -> None:
    """``eval/cv_folds.csv``: patient_id, fold and the patient's class flags."""
    mlflow.log_text(table.to_csv(index=False), eval_artifact("cv", "folds"))


def log_cv_tables(fold_rows: list[dict], fold_support: list[dict], metrics: dict, sup: dict, classes: list[str],
                  n_folds: int, repeats: int = 1) -> None:
    """Per-fold metrics and support, and the markdown summary: the pooled out-of-fold headline (``oof_*`` with
    CIs, fold means beside), then the held-out folds (``cv_*``) and the inner validation (``val_*``)."""
    mlflow.log_text(pd.DataFrame(fold_rows).to_csv(index=False), eval_artifact("cv", "fold_metrics"))
    mlflow.log_text(pd.DataFrame(fold_support).to_csv(index=False), eval_artifact("cv", "support_per_fold"))
    repeated = (f" × {repeats} repeats (each repeat deals the patients into new folds; a slice's out-of-fold "
                f"score is the mean of its {repeats} held-out scores; the spread over repeats: "
                f"`oof_*_repeat_mean` / `_repeat_sd`)") if repeats > 1 else ""
    text = ["# Subtype cross-validation", "",
            f"{n_folds} patient-level folds{repeated}. Out-of-fold: every patient's slices scored by the fold "
            "model that did not train on it, pooled; 95 % CI by a percentile bootstrap over patients "
            f"({mm.N_BOOT} resamples). Beside it the mean ± sd over the held-out folds.", "",
            mm.headline_markdown(metrics, sup, classes), "",
            "Held-out folds, mean ± sd over folds (folds where defined):", "",
            mm.summary_markdown(metrics, sup, classes, prefix="cv"), "",
            "Inner validation (threshold / checkpoint selection), mean ± sd:", "",
            mm.summary_markdown(metrics, sup, classes, prefix="val")]
    mlflow.log_text("\n".join(text), eval_artifact("cv", "summary", "md"))


def cv_lines(result, support: dict, classes: list[str]) -> list[str]:
    """Summary lines of the CV estimate, pooled out-of-fold with its CI first, fold mean ± sd beside (none
    when it was not reported)."""
    if "cv_macro_auc" not in result:
        return []

    def both(key):
        return f"{mm.ci_text(result, f'oof_{key}')}, fold mean {mm.mean_sd_text(result, f'cv_{key}')}"

    lines = [f"{c}: {support[f'{c}_slices']} slices / {support[f'{c}_patients']} patients; out-of-fold ROC-AUC "
             f"{both(c + '_roc_auc')}; PR-AUC {both(c + '_pr_auc')}" for c in classes]
    spread = (f" (over CV repeats {result['oof_macro_auc_repeat_mean']:.3f} ± {result['oof_macro_auc_repeat_sd']:.3f})"
              if "oof_macro_auc_repeat_sd" in result else "")
    return lines + [f"out-of-fold macro AUC {both('macro_auc')}{spread}; macro F1 {both('macro_f1')}; "
                    f"final model {result.get('final_model')}"]


def _log(fig, path: str) -> None:
    figures.log_figure(fig, path)
