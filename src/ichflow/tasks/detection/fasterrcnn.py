"""torchvision Faster R-CNN from scratch (no weights anywhere), trained with the engine's Trainer.

Slices come from the engine's decoded slice cache at ``imgsz`` (2.5D stacking as every task does), the
augmentation is the engine's ``build_augment`` made box-aware, and the loss is the sum of torchvision's
loss dict. Scored on val each epoch with the same matching/AP code as YOLO (``metrics.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ichflow.engine.budget import TimeBudget
from ichflow.engine.slices import resize_square, stack_channels
from ichflow.errors import ParameterError, check_choice
from ichflow.paths import CHECKPOINT
from ichflow.tasks.detection.base import BOX_CONF, EngineFit
from ichflow.tracking import log_params_once

ARCHS = ("mobilenet", "resnet50")
COCO_ANCHORS = (32, 64, 128, 256, 512)   # torchvision's sizes: what models saved before anchor_sizes rebuild with
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def anchor_sizes(boxes: list[np.ndarray]) -> tuple[int, ...]:
    """Five anchor sizes (px at the training size) spanning the training boxes' sides: sqrt(w*h) from a little
    below the 5th to a little above the 95th percentile, spaced geometrically.

    torchvision's COCO sizes start at 32 px: at imgsz 64-192 most lesions are smaller than the smallest anchor,
    the RPN then finds no positive anchors and a model trained from scratch learns nothing.
    """
    b = np.concatenate([np.asarray(x, np.float64).reshape(-1, 4) for x in boxes]) if boxes else np.zeros((0, 4))
    sides = np.sqrt(np.clip(b[:, 2] - b[:, 0], 1, None) * np.clip(b[:, 3] - b[:, 1], 1, None))
    if len(sides) == 0:
        return COCO_ANCHORS
    low, high = np.percentile(sides, [5, 95])
    sizes = np.geomspace(max(4.0, 0.75 * low), max(8.0, 1.25 * high), len(COCO_ANCHORS))
    return tuple(int(round(v)) for v in sizes)


def parse_anchor_sizes(text: str) -> tuple[int, ...] | None:
    """None for ``auto``; COCO_ANCHORS for ``coco``; else five ascending sizes (ParameterError otherwise)."""
    text = str(text).strip().lower()
    if text == "auto":
        return None
    if text == "coco":
        return COCO_ANCHORS
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != len(COCO_ANCHORS) or min(sizes) < 2 or list(sizes) != sorted(set(sizes)):
        raise ParameterError("anchor_sizes", "must be auto, coco or 5 ascending sizes in px (e.g. 8,16,32,64,128); "
                                             f"got {text!r}")
    return sizes


def build_model(arch: str, imgsz: int, mean: float, std: float, max_det: int = 50,
                anchors: tuple[int, ...] | None = None) -> torch.nn.Module:
    """Faster R-CNN + FPN from scratch (BatchNorm trained, every layer trainable) with ``anchors`` px anchors."""
    from torch import nn
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone

    anchors = tuple(int(a) for a in (anchors or COCO_ANCHORS))
    kw = dict(min_size=imgsz, max_size=imgsz, image_mean=[mean] * 3, image_std=[std] * 3,
              box_detections_per_img=max_det, box_score_thresh=0.001)
    if arch == "mobilenet":   # as fasterrcnn_mobilenet_v3_large_fpn: all sizes on each of its 3 feature maps
        backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                                      norm_layer=nn.BatchNorm2d, trainable_layers=6)
        generator = AnchorGenerator((anchors,) * 3, (ASPECT_RATIOS,) * 3)
        kw["rpn_score_thresh"] = 0.05
    elif arch == "resnet50":  # as fasterrcnn_resnet50_fpn: one size per pyramid level
        backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=nn.BatchNorm2d,
                                       trainable_layers=5)
        generator = AnchorGenerator(tuple((a,) for a in anchors), (ASPECT_RATIOS,) * len(anchors))
    else:
        raise ValueError(f"engine=fasterrcnn: model must be one of {ARCHS}, got {arch!r}")
    return FasterRCNN(backbone, num_classes=2, rpn_anchor_generator=generator, **kw)


class SliceBoxes(torch.utils.data.Dataset):
    """(image tensor C×S×S in [0, 1], target dict) for rows ``rows`` of the full manifest's slice cache."""

    def __init__(self, images: "_SliceImages", rows: np.ndarray, boxes: list[np.ndarray], channels: int,
                 augment=None):
        self.images, self.rows, self.boxes = images, np.asarray(rows), boxes
        self.channels, self.augment = channels, augment

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int):
        i = int(self.rows[k])
        arr = self.images.stack(i, self.channels)
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
                            config.get("max_det", 50), config.get("anchor_sizes"))
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return cls(model, config["imgsz"], device)

    @torch.inference_mode()
    def __call__(self, images, conf: float = 0.001, batch: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
        """Callers pass one scan at a time (training and serving alike): the same batches give the same bits."""
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
                im = resize_square(im, self.imgsz)
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


def _val_scorer(predictor: "FasterRCNNPredictor", images, val: pd.DataFrame, cfg):
    """``evaluate(model)`` for the Trainer: val box metrics by the YOLO definition (``metrics.py``)."""
    from ichflow.tasks.detection.metrics import box_metrics, predictions_frame, truths_from_index
    from ichflow.tasks.detection.yolo import fitness

    truths = truths_from_index(val)

    def evaluate(_model) -> dict:
        m = box_metrics(predictions_frame(predict_by_scan(predictor, images, val, cfg)), truths)
        out = {"val_precision": m["precision"], "val_recall": m["recall"], "val_map50": m["map50"],
               "val_map50_95": m["map50_95"]}
        return {**out, "val_fitness": fitness(out)}

    return evaluate


def predict_by_scan(predictor: "FasterRCNNPredictor", images: "_SliceImages", part: pd.DataFrame, cfg) -> list:
    """Boxes per row of ``part`` in its slices' own pixels, predicted scan by scan in axial order as the served
    model predicts (same batches, same bits)."""
    scale = _scale_back(part, cfg.imgsz)
    outputs: list = [None] * len(part)
    for _, scan in part.reset_index(drop=True).groupby("patient_id", sort=True):
        scan = scan.sort_values("slice_index", kind="stable")
        imgs = [images.stack(int(r), cfg.in_channels) for r in scan["row"]]
        for pos, (b, s) in zip(scan.index, predictor(imgs, conf=BOX_CONF)):
            outputs[pos] = (b * scale[pos], s)
    return outputs


def _scale_back(part: pd.DataFrame, imgsz: int) -> np.ndarray:
    """(n, 4) factors from the cached ``imgsz`` square back to each slice's own pixels."""
    return np.stack([part["width"] / imgsz, part["height"] / imgsz] * 2, 1).astype(np.float32)


class _SliceImages:
    """The decoded slice cache of the whole manifest at ``imgsz``, with each slice's 2.5D neighbours."""

    def __init__(self, manifest: pd.DataFrame, imgsz: int):
        from ichflow.engine.slices import neighbour_indices, slice_cache

        man = manifest.reset_index(drop=True)
        self.images = slice_cache(man["image_path"].astype(str).tolist(), size=imgsz)
        self.prev_idx, self.next_idx = neighbour_indices(man)

    def stack(self, row: int, channels: int) -> np.ndarray:
        return stack_channels(self.images, row, self.prev_idx, self.next_idx, channels)


class FasterRCNNEngine:
    """torchvision Faster R-CNN on the engine's slice cache, fitted by the engine's Trainer."""

    name = "fasterrcnn"
    default_lr = 1e-3

    @staticmethod
    def check(cfg) -> None:
        check_choice("model", cfg.model, ARCHS)
        parse_anchor_sizes(cfg.anchor_sizes)

    def slices(self, cfg, prep) -> pd.DataFrame:
        from ichflow.tasks.detection.dataset import slice_table

        log_params_once({"model_resolved": f"fasterrcnn_{cfg.model}_fpn (weights=None)"})
        self.table = slice_table(prep.manifest, prep.split)
        return self.table

    def train(self, cfg, prep, folder: Path, device, on_epoch_end, budget: TimeBudget) -> EngineFit:
        from ichflow.engine.augment import Normalizer
        from ichflow.engine.device import amp_dtype
        from ichflow.engine.schedule import warmup_cosine
        from ichflow.engine.trainer import Trainer, adamw
        from ichflow.tasks.common import make_loader
        from ichflow.tasks.detection.dataset import train_negatives_dropped

        self.cfg, self.images, table = cfg, _SliceImages(prep.manifest, cfg.imgsz), self.table
        train = table.drop(table.index[train_negatives_dropped(table, cfg.neg_fraction, cfg.seed)])
        train = train[train["split"] == "train"]
        norm = Normalizer.fit(self.images.images[train["row"].to_numpy()], seed=cfg.seed)
        mean, std = norm.mean / 255.0, norm.std / 255.0
        log_params_once(norm.as_params())
        train_boxes = scaled_boxes(train, cfg.imgsz)
        anchors = parse_anchor_sizes(cfg.anchor_sizes) or anchor_sizes(train_boxes)
        log_params_once({"anchor_sizes": ",".join(map(str, anchors))})
        model = build_model(cfg.model, cfg.imgsz, mean, std, cfg.max_det, anchors).to(device)
        train_ds = SliceBoxes(self.images, train["row"].to_numpy(), train_boxes, cfg.in_channels,
                              augment=box_augment(cfg.aug_strength) if cfg.aug_strength > 0 else None)
        loader = make_loader(train_ds, cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, seed=cfg.seed,
                             drop_last=len(train_ds) > cfg.batch_size)
        loader.collate_fn = collate
        opt = adamw(model, cfg.lr, cfg.weight_decay)
        # warm-up as YOLO's warmup_epochs: 10 % of the steps, at most 3 epochs
        sched = warmup_cosine(opt, cfg.epochs * len(loader), warmup_fraction=min(0.1, 3 / cfg.epochs))
        self.predictor = FasterRCNNPredictor(model, cfg.imgsz, device)
        trainer = Trainer(model, opt, compute_loss, device, amp_dtype=amp_dtype(device, cfg.amp), scheduler=sched,
                          grad_clip=10.0, progress=False)
        fit = trainer.fit(loader, _val_scorer(self.predictor, self.images, table[table["split"] == "val"]
                                              .reset_index(drop=True), cfg),
                          cfg.epochs, monitor="val_fitness", mode="max", patience=cfg.patience,
                          checkpoint=folder / CHECKPOINT, on_epoch_end=on_epoch_end, budget=budget)
        config = {"engine": self.name, "arch": cfg.model, "imgsz": cfg.imgsz, "image_mean": mean, "image_std": std,
                  "in_channels": cfg.in_channels, "max_det": cfg.max_det, "anchor_sizes": list(anchors),
                  **norm.as_params()}
        return EngineFit(**vars(fit), model_config=config)

    def predict(self, part: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
        return predict_by_scan(self.predictor, self.images, part, self.cfg)

    @staticmethod
    def load_predictor(weights, config: dict, device) -> "FasterRCNNPredictor":
        return FasterRCNNPredictor.from_files(weights, config, device)
