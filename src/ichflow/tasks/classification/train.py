"""Task 1: does a slice show a bleed? A timm CNN on single slices (or 2.5D stacks), on the task recipe.

Label ``has_lesion``: PHE-SICH-CT-IDS = the slice has an annotated box, CT-ICH = any hemorrhage subtype.
Honest evaluation: patient-level split from :func:`ichflow.prepare.prepare_data`, checkpoint (val ROC-AUC,
ties broken by the lower val loss) and decision threshold chosen on validation only, test touched once,
metrics per slice and per patient (a patient is positive when any slice is) with 95 % bootstrap CIs.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import torch

from ichflow.data.splits import attach_split
from ichflow.engine.device import amp_dtype
from ichflow.errors import DataError, ParameterError, check_choice, check_range
from ichflow.metric_names import log_metrics
from ichflow.paths import eval_artifact
from ichflow.tasks import slice_classifier as sc
from ichflow.tasks.classification import figures
from ichflow.tasks.classification.config import LABEL, PRESETS, ClassificationConfig
from ichflow.tasks.classification.report import evaluate_split, prediction_frame
from ichflow.tasks.common import run_folder
from ichflow.engine.degenerate import score_reasons
from ichflow.tasks.recipe import TaskRecipe, TaskResult, run_task
from ichflow.tasks.spec import TASKS

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class ClassificationRecipe(TaskRecipe):
    spec = TASKS["classification"]
    presets = PRESETS

    def validate(self, cfg: ClassificationConfig) -> None:
        check_choice("imbalance", cfg.imbalance, sc.IMBALANCE)
        check_choice("threshold_goal", cfg.threshold_goal, sc.THRESHOLD_GOALS)
        check_choice("scan_context", cfg.scan_context, sc.SCAN_CONTEXT_CHOICES)
        check_range("pos_weight", cfg.pos_weight, 0)
        check_range("target_recall", cfg.target_recall, 0, 1, low_open=True)
        check_range("image_size", cfg.image_size, 32)
        for name in ("epochs", "batch_size", "patience"):
            check_range(name, getattr(cfg, name), 1)
        for name in ("steps_per_epoch", "gradcam_per_group", "n_boot"):
            check_range(name, getattr(cfg, name), 0)
        sc.check_model(cfg.model, cfg.in_channels, cfg.pretrained)

    def setup(self, cfg: ClassificationConfig) -> None:
        self.manifest = attach_split(self.prep.manifest, self.prep.split).reset_index(drop=True)
        self.data = sc.SliceData.load(self.manifest, cfg.image_size)
        self.y = self.manifest[LABEL].to_numpy().astype(np.float32)
        self.rows = {s: np.nonzero((self.manifest["split"] == s).to_numpy())[0] for s in SPLITS}
        check_rows(self.rows, self.y, cfg.evaluate_test)
        log_metrics({f"slices_{s}": len(r) for s, r in self.rows.items()}
                           | {f"positive_slices_{s}": int(self.y[r].sum()) for s, r in self.rows.items()})
        self.amp = amp_dtype(self.device, cfg.amp)
        self.norm = self.data.normalizer(self.rows["train"], seed=cfg.seed)
        mlflow.log_params({**self.norm.as_params(), "device_used": str(self.device),
                           "amp_used": str(self.amp).replace("torch.", "") if self.amp else "fp32"})
        self.model = sc.train_model(cfg, 1, self.device)

    def fit(self, cfg: ClassificationConfig, on_epoch_end):
        train_y = self.y[self.rows["train"]]
        pos_weight = (np.array([cfg.pos_weight], dtype=np.float32) if cfg.pos_weight > 0 else
                      sc.prevalence_pos_weight(train_y) if cfg.imbalance == "weighted_loss" else None)
        sampler = (sc.balanced_sampler(train_y, num_samples=len(train_y), seed=cfg.seed)
                   if cfg.imbalance == "sampler" else None)
        mlflow.log_param("pos_weight_used", round(float(pos_weight[0]), 4) if pos_weight is not None else "none")
        train_loader, self.loaders = sc.loaders(self.data, self.rows, self.y, cfg, self.norm, sampler, cfg.seed)

        def evaluate(model):
            probs, loss = sc.predict_probs(model, self.loaders["val"], self.device, self.amp)
            met = sc.binary_metrics(self.y[self.rows["val"]], probs[:, 0], 0.5)
            nan_to_0 = {k: 0.0 if met[k] != met[k] else met[k] for k in ("roc_auc", "pr_auc", "f1")}
            return {"val_loss": loss, "val_roc_auc": nan_to_0["roc_auc"], "val_pr_auc": nan_to_0["pr_auc"],
                    "val_f1_at_0.5": nan_to_0["f1"], "val_selection": sc.selection_score(met["roc_auc"], loss)}

        return sc.fit_model(self.model, cfg, sc.bce_loss(pos_weight, self.device), self.device, self.amp,
                            train_loader, evaluate, on_epoch_end)

    def select(self, cfg: ClassificationConfig, fit) -> dict:
        raw = self.raw_predictions("val")
        self.scan_context, candidates = sc.choose_scan_context(raw, cfg.scan_context)
        log_metrics({f"val_pr_auc_scan_context_{c}": v for c, v in candidates.items()}, step=fit.epochs_run)
        mlflow.log_param("scan_context_used", self.scan_context)
        self.frames = {"val": sc.smooth_frame(raw, self.scan_context)}
        val = self.frames["val"]
        self.threshold, info = sc.select_threshold(val["y"], val["score"], cfg.threshold_goal, cfg.target_recall)
        log_metrics({"threshold": self.threshold}, step=fit.epochs_run)
        mlflow.log_dict({"threshold": self.threshold, **info}, eval_artifact("val", "threshold", "json"))
        return {"threshold": self.threshold, "scan_context": self.scan_context}

    def raw_predictions(self, split: str):
        probs, _ = sc.predict_probs(self.model, self.loaders[split], self.device, self.amp)
        return prediction_frame(self.manifest, self.rows[split], self.y, probs[:, 0])

    def predictions(self, split: str):
        """Scores of ``split``'s slices, smoothed along each scan with the chosen context, as the served model does."""
        return sc.smooth_frame(self.raw_predictions(split), self.scan_context)

    def report(self, cfg: ClassificationConfig, split: str, step: int) -> dict:
        frame = self.frames[split] if split in self.frames else self.predictions(split)
        self.frames[split] = frame.assign(pred=(frame["score"] >= self.threshold).astype(int))
        return evaluate_split(split, frame, self.threshold, cfg.n_boot, cfg.seed, cfg.threshold_goal, step)

    def degenerate_reasons(self, cfg: ClassificationConfig) -> list[str]:
        val = self.frames["val"]
        return score_reasons(val["y"], val["score"], self.threshold)

    def figures(self, cfg: ClassificationConfig, fit) -> None:
        split = "test" if "test" in self.frames else "val"
        dataset = sc.SliceDataset(self.data, self.rows[split], self.y, cfg.in_channels, self.norm)
        figures.log_gradcam(self.model, dataset, self.frames[split], cfg.gradcam_per_group, self.device, split,
                            cfg.model)

    def export(self, cfg: ClassificationConfig):
        config = {"task": self.spec.name, "model": cfg.model, "in_channels": cfg.in_channels,
                  "image_size": cfg.image_size, "classes": [LABEL], "thresholds": [self.threshold],
                  "norm_mean": self.norm.mean, "norm_std": self.norm.std, "threshold_goal": cfg.threshold_goal,
                  "scan_context": self.scan_context,
                  "split_digest": self.prep.split_digest}
        example = sc.example_scan(self.manifest, self.rows["test"])
        model = self.model.cpu().to(memory_format=torch.contiguous_format)
        return sc.log_slice_model(model, config, run_folder(), example,
                                  self.spec.registered_name if cfg.register else None,
                                  metadata={"task": self.spec.name, "threshold": self.threshold})

    def summary_lines(self, cfg: ClassificationConfig, result: TaskResult) -> list[str]:
        lines = [f"{self.prep.dataset} ({self.prep.source}), {cfg.model} {cfg.image_size}px, in_channels "
                 f"{cfg.in_channels}, scan context {self.scan_context}, threshold {self.threshold:.4f} "
                 f"({cfg.threshold_goal})"]
        for s in ("val", "test"):
            if f"{s}_patients" in result:
                shown = ", ".join(f"{k} {result.get(f'{s}_patient_{k}', float('nan')):.3f}"
                                  for k in ("accuracy", "precision", "recall", "f1", "roc_auc"))
                lines.append(f"{s} patients ({result[f'{s}_patients']}, {result[f'{s}_positive_patients']} "
                             f"positive): {shown}")
        return lines


def check_rows(rows: dict, y: np.ndarray, evaluate_test: bool) -> None:
    """UserError when the split cannot train / validate / test; a warning for a single-class val or test."""
    if len(rows["train"]) == 0 or len(rows["val"]) == 0:
        raise ParameterError("val_fraction", "the split has no train or no val patients; use more patients or "
                                             "other fractions")
    if evaluate_test and len(rows["test"]) == 0:
        raise ParameterError("test_fraction", "the split has no test patients; set evaluate_test=false or a "
                                              "test_fraction > 0")
    if y[rows["train"]].min() == y[rows["train"]].max():
        raise DataError("data", "the training split has a single class: nothing to learn")
    for s in ("val", "test"):
        if len(rows[s]) and y[rows[s]].min() == y[rows[s]].max():
            log.warning("the %s split has a single class: its threshold-free metrics are undefined", s)


def train_classification(cfg: ClassificationConfig, on_epoch_end=None) -> TaskResult:
    """Train, choose the threshold on val, evaluate (val, and test when ``cfg.evaluate_test``), log, register.

    ``objective`` = ``val_roc_auc`` (slice-level, of the best checkpoint); also ``threshold``, ``val_*``,
    ``test_*`` (when evaluated), ``model_uri`` / ``model_version`` (when logged / registered).
    """
    return run_task(ClassificationRecipe, cfg, on_epoch_end)
