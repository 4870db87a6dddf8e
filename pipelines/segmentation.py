"""Entry point ``segmentation``: PHE (edema) segmentation, trained, evaluated and registered in MLflow."""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.cli import main_guard
from ichflow.tasks.segmentation import SegmentationConfig, train_segmentation

if __name__ == "__main__":
    main_guard(train_segmentation, SegmentationConfig)
