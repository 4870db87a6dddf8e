"""Task 3: perihematomal-edema (PHE) segmentation with segmentation-models-pytorch.

``train_segmentation(cfg, on_epoch_end=None) -> dict`` is the entry (``mlflow run . -e segmentation``).
Modules: ``model`` (smp factory, local weights, loss, schedule), ``data`` (patch sampling with foreground
oversampling, whole-scan inference), ``metrics`` (Dice/IoU/sensitivity/specificity, volumes, slice
detection, edge cases), ``evaluate`` (per-split evaluation and figures), ``pyfunc`` (the served model).
"""

from ichflow.tasks.segmentation.train import PRESETS, REGISTERED_NAME, SegmentationConfig, train_segmentation

__all__ = ["PRESETS", "REGISTERED_NAME", "SegmentationConfig", "train_segmentation"]
