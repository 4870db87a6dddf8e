"""Task 1: binary bleed / no-bleed slice classification (``mlflow run . -e classification``)."""

from ichflow.tasks.classification.train import (PRESETS, REGISTERED_NAME, ClassificationConfig,
                                                train_classification)

__all__ = ["ClassificationConfig", "PRESETS", "REGISTERED_NAME", "train_classification"]
