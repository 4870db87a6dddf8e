"""Task 4: multi-label hemorrhage subtypes (``mlflow run . -e multilabel``), patient-level k-fold CV."""

from ichflow.tasks.multilabel.train import PRESETS, REGISTERED_NAME, MultilabelConfig, train_multilabel

__all__ = ["MultilabelConfig", "PRESETS", "REGISTERED_NAME", "train_multilabel"]
