"""Task 4: hemorrhage subtypes (IVH / IPH / SAH by default) per slice, multi-label, by patient-level k-fold CV.

Model: a timm CNN with one logit per class, sigmoid + ``BCEWithLogitsLoss(pos_weight)``; ``pos_weight`` per
class from the training prevalence (under the sampler's distribution when the balanced sampler is on), times
optional per-class multipliers (Optuna tunes those).

Evaluation: the classes are thin (few positive patients each), so one split says little. Every patient is
held out exactly once in k folds (:mod:`.crossval`: one nested MLflow run per fold, inner validation for
checkpoint and thresholds). The parent run reports ``val_*`` (inner validation, mean ± sd over folds, the
objective) and, when ``evaluate_test``, ``cv_*`` = ``test_*`` (held-out folds) and the pooled ``oof_*``.
The headline is the pooled out-of-fold per-class ROC-AUC / PR-AUC and macro AUC with 95 % patient-bootstrap
CIs (``oof_<class>_roc_auc_ci_low`` / ``_ci_high``, ...): a fold holds one or two patients of a rare class, so
a fold's AUC, and the mean of five of them, rests on very few patients.
With ``evaluate_test=False`` (tuning trials) the holdout test patients are left out of the CV entirely.
``cv_repeats=R`` repeats the CV R times on newly dealt folds (R × k child runs): each slice's out-of-fold
probability is the mean of its R held-out scores (an ensemble of R models, which the registered single model
is not), and the pooled AUCs of each repeat on its own give ``oof_*_repeat_mean`` / ``_repeat_sd``: the
single-model estimate and the variance of one fold assignment, which one CV cannot show.

Model ``ich-subtypes``: ``final_model=best_fold`` (default) is the fold model with the best inner-validation
macro-AUC (its thresholds and normalisation); ``final_model=refit`` trains one more model on all folds but
one (inner validation), at the cost of one more training.
"""

from __future__ import annotations
from ichflow.metric_names import log_metrics

import dataclasses

import mlflow
import numpy as np
import torch

from ichflow.engine.degenerate import score_reasons
from ichflow.engine.device import amp_dtype
from ichflow.engine.stats import finite
from ichflow.errors import ParameterError, check_choice, check_range
from ichflow.paths import default_data_dir
from ichflow.prepare import DATASETS, prepare_data
from ichflow.tasks import slice_classifier as sc
from ichflow.tasks.common import run_folder
from ichflow.tasks.multilabel import crossval as cv, metrics as mm, report
from ichflow.tasks.multilabel.config import (FINAL_MODELS, POS_WEIGHTS, PRESETS, SAMPLERS, MultilabelConfig,
                                             parse_classes, parse_multipliers, validate_labels)
from ichflow.tasks.multilabel.labels import with_derived
from ichflow.tasks.multilabel.labels_csv import is_labels_csv, prepare_labels_csv
from ichflow.tasks.recipe import TaskRecipe, TaskResult, run_task
from ichflow.tasks.spec import TASKS


class MultilabelRecipe(TaskRecipe):
    spec = TASKS["multilabel"]
    presets = PRESETS
    datasets = DATASETS + ("csv",)    # csv: data_dir is a labels CSV (labels_csv.py)

    def resolve(self, cfg: MultilabelConfig) -> MultilabelConfig:
        # dataset=auto with no data folder at all: the subtype phantom (the PHE-like one has no subtype labels);
        # with a data folder, auto means its layout decides, never the phantom
        if cfg.dataset == "auto" and not (cfg.data_dir or default_data_dir()):
            return dataclasses.replace(cfg, dataset=self.spec.synthetic_dataset)
        return cfg

    def validate(self, cfg: MultilabelConfig) -> None:
        self.classes = parse_classes(cfg.classes)
        validate_labels(self.classes, cfg.dataset)
        self.mult = parse_multipliers(cfg.pos_weight_multipliers, len(self.classes))
        for name, choices in (("pos_weight", POS_WEIGHTS), ("sampler", SAMPLERS), ("final_model", FINAL_MODELS),
                              ("threshold_goal", sc.THRESHOLD_GOALS), ("scan_context", sc.SCAN_CONTEXT_CHOICES)):
            check_choice(name, getattr(cfg, name), choices)
        check_range("cv_repeats", cfg.cv_repeats, 1)
        if cfg.n_folds < 3:
            raise ParameterError("n_folds", f"must be at least 3 (train, inner validation and held-out folds); "
                                            f"got {cfg.n_folds}")
        check_range("target_recall", cfg.target_recall, 0, 1, low_open=True)
        check_range("image_size", cfg.image_size, 32)
        for name in ("epochs", "batch_size", "patience"):
            check_range(name, getattr(cfg, name), 1)
        check_range("steps_per_epoch", cfg.steps_per_epoch, 0)
        sc.check_model(cfg.model, cfg.in_channels, cfg.pretrained)

    def label_column(self, cfg: MultilabelConfig) -> str:
        return self.classes[0]

    def prepare(self, cfg: MultilabelConfig):
        prep = prepare_labels_csv(cfg) if is_labels_csv(cfg.data_dir, cfg.dataset) else prepare_data(cfg)
        prep = dataclasses.replace(prep, manifest=with_derived(prep.manifest, self.classes))
        missing = [c for c in self.classes if c not in prep.manifest.columns or prep.manifest[c].isna().all()]
        if missing:
            raise ParameterError("classes", f"{missing} have no labels in the {prep.dataset} data (PHE-SICH-CT-IDS "
                                            "has no subtype labels; use dataset=ctich, synthetic-ctich or a labels "
                                            "CSV)")
        return prep

    def setup(self, cfg: MultilabelConfig) -> None:
        manifest = self.prep.manifest.reset_index(drop=True)
        y = manifest[self.classes].astype("Float64").fillna(0).to_numpy(dtype=np.float32)
        fold_sets, self.fold_source, self.fold_warnings, self.cv_digest = cv.assign_folds(
            manifest, self.prep, self.classes, cfg)
        fold_of_rows = [manifest["patient_id"].astype(str).map(folds).fillna(-1).astype(int).to_numpy()
                        for folds in fold_sets]
        in_cv = fold_of_rows[0] >= 0
        self.support = mm.support(manifest[in_cv], y[in_cv], self.classes)
        log_metrics({f"support_{k}": v for k, v in self.support.items()})
        data = sc.SliceData.load(manifest, cfg.image_size)
        self.ctx = cv.CVContext(cfg, self.classes, self.mult, data, y, self.device,
                                amp_dtype(self.device, cfg.amp), fold_of_rows[0])
        self.repeat_ctxs = [dataclasses.replace(self.ctx, fold_of_row=f) for f in fold_of_rows]
        mlflow.log_params({"device_used": str(self.device), "n_classes": len(self.classes),
                           "cv_patients": len(fold_sets[0])})

    def fit(self, cfg: MultilabelConfig, on_epoch_end):
        """Every fold of every repeat; ``on_epoch_end(run index * epochs + epoch, inner-validation metrics)``."""
        K = cfg.n_folds
        self.outcomes = [cv.run_fold(ctx, f"fold-{k}" if cfg.cv_repeats == 1 else f"repeat-{r}-fold-{k}", k,
                                     (k + 1) % K, k, on_epoch_end, (r * K + k) * cfg.epochs, repeat=r)
                         for r, ctx in enumerate(self.repeat_ctxs) for k in range(K)]
        self.best = cv.best_fold(self.outcomes)
        return cv.summarise(self.outcomes, self.best)

    def select(self, cfg: MultilabelConfig, fit) -> dict:
        if not cfg.evaluate_test:   # no model is logged in a tuning trial
            return {}
        K = cfg.n_folds
        if cfg.final_model == "refit":
            self.final = cv.run_fold(self.ctx, "refit", K, K - 1, None, None, len(self.outcomes) * cfg.epochs)
            self.chosen = f"refit on all folds but one (inner validation fold {K - 1})"
        else:
            self.final = self.outcomes[self.best]
            self.chosen = f"fold-{self.best} (best inner-validation macro-AUC " \
                          f"{self.final.val.get('macro_auc', float('nan')):.3f})"
        mlflow.set_tag("ichflow.final_model", self.chosen)
        return {"final_model": self.chosen}

    def report(self, cfg: MultilabelConfig, split: str, step: int) -> dict:
        if split == "val":
            self.val_agg = {f"val_{k}": v for k, v in mm.aggregate([o.val for o in self.outcomes]).items()}
            log_metrics(finite(self.val_agg), step=step)
            return {**self.val_agg, "folds": cfg.n_folds, "fold_source": self.fold_source}
        cv_m = {f"cv_{k}": v for k, v in mm.aggregate([o.heldout for o in self.outcomes]).items()}
        rows, p, pred = self.oof = cv.out_of_fold(self.outcomes)
        y, slices = self.ctx.y[rows], self.ctx.data.manifest.loc[rows]
        pids = slices["patient_id"].to_numpy()
        oof = {**mm.pooled_metrics(y, p, pred, self.classes), **mm.pooled_cis(y, p, pids, self.classes, cfg.seed)}
        if cfg.cv_repeats > 1:
            oof.update(self.repeat_spread())
        out = {**cv_m, **{f"test_{k[3:]}": v for k, v in cv_m.items()}, **{f"oof_{k}": v for k, v in oof.items()}}
        log_metrics(finite(out), step=step)
        report.log_cv_tables(cv.fold_rows(self.ctx, self.outcomes), cv.fold_support(self.ctx, self.outcomes),
                             {**self.val_agg, **out}, self.support, self.classes, cfg.n_folds, cfg.cv_repeats)
        report.log_predictions("oof", slices, y, p, pred, self.classes)
        report.log_split_figures("oof", y, p, pred, pids, self.classes,
                                 title="out-of-fold (each fold's own thresholds)")
        return out

    def repeat_spread(self) -> dict:
        """``<key>_repeat_mean`` / ``_repeat_sd`` of the pooled out-of-fold AUCs of each repeat on its own: how
        much the estimate moves when the same patients are dealt into other folds."""
        keys = ["macro_auc", *[f"{c}_{m}" for c in self.classes for m in ("roc_auc", "pr_auc")]]
        per_repeat = [mm.pooled_metrics(self.ctx.y[rows], p, pred, self.classes)
                      for rows, p, pred in cv.out_of_fold_by_repeat(self.outcomes)]
        spread = mm.aggregate([{k: m[k] for k in keys if k in m} for m in per_repeat])
        return {**{f"{k}_repeat_mean": spread[k] for k in keys if k in spread},
                **{f"{k}_repeat_sd": spread[f"{k}_sd"] for k in keys if k in spread}}

    def degenerate_reasons(self, cfg: MultilabelConfig) -> list[str]:
        """On the out-of-fold predictions (what promotion compares): a class whose scores ignore the input, or
        every class calling every slice the same."""
        if getattr(self, "oof", None) is None:
            return []
        rows, p, pred = self.oof
        per_class = [[f"{c}: {r}" for r in score_reasons(self.ctx.y[rows, j], p[:, j], called=pred[:, j])]
                     for j, c in enumerate(self.classes)]
        constant = [r for reasons in per_class for r in reasons if "near-constant" in r]
        all_same = all(any("every" in r for r in reasons) for reasons in per_class)
        return constant + ([r for reasons in per_class for r in reasons if "every" in r] if all_same else [])

    def export(self, cfg: MultilabelConfig):
        model = sc.build_model(cfg.model, cfg.in_channels, len(self.classes))
        model.load_state_dict(torch.load(self.final.fit.checkpoint, map_location="cpu", weights_only=True))
        config = {"task": self.spec.name, "model": cfg.model, "in_channels": cfg.in_channels,
                  "image_size": cfg.image_size, "classes": self.classes,
                  "thresholds": [float(t) for t in self.final.thresholds], "norm_mean": self.final.norm.mean,
                  "norm_std": self.final.norm.std, "scan_context": self.final.scan_context, "final_model": self.chosen, "cv_digest": self.cv_digest}
        example = sc.example_scan(self.ctx.data.manifest, np.nonzero(self.ctx.fold_of_row >= 0)[0])
        return sc.log_slice_model(model, config, run_folder(), example,
                                  self.spec.registered_name if cfg.register else None,
                                  metadata={"task": self.spec.name, "classes": self.classes,
                                            "final_model": self.chosen})

    def summary_lines(self, cfg: MultilabelConfig, result: TaskResult) -> list[str]:
        return [f"{self.prep.dataset} ({self.prep.source}) {cfg.model} {cfg.image_size}px, classes "
                f"{','.join(self.classes)}, {cfg.n_folds}-fold patient CV ({self.fold_source}), inner-val macro "
                f"AUC {result.objective:.3f}", *report.cv_lines(result, self.support, self.classes),
                *[f"warning: {w}" for w in self.fold_warnings]]


def train_multilabel(cfg: MultilabelConfig, on_epoch_end=None) -> TaskResult:
    """k-fold CV with one child run per fold, aggregated on the parent; log and register the model.

    Returns ``objective`` (= ``val_macro_auc``, mean over folds of the inner-validation macro-AUC), ``val_*``,
    ``folds``, ``fold_source``; when ``evaluate_test``: ``cv_*`` (held-out folds, mean and ``_sd``), ``test_*``
    (= ``cv_*``), ``oof_*`` (with ``_ci_low`` / ``_ci_high`` of the AUCs), ``final_model``, ``model_uri`` /
    ``model_version``.
    """
    return run_task(MultilabelRecipe, cfg, on_epoch_end)
