"""Parameters of the ``detection`` entry point and its named presets."""

from __future__ import annotations

from dataclasses import dataclass

from ichflow.cli import choice
from ichflow.configs import TrainConfig

ENGINES = ("yolo", "fasterrcnn")   # the names of engines.ENGINES (this module stays free of torch)

PRESETS: dict[str, dict] = {
    # real PHE-SICH-CT-IDS data at native 512 px: sized for a GPU
    "phe": {"dataset": "phe", "imgsz": 512, "epochs": 60, "patience": 20, "batch_size": 16},
    # the same data on a small CPU: 192 px, 30 % of the train negatives, a 10-min training budget
    "phe-cpu": {"dataset": "phe", "imgsz": 192, "epochs": 12, "patience": 12, "neg_fraction": 0.3,
                "time_budget_min": 10.0},
    # Faster R-CNN from scratch on the real data (GPU): its ROI head needs a longer schedule than YOLO
    "phe-fasterrcnn": {"dataset": "phe", "engine": "fasterrcnn", "model": "mobilenet", "imgsz": 512, "epochs": 80,
                       "patience": 30, "batch_size": 16},
}


@dataclass
class DetectionConfig(TrainConfig):
    """Lesion boxes (hematoma + edema) with Ultralytics YOLOv8 or torchvision Faster R-CNN, from scratch."""

    preset: str = choice("", PRESETS)  # named preset: sets every parameter you do not give ('' = none)
    engine: str = choice("yolo", ENGINES)  # detector family
    model: str = "n"               # yolo: n | s | m (yolov8<x>.yaml from scratch), a model .yaml, or a local .pt;
    #                                fasterrcnn: mobilenet (fasterrcnn_mobilenet_v3_large_fpn; also what the
    #                                default 'n' means there) | resnet50
    imgsz: int = 192               # training/inference size (square, multiple of 32); PHE slices are 512
    epochs: int = 20
    patience: int = 15
    lr: float = 0.0                # AdamW learning rate; 0 = the engine's (yolo 5e-3; fasterrcnn 1e-3: from
    #                                scratch it learns nothing at 5e-3)
    weight_decay: float = 5e-4
    batch_size: int = 16
    conf_threshold: float = -1.0   # slice decision: a box with score >= this -> lesion; -1 = val-optimal (max F1)
    mosaic: float = 1.0            # YOLO mosaic probability (scaled by aug_strength)
    close_mosaic: int = 10         # YOLO: last epochs without mosaic
    neg_fraction: float = 1.0      # share of the TRAIN split's negative slices used for training (val/test: all)
    time_budget_min: float = 0.0   # stop after the epoch when another one would exceed this (0 = no limit)
    max_det: int = 50              # boxes kept per slice at inference
    anchor_sizes: str = "auto"     # fasterrcnn: auto (5 sizes spanning the training boxes) | coco (torchvision's
    #                                32,64,128,256,512) | 5 ascending sizes in px at imgsz, e.g. 8,16,32,64,128
    overlays: int = 8              # test slices drawn with predicted/true boxes
