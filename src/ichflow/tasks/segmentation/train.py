"""``train_segmentation``: PHE (perihematomal edema) segmentation, trained and evaluated end to end in MLflow.

Recipe: smp model (Unet/UnetPlusPlus/FPN/Segformer), 1-channel or 2.5D input, random native-resolution
patches with foreground oversampling, albumentations scaled by ``aug_strength``, Dice+BCE (configurable),
AdamW with warm-up + cosine (or one-cycle). After every epoch the whole validation scans are predicted and
the mean per-patient 3D Dice is the monitored metric (best checkpoint, early stopping). The probability
threshold is chosen on validation (``threshold=auto``) or fixed; the test split is evaluated once, at the
end, with the selected checkpoint and threshold.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass

import mlflow
import numpy as np
import torch

from ichflow.data.splits import subset
from ichflow.engine import figures
from ichflow.engine.augment import Normalizer
from ichflow.engine.device import amp_dtype as resolve_amp
from ichflow.engine.device import resolve_device, seed_everything
from ichflow.engine.modelio import log_pyfunc
from ichflow.engine.slices import neighbour_indices, slice_cache
from ichflow.engine.trainer import FitResult, Trainer, adamw, default_loss
from ichflow.errors import DataError
from ichflow.prepare import log_prepared, prepare_data
from ichflow.tasks.common import TrainConfig, apply_preset, log_config, make_loader, run_folder
from ichflow.tasks.segmentation import evaluate as ev
from ichflow.tasks.segmentation.data import PAD_MULTIPLE, PatchDataset
from ichflow.tasks.segmentation.metrics import finite, select_threshold, summarise
from ichflow.tasks.segmentation.model import (ARCHS, LOSSES, SCHEDULERS, build_loss, build_model, build_scheduler,
                                              load_encoder_weights, model_spec)
from ichflow.tasks.segmentation.pyfunc import SegmentationModel, signature
from ichflow.tracking import log_params_once, task_run

log = logging.getLogger(__name__)

REGISTERED_NAME = "ich-segmentation"
TARGETS = ("phe",)


@dataclass
class SegmentationConfig(TrainConfig):
    """PHE segmentation: data selection, model, patch sampling, optimisation and evaluation knobs."""

    target: str = "phe"               # what is segmented: the perihematomal-edema masks
    arch: str = "Unet"                # Unet | UnetPlusPlus | FPN | Segformer (smp)
    encoder: str = "resnet18"         # any smp encoder name (resnet34, efficientnet-b0, ...)
    encoder_weights: str = "none"     # none, or a local weights file (nothing is downloaded)
    decoder_channels: str = "128,64,32,16,16"  # lighter than smp's default (256..16): ~2x faster on CPU
    patch_size: int = 128             # training patch side in pixels, native resolution (multiple of 32)
    fg_fraction: float = 0.5          # share of patches centred on an edema pixel
    steps_per_epoch: int = 40         # optimiser steps between two validations
    epochs: int = 8
    patience: int = 4
    lr: float = 2e-3
    loss: str = "dice+bce"            # '+'-joined: dice, bce, focal, tversky, jaccard, lovasz
    scheduler: str = "cosine"         # cosine (linear warm-up, then cosine) | onecycle | constant
    warmup_fraction: float = 0.05
    threshold: str = "auto"           # probability threshold: auto (best mean patient Dice on val) or a number
    eval_batch_size: int = 4
    pixel_spacing_mm: float = 0.508   # in-plane pixel size for volumes (PHE-SICH-CT-IDS)
    slice_thickness_mm: float = 5.0
    detect_min_pixels: int = 1        # slice-level detection: predicted positive with >= this many pixels
    time_budget_min: float = 0.0      # stop after the epoch when another one would exceed this (0 = no limit)


# Named recipes: ``-P preset=phe`` sets every field still at its default.
PRESETS = {
    # The real PHE-SICH-CT-IDS data on a 2-core CPU in ~25 min (see reports/segmentation_phe.md);
    # on a GPU raise epochs/steps_per_epoch (e.g. -P epochs=40 -P patience=10).
    "phe": {"dataset": "phe", "steps_per_epoch": 400, "epochs": 4, "patience": 3, "time_budget_min": 19.0},
}


def _bad(param: str, problem: str) -> DataError:
    return DataError(f"parameter {param}", problem)


def parse_threshold(text) -> float | None:
    """None for 'auto', else a number in (0, 1) on the evaluation grid."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise _bad("threshold", f"expected 'auto' or a number in (0, 1), got {text!r}") from None
    grid = np.asarray(ev.THRESHOLDS)
    if not np.isclose(grid, value).any():
        raise _bad("threshold", f"{value} is not on the evaluation grid {list(ev.THRESHOLDS)}")
    return float(grid[np.isclose(grid, value)][0])


def validate(cfg: SegmentationConfig) -> None:
    """Reject bad parameters before anything is read or trained, naming the parameter."""
    if cfg.target not in TARGETS:
        raise _bad("target", f"must be one of {TARGETS}, got {cfg.target!r}")
    if cfg.arch.lower() not in ARCHS:
        raise _bad("arch", f"must be one of {sorted(ARCHS.values())}, got {cfg.arch!r}")
    if cfg.in_channels not in (1, 3):
        raise _bad("in_channels", f"must be 1 or 3 (2.5D), got {cfg.in_channels}")
    if cfg.patch_size < PAD_MULTIPLE or cfg.patch_size % PAD_MULTIPLE:
        raise _bad("patch_size", f"must be a positive multiple of {PAD_MULTIPLE}, got {cfg.patch_size}")
    if not 0.0 <= cfg.fg_fraction <= 1.0:
        raise _bad("fg_fraction", f"must be in [0, 1], got {cfg.fg_fraction}")
    if not 0.0 <= cfg.aug_strength <= 1.0:
        raise _bad("aug_strength", f"must be in [0, 1], got {cfg.aug_strength}")
    for name in ("epochs", "steps_per_epoch", "batch_size", "eval_batch_size", "patience"):
        if getattr(cfg, name) < 1:
            raise _bad(name, f"must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise _bad("lr", f"must be > 0, got {cfg.lr}")
    if cfg.scheduler not in SCHEDULERS:
        raise _bad("scheduler", f"must be one of {SCHEDULERS}, got {cfg.scheduler!r}")
    names = [n.strip().lower() for n in cfg.loss.split("+") if n.strip()]
    if not names or any(n not in LOSSES for n in names):
        raise _bad("loss", f"must be '+'-joined names from {LOSSES}, got {cfg.loss!r}")
    if cfg.encoder_weights.lower() == "imagenet":
        raise _bad("encoder_weights", "no downloads here: pass 'none' or the path of a local weights file")
    try:
        build_model(model_spec(cfg.arch, cfg.encoder, cfg.in_channels, cfg.decoder_channels))
    except ValueError as exc:
        raise _bad("arch/encoder/decoder_channels", str(exc)) from None
    parse_threshold(cfg.threshold)


def train_segmentation(cfg: SegmentationConfig, on_epoch_end=None) -> dict:
    """Train, select on validation, evaluate (test once), log everything; returns the metrics dict.

    ``on_epoch_end(epoch, metrics)`` is passed to the Trainer (Optuna reports/prunes there). With
    ``cfg.evaluate_test=False`` (tuning trials) the test split is not touched and no model is logged.
    """
    cfg = apply_preset(cfg, PRESETS)
    validate(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    amp = resolve_amp(device, cfg.amp)
    t_start = time.perf_counter()
    with task_run("segmentation", run_name=f"segmentation-{cfg.arch}-{cfg.encoder}",
                  tags={"ichflow.target": cfg.target}) as run:
        prep = prepare_data(cfg)
        if prep.dataset != "phe" or not prep.manifest["has_mask"].any():
            raise DataError(prep.data_root, "segmentation needs PHE edema masks (a PHE-SICH-CT-IDS layout with "
                                            f"label/ masks); this is a {prep.dataset} dataset without masks")
        log_config(cfg)
        _log_preset_values(cfg)
        log_prepared(prep, target="mask_path")
        parts = {name: subset(prep.manifest, prep.split, name) for name in ("train", "val", "test")}
        for name in ("train", "val") + (("test",) if cfg.evaluate_test else ()):
            if parts[name].empty:
                raise DataError(prep.data_root, f"the {name} split has no patients; adjust val/test_fraction")
        cache = {name: (slice_cache(part["image_path"].tolist()),
                        slice_cache(part["mask_path"].fillna("").tolist(), is_mask=True))
                 for name, part in parts.items() if not part.empty}
        if not any(np.count_nonzero(m) for m in cache["val"][1]):
            raise DataError(prep.data_root, "the validation split has no edema pixels: no checkpoint can be chosen")
        train_images, train_masks = cache["train"]
        normalizer = Normalizer.fit(train_images, seed=cfg.seed)
        spec = model_spec(cfg.arch, cfg.encoder, cfg.in_channels, cfg.decoder_channels)
        model = build_model(spec)
        if cfg.encoder_weights.lower() not in ("", "none"):
            n_loaded = load_encoder_weights(model, cfg.encoder_weights)
            mlflow.log_metric("encoder_tensors_loaded", n_loaded)
        model = model.to(device).to(memory_format=torch.channels_last)
        log_params_once({**normalizer.as_params(), "device_resolved": str(device),
                         "amp_dtype": str(amp).replace("torch.", "") if amp else "fp32",
                         "model_parameters": sum(p.numel() for p in model.parameters()),
                         "train_slices": len(parts["train"]), "val_slices": len(parts["val"]),
                         "test_slices": len(parts["test"]) if cfg.evaluate_test else 0,
                         "threshold_grid": ",".join(f"{t:g}" for t in ev.THRESHOLDS)})

        prev_idx, next_idx = neighbour_indices(parts["train"])
        dataset = PatchDataset(train_images, train_masks, prev_idx, next_idx, cfg.in_channels, cfg.patch_size,
                               cfg.fg_fraction, cfg.aug_strength, normalizer,
                               length=cfg.steps_per_epoch * cfg.batch_size, seed=cfg.seed)
        loader = make_loader(dataset, cfg.batch_size, shuffle=False, num_workers=cfg.num_workers, seed=cfg.seed,
                             drop_last=True)
        loss_fn = build_loss(cfg.loss)
        optimizer = adamw(model, cfg.lr, cfg.weight_decay)
        scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.epochs * cfg.steps_per_epoch,
                                    cfg.warmup_fraction, cfg.lr)
        fixed_threshold = parse_threshold(cfg.threshold)
        best: dict = {"dice": -np.inf}
        val_images, val_masks = cache["val"]

        def evaluate(m: torch.nn.Module) -> dict:
            stats = ev.evaluate_split(m, parts["val"], val_images, val_masks, normalizer, cfg.in_channels, device,
                                      loss_fn, batch_size=cfg.eval_batch_size, amp_dtype=amp, keep_examples=True,
                                      desc="val")
            thr = fixed_threshold if fixed_threshold is not None else select_threshold(stats)[0]
            metrics, _ = summarise(stats, thr, cfg.pixel_spacing_mm, cfg.slice_thickness_mm, cfg.detect_min_pixels)
            if metrics["dice"] > best["dice"]:  # the Trainer keeps this epoch's checkpoint too
                best.update(dice=metrics["dice"], stats=stats, threshold=thr)
            return {"val_loss": stats.loss, "val_dice": metrics["dice"], "val_dice_pooled": metrics["dice_pooled"],
                    "val_sensitivity_pooled": metrics["sensitivity_pooled"], "val_threshold": thr}

        trainer = Trainer(model, optimizer, default_loss(loss_fn), device, amp_dtype=amp, scheduler=scheduler)
        checkpoint = run_folder() / "best.pt"
        budget = _TimeBudget(cfg.time_budget_min, cfg.epochs, on_epoch_end)
        try:
            fit = trainer.fit(loader, evaluate, max_epochs=cfg.epochs, monitor="val_dice", mode="max",
                              patience=cfg.patience, checkpoint=checkpoint, steps_per_epoch=cfg.steps_per_epoch,
                              on_epoch_end=budget)
        except _BudgetReached:  # the Trainer stops on exceptions from the hook: restore the best checkpoint here
            model.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=True))
            fit = budget.result(best_epoch=int(np.nanargmax([h["val_dice"] for h in budget.history])),
                                best_score=best["dice"], checkpoint=str(checkpoint))
            print(f"[segmentation] time budget of {cfg.time_budget_min:g} min reached after {fit.epochs_run} epochs")
        results_stopped_by_budget = budget.reached
        threshold = best["threshold"]
        results: dict = {"run_id": run.info.run_id, "objective_name": "val_dice", "best_epoch": fit.best_epoch,
                         "epochs_run": fit.epochs_run, "train_seconds": fit.train_seconds,
                         "stopped_early": float(fit.stopped_early), "threshold": threshold,
                         "stopped_by_time_budget": float(results_stopped_by_budget)}
        step = fit.epochs_run  # final values after the per-epoch ones, so the run shows the selected model
        val_metrics, val_table = summarise(best["stats"], threshold, cfg.pixel_spacing_mm, cfg.slice_thickness_mm,
                                           cfg.detect_min_pixels)
        _, sweep = select_threshold(best["stats"])
        results.update({f"val_{k}": v for k, v in val_metrics.items()})
        results["objective"] = val_metrics["dice"]
        _log_split("val", val_metrics, val_table, best["stats"], threshold, step)
        mlflow.log_text(ev.threshold_sweep(best["stats"], sweep).to_csv(index=False), "eval/val_threshold_sweep.csv")

        if cfg.evaluate_test:
            test_images, test_masks = cache["test"]
            stats = ev.evaluate_split(model, parts["test"], test_images, test_masks, normalizer, cfg.in_channels,
                                      device, loss_fn, batch_size=cfg.eval_batch_size, amp_dtype=amp,
                                      keep_examples=True, desc="test")
            test_metrics, test_table = summarise(stats, threshold, cfg.pixel_spacing_mm, cfg.slice_thickness_mm,
                                                 cfg.detect_min_pixels)
            results.update({f"test_{k}": v for k, v in test_metrics.items()})
            _log_split("test", test_metrics, test_table, stats, threshold, step)

        for name, keys in (("loss_curves", ["train_loss", "val_loss"]),
                           ("val_dice_curves", ["val_dice", "val_dice_pooled"])):
            fig = figures.curves_figure(fit.history, keys, title=name.replace("_", " "))
            mlflow.log_figure(fig, f"figures/{name}.png")
            figures.close(fig)

        if cfg.evaluate_test:
            info = _log_model(model, spec, normalizer, threshold, cfg, val_images)
            results["model_uri"] = info.model_uri
            if info.registered_model_version is not None:
                results["model_version"] = int(info.registered_model_version)
        results["total_seconds"] = time.perf_counter() - t_start
        mlflow.log_metrics(finite({k: results[k] for k in ("best_epoch", "epochs_run", "train_seconds",
                                                           "stopped_early", "stopped_by_time_budget",
                                                           "total_seconds", "objective")}))
    _print_summary(results)
    return results


class _BudgetReached(Exception):
    pass


class _TimeBudget:
    """Epoch-end hook: calls the user's hook, keeps the history, stops before an epoch would overrun."""

    def __init__(self, minutes: float, max_epochs: int, inner=None):
        self.limit = minutes * 60.0
        self.max_epochs = max_epochs
        self.inner = inner
        self.history: list[dict] = []
        self.reached = False
        self.t0 = self.last = time.perf_counter()

    def __call__(self, epoch: int, metrics: dict) -> None:
        self.history.append(dict(metrics))
        if self.inner is not None:
            self.inner(epoch, metrics)
        now = time.perf_counter()
        epoch_seconds, self.last = now - self.last, now
        if self.limit > 0 and epoch < self.max_epochs - 1 and (now - self.t0) + epoch_seconds > self.limit:
            self.reached = True
            raise _BudgetReached

    def result(self, best_epoch: int, best_score: float, checkpoint: str) -> FitResult:
        return FitResult(best_epoch=best_epoch, best_score=best_score, epochs_run=len(self.history),
                         history=self.history, train_seconds=time.perf_counter() - self.t0, stopped_early=True,
                         checkpoint=checkpoint)


def _log_preset_values(cfg: SegmentationConfig) -> None:
    """A preset changes fields after ``mlflow run`` logged the -P values: record what was really used."""
    if not cfg.preset:
        return
    params = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    values = dataclasses.asdict(cfg)
    log_params_once({f"preset.{k}": values[k] for k in PRESETS[cfg.preset] if str(params.get(k)) != str(values[k])})


def _log_split(name: str, metrics: dict, table, stats, threshold: float, step: int) -> None:
    mlflow.log_metrics(finite({f"{name}_{k}": v for k, v in metrics.items()}), step=step)
    mlflow.log_text(table.to_csv(index=False), f"eval/{name}_per_patient.csv")
    mlflow.log_dict({k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()},
                    f"eval/{name}_metrics.json")
    fig = ev.pixel_confusion_figure(metrics, f"{name}: pixel confusion at p>={threshold:g}")
    mlflow.log_figure(fig, f"figures/{name}_pixel_confusion.png")
    figures.close(fig)
    fig = ev.overlay_figure(stats, table, threshold, f"{name}: best / median / worst patient (largest-edema slice)")
    mlflow.log_figure(fig, f"figures/{name}_overlays.png")
    figures.close(fig)


def _log_model(model, spec: dict, normalizer: Normalizer, threshold: float, cfg: SegmentationConfig, images):
    folder = run_folder()
    weights = folder / "model_state.pt"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
    config = {"model": spec, "norm_mean": normalizer.mean, "norm_std": normalizer.std, "threshold": threshold,
              "target": cfg.target, "pixel_spacing_mm": cfg.pixel_spacing_mm,
              "slice_thickness_mm": cfg.slice_thickness_mm}
    (folder / "model_config.json").write_text(json.dumps(config, indent=2))
    h, w = images.shape[1:]
    example = np.ascontiguousarray(images[:2, h // 2 - 32:h // 2 + 32, w // 2 - 32:w // 2 + 32])
    return log_pyfunc(SegmentationModel(), {"weights": str(weights), "config": str(folder / "model_config.json")},
                      signature(), example, REGISTERED_NAME if cfg.register else None,
                      metadata={"task": "segmentation", "target": cfg.target, "threshold": threshold,
                                "arch": spec["arch"], "encoder": spec["encoder"], "in_channels": spec["in_channels"],
                                "input": "uint8 (N, H, W) slices of one scan, axial order",
                                "output": "float32 (N, H, W) PHE probability; params output=mask -> 0/1"})


def _print_summary(r: dict) -> None:
    def fmt(key):
        v = r.get(key)
        return "n/a" if v is None or v != v else f"{v:.3f}"

    print(f"[segmentation] run {r['run_id']}: best epoch {r['best_epoch']} of {r['epochs_run']}, "
          f"threshold {r['threshold']:g}, train {r['train_seconds']:.0f}s, total {r['total_seconds']:.0f}s")
    for split in ("val", "test"):
        if f"{split}_dice" in r:
            print(f"  {split}: per-patient Dice {fmt(f'{split}_dice')} (95% CI {fmt(f'{split}_dice_ci_low')}-"
                  f"{fmt(f'{split}_dice_ci_high')}, median {fmt(f'{split}_dice_median')}), pooled Dice "
                  f"{fmt(f'{split}_dice_pooled')}, sensitivity {fmt(f'{split}_sensitivity_pooled')}, "
                  f"volume |err| {fmt(f'{split}_volume_abs_err_ml')} mL, slice F1 {fmt(f'{split}_slice_f1')}")
    if r.get("model_version"):
        print(f"  registered {REGISTERED_NAME} version {r['model_version']} ({r['model_uri']})")
