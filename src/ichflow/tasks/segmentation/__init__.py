"""Task 3: perihematomal-edema (PHE) segmentation.

``train_segmentation(cfg, on_epoch_end=None) -> TaskResult`` is the entry (``mlflow run . -e segmentation``).
Modules: ``config`` (parameters, presets, validation), ``train`` (the recipe's hooks), ``engines`` (the network
families: smp), ``model`` (smp factory, local weights, loss, schedule), ``data`` (patch sampling with foreground
oversampling, whole-scan inference), ``metrics`` (Dice/IoU/sensitivity/specificity, volumes, slice detection,
edge cases), ``evaluate`` (per-split counting), ``report`` (per-split logging and figures), ``pyfunc`` (the
served model), ``external`` (metrics of a served model, the ``evaluate`` entry point).
"""

from ichflow.cli import lazy_attributes
from ichflow.tasks.segmentation.config import PRESETS, SegmentationConfig
from ichflow.tasks.spec import TASKS

# the trainer imports torch: loaded on first use, so parsing a command line imports the config alone
__getattr__ = lazy_attributes({"train_segmentation": "ichflow.tasks.segmentation.train"})

REGISTERED_NAME = TASKS["segmentation"].registered_name

__all__ = ["PRESETS", "REGISTERED_NAME", "SegmentationConfig", "train_segmentation"]
