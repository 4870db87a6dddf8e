"""One cross-validation fold of the subtype model: a nested MLflow run trained on the engine Trainer.

Fold ``k`` trains on every CV fold but ``k`` and its inner validation fold ``(k + 1) mod K``; the inner
validation picks the checkpoint (macro-AUC, ties broken by the lower loss) and the per-class thresholds; the
held-out fold ``k`` is scored once. The child run logs its inputs, per-epoch curves, ``val_*``, ``heldout_*``,
``threshold_<class>`` and ``figures/heldout_multilabel_confusion.png``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
import torch

from ichflow.engine import figures
from ichflow.engine.augment import Normalizer
from ichflow.engine.device import seed_everything
from ichflow.engine.stats import finite
from ichflow.engine.trainer import FitResult
from ichflow.metric_names import log_metrics
from ichflow.paths import figure_artifact
from ichflow.tasks import slice_classifier as sc
from ichflow.tasks.multilabel import folds as cvf
from ichflow.tasks.multilabel import metrics as mm
from ichflow.tasks.multilabel.report import log_fold_table
from ichflow.tracking import frame_digest

log = logging.getLogger(__name__)


def assign_folds(manifest, prep, classes: list[str], cfg):
    """(fold per patient of each repeat, source, fold warnings, CV digest): warnings logged, tagged and
    re-raised; the fold table logged as eval/cv_folds.csv (a ``repeat`` column when ``cv_repeats`` > 1); the CV
    digest (of every repeat's folds) tagged as the run's split digest."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", cvf.FoldWarning)
        dealt = [cvf.cv_folds(manifest, prep.split, classes, cfg.n_folds, seed=cfg.split_seed,
                              exclude_test=not cfg.evaluate_test, repeat=r) for r in range(cfg.cv_repeats)]
    source = dealt[0][1] + (f" + {cfg.cv_repeats - 1} re-dealt repeat(s)" if cfg.cv_repeats > 1 else "")
    fold_warnings = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, cvf.FoldWarning)))
    for msg in fold_warnings:
        log.warning(msg)
        warnings.warn(msg, cvf.FoldWarning, stacklevel=2)
    plabels = cvf.patient_labels(manifest, classes)
    tables = [cvf.fold_table(folds, plabels).assign(repeat=r) for r, (folds, _) in enumerate(dealt)]
    table = pd.concat(tables, ignore_index=True) if cfg.cv_repeats > 1 else tables[0].drop(columns="repeat")
    log_fold_table(table)
    digest = frame_digest(table[[c for c in ("repeat", "patient_id", "fold") if c in table.columns]])
    # candidates are comparable when they were cross-validated on the same folds (registry rule)
    mlflow.set_tags({"ichflow.split_digest": digest, "ichflow.cv_folds": source,
                     "ichflow.prepare_split_digest": prep.split_digest})
    if fold_warnings:
        mlflow.set_tag("ichflow.fold_warnings", " | ".join(fold_warnings)[:5000])
    return [folds for folds, _ in dealt], source, fold_warnings, digest


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
    repeat: int = 0               # the CV repeat it belongs to


def run_fold(ctx: CVContext, name: str, k: int, val: int, held: int | None, on_epoch_end=None,
             step_offset: int = 0, repeat: int = 0) -> FoldOutcome:
    """Train and score fold ``k`` (of CV repeat ``repeat``) in a nested run; ``on_epoch_end(step_offset + epoch,
    metrics)``."""
    parts = ctx.parts(held, val)
    cfg = ctx.cfg
    seed = cfg.seed + k + 1000 * repeat
    with mlflow.start_run(run_name=name, nested=True, tags={"ichflow.task": "multilabel", "ichflow.fold": str(k),
                                                            "ichflow.cv_repeat": str(repeat)}):
        _log_inputs(ctx, name, k, val, parts)
        norm = ctx.data.normalizer(parts["train"], seed=cfg.seed)
        seed_everything(seed)
        model = sc.train_model(cfg, len(ctx.classes), ctx.device)
        hook = None if on_epoch_end is None else (lambda epoch, metrics: on_epoch_end(step_offset + epoch, metrics))
        fit, loaders = _train(ctx, model, parts, norm, seed, hook)
        outcome = _score(ctx, name, model, fit, loaders, parts, norm, repeat)
        _log_outcome(ctx, outcome)
        model.cpu()
        return outcome


def _log_inputs(ctx: CVContext, name: str, k: int, val: int, parts: dict) -> None:
    m = ctx.data.manifest
    mlflow.log_params({"fold": k, "inner_val_fold": val,
                       **{f"{p}_patients": m.loc[r, "patient_id"].nunique() for p, r in parts.items()}})
    for part, rows in parts.items():
        log_metrics({f"support_{part}_{kk}": v for kk, v in mm.support(m.loc[rows], ctx.y[rows],
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
           norm: Normalizer, repeat: int = 0) -> FoldOutcome:
    """Per-class thresholds and metrics on the inner validation; held-out metrics at those thresholds."""
    cfg, y, manifest = ctx.cfg, ctx.y, ctx.data.manifest
    val_p, _ = sc.predict_probs(model, loaders["val"], ctx.device, ctx.amp)
    context, candidates = sc.best_scan_context(cfg.scan_context, lambda c: mm.multilabel_metrics(
        y[parts["val"]], sc.smooth_rows(manifest, parts["val"], val_p, c), [0.5] * len(ctx.classes),
        ctx.classes)["macro_auc"])
    mlflow.log_param("scan_context_used", context)
    log_metrics(finite({f"val_macro_auc_scan_context_{c}": v for c, v in candidates.items()}))
    val_p = sc.smooth_rows(manifest, parts["val"], val_p, context)
    thresholds = sc.per_class_thresholds(y[parts["val"]], val_p, cfg.threshold_goal, cfg.target_recall)
    val_m = mm.multilabel_metrics(y[parts["val"]], val_p, thresholds, ctx.classes)
    held_p, held_m = np.zeros((0, len(ctx.classes)), np.float32), {}
    if len(parts["heldout"]):
        held_p, _ = sc.predict_probs(model, loaders["heldout"], ctx.device, ctx.amp)
        held_p = sc.smooth_rows(manifest, parts["heldout"], held_p, context)
        held_m = mm.multilabel_metrics(y[parts["heldout"]], held_p, thresholds, ctx.classes)
    return FoldOutcome(name, fit, val_m, held_m, thresholds, norm, parts["heldout"], held_p, context, repeat)


def _log_outcome(ctx: CVContext, o: FoldOutcome) -> None:
    logged = {f"val_{k}": v for k, v in o.val.items()} | {f"heldout_{k}": v for k, v in o.heldout.items()}
    logged.update({f"threshold_{c}": t for c, t in zip(ctx.classes, o.thresholds)})
    log_metrics(finite({**logged, "best_epoch": o.fit.best_epoch, "epochs_run": o.fit.epochs_run,
                               "train_seconds": o.fit.train_seconds}), step=o.fit.epochs_run)
    if len(o.rows):   # the per-epoch curves are MLflow metrics (its charts draw them): no PNG of them
        fig = mm.multilabel_confusion_figure(ctx.y[o.rows], o.probs, o.thresholds, ctx.classes,
                                             title=f"{o.name}: held-out fold")
        figures.log_figure(fig, figure_artifact("heldout", "multilabel_confusion"))


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
    """(rows, probabilities, 0/1 predictions at each fold's own thresholds) of every held-out slice, rows sorted.

    With repeated CV every slice is held out once per repeat: its probability is the mean of its held-out
    scores and its call the majority of its calls (ties count as positive)."""
    rows = np.concatenate([o.rows for o in outcomes])
    probs = np.concatenate([o.probs for o in outcomes])
    calls = np.concatenate([o.probs >= o.thresholds[None, :] for o in outcomes]).astype(float)
    order, index, counts = np.unique(rows, return_inverse=True, return_counts=True)
    mean_p = np.zeros((len(order), probs.shape[1]))
    mean_call = np.zeros_like(mean_p)
    np.add.at(mean_p, index, probs)
    np.add.at(mean_call, index, calls)
    return order, (mean_p / counts[:, None]).astype(np.float32), mean_call / counts[:, None] >= 0.5


def out_of_fold_by_repeat(outcomes: list[FoldOutcome]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`out_of_fold` of each CV repeat on its own."""
    return [out_of_fold([o for o in outcomes if o.repeat == r]) for r in sorted({o.repeat for o in outcomes})]


def fold_rows(ctx: CVContext, outcomes: list[FoldOutcome]) -> list[dict]:
    """One row per fold: epochs, inner-validation and held-out metrics, thresholds (eval/cv_fold_metrics.csv)."""
    return [{"run": o.name, "repeat": o.repeat, "fold": k % ctx.cfg.n_folds, "best_epoch": o.fit.best_epoch, "epochs_run": o.fit.epochs_run,
             **{f"val_{kk}": v for kk, v in o.val.items()}, **{f"heldout_{kk}": v for kk, v in o.heldout.items()},
             **{f"threshold_{c}": t for c, t in zip(ctx.classes, o.thresholds)}} for k, o in enumerate(outcomes)]


def fold_support(ctx: CVContext, outcomes: list[FoldOutcome]) -> list[dict]:
    """Positives per class of each held-out fold (eval/cv_support_per_fold.csv)."""
    return [{"run": o.name, "repeat": o.repeat, "fold": k % ctx.cfg.n_folds,
             **mm.support(ctx.data.manifest.loc[o.rows], ctx.y[o.rows], ctx.classes)}
            for k, o in enumerate(outcomes)]
