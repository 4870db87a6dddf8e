"""Pieces every training task shares: presets, parameter checks and logging, loaders, run folders.

The base config, :class:`~ichflow.configs.TrainConfig`, lives in the light ``ichflow.configs``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import torch

from ichflow.cli import given_fields
from ichflow.configs import AMP_MODES, DEVICES
from ichflow.engine.device import default_workers
from ichflow.engine.pretrained import PACKAGED_NAMES
from ichflow.paths import runs_dir
from ichflow.engine.resources import check_training_memory
from ichflow.errors import ParameterError, check_choice, check_range
from ichflow.tracking import log_params_once, same_param


SIZE_FIELDS = ("patch_size", "image_size", "imgsz")   # the side of the square a task trains on


def validate_train_config(cfg) -> None:
    """The knobs every torch task shares, and whether one training step fits in memory (before any work)."""
    device = str(cfg.device)
    if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ParameterError("device", f"must be one of {', '.join(DEVICES)} or cuda:<index>; got {device!r}")
    check_choice("amp", cfg.amp, AMP_MODES)
    check_range("seed", cfg.seed, 0)
    check_range("lr", cfg.lr, 0.0, low_open=True)
    check_range("weight_decay", cfg.weight_decay, 0.0)
    check_range("aug_strength", cfg.aug_strength, 0.0, 1.0)
    check_range("num_workers", cfg.num_workers, -1)
    for name in ("epochs", "patience", "batch_size"):
        check_range(name, getattr(cfg, name), 1)
    pretrained = str(getattr(cfg, "pretrained", "") or "").strip()
    if pretrained.lower() != "none" and pretrained and pretrained not in PACKAGED_NAMES and not Path(pretrained).expanduser().is_file():
        raise ParameterError("pretrained", f"no weights file at {pretrained!r} (give a local file, packaged weights "
                                           f"{', '.join(PACKAGED_NAMES)}, or leave it empty)")
    size_name = next((n for n in SIZE_FIELDS if hasattr(cfg, n)), None)
    if size_name:
        check_training_memory(size_name, getattr(cfg, size_name), cfg.batch_size, cfg.in_channels, device)


def apply_preset(cfg, presets: dict[str, dict]):
    """Return cfg with the preset's value for every field not given on purpose (``cli.given_fields``)."""
    if not cfg.preset:
        return cfg
    if cfg.preset not in presets:
        raise ParameterError("preset", f"unknown preset {cfg.preset!r}; one of {', '.join(sorted(presets)) or '(none)'}")
    given = given_fields(cfg)
    return dataclasses.replace(cfg, **{k: v for k, v in presets[cfg.preset].items() if k not in given})


def log_config(cfg) -> None:
    log_params_once({k: v for k, v in dataclasses.asdict(cfg).items()})


def log_preset_values(cfg, presets: dict[str, dict]) -> None:
    """A preset changes fields after ``mlflow run`` logged the -P values: record what really ran as
    ``preset.<name>`` (read back by ``evaluation.data_config_from_run``)."""
    if not cfg.preset:
        return
    params = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    log_params_once({f"preset.{k}": getattr(cfg, k) for k in presets[cfg.preset]
                     if not same_param(params.get(k), getattr(cfg, k))})


def run_folder() -> Path:
    """Scratch folder of the active run (checkpoints etc.): work/runs/<run_id>/."""
    run = mlflow.active_run()
    folder = runs_dir() / (run.info.run_id if run else "no-run")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int = -1, seed: int = 0,
                drop_last: bool = False, sampler=None) -> torch.utils.data.DataLoader:
    workers = default_workers() if num_workers < 0 else num_workers
    gen = torch.Generator()
    gen.manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=workers, drop_last=drop_last, generator=gen,
                                       persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
