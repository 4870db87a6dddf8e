"""The parameters of the segmentation task, their named presets and their validation."""

from __future__ import annotations

from dataclasses import dataclass

from ichflow.cli import choice
from ichflow.configs import TrainConfig
from ichflow.errors import ParameterError, check_choice, check_range

TARGETS = ("phe",)

# Named recipes: ``-P preset=phe`` sets every field not given on the command line.
PRESETS = {
    # The real PHE-SICH-CT-IDS data on a 2-core CPU in about 35 min (reports/segmentation_phe.md): the selected
    # checkpoint with flip TTA and the threshold + minimum component size chosen on val.
    # On a GPU raise epochs/steps_per_epoch (e.g. -P epochs=40 -P patience=10), or add -P n_folds=5.
    "phe": {"dataset": "phe", "steps_per_epoch": 400, "epochs": 6, "patience": 3, "time_budget_min": 30.0},
    # The same recipe stopped after 4 epochs (about 22 min on 2 cores).
    "phe-quick": {"dataset": "phe", "steps_per_epoch": 400, "epochs": 4, "patience": 3, "time_budget_min": 17.0},
}


@dataclass
class SegmentationConfig(TrainConfig):
    """PHE segmentation: data selection, model, patch sampling, optimisation and evaluation knobs."""

    preset: str = choice("", PRESETS)  # named preset: sets every parameter you do not give ('' = none)
    in_channels: int = choice(3, (1, 3, 5))  # 1 = the slice; 3 / 5 = 2.5D, the slice with 1 / 2 neighbours per side
    target: str = choice("phe", TARGETS)  # what is segmented: the perihematomal-edema masks
    engine: str = "smp"               # network family: smp = segmentation-models-pytorch | nnunet = nnU-Net v2 2d
    arch: str = "Unet"                # Unet | UnetPlusPlus | FPN | Segformer (smp)
    encoder: str = "resnet18"         # any smp encoder name (resnet34, efficientnet-b0, ...)
    encoder_weights: str = "none"     # none, or a local weights file (nothing is downloaded)
    decoder_channels: str = "128,64,32,16,16"  # lighter than smp's default (256..16)
    patch_size: int = 128             # training patch side in pixels, native resolution (multiple of 32)
    fg_fraction: float = 0.5          # share of patches centred on an edema pixel
    steps_per_epoch: int = 40         # optimiser steps between two validations
    epochs: int = 8
    patience: int = 4
    lr: float = 2e-3
    loss: str = "dice+bce"            # '+'-joined: dice, bce, focal, tversky, jaccard, lovasz
    scheduler: str = "cosine"         # cosine (linear warm-up, then cosine) | onecycle | constant
    warmup_fraction: float = 0.05     # share of the optimiser steps spent warming the learning rate up
    threshold: str = "auto"           # probability threshold: auto (best mean patient Dice on val) or a number
    tta: str = "flip"                 # test-time augmentation of the selected model: flip (mean with the mirror) | none
    min_component_voxels: str = "auto"  # drop predicted 3D components below this size: auto (chosen on val) | N | 0
    n_folds: int = 1                  # 1: one model (train / val); K >= 2: K patient folds of train+val, an ensemble
    eval_batch_size: int = 4          # slices per forward pass when whole scans are predicted
    pixel_spacing_mm: float = 0.508   # in-plane pixel size for volumes (PHE-SICH-CT-IDS)
    slice_thickness_mm: float = 5.0   # slice thickness for volumes (PHE-SICH-CT-IDS)
    detect_min_pixels: int = 1        # slice-level detection: predicted positive with >= this many pixels
    time_budget_min: float = 0.0      # stop after the epoch when another one would exceed this (0 = no limit)


def parse_threshold(text) -> float | None:
    """None for 'auto', else a number in (0, 1) on the evaluation grid."""
    import numpy as np

    from ichflow.tasks.segmentation.evaluate import THRESHOLDS

    if str(text).strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ParameterError("threshold", f"must be 'auto' or a number in (0, 1); got {text!r}") from None
    grid = np.asarray(THRESHOLDS)
    if not np.isclose(grid, value).any():
        raise ParameterError("threshold", f"must be 'auto' or one of the evaluation grid "
                                          f"{', '.join(f'{t:g}' for t in THRESHOLDS)}; got {text!r}")
    return float(grid[np.isclose(grid, value)][0])


def validate(cfg: SegmentationConfig) -> None:
    """Reject bad parameters before anything is read or trained, naming the parameter."""
    from ichflow.tasks.segmentation.data import PAD_MULTIPLE, TTA   # torch: not needed to parse a command line
    from ichflow.tasks.segmentation.engines import ENGINES
    from ichflow.tasks.segmentation.model import LOSSES, SCHEDULERS
    from ichflow.tasks.segmentation.postprocess import parse_min_voxels

    check_choice("target", cfg.target, TARGETS)
    check_choice("engine", cfg.engine, ENGINES)
    check_choice("in_channels", cfg.in_channels, (1, 3, 5))
    if cfg.patch_size < PAD_MULTIPLE or cfg.patch_size % PAD_MULTIPLE:
        raise ParameterError("patch_size", f"must be a positive multiple of {PAD_MULTIPLE}; got {cfg.patch_size}")
    check_range("fg_fraction", cfg.fg_fraction, 0.0, 1.0)
    check_range("aug_strength", cfg.aug_strength, 0.0, 1.0)
    check_range("warmup_fraction", cfg.warmup_fraction, 0.0, 1.0)
    for name in ("epochs", "steps_per_epoch", "batch_size", "eval_batch_size", "patience"):
        check_range(name, getattr(cfg, name), 1)
    check_range("lr", cfg.lr, 0.0, low_open=True)
    check_range("time_budget_min", cfg.time_budget_min, 0.0)
    check_range("pixel_spacing_mm", cfg.pixel_spacing_mm, 0.0, low_open=True)
    check_range("slice_thickness_mm", cfg.slice_thickness_mm, 0.0, low_open=True)
    check_range("detect_min_pixels", cfg.detect_min_pixels, 1)
    check_choice("scheduler", cfg.scheduler, SCHEDULERS)
    names = [n.strip().lower() for n in cfg.loss.split("+") if n.strip()]
    if not names or any(n not in LOSSES for n in names):
        raise ParameterError("loss", f"must be '+'-joined names from {', '.join(LOSSES)}; got {cfg.loss!r}")
    parse_threshold(cfg.threshold)
    check_choice("tta", cfg.tta, TTA)
    parse_min_voxels(cfg.min_component_voxels)
    check_range("n_folds", cfg.n_folds, 1)
    ENGINES[cfg.engine].check(cfg)
