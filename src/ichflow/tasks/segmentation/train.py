"""``train_segmentation``: PHE (perihematomal edema) segmentation as the hooks of the task recipe.

A ``cfg.engine`` network (smp), 1-channel or 2.5D, on native-resolution patches with foreground oversampling;
after every epoch the whole validation scans are predicted and the mean per-patient 3D Dice is monitored (best
checkpoint, early stopping, time budget). The threshold is chosen on validation (``threshold=auto``) or fixed;
the test split is evaluated once, at the end, with the restored best checkpoint and that threshold.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch

from ichflow.data.splits import subset
from ichflow.engine import figures
from ichflow.engine.augment import Normalizer
from ichflow.engine.budget import TimeBudget
from ichflow.engine.degenerate import mask_reasons
from ichflow.engine.device import amp_dtype as resolve_amp
from ichflow.engine.slices import neighbour_indices, slice_cache
from ichflow.engine.trainer import FitResult, Trainer, adamw, default_loss
from ichflow.errors import DataError
from ichflow.paths import CHECKPOINT, figure_artifact
from ichflow.prepare import prepare_data
from ichflow.tasks.common import make_loader, run_folder
from ichflow.tasks.recipe import TaskRecipe, TaskResult, run_task
from ichflow.tasks.segmentation.config import PRESETS, SegmentationConfig, parse_threshold, validate
from ichflow.tasks.segmentation.data import PatchDataset
from ichflow.tasks.segmentation.engines import ENGINES
from ichflow.tasks.segmentation.evaluate import THRESHOLDS, evaluate_split
from ichflow.tasks.segmentation.metrics import select_threshold, summarise
from ichflow.tasks.segmentation.model import build_loss, build_scheduler
from ichflow.tasks.segmentation.pyfunc import log_model
from ichflow.tasks.segmentation.report import log_split
from ichflow.tasks.spec import TASKS
from ichflow.tracking import log_params_once


def _units(cfg: SegmentationConfig) -> tuple:
    """(pixel mm, slice mm, detection min pixels): what summarise / log_split take after the threshold."""
    return cfg.pixel_spacing_mm, cfg.slice_thickness_mm, cfg.detect_min_pixels


class SegmentationRecipe(TaskRecipe):
    spec = TASKS["segmentation"]
    presets = PRESETS

    def validate(self, cfg: SegmentationConfig) -> None:
        validate(cfg)

    def run_name(self, cfg: SegmentationConfig) -> str:
        return f"segmentation-{cfg.arch}-{cfg.encoder}"

    def prepare(self, cfg: SegmentationConfig):
        prep = prepare_data(cfg)  # refused before its dataset is logged as this task's input
        if prep.dataset != "phe" or not prep.manifest["has_mask"].any():
            raise DataError(prep.data_root, "segmentation needs PHE edema masks (a PHE-SICH-CT-IDS layout with "
                                            f"label/ masks); this is a {prep.dataset} dataset without masks")
        return prep

    def setup(self, cfg: SegmentationConfig) -> None:
        splits = ("train", "val", "test") if cfg.evaluate_test else ("train", "val")  # tuning: test untouched
        self.parts = {name: subset(self.prep.manifest, self.prep.split, name) for name in splits}
        for name, part in self.parts.items():
            if part.empty:
                raise DataError(self.prep.data_root, f"the {name} split has no patients; adjust val/test_fraction")
        self.cache = {name: (slice_cache(part["image_path"].tolist()),
                             slice_cache(part["mask_path"].fillna("").tolist(), is_mask=True))
                      for name, part in self.parts.items()}
        if not any(np.count_nonzero(m) for m in self.cache["val"][1]):
            raise DataError(self.prep.data_root, "the validation split has no edema pixels: no checkpoint can be "
                                                 "chosen")
        self.amp = resolve_amp(self.device, cfg.amp)
        self.normalizer = Normalizer.fit(self.cache["train"][0], seed=cfg.seed)
        engine = ENGINES[cfg.engine]
        self.model_spec = engine.spec(cfg)
        model = engine.build(self.model_spec)
        if cfg.encoder_weights.lower() not in ("", "none"):
            mlflow.log_metric("encoder_tensors_loaded", engine.load_weights(model, cfg.encoder_weights))
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.loss_fn = build_loss(cfg.loss)
        log_params_once({**self.normalizer.as_params(), "device_resolved": str(self.device),
                         "amp_dtype": str(self.amp).replace("torch.", "") if self.amp else "fp32",
                         "model_parameters": sum(p.numel() for p in model.parameters()),
                         **{f"{s}_slices": len(self.parts.get(s, ())) for s in ("train", "val", "test")},
                         "threshold_grid": ",".join(f"{t:g}" for t in THRESHOLDS)})

    def fit(self, cfg: SegmentationConfig, on_epoch_end) -> FitResult:
        images, masks = self.cache["train"]
        dataset = PatchDataset(images, masks, *neighbour_indices(self.parts["train"]), cfg.in_channels,
                               cfg.patch_size, cfg.fg_fraction, cfg.aug_strength, self.normalizer,
                               length=cfg.steps_per_epoch * cfg.batch_size, seed=cfg.seed)
        loader = make_loader(dataset, cfg.batch_size, shuffle=False, num_workers=cfg.num_workers, seed=cfg.seed,
                             drop_last=True)
        optimizer = adamw(self.model, cfg.lr, cfg.weight_decay)
        scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.epochs * cfg.steps_per_epoch,
                                    cfg.warmup_fraction, cfg.lr)
        trainer = Trainer(self.model, optimizer, default_loss(self.loss_fn), self.device, amp_dtype=self.amp,
                          scheduler=scheduler)
        self.best = {"dice": -np.inf}
        return trainer.fit(loader, self._monitor(cfg), max_epochs=cfg.epochs, monitor="val_dice", mode="max",
                           patience=cfg.patience, checkpoint=run_folder() / CHECKPOINT,
                           steps_per_epoch=cfg.steps_per_epoch, on_epoch_end=on_epoch_end,
                           budget=TimeBudget(cfg.time_budget_min, cfg.epochs))

    def _monitor(self, cfg: SegmentationConfig):
        """The per-epoch validation; keeps the best epoch's counts and threshold (the Trainer its checkpoint)."""
        fixed = parse_threshold(cfg.threshold)

        def evaluate(model: torch.nn.Module) -> dict:
            stats = self._evaluate(cfg, "val", model)
            thr = fixed if fixed is not None else select_threshold(stats)[0]
            m, _ = summarise(stats, thr, *_units(cfg))
            if m["dice"] > self.best["dice"]:
                self.best = {"dice": m["dice"], "stats": stats, "threshold": thr}
            return {"val_loss": stats.loss, "val_dice": m["dice"], "val_dice_pooled": m["dice_pooled"],
                    "val_sensitivity_pooled": m["sensitivity_pooled"], "val_threshold": thr}
        return evaluate

    def _evaluate(self, cfg: SegmentationConfig, split: str, model: torch.nn.Module):
        images, masks = self.cache[split]
        return evaluate_split(model, self.parts[split], images, masks, self.normalizer, cfg.in_channels,
                              self.device, self.loss_fn, batch_size=cfg.eval_batch_size, amp_dtype=self.amp,
                              desc=split)

    def select(self, cfg: SegmentationConfig, fit: FitResult) -> dict:
        self.threshold = self.best["threshold"]
        return {"threshold": self.threshold}

    def report(self, cfg: SegmentationConfig, split: str, step: int) -> dict:
        stats = self.best["stats"] if split == "val" else self._evaluate(cfg, split, self.model)
        return log_split(split, stats, self.threshold, step, *_units(cfg))

    def degenerate_reasons(self, cfg: SegmentationConfig) -> list[str]:
        stats = self.best["stats"]
        t = int(np.argmin(np.abs(np.asarray(stats.thresholds) - self.threshold)))
        height, width = self.cache["val"][0].shape[1:]
        return mask_reasons(stats.slice_truth, stats.slice_pred[:, t], height * width)

    def figures(self, cfg: SegmentationConfig, fit: FitResult) -> None:
        for name, keys in (("loss_curves", ["train_loss", "val_loss"]),
                           ("val_dice_curves", ["val_dice", "val_dice_pooled"])):
            fig = figures.curves_figure(fit.history, keys, title=name.replace("_", " "))
            mlflow.log_figure(fig, figure_artifact("training", name))
            figures.close(fig)

    def export(self, cfg: SegmentationConfig):
        images = self.cache["val"][0]
        h, w = images.shape[1:]
        example = np.ascontiguousarray(images[:2, h // 2 - 32:h // 2 + 32, w // 2 - 32:w // 2 + 32])
        config = {"model": self.model_spec, "norm_mean": self.normalizer.mean, "norm_std": self.normalizer.std,
                  "threshold": self.threshold, "target": cfg.target, "pixel_spacing_mm": cfg.pixel_spacing_mm,
                  "slice_thickness_mm": cfg.slice_thickness_mm}
        name = self.spec.registered_name if cfg.register else None
        return log_model(run_folder() / CHECKPOINT, config, example, name)

    def summary_lines(self, cfg: SegmentationConfig, result: TaskResult) -> list[str]:
        how = "chosen on val" if parse_threshold(cfg.threshold) is None else "fixed"
        return [f"threshold {result.metrics['threshold']:g} ({how})"]


def train_segmentation(cfg: SegmentationConfig, on_epoch_end=None) -> TaskResult:
    """Train, select on validation, evaluate (test once), log and register; see :class:`TaskRecipe`."""
    return run_task(SegmentationRecipe, cfg, on_epoch_end)
