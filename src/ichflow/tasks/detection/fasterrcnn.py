"""torchvision Faster R-CNN from scratch (no weights anywhere), trained with the engine's Trainer.

Slices come from the engine's decoded slice cache at ``imgsz`` (2.5D stacking as every task does), the
augmentation is the engine's ``build_augment`` made box-aware, and the loss is the sum of torchvision's
loss dict. Scored on val each epoch with the same matching/AP code as YOLO (``metrics.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ichflow.engine.slices import stack_channels

ARCHS = ("mobilenet", "resnet50")


class _BudgetReached(Exception):
    """Raised from the epoch hook when the next epoch would overrun ``time_budget_min``."""


def build_model(arch: str, imgsz: int, mean: float, std: float, max_det: int = 50) -> torch.nn.Module:
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn

    kw = dict(weights=None, weights_backbone=None, num_classes=2, min_size=imgsz, max_size=imgsz,
              image_mean=[mean] * 3, image_std=[std] * 3, box_detections_per_img=max_det, box_score_thresh=0.001)
    if arch == "mobilenet":
        return fasterrcnn_mobilenet_v3_large_fpn(**kw)
    if arch == "resnet50":
        return fasterrcnn_resnet50_fpn(**kw)
    raise ValueError(f"engine=fasterrcnn: model must be one of {ARCHS}, got {arch!r}")


class SliceBoxes(torch.utils.data.Dataset):
    """(image tensor C×S×S in [0, 1], target dict) for rows ``rows`` of the full manifest's slice cache."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, boxes: list[np.ndarray], prev_idx: np.ndarray,
                 next_idx: np.ndarray, channels: int, augment=None):
        self.images, self.rows, self.boxes = images, np.asarray(rows), boxes
        self.prev_idx, self.next_idx, self.channels, self.augment = prev_idx, next_idx, channels, augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        i = int(self.rows[k])
        arr = stack_channels(self.images, i, self.prev_idx, self.next_idx, self.channels)
        if self.channels == 1:
            arr = np.repeat(arr, 3, axis=-1)
        boxes = self.boxes[k].reshape(-1, 4)
        if self.augment is not None:
            out = self.augment(image=np.ascontiguousarray(arr), bboxes=boxes, labels=np.ones(len(boxes), int))
            arr = out["image"]
            boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        img = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)
        target = {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.ones(len(boxes), dtype=torch.int64)}
        return img, target


def collate(batch):
    return tuple(zip(*batch))


def box_augment(strength: float):
    """The engine's augmentation, box-aware (boxes follow flips/affine; boxes mostly cut off are dropped)."""
    import albumentations as A

    from ichflow.engine.augment import build_augment

    return A.Compose(list(build_augment(strength).transforms),
                     bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=0.3,
                                               clip=True, filter_invalid_bboxes=True))


def compute_loss(model, batch, device):
    images, targets = batch
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    losses = model(images, targets)
    return sum(losses.values()), len(images)


class FasterRCNNPredictor:
    """Boxes for (H, W, C) uint8 images of any size, in the images' own pixel coordinates."""

    def __init__(self, model: torch.nn.Module, imgsz: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.imgsz = int(imgsz)

    @classmethod
    def from_files(cls, weights: str | Path, config: dict, device="cpu") -> "FasterRCNNPredictor":
        model = build_model(config["arch"], config["imgsz"], config["image_mean"], config["image_std"],
                            config.get("max_det", 50))
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return cls(model, config["imgsz"], device)

    @torch.inference_mode()
    def __call__(self, images, conf: float = 0.001, batch: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
        import cv2

        self.model.eval()
        out = []
        for start in range(0, len(images), batch):
            chunk = [np.asarray(im) for im in images[start:start + batch]]
            tensors, scales = [], []
            for im in chunk:
                if im.ndim == 2:
                    im = im[..., None]
                if im.shape[-1] == 1:
                    im = np.repeat(im, 3, axis=-1)
                h, w = im.shape[:2]
                if (h, w) != (self.imgsz, self.imgsz):
                    im = cv2.resize(im, (self.imgsz, self.imgsz), interpolation=cv2.INTER_LINEAR)
                tensors.append(torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).float().div_(255.0)
                               .to(self.device))
                scales.append(np.array([w / self.imgsz, h / self.imgsz] * 2, np.float32))
            for res, scale in zip(self.model(tensors), scales):
                keep = res["scores"] >= conf
                out.append(((res["boxes"][keep].cpu().numpy() * scale).astype(np.float32),
                            res["scores"][keep].cpu().numpy().astype(np.float32)))
        return out


def scaled_boxes(index: pd.DataFrame, imgsz: int) -> list[np.ndarray]:
    """Pixel boxes of each row rescaled to the cached ``imgsz`` square."""
    out = []
    for boxes, w, h in zip(index["boxes"], index["width"], index["height"]):
        b = np.asarray(json.loads(boxes), np.float32).reshape(-1, 4)
        out.append(b * np.array([imgsz / w, imgsz / h] * 2, np.float32))
    return out


def train_fasterrcnn(cfg, manifest: pd.DataFrame, table: pd.DataFrame, device: torch.device, folder: Path,
                     on_epoch_end=None) -> dict:
    """Fit with the engine's Trainer; per-epoch val box metrics use ``metrics.py`` (the YOLO definition)."""
    import math

    import mlflow

    from ichflow.engine.augment import Normalizer
    from ichflow.engine.device import amp_dtype
    from ichflow.engine.slices import neighbour_indices, slice_cache
    from ichflow.engine.trainer import Trainer, adamw
    from ichflow.tasks.common import make_loader
    from ichflow.tasks.detection.metrics import box_metrics, predictions_frame, truths_from_index
    from ichflow.tasks.detection.yolo import EPOCH_PREFIXED

    man = manifest.reset_index(drop=True)
    images = slice_cache(man["image_path"].astype(str).tolist(), size=cfg.imgsz)
    prev_idx, next_idx = neighbour_indices(man)
    train, val = table[table["split"] == "train"], table[table["split"] == "val"].reset_index(drop=True)
    if cfg.neg_fraction < 1.0:  # the same pick as the YOLO export: every lesion slice, a share of the negatives
        neg = np.flatnonzero(~train["has_lesion"].to_numpy(bool))
        drop = neg[~(np.random.default_rng([cfg.seed, 17]).random(len(neg)) < cfg.neg_fraction)]
        train = train.drop(train.index[drop])
    norm = Normalizer.fit(images[train["row"].to_numpy()], seed=cfg.seed)
    mean, std = norm.mean / 255.0, norm.std / 255.0
    model = build_model(cfg.model, cfg.imgsz, mean, std, cfg.max_det).to(device)
    train_ds = SliceBoxes(images, train["row"].to_numpy(), scaled_boxes(train, cfg.imgsz), prev_idx, next_idx,
                          cfg.in_channels, augment=box_augment(cfg.aug_strength) if cfg.aug_strength > 0 else None)
    loader = make_loader(train_ds, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, seed=cfg.seed,
                         drop_last=len(train_ds) > cfg.batch_size)
    loader.collate_fn = collate
    opt = adamw(model, cfg.lr, cfg.weight_decay)
    total = max(1, cfg.epochs * len(loader))
    warm = min(total // 10, 3 * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    predictor = FasterRCNNPredictor(model, cfg.imgsz, device)
    val_truths = truths_from_index(val)
    val_images = [stack_channels(images, int(r), prev_idx, next_idx, cfg.in_channels) for r in val["row"]]
    val_scale = np.stack([val["width"] / cfg.imgsz, val["height"] / cfg.imgsz] * 2, 1).astype(np.float32)

    def evaluate(_model) -> dict:
        outs = predictor(val_images, conf=0.001)
        outs = [(b * val_scale[i], s) for i, (b, s) in enumerate(outs)]
        m = box_metrics(predictions_frame(outs), val_truths)
        return {"val_precision": m["precision"], "val_recall": m["recall"], "val_map50": m["map50"],
                "val_map50_95": m["map50_95"], "val_fitness": 0.1 * m["map50"] + 0.9 * m["map50_95"]}

    log_to_run = mlflow.active_run() is not None
    budget_s, t0 = 60.0 * cfg.time_budget_min, time.perf_counter()
    history: list[dict] = []

    def epoch_end(epoch, metrics):
        history.append(dict(metrics))
        if log_to_run:
            mlflow.log_metrics({(f"epoch_{k}" if k in EPOCH_PREFIXED or k == "val_fitness" else k): float(v)
                                for k, v in metrics.items() if k != "epoch" and math.isfinite(float(v))}, step=epoch)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
        elapsed = time.perf_counter() - t0
        if budget_s > 0 and epoch < cfg.epochs - 1 and elapsed + elapsed / (epoch + 1) > budget_s:
            raise _BudgetReached

    trainer = Trainer(model, opt, compute_loss, device, amp_dtype=amp_dtype(device, cfg.amp), scheduler=sched,
                      grad_clip=10.0, log_to_mlflow=False, progress=False)
    weights = folder / "fasterrcnn_best.pt"
    stopped = False
    try:
        fit = trainer.fit(loader, evaluate, cfg.epochs, monitor="val_fitness", mode="max", patience=cfg.patience,
                          checkpoint=weights, on_epoch_end=epoch_end)
        history, best_epoch, epochs_run = fit.history, fit.best_epoch, fit.epochs_run
    except _BudgetReached:  # the Trainer lets hook exceptions through: restore the best checkpoint here
        stopped, epochs_run = True, len(history)
        best_epoch = int(np.nanargmax([h["val_fitness"] for h in history]))
        model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    config = {"engine": "fasterrcnn", "arch": cfg.model, "imgsz": cfg.imgsz, "image_mean": mean, "image_std": std,
              "in_channels": cfg.in_channels, "max_det": cfg.max_det, **norm.as_params()}
    return {"weights": weights, "history": history, "train_seconds": time.perf_counter() - t0,
            "epochs_run": epochs_run, "best_epoch": best_epoch, "config": config, "stopped_by_time_budget": stopped,
            "predictor": FasterRCNNPredictor(model, cfg.imgsz, device), "images": images,
            "prev_idx": prev_idx, "next_idx": next_idx}
