"""One cross-validation fold of the subtype model: a nested MLflow run trained on the engine Trainer.

Fold ``k`` trains on every CV fold but ``k`` and its inner validation fold ``(k + 1) mod K``; the inner
validation picks the checkpoint (macro-AUC, ties broken by the lower loss) and the per-class thresholds; the
held-out fold ``k`` is scored once. The child run logs its inputs, per-epoch curves, ``val_*``, ``heldout_*``,
``threshold_<class>`` and ``figures/training_curves.png`` / ``figures/heldout_multilabel_confusion.png``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import mlflow
import numpy as np
import torch

from ichflow.engine import figures
from ichflow.engine.augment import Normalizer
from ichflow.engine.device import seed_everything
from ichflow.engine.stats import finite
from ichflow.engine.trainer import FitResult
from ichflow.paths import figure_artifact
from ichflow.tasks import slice_classifier as sc
from ichflow.tasks.multilabel import folds as cvf
from ichflow.tasks.multilabel import metrics as mm
from ichflow.tasks.multilabel.report import log_fold_table
from ichflow.tracking import frame_digest

log = logging.getLogger(__name__)


def assign_folds(manifest, prep, classes: list[str], cfg):
    """(fold per patient, source, fold warnings, CV digest): warnings logged, tagged and re-raised; the fold
    table logged as eval/cv_folds.csv; the CV digest tagged as the run's split digest."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cvf.FoldWarning)
        folds, source = cvf.cv_folds(manifest, prep.split, classes, cfg.n_folds, seed=cfg.split_seed,
                                     exclude_test=not cfg.evaluate_test)
    fold_warnings = [str(w.message) for w in caught if issubclass(w.category, cvf.FoldWarning)]
    for msg in fold_warnings:
        log.warning(msg)
        warnings.warn(msg, cvf.FoldWarning, stacklevel=2)
    table = cvf.fold_table(folds, cvf.patient_labels(manifest, classes))
    log_fold_table(table)
    digest = frame_digest(table[["patient_id", "fold"]])
    # candidates are comparable when they were cross-validated on the same folds (registry rule)
    mlflow.set_tags({"ichflow.split_digest": digest, "ichflow.cv_folds": source,
                     "ichflow.prepare_split_digest": prep.split_digest})
    if fold_warnings:
        mlflow.set_tag("ichflow.fold_warnings", " | ".join(fold_warnings)[:5000])
    return folds, source, fold_warnings, digest


@dataclass
class CVContext:
    """What every fold shares: parameters, classes, decoded slices, labels, device and the fold of each row."""

    cfg: object
    classes: list[str]
    mult: np.ndarray              # per-class pos_weight multipliers
    data: sc.SliceData
    y: np.ndarray                 # (rows, classes) 0/1
    device: torch.device
    amp: torch.dtype | None
    fold_of_row: np.ndarray       # fold of every manifest row, -1 = not in the CV (test patients in tuning)

    def parts(self, held: int | None, val: int) -> dict[str, np.ndarray]:
        held_mask = self.fold_of_row == held if held is not None else np.zeros(len(self.y), bool)
        train = (self.fold_of_row >= 0) & ~held_mask & (self.fold_of_row != val)
        return {"train": np.nonzero(train)[0], "val": np.nonzero(self.fold_of_row == val)[0],
                "heldout": np.nonzero(held_mask)[0]}


@dataclass
class FoldOutcome:
    name: str
    fit: FitResult
    val: dict                     # inner-validation metrics at the chosen thresholds
    heldout: dict                 # held-out metrics ({} for the refit)
    thresholds: np.ndarray
    norm: Normalizer
    rows: np.ndarray              # held-out rows
    probs: np.ndarray             # their probabilities (smoothed with scan_context)
    scan_context: str = "none"    # chosen on the inner validation


def run_fold(ctx: CVContext, name: str, k: int, val: int, held: int | None, on_epoch_end=None,
             step_offset: int = 0) -> FoldOutcome:
    """Train and score fold ``k`` in a nested run; ``on_epoch_end(step_offset + epoch, metrics)``."""
    parts = ctx.parts(held, val)
    cfg = ctx.cfg
    with mlflow.start_run(run_name=name, nested=True, tags={"ichflow.task": "multilabel", "ichflow.fold": str(k)}):
        _log_inputs(ctx, name, k, val, parts)
        norm = ctx.data.normalizer(parts["train"], seed=cfg.seed)
        seed_everything(cfg.seed + k)
        model = sc.train_model(cfg, len(ctx.classes), ctx.device)
        hook = None if on_epoch_end is None else (lambda epoch, metrics: on_epoch_end(step_offset + epoch, metrics))
        fit, loaders = _train(ctx, model, parts, norm, cfg.seed + k, hook)
        outcome = _score(ctx, name, model, fit, loaders, parts, norm)
        _log_outcome(ctx, outcome)
        model.cpu()
        return outcome


def _log_inputs(ctx: CVContext, name: str, k: int, val: int, parts: dict) -> None:
    m = ctx.data.manifest
    mlflow.log_params({"fold": k, "inner_val_fold": val,
                       **{f"{p}_patients": m.loc[r, "patient_id"].nunique() for p, r in parts.items()}})
    for part, rows in parts.items():
        mlflow.log_metrics({f"support_{part}_{kk}": v for kk, v in mm.support(m.loc[rows], ctx.y[rows],
                                                                               ctx.classes).items()})
    present = ctx.y[parts["train"]].any(axis=0)
    if not present.all():
        log.warning("%s: no training positives of %s", name, [c for c, a in zip(ctx.classes, present) if not a])


def _train(ctx: CVContext, model, parts: dict, norm: Normalizer, seed: int, hook):
    cfg, train_y = ctx.cfg, ctx.y[parts["train"]]
    sampler = (sc.balanced_sampler(train_y, num_samples=len(train_y), seed=seed)
               if cfg.sampler == "balanced" else None)
    pw = pos_weight_for(train_y, cfg.pos_weight, ctx.mult, None if sampler is None else sampler.weights.numpy())
    if pw is not None:
        mlflow.log_params({f"pos_weight_{c}": round(float(w), 4) for c, w in zip(ctx.classes, pw)})
    train_loader, loaders = sc.loaders(ctx.data, parts, ctx.y, cfg, norm, sampler, seed)
    y_val = ctx.y[parts["val"]]

    def evaluate(mdl):
        probs, loss = sc.predict_probs(mdl, loaders["val"], ctx.device, ctx.amp)
        met = mm.multilabel_metrics(y_val, probs, [0.5] * len(ctx.classes), ctx.classes)
        auc = met["macro_auc"] if met["macro_auc"] == met["macro_auc"] else 0.0
        out = {"val_loss": loss, "val_macro_auc": auc, "val_selection": sc.selection_score(met["macro_auc"], loss)}
        out.update({f"val_{c}_roc_auc": met[f"{c}_roc_auc"] for c in ctx.classes
                    if met[f"{c}_roc_auc"] == met[f"{c}_roc_auc"]})
        return out

    fit = sc.fit_model(model, cfg, sc.bce_loss(pw, ctx.device), ctx.device, ctx.amp, train_loader, evaluate, hook)
    return fit, loaders


def pos_weight_for(labels: np.ndarray, mode: str, mult: np.ndarray, sample_weights=None):
    """Per-class BCE pos_weight (None = plain BCE): prevalence under the sampling distribution x multipliers."""
    if mode == "none":
        return None if np.allclose(mult, 1) else mult.astype(np.float32)
    return sc.prevalence_pos_weight(labels, mult, sample_weights=sample_weights)


def _score(ctx: CVContext, name: str, model, fit: FitResult, loaders: dict, parts: dict,
           norm: Normalizer) -> FoldOutcome:
    """Per-class thresholds and metrics on the inner validation; held-out metrics at those thresholds."""
    cfg, y, manifest = ctx.cfg, ctx.y, ctx.data.manifest
    val_p, _ = sc.predict_probs(model, loaders["val"], ctx.device, ctx.amp)
    context, candidates = sc.best_scan_context(cfg.scan_context, lambda c: mm.multilabel_metrics(
        y[parts["val"]], sc.smooth_rows(manifest, parts["val"], val_p, c), [0.5] * len(ctx.classes),
        ctx.classes)["macro_auc"])
    mlflow.log_param("scan_context_used", context)
    mlflow.log_metrics(finite({f"val_macro_auc_scan_context_{c}": v for c, v in candidates.items()}))
    val_p = sc.smooth_rows(manifest, parts["val"], val_p, context)
    thresholds = sc.per_class_thresholds(y[parts["val"]], val_p, cfg.threshold_goal, cfg.target_recall)
    val_m = mm.multilabel_metrics(y[parts["val"]], val_p, thresholds, ctx.classes)
    held_p, held_m = np.zeros((0, len(ctx.classes)), np.float32), {}
    if len(parts["heldout"]):
        held_p, _ = sc.predict_probs(model, loaders["heldout"], ctx.device, ctx.amp)
        held_p = sc.smooth_rows(manifest, parts["heldout"], held_p, context)
        held_m = mm.multilabel_metrics(y[parts["heldout"]], held_p, thresholds, ctx.classes)
    return FoldOutcome(name, fit, val_m, held_m, thresholds, norm, parts["heldout"], held_p, context)


def _log_outcome(ctx: CVContext, o: FoldOutcome) -> None:
    logged = {f"val_{k}": v for k, v in o.val.items()} | {f"heldout_{k}": v for k, v in o.heldout.items()}
    logged.update({f"threshold_{c}": t for c, t in zip(ctx.classes, o.thresholds)})
    mlflow.log_metrics(finite({**logged, "best_epoch": o.fit.best_epoch, "epochs_run": o.fit.epochs_run,
                               "train_seconds": o.fit.train_seconds}), step=o.fit.epochs_run)
    fig = figures.curves_figure(o.fit.history, ["train_loss", "val_loss", "val_macro_auc"], title=o.name)
    mlflow.log_figure(fig, figure_artifact("training", "curves"))
    figures.close(fig)
    if len(o.rows):
        fig = mm.multilabel_confusion_figure(ctx.y[o.rows], o.probs, o.thresholds, ctx.classes,
                                             title=f"{o.name}: held-out fold")
        mlflow.log_figure(fig, figure_artifact("heldout", "multilabel_confusion"))
        figures.close(fig)


def best_fold(outcomes: list[FoldOutcome]) -> int:
    """Index of the fold with the best inner-validation macro-AUC (0 when none is defined)."""
    scores = np.array([o.val.get("macro_auc", np.nan) for o in outcomes], dtype=float)
    return int(np.nanargmax(scores)) if np.isfinite(scores).any() else 0


def summarise(outcomes: list[FoldOutcome], best: int) -> FitResult:
    """The CV as one FitResult: epochs and checkpoint of the best fold, time and stop flags over all folds."""
    b = outcomes[best].fit
    return FitResult(best_epoch=b.best_epoch, best_score=b.best_score, epochs_run=b.epochs_run, history=b.history,
                     train_seconds=sum(o.fit.train_seconds for o in outcomes),
                     stopped_early=any(o.fit.stopped_early for o in outcomes),
                     stopped_by_time_budget=any(o.fit.stopped_by_time_budget for o in outcomes),
                     checkpoint=b.checkpoint)


def out_of_fold(outcomes: list[FoldOutcome]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, probabilities, 0/1 predictions at each fold's own thresholds) of every held-out slice."""
    return (np.concatenate([o.rows for o in outcomes]), np.concatenate([o.probs for o in outcomes]),
            np.concatenate([o.probs >= o.thresholds[None, :] for o in outcomes]))


def fold_rows(ctx: CVContext, outcomes: list[FoldOutcome]) -> list[dict]:
    """One row per fold: epochs, inner-validation and held-out metrics, thresholds (eval/cv_fold_metrics.csv)."""
    return [{"fold": k, "best_epoch": o.fit.best_epoch, "epochs_run": o.fit.epochs_run,
             **{f"val_{kk}": v for kk, v in o.val.items()}, **{f"heldout_{kk}": v for kk, v in o.heldout.items()},
             **{f"threshold_{c}": t for c, t in zip(ctx.classes, o.thresholds)}} for k, o in enumerate(outcomes)]


def fold_support(ctx: CVContext, outcomes: list[FoldOutcome]) -> list[dict]:
    """Positives per class of each held-out fold (eval/cv_support_per_fold.csv)."""
    return [{"fold": k, **mm.support(ctx.data.manifest.loc[o.rows], ctx.y[o.rows], ctx.classes)}
            for k, o in enumerate(outcomes)]
