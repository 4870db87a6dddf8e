"""``train_segmentation``: PHE (perihematomal edema) segmentation as the hooks of the task recipe.

A ``cfg.engine`` network (smp), 1-channel or 2.5D, on native-resolution patches with foreground oversampling;
after every epoch the whole validation scans are predicted and the mean per-patient 3D Dice is monitored (best
checkpoint, early stopping, time budget). Then, on validation only: the selected model predicts the val scans
with test-time flips (``tta``), and the probability threshold and the minimum 3D component size
(``min_component_voxels``) are chosen together. The test split is evaluated once, at the end, with that
predictor; ``eval/inference_ablation.csv`` shows what TTA and post-processing changed on val and test.

``n_folds=K >= 2``: the train and val patients are dealt into K folds by patient (balanced by edema volume);
fold k trains on the others and selects its checkpoint on fold k, in a nested run ``fold-k``. Threshold and
component size are chosen on the out-of-fold predictions (each patient predicted by the one member that did
not train on it: the reported ``val_*``); the registered model is the ensemble (mean probability of the K
members, with TTA). The test split is scored for the ensemble and for every member alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
import torch

from ichflow.data.manifest import MASK_READERS
from ichflow.data.splits import subset
from ichflow.engine.augment import Normalizer
from ichflow.engine.budget import TimeBudget
from ichflow.engine.degenerate import mask_reasons
from ichflow.engine.device import amp_dtype as resolve_amp
from ichflow.engine.slices import neighbour_indices, slice_cache
from ichflow.engine.stats import finite
from ichflow.engine.trainer import FitResult, Trainer, adamw, default_loss
from ichflow.errors import DataError
from ichflow.metric_names import log_metrics
from ichflow.paths import CHECKPOINT, eval_artifact
from ichflow.prepare import prepare_data
from ichflow.tasks.common import make_loader, run_folder
from ichflow.tasks.recipe import TaskRecipe, TaskResult, run_task
from ichflow.tasks.segmentation.config import PRESETS, SegmentationConfig, parse_threshold, validate
from ichflow.tasks.segmentation.data import PatchDataset, ScanPredictor
from ichflow.tasks.segmentation.engines import ENGINES
from ichflow.tasks.segmentation.evaluate import THRESHOLDS, collect, evaluate_split, predict_split
from ichflow.tasks.segmentation.folds import patient_folds
from ichflow.tasks.segmentation.metrics import SplitStats, select_threshold, summarise
from ichflow.tasks.segmentation.model import build_loss, build_scheduler
from ichflow.tasks.segmentation.postprocess import (MIN_VOXEL_GRID, drop_small_components, parse_min_voxels,
                                                    select_postprocessing)
from ichflow.tasks.segmentation.pyfunc import log_model
from ichflow.tasks.segmentation.report import log_split
from ichflow.tasks.spec import TASKS
from ichflow.tracking import log_params_once


def _units(cfg: SegmentationConfig) -> tuple:
    """(pixel mm, slice mm, detection min pixels): what summarise / log_split take after the threshold."""
    return cfg.pixel_spacing_mm, cfg.slice_thickness_mm, cfg.detect_min_pixels


@dataclass
class Member:
    """One trained network: where it was validated, its best checkpoint and that epoch's plain val counts."""

    name: str
    model: torch.nn.Module
    val_rows: np.ndarray
    fit: FitResult
    val_stats: SplitStats
    val_scans: list | None = None   # that epoch's val predictions, kept when they are the final ones (no TTA)


def _take(arr, rows: np.ndarray):
    """``arr[rows]``: a view of the memory-mapped cache when the rows are one run, else a copy."""
    if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return arr[rows[0]:rows[0] + len(rows)]
    return np.asarray(arr[rows])


def _postprocessed(scans: list, threshold: float, min_voxels: int) -> list:
    return [(pid, index, slices, truth, drop_small_components(probs, threshold, min_voxels), loss)
            for pid, index, slices, truth, probs, loss in scans]


class SegmentationRecipe(TaskRecipe):
    spec = TASKS["segmentation"]
    presets = PRESETS

    def validate(self, cfg: SegmentationConfig) -> None:
        validate(cfg)

    def run_name(self, cfg: SegmentationConfig) -> str:
        if cfg.engine == "nnunet":
            return "segmentation-nnunet-2d"
        folds = f"-{cfg.n_folds}fold" if cfg.n_folds > 1 else ""
        return f"segmentation-{cfg.arch}-{cfg.encoder}{folds}"

    def prepare(self, cfg: SegmentationConfig):
        prep = prepare_data(cfg)  # refused before its dataset is logged as this task's input
        if prep.dataset not in MASK_READERS or not prep.manifest["has_mask"].any():
            raise DataError(prep.data_root, "segmentation needs PHE edema masks (a PHE-SICH-CT-IDS layout with "
                                            f"label/ masks); this is a {prep.dataset} dataset without masks")
        return prep

    # ------------------------------------------------------------------------------------------ data, model
    def setup(self, cfg: SegmentationConfig) -> None:
        parts = {name: subset(self.prep.manifest, self.prep.split, name)
                 for name in (("train", "val", "test") if cfg.evaluate_test else ("train", "val"))}
        for name, part in parts.items():
            if part.empty:
                raise DataError(self.prep.data_root, f"the {name} split has no patients; adjust val/test_fraction")
        # the development pool: train rows first, then val rows; folds and members index into it
        self.pool = pd.concat([parts["train"], parts["val"]], ignore_index=True)
        self.cache = {"pool": self._cache(self.pool)}
        if "test" in parts:
            self.test_part = parts["test"].reset_index(drop=True)
            self.cache["test"] = self._cache(self.test_part)
        self.plans = self._plans(cfg, len(parts["train"]))
        for name, train_rows, val_rows in self.plans:
            if not np.count_nonzero(_take(self.cache["pool"][1], val_rows)):
                raise DataError(self.prep.data_root, f"the validation patients of {name} have no edema pixels: "
                                                     "no checkpoint can be chosen")
        self.amp = resolve_amp(self.device, cfg.amp)
        training = np.unique(np.concatenate([rows for _, rows, _ in self.plans]))
        self.normalizer = Normalizer.fit(_take(self.cache["pool"][0], training), seed=cfg.seed)
        self.model_spec = ENGINES[cfg.engine].spec(cfg)
        self.loss_fn = build_loss(cfg.loss)
        log_params_once({**self.normalizer.as_params(), "device_resolved": str(self.device),
                         "amp_dtype": str(self.amp).replace("torch.", "") if self.amp else "fp32",
                         **({} if cfg.engine == "nnunet" else {"model_parameters": sum(
                             p.numel() for p in ENGINES[cfg.engine].build(self.model_spec).parameters())}),
                         **{f"{s}_slices": len(parts.get(s, ())) for s in ("train", "val", "test")},
                         "threshold_grid": ",".join(f"{t:g}" for t in THRESHOLDS),
                         "min_component_voxels_grid": ",".join(map(str, MIN_VOXEL_GRID))})

    @staticmethod
    def _cache(part: pd.DataFrame) -> tuple:
        return (slice_cache(part["image_path"].tolist()),
                slice_cache(part["mask_path"].fillna("").tolist(), is_mask=True))

    def _plans(self, cfg: SegmentationConfig, n_train: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(name, training rows, validation rows) of the pool per member: the split itself, or K folds."""
        rows = np.arange(len(self.pool))
        if cfg.n_folds == 1:
            return [("the val split", rows[:n_train], rows[n_train:])]
        masks = self.cache["pool"][1]
        fold_of = patient_folds(self.pool, [np.count_nonzero(masks[i]) for i in rows], cfg.n_folds, cfg.split_seed)
        fold = self.pool["patient_id"].astype(str).map(fold_of).to_numpy()
        mlflow.log_text(fold_of.rename_axis("patient_id").reset_index().to_csv(index=False),
                        eval_artifact("cv", "patient_folds"))
        return [(f"fold-{k}", rows[fold != k], rows[fold == k]) for k in range(cfg.n_folds)]

    # ------------------------------------------------------------------------------------------ training
    def fit(self, cfg: SegmentationConfig, on_epoch_end) -> FitResult:
        """Every member; ``on_epoch_end(member * epochs + epoch, val metrics)``."""
        self.members = []
        for k, (name, train_rows, val_rows) in enumerate(self.plans):
            hook = None if on_epoch_end is None else (
                lambda epoch, metrics, offset=k * cfg.epochs: on_epoch_end(offset + epoch, metrics))
            if cfg.engine == "nnunet":
                self.members.append(self._train_nnunet(cfg, name, train_rows, val_rows, hook))
                continue
            if cfg.n_folds == 1:
                self.members.append(self._train_member(cfg, name, train_rows, val_rows, hook))
                continue
            with mlflow.start_run(run_name=name, nested=True,
                                  tags={"ichflow.task": "segmentation", "ichflow.fold": str(k)}):
                mlflow.log_params({"fold": k, "train_patients": self.pool.loc[train_rows, "patient_id"].nunique(),
                                   "val_patients": self.pool.loc[val_rows, "patient_id"].nunique()})
                self.members.append(self._train_member(cfg, name, train_rows, val_rows, hook))
        fits = [m.fit for m in self.members]
        best = fits[int(np.argmax([f.best_score for f in fits]))]
        return FitResult(best_epoch=best.best_epoch, best_score=best.best_score,
                         epochs_run=max(f.epochs_run for f in fits), history=best.history,
                         train_seconds=sum(f.train_seconds for f in fits),
                         stopped_early=any(f.stopped_early for f in fits),
                         stopped_by_time_budget=any(f.stopped_by_time_budget for f in fits), checkpoint=best.checkpoint)

    def _train_member(self, cfg: SegmentationConfig, name: str, train_rows, val_rows, hook) -> Member:
        images, masks = (_take(a, train_rows) for a in self.cache["pool"])
        train_part = self.pool.loc[train_rows].reset_index(drop=True)
        dataset = PatchDataset(images, masks, *neighbour_indices(train_part), cfg.in_channels, cfg.patch_size,
                               cfg.fg_fraction, cfg.aug_strength, self.normalizer,
                               length=cfg.steps_per_epoch * cfg.batch_size, seed=cfg.seed)
        loader = make_loader(dataset, cfg.batch_size, shuffle=False, num_workers=cfg.num_workers, seed=cfg.seed,
                             drop_last=True)
        engine = ENGINES[cfg.engine]
        model = engine.build(self.model_spec)
        if cfg.encoder_weights.lower() not in ("", "none"):
            log_metrics({"encoder_tensors_loaded": engine.load_weights(model, cfg.encoder_weights)})
        model = model.to(self.device).to(memory_format=torch.channels_last)
        optimizer = adamw(model, cfg.lr, cfg.weight_decay)
        scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.epochs * cfg.steps_per_epoch,
                                    cfg.warmup_fraction, cfg.lr)
        trainer = Trainer(model, optimizer, default_loss(self.loss_fn), self.device, amp_dtype=self.amp,
                          scheduler=scheduler)
        best: dict = {"dice": -np.inf}
        fit = trainer.fit(loader, self._monitor(cfg, val_rows, best), max_epochs=cfg.epochs, monitor="val_dice",
                          mode="max", patience=cfg.patience, checkpoint=run_folder() / CHECKPOINT,
                          steps_per_epoch=cfg.steps_per_epoch, on_epoch_end=hook,
                          budget=TimeBudget(cfg.time_budget_min, cfg.epochs))
        return Member(name, model, val_rows, fit, best["stats"], best["scans"])

    def _train_nnunet(self, cfg: SegmentationConfig, name: str, train_rows, val_rows, hook) -> Member:
        """nnU-Net's own pipeline on the same train/val patients; its predictor scores val once, at the end."""
        from ichflow.tasks.segmentation.nnunet.engine import train_nnunet   # nnunetv2 imports take seconds

        parts = {"train": self.pool.loc[train_rows].reset_index(drop=True),
                 "val": self.pool.loc[val_rows].reset_index(drop=True)}
        network = train_nnunet(cfg, parts, run_folder() / "nnunet", self.device, on_epoch=hook)
        scans = list(predict_split(network, *self._pool_part(val_rows), loss_fn=self.loss_fn, desc="val nnU-Net"))
        return Member(name, network, val_rows, network.fit_result, collect(scans, THRESHOLDS), scans)

    def _monitor(self, cfg: SegmentationConfig, val_rows, best: dict):
        """The per-epoch validation (one plain pass, no TTA); keeps the best epoch's counts in ``best``."""
        fixed = parse_threshold(cfg.threshold)

        def evaluate(model: torch.nn.Module) -> dict:
            scans = list(predict_split(self._predictor(cfg, [model], tta="none"), *self._pool_part(val_rows),
                                       loss_fn=self.loss_fn, desc="val"))
            stats = collect(scans, THRESHOLDS)
            thr = fixed if fixed is not None else select_threshold(stats)[0]
            m, _ = summarise(stats, thr, *_units(cfg))
            if m["dice"] > best["dice"]:   # without TTA the selection reuses these scans: no second val pass
                best.update(dice=m["dice"], stats=stats, scans=scans if cfg.tta == "none" else None)
            return {"val_loss": stats.loss, "val_dice": m["dice"], "val_dice_pooled": m["dice_pooled"],
                    "val_sensitivity_pooled": m["sensitivity_pooled"], "val_threshold": thr}
        return evaluate

    def _pool_part(self, rows) -> tuple:
        """(part, images, masks) of pool rows, aligned for :func:`evaluate_split`."""
        return (self.pool.loc[rows].reset_index(drop=True), *(_take(a, rows) for a in self.cache["pool"]))

    def _predictor(self, cfg: SegmentationConfig, models: list, tta: str, threshold: float = 0.5,
                   min_voxels: int = 0) -> ScanPredictor:
        return ScanPredictor(models, self.normalizer, cfg.in_channels, self.device, cfg.eval_batch_size, self.amp,
                             tta, threshold, min_voxels)

    # ------------------------------------------------------------------------------------------ selection
    def select(self, cfg: SegmentationConfig, fit: FitResult) -> dict:
        """Threshold and minimum component size, together, on the val (or out-of-fold) scans with TTA."""
        self.val_scans = [scan for m in self.members for scan in (
            m.val_scans if m.val_scans is not None else
            predict_split(self._predictor(cfg, [m.model], cfg.tta), *self._pool_part(m.val_rows),
                          loss_fn=self.loss_fn, desc=f"val {m.name}"))]
        self.threshold, self.min_voxels, grid = select_postprocessing(
            [(truth, probs) for _, _, _, truth, probs, _ in self.val_scans], THRESHOLDS,
            fixed_threshold=parse_threshold(cfg.threshold), fixed_min_voxels=parse_min_voxels(cfg.min_component_voxels))
        sweep = pd.DataFrame(grid, index=pd.Index(THRESHOLDS, name="threshold"),
                             columns=[f"min_voxels_{s}" for s in MIN_VOXEL_GRID]).reset_index()
        mlflow.log_text(sweep.to_csv(index=False), eval_artifact("val", "postprocessing_sweep"))
        self.val_stats = collect(_postprocessed(self.val_scans, self.threshold, self.min_voxels), THRESHOLDS)
        chosen = {"min_component_voxels": float(self.min_voxels), "ensemble_members": float(len(self.members))}
        log_metrics(chosen)
        return {"threshold": self.threshold, **chosen}

    def final_predictor(self, cfg: SegmentationConfig, models=None, min_voxels: int | None = None):
        """The registered model's prediction: all members (or ``models``), TTA, post-processing (at the chosen
        size, or ``min_voxels``: 0 gives the raw probabilities)."""
        min_voxels = self.min_voxels if min_voxels is None else min_voxels
        if cfg.engine == "nnunet":   # nnU-Net's predictor, with its own mirroring TTA
            return dataclasses.replace(self.members[0].model, threshold=self.threshold, min_voxels=min_voxels)
        return self._predictor(cfg, models or [m.model for m in self.members], cfg.tta, self.threshold, min_voxels)

    # ------------------------------------------------------------------------------------------ reports
    def report(self, cfg: SegmentationConfig, split: str, step: int) -> dict:
        if split == "val":
            return log_split("val", self.val_stats, self.threshold, step, *_units(cfg))
        images, masks = self.cache["test"]
        raw = list(predict_split(self.final_predictor(cfg, min_voxels=0), self.test_part, images, masks, self.loss_fn,
                                 desc="test"))   # before post-processing: the ablation's TTA-only row
        out = log_split("test", collect(_postprocessed(raw, self.threshold, self.min_voxels), THRESHOLDS),
                        self.threshold, step, *_units(cfg))
        out.update(self._ablation(cfg, raw, out))
        return out

    def _ablation(self, cfg: SegmentationConfig, test_raw: list, test_final: dict) -> dict:
        """What TTA, post-processing and the ensemble changed: mean per-patient Dice on val and test of each
        inference variant, all at the selected threshold (``eval/inference_ablation.csv``)."""
        t, images, masks = self.threshold, *self.cache["test"]

        def dice(stats) -> float:
            return summarise(stats, t, *_units(cfg))[0]["dice"]

        single, tta = len(self.members) == 1, "nnU-Net mirroring" if cfg.engine == "nnunet" else f"TTA {cfg.tta}"
        rows = [] if cfg.engine == "nnunet" else [
            {"variant": "selected model, no TTA, no post-processing",
             "val_dice": dice(self.members[0].val_stats) if single else float("nan"),
             "test_dice": dice(evaluate_split(self._predictor(cfg, [m.model for m in self.members], "none"),
                                              self.test_part, images, masks, desc="test plain"))}]
        rows += [{"variant": tta, "val_dice": dice(collect(self.val_scans, THRESHOLDS)),
                  "test_dice": dice(collect(test_raw, THRESHOLDS))},
                 {"variant": f"{tta} + components >= {self.min_voxels} voxels (registered)",
                  "val_dice": dice(self.val_stats), "test_dice": test_final["test_dice"]}]
        if not single:
            for m in self.members:
                stats = evaluate_split(self.final_predictor(cfg, [m.model]), self.test_part, images, masks,
                                       desc=f"test {m.name}")
                rows.append({"variant": f"{m.name} alone (TTA + post-processing)", "val_dice": float("nan"),
                             "test_dice": dice(stats)})
        table = pd.DataFrame(rows)
        mlflow.log_text(table.to_csv(index=False), eval_artifact("inference", "ablation"))
        # not test_*: those are the registered model's metrics (what `evaluate` reproduces and promotion reads)
        out = {"ablation/test_dice_tta": rows[-2]["test_dice"]}
        if cfg.engine != "nnunet":
            out["ablation/test_dice_plain"] = rows[0]["test_dice"]
        if not single:
            member_dice = [r["test_dice"] for r in rows[3:]]
            out.update({"ablation/test_dice_member_mean": float(np.mean(member_dice)),
                        "ablation/test_dice_member_best": float(np.max(member_dice))})
        log_metrics(finite(out))
        return out

    def degenerate_reasons(self, cfg: SegmentationConfig) -> list[str]:
        stats = self.val_stats
        t = stats.threshold_index(self.threshold)
        height, width = self.cache["pool"][0].shape[1:]
        return mask_reasons(stats.slice_truth, stats.slice_pred[:, t], height * width)

    def export(self, cfg: SegmentationConfig):
        images = self.cache["pool"][0]
        h, w = images.shape[1:]
        example = np.ascontiguousarray(images[:2, h // 2 - 32:h // 2 + 32, w // 2 - 32:w // 2 + 32])
        config = {"model": self.model_spec, "norm_mean": self.normalizer.mean, "norm_std": self.normalizer.std,
                  "threshold": self.threshold, "tta": cfg.tta, "min_component_voxels": self.min_voxels,
                  "members": [m.name for m in self.members], "target": cfg.target,
                  "pixel_spacing_mm": cfg.pixel_spacing_mm, "slice_thickness_mm": cfg.slice_thickness_mm}
        name = self.spec.registered_name if cfg.register else None
        if cfg.engine == "nnunet":
            from ichflow.tasks.segmentation.nnunet.pyfunc import log_model as log_nnunet

            config = {k: v for k, v in config.items() if k not in ("model", "norm_mean", "norm_std", "tta")}
            return log_nnunet(self.members[0].model, config, example, name)
        return log_model([m.fit.checkpoint for m in self.members], config, example, name)

    def summary_lines(self, cfg: SegmentationConfig, result: TaskResult) -> list[str]:
        how = "chosen on val" if parse_threshold(cfg.threshold) is None else "fixed"
        size = "chosen on val" if parse_min_voxels(cfg.min_component_voxels) is None else "fixed"
        tta = "nnU-Net mirroring" if cfg.engine == "nnunet" else f"TTA {cfg.tta}"
        lines = [f"threshold {result.metrics['threshold']:g} ({how}), components >= {self.min_voxels} voxels "
                 f"({size}), {tta}"]
        if cfg.n_folds > 1:
            lines.append(f"ensemble of {cfg.n_folds} patient folds; val_* are out-of-fold")
        return lines


def train_segmentation(cfg: SegmentationConfig, on_epoch_end=None) -> TaskResult:
    """Train, select on validation, evaluate (test once), log and register; see :class:`TaskRecipe`."""
    return run_task(SegmentationRecipe, cfg, on_epoch_end)
