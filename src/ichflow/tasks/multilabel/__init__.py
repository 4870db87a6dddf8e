"""Task 4: multi-label hemorrhage subtypes (``mlflow run . -e multilabel``), patient-level k-fold CV."""

from ichflow.cli import lazy_attributes
from ichflow.tasks.multilabel.config import PRESETS, REGISTERED_NAME, MultilabelConfig

# the trainer imports torch: loaded on first use, so parsing a command line imports the config alone
__getattr__ = lazy_attributes(dict.fromkeys(("MultilabelRecipe", "train_multilabel"), "ichflow.tasks.multilabel.train"))

__all__ = ["MultilabelConfig", "MultilabelRecipe", "PRESETS", "REGISTERED_NAME", "train_multilabel"]
