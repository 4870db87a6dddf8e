"""Ultralytics YOLOv8 offline, quiet and inside *our* MLflow run.

What Ultralytics does on its own, and what this module does about it:

* settings + fonts: it keeps ``settings.json`` in ``$YOLO_CONFIG_DIR/Ultralytics`` (``ichflow`` points that at
  ``work/ultralytics``) and downloads ``Arial.ttf`` for plot labels when that folder has no such font. We put
  matplotlib's DejaVuSans there under both names Ultralytics asks for, so nothing is fetched.
* ``YOLO_OFFLINE=1`` (set by ``ichflow``): no online check, no PyPI update check, no telemetry (``sync`` off too).
* its MLflow callback turns itself on when mlflow is installed, calls ``mlflow.autolog()`` and may open its
  own experiment/run: we switch it off in the settings (``mlflow=False``, read per trainer) and log per-epoch
  metrics into our run from an ``on_fit_epoch_end`` callback instead.
* on CUDA its AMP check downloads ``yolo26n.pt``: we pass ``amp='bf16'`` (no check) or ``amp=False``.
* ``YOLO('yolov8n.pt')`` without the file tries a download: we refuse local-only with a clear message.
* ``labels/*.cache`` land beside the labels, i.e. inside our cache folder (``dataset.py``); its run folder
  (``project``) is the run's scratch folder ``work/runs/<run_id>/yolo``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pandas as pd
import torch

from ichflow.engine.budget import TimeBudget
from ichflow.engine.stats import finite
from ichflow.errors import DataError
from ichflow.metric_names import log_metrics
from ichflow.paths import work_dir
from ichflow.tasks.detection.dataset import export_yolo
from ichflow.tasks.detection.base import BOX_CONF, EngineFit
from ichflow.tracking import log_params_once

log = logging.getLogger(__name__)

SIZES = ("n", "s", "m", "l", "x")
_DISABLED = ("mlflow", "sync", "clearml", "comet", "dvc", "raytune", "tensorboard", "wandb")


def config_dir() -> Path:
    """The folder Ultralytics keeps its settings and fonts in (``$YOLO_CONFIG_DIR/Ultralytics``)."""
    base = os.environ.get("YOLO_CONFIG_DIR") or str(work_dir() / "ultralytics")
    os.environ["YOLO_CONFIG_DIR"] = base
    return Path(base).expanduser() / "Ultralytics"


def setup_ultralytics():
    """Make Ultralytics offline and quiet before (and after) it is imported; returns the ``ultralytics`` module."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("YOLO_VERBOSE", "False")
    folder = config_dir()
    folder.mkdir(parents=True, exist_ok=True)
    import matplotlib

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        if not (folder / name).exists() and font.exists():
            tmp = folder / f".{name}.{os.getpid()}"
            shutil.copyfile(font, tmp)
            os.replace(tmp, folder / name)
    omp_threads = os.environ.get("OMP_NUM_THREADS")
    import ultralytics
    from ultralytics.utils import SETTINGS, torch_utils

    if omp_threads is None:  # its import sets OMP_NUM_THREADS=1, which every process we start would inherit
        os.environ.pop("OMP_NUM_THREADS", None)   # (a model server started after it ran on one core)

    # its select_device (trainer, final validation, predictor set-up) pins the whole process to cpu_count - 1
    # torch threads on CPU, which slows training and every model loaded beside it: keep the process's own count
    torch_utils.NUM_THREADS = torch.get_num_threads()

    wanted = {k: False for k in _DISABLED}
    wanted.update(runs_dir=str(work_dir() / "runs" / "ultralytics"), weights_dir=str(work_dir() / "weights"),
                  datasets_dir=str(work_dir() / "cache" / "yolo"))
    if any(SETTINGS.get(k) != v for k, v in wanted.items()):
        SETTINGS.update(wanted)
    logging.getLogger("ultralytics").setLevel(logging.WARNING)
    _quiet_image_caching_bar()
    return ultralytics


def _quiet_image_caching_bar() -> None:
    """Ultralytics draws its "Caching images" bar whatever its verbosity (it passes ``disable`` itself): off a
    terminal that is ANSI colour codes and frames in the log. Its own progress class, off when its stream (stdout
    unless given a file) is not a terminal."""
    import ultralytics.data.base as base

    if getattr(base.TQDM, "ichflow_quiet", False):
        return

    class TerminalOnlyTQDM(base.TQDM):
        ichflow_quiet = True

        def __init__(self, *args, **kwargs):
            if not (kwargs.get("file") or sys.stdout).isatty():
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    base.TQDM = TerminalOnlyTQDM


def resolve_model(spec: str) -> str:
    """``n``/``s``/``m`` -> ``yolov8<size>.yaml`` (from scratch); a ``.yaml``/``.pt`` must be local."""
    spec = (spec or "n").strip()
    if spec in SIZES:
        return f"yolov8{spec}.yaml"
    path = Path(spec).expanduser()
    if spec.endswith((".yaml", ".yml")):
        if path.is_file():
            return str(path)
        from ultralytics.nn.tasks import yaml_model_load  # noqa: F401  (raises on unknown names)
        from ultralytics.utils.checks import check_yaml

        try:
            check_yaml(spec, hard=True)
        except Exception as exc:  # FileNotFoundError from Ultralytics, with a long message
            raise DataError(spec, "model .yaml not found locally or among Ultralytics' model configs "
                                  f"(use model=n|s|m for yolov8n/s/m.yaml): {exc}") from exc
        return spec
    if spec.endswith(".pt"):
        if not path.is_file():
            stem = Path(spec).stem
            hint = f"{stem}.yaml" if stem.startswith(("yolov8", "yolo11", "yolo26", "yolov5")) else "yolov8n.yaml"
            raise DataError(spec, "weights file not found; nothing is downloaded here (offline, from scratch). "
                                  f"Train from scratch with model=n (or model={hint}), or pass the path of a local "
                                  ".pt file")
        return str(path.resolve())
    raise DataError(spec, "model must be n, s, m, l, x, a model .yaml or a local .pt weights file")


def load_yolo(spec: str):
    setup_ultralytics()
    from ultralytics import YOLO

    return YOLO(resolve_model(spec), task="detect")


def device_arg(device: torch.device) -> str:
    if device.type == "cuda":
        return str(device.index or 0)
    return device.type


def amp_arg(device: torch.device, amp: str) -> bool | str:
    """Ultralytics' ``amp``: never its fp16 check on CUDA (it downloads weights); bf16 where supported."""
    if device.type != "cuda" or amp in ("off", "false", "fp32", "none"):
        return False
    if amp == "fp16":
        log.warning("amp=fp16 would run Ultralytics' AMP check, which downloads weights; using bf16 instead")
    return "bf16" if torch.cuda.is_bf16_supported() else False


def augment_args(strength: float, mosaic: float) -> dict:
    """Ultralytics' own augmentation scaled by one ``aug_strength`` in [0, 1] (Optuna tunes it).

    Hue/saturation stay off: the three channels are neighbouring slices (2.5D), not colours.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"aug_strength must be in [0, 1], got {strength}")
    s = strength
    return {"hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.4 * s, "degrees": 10.0 * s, "translate": 0.1 * s,
            "scale": 0.4 * s, "fliplr": 0.5 if s > 0 else 0.0, "flipud": 0.0, "mosaic": mosaic * min(1.0, 2 * s),
            "mixup": 0.0, "erasing": 0.0}


_NAMES = {
    "train/box_loss": "train_box_loss", "train/cls_loss": "train_cls_loss", "train/dfl_loss": "train_dfl_loss",
    "val/box_loss": "val_box_loss", "val/cls_loss": "val_cls_loss", "val/dfl_loss": "val_dfl_loss",
    "metrics/precision(B)": "val_precision", "metrics/recall(B)": "val_recall",
    "metrics/mAP50(B)": "val_map50", "metrics/mAP50-95(B)": "val_map50_95",
}


def epoch_metrics(trainer) -> dict:
    raw = {**trainer.label_loss_items(trainer.tloss), **(trainer.metrics or {})}
    out = {_NAMES.get(k, k.replace("/", "_").replace("(", "").replace(")", "")): float(v) for k, v in raw.items()}
    out["lr"] = float(trainer.optimizer.param_groups[0]["lr"])
    out["epoch_seconds"] = float(getattr(trainer, "epoch_time", 0.0) or 0.0)
    return out


def fitness(m: dict) -> float:
    """Ultralytics' model selection: 0.1 mAP@0.5 + 0.9 mAP@0.5:0.95 (Faster R-CNN selects by the same)."""
    return 0.1 * m.get("val_map50", 0.0) + 0.9 * m.get("val_map50_95", 0.0)


def _results_csv_trainer():
    """Ultralytics' DetectionTrainer, reading its own results.csv back with the csv module.

    Ultralytics imports polars (a 50 MB wheel) only to put results.csv into each checkpoint; without it a GPU
    box that gets packages as carried wheels could not save a checkpoint. Its two plots that need polars
    (labels.jpg, results.png) are skipped there.
    """
    import csv
    import importlib.util

    from ultralytics.models.yolo.detect import DetectionTrainer

    def number(text: str):
        try:
            return float(text)
        except ValueError:
            return text

    has_polars = importlib.util.find_spec("polars") is not None

    class ResultsCsvTrainer(DetectionTrainer):
        def read_results_csv(self):
            try:
                with open(self.csv, newline="") as fh:
                    rows = list(csv.DictReader(fh))
            except OSError:
                return {}
            return {k.strip(): [number(r[k]) for r in rows] for k in (rows[0] if rows else {})}

        def plot_training_labels(self):  # labels.jpg: Ultralytics reads the boxes with polars
            if has_polars:
                super().plot_training_labels()

        def plot_metrics(self):  # results.png: Ultralytics reads results.csv with polars
            if has_polars:
                super().plot_metrics()

    return ResultsCsvTrainer


def train_args(cfg, data_yaml: Path, project: Path, device: torch.device) -> dict:
    workers = cfg.num_workers if cfg.num_workers >= 0 else min(4, max(0, (os.cpu_count() or 1) - 1))
    return dict(
        data=str(data_yaml), epochs=cfg.epochs, patience=cfg.patience, imgsz=cfg.imgsz, batch=cfg.batch_size,
        device=device_arg(device), workers=workers, project=str(project), name="train", exist_ok=True,
        seed=cfg.seed, deterministic=True, optimizer="AdamW", lr0=cfg.lr, weight_decay=cfg.weight_decay,
        cos_lr=True, warmup_epochs=min(3.0, max(0.0, cfg.epochs * 0.1)),
        close_mosaic=min(cfg.close_mosaic, cfg.epochs // 3), amp=amp_arg(device, cfg.amp), cache="ram",
        single_cls=True, plots=cfg.evaluate_test, verbose=False, val=True, max_det=cfg.max_det,
        pretrained=cfg.model.endswith(".pt"), **augment_args(cfg.aug_strength, cfg.mosaic))


def train_yolo(cfg, data_yaml: Path, project: Path, device: torch.device, budget: TimeBudget,
               on_epoch_end: Callable[[int, dict], None] | None = None) -> EngineFit:
    """Train from ``cfg`` on ``data_yaml``; per-epoch metrics go into the active MLflow run (step=epoch)."""
    model = load_yolo(cfg.model)
    history: list[dict] = []
    log_to_run = mlflow.active_run() is not None
    pending = {"epoch": False}

    def _train_epoch_end(trainer):
        pending["epoch"] = True

    def _fit_epoch_end(trainer):
        if not pending["epoch"]:  # Ultralytics' final_eval of best.pt calls this once more at epoch+1: skip
            return
        pending["epoch"] = False
        epoch = int(trainer.epoch)
        metrics = {"epoch": epoch, **epoch_metrics(trainer)}
        history.append(metrics)
        if log_to_run:
            log_metrics(finite({k: v for k, v in metrics.items() if k != "epoch"}), step=epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
        if budget.should_stop(epoch):
            trainer.stop = True  # Ultralytics checks this right after the callback; best.pt is kept
            log.warning("time budget of %.1f min reached after %d epochs", budget.limit_s / 60, epoch + 1)

    model.add_callback("on_train_epoch_end", _train_epoch_end)
    model.add_callback("on_fit_epoch_end", _fit_epoch_end)
    budget.start()
    model.train(trainer=_results_csv_trainer(), **train_args(cfg, data_yaml, project, device))
    seconds = time.perf_counter() - budget.t0
    trainer = model.trainer
    best = Path(trainer.best) if Path(trainer.best).exists() else Path(trainer.last)
    scores = [fitness(h) for h in history]
    best_i = int(np.argmax(scores)) if scores else -1
    return EngineFit(best_epoch=int(history[best_i]["epoch"]) if scores else -1,
                     best_score=scores[best_i] if scores else float("nan"), epochs_run=len(history),
                     history=history, train_seconds=seconds,
                     stopped_early=len(history) < cfg.epochs and not budget.reached,
                     stopped_by_time_budget=budget.reached, checkpoint=str(best))


def log_ultralytics_plots(folder: Path) -> None:
    """Ultralytics' own PNGs of its training folder (results.png; on the val split at the end: PR / F1 / P / R
    curves, confusion matrices) as ``figures/training_yolo_<name>.png``."""
    for png in sorted(folder.glob("*.png")):
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / f"training_yolo_{png.stem.lower()}.png"
            shutil.copyfile(png, target)
            mlflow.log_artifact(str(target), artifact_path="figures")


class YoloEngine:
    """Ultralytics YOLOv8 on the exported YOLO dataset (``dataset.export_yolo``)."""

    name = "yolo"
    default_lr = 5e-3

    @staticmethod
    def check(cfg) -> None:
        resolve_model(cfg.model)  # a missing .pt fails here, before any run is opened

    def slices(self, cfg, prep) -> pd.DataFrame:
        setup_ultralytics()
        self.dataset = export_yolo(prep.manifest, prep.split, cfg.in_channels, cfg.neg_fraction, cfg.seed)
        log_params_once({"model_resolved": resolve_model(cfg.model), "yolo_dataset": str(self.dataset.root),
                         "yolo_dataset_digest": self.dataset.digest})
        mlflow.log_artifact(str(self.dataset.data_yaml), artifact_path="data/yolo")
        return self.dataset.index

    def train(self, cfg, prep, folder: Path, device, on_epoch_end, budget: TimeBudget) -> EngineFit:
        fit = train_yolo(cfg, self.dataset.data_yaml, folder / "yolo", device, budget, on_epoch_end)
        for extra in ("args.yaml", "results.csv"):
            if (fit.weights.parent.parent / extra).exists():
                mlflow.log_artifact(str(fit.weights.parent.parent / extra), artifact_path="yolo")
        log_ultralytics_plots(fit.weights.parent.parent)
        fit.model_config = {"engine": self.name, "imgsz": cfg.imgsz, "in_channels": cfg.in_channels,
                            "max_det": cfg.max_det, "model": resolve_model(cfg.model)}
        self.predictor = YoloPredictor(fit.weights, cfg.imgsz, device, cfg.max_det)
        return fit

    def predict(self, part: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every box down to ``BOX_CONF`` per row of ``part``, in the original pixel frame."""
        return self.predictor(list(part["image"]), conf=BOX_CONF)

    @staticmethod
    def load_predictor(weights, config: dict, device) -> "YoloPredictor":
        return YoloPredictor(weights, config["imgsz"], device, config.get("max_det", 50))


def _three_channels(im: np.ndarray) -> np.ndarray:
    """Grayscale (H, W) or (H, W, 1) -> (H, W, 3), as OpenCV reads the exported 1-channel PNGs."""
    if im.ndim == 2:
        im = im[..., None]
    return np.ascontiguousarray(np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im)


class YoloPredictor:
    """Boxes for a batch of (H, W, C) uint8 images, in the images' own pixel coordinates."""

    def __init__(self, weights: str | Path, imgsz: int, device: torch.device | str = "cpu", max_det: int = 50):
        setup_ultralytics()
        from ultralytics import YOLO

        self.model = YOLO(str(weights), task="detect")
        self.imgsz, self.max_det = int(imgsz), int(max_det)
        self.device = device_arg(torch.device(device) if isinstance(device, str) else device)

    def __call__(self, images, conf: float = 0.001, batch: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for start in range(0, len(images), batch):
            chunk = [im if isinstance(im, (str, Path)) else _three_channels(np.asarray(im))
                     for im in images[start:start + batch]]
            results = self.model.predict(chunk, imgsz=self.imgsz, conf=conf, iou=0.7, max_det=self.max_det,
                                         device=self.device, verbose=False, batch=len(chunk))
            for r in results:
                b = r.boxes
                out.append((b.xyxy.cpu().numpy().astype(np.float32), b.conf.cpu().numpy().astype(np.float32)))
        return out
