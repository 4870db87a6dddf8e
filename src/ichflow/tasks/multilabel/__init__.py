"""Task 4: multi-label hemorrhage subtypes (``mlflow run . -e multilabel``), patient-level k-fold CV."""

from ichflow.tasks.multilabel.config import PRESETS, REGISTERED_NAME, MultilabelConfig
from ichflow.tasks.multilabel.train import MultilabelRecipe, train_multilabel

__all__ = ["MultilabelConfig", "MultilabelRecipe", "PRESETS", "REGISTERED_NAME", "train_multilabel"]
