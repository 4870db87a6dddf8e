"""Task 2, lesion detection: boxes around hematoma + edema with Ultralytics YOLOv8 or Faster R-CNN.

``train_detection(cfg, on_epoch_end=None) -> TaskResult`` is the entry point body (``train.DetectionRecipe``,
engines by name in ``engines``); ``slice_metrics`` scores stored predictions at any confidence threshold without
retraining.
"""

from ichflow.cli import lazy_attributes
from ichflow.tasks.detection.config import PRESETS, DetectionConfig
from ichflow.tasks.spec import TASKS

REGISTERED_NAME = TASKS["detection"].registered_name

# the trainer imports torch and the metrics pandas: loaded on first use, so parsing a command line imports the
# config alone
__getattr__ = lazy_attributes({"train_detection": "ichflow.tasks.detection.train",
                               **dict.fromkeys(("slice_metrics", "best_conf_threshold", "box_metrics"),
                                               "ichflow.tasks.detection.metrics")})

__all__ = ["DetectionConfig", "PRESETS", "train_detection", "slice_metrics", "best_conf_threshold", "box_metrics",
           "REGISTERED_NAME"]
