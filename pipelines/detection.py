"""Entry point ``detection``: lesion boxes with YOLOv8 (default) or Faster R-CNN, tracked in MLflow."""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.entrypoints import run_entry_point

if __name__ == "__main__":
    run_entry_point("detection")
