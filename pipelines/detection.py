"""Entry point ``detection``: lesion boxes with YOLOv8 (default) or Faster R-CNN, tracked in MLflow."""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.cli import main_guard
from ichflow.tasks.detection import DetectionConfig, train_detection

if __name__ == "__main__":
    main_guard(train_detection, DetectionConfig)
