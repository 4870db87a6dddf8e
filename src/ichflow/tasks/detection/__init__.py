"""Task 2, lesion detection: boxes around hematoma + edema with Ultralytics YOLOv8 or Faster R-CNN.

``train_detection(cfg, on_epoch_end=None) -> TaskResult`` is the entry point body (``train.DetectionRecipe``,
engines by name in ``engines``); ``slice_metrics`` scores stored predictions at any confidence threshold without
retraining.
"""

from ichflow.tasks.detection.config import PRESETS, DetectionConfig
from ichflow.tasks.detection.metrics import best_conf_threshold, box_metrics, slice_metrics
from ichflow.tasks.detection.train import REGISTERED_NAME, train_detection

__all__ = ["DetectionConfig", "PRESETS", "train_detection", "slice_metrics", "best_conf_threshold", "box_metrics",
           "REGISTERED_NAME"]
