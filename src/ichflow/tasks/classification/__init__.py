"""Task 1: binary bleed / no-bleed slice classification (``mlflow run . -e classification``)."""

from ichflow.tasks.classification.config import PRESETS, REGISTERED_NAME, ClassificationConfig
from ichflow.tasks.classification.train import ClassificationRecipe, train_classification

__all__ = ["ClassificationConfig", "ClassificationRecipe", "PRESETS", "REGISTERED_NAME", "train_classification"]
