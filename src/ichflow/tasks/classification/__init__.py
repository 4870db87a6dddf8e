"""Task 1: binary bleed / no-bleed slice classification (``mlflow run . -e classification``)."""

from ichflow.cli import lazy_attributes
from ichflow.tasks.classification.config import PRESETS, REGISTERED_NAME, ClassificationConfig

# the trainer imports torch: loaded on first use, so parsing a command line imports the config alone
__getattr__ = lazy_attributes(dict.fromkeys(("ClassificationRecipe", "train_classification"),
                                            "ichflow.tasks.classification.train"))

__all__ = ["ClassificationConfig", "ClassificationRecipe", "PRESETS", "REGISTERED_NAME", "train_classification"]
