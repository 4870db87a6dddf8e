"""The task registry: every place that needs "the list of tasks" looks it up here.

A :class:`TaskSpec` says what a task is (registered model name, target, headline metric, which readers
feed it) and where its code lives (config class, training entry, report and external-evaluation glue),
as import paths resolved on first use, so importing this module stays cheap (``--help``, the registry).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ichflow.errors import ParameterError


DEGENERATE_TAG = "ichflow.degenerate"   # on a training run: why its model learned nothing (the registry reads it)


@dataclass(frozen=True)
class TaskSpec:
    name: str                 # entry point and experiment suffix (ichflow-<name>)
    registered_name: str      # Model Registry name
    package: str              # ichflow.tasks.<name>: config, train function, ``report`` and ``external`` modules
    config_name: str          # the dataclass of its parameters
    train_name: str           # ``train_<name>(cfg, on_epoch_end=None) -> TaskResult``
    target: str               # what the model predicts (logged as tag ichflow.target)
    label_column: str         # manifest column its MLflow dataset inputs are labelled with
    objective: str            # validation metric the task selects on (checkpoints, tuning)
    headline: tuple[str, ...]  # metric names (without split prefix) a summary shows, most important first
    readers: tuple[str, ...]  # data readers that carry its labels
    synthetic_dataset: str    # the phantom it trains on when no data folder is given
    cross_validated: bool = False   # selection metrics are out-of-fold (oof_*), not a validation split's
    summary: str = ""         # what the registered model does, its input and output (the model page)

    def config_class(self):
        return getattr(importlib.import_module(self.package), self.config_name)

    def train_function(self):
        return getattr(importlib.import_module(self.package), self.train_name)

    def predict_glue(self):
        """Module with ``predict_scan(model, meta, scan, files, arr, out, overlays)`` and ``TABLE`` (``predict``)."""
        return importlib.import_module(f"{self.package}.predict")

    def external(self):
        """Module with ``check_data(model, part)`` and ``evaluate_external(model, part, prefix)``."""
        return importlib.import_module(f"{self.package}.external")


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("segmentation", "ich-segmentation", "ichflow.tasks.segmentation", "SegmentationConfig",
             "train_segmentation", target="phe", label_column="mask_path", objective="val_dice",
             headline=("dice", "dice_median", "dice_pooled", "sensitivity", "volume_abs_err_ml", "slice_f1"),
             readers=("phe", "phe_nifti"), synthetic_dataset="synthetic",
             summary="Perihematomal edema (PHE) segmentation of one non-contrast head CT (the edema rim around "
                     "a spontaneous intracerebral hematoma, not the hematoma). Input: ONE scan, slices in axial order at "
                     "native resolution, as uint8 (N, H, W) 8-bit slices windowed with the model's `window` "
                     "(brain, as the training PNGs), a list of base64 PNG slices, int16 HU (N, H, W) (the model "
                     "windows it; `params={\"intensity\": \"hu\"}` when no value is outside 0..255) or one base64 "
                     ".nii.gz; a 0..1 float image is refused (HTTP 400). Output: float32 (N, H, W) edema "
                     "probability; `params={\"output\": \"mask\"}` gives a 0/1 mask at the threshold chosen on "
                     "validation, `mask_png` one base64 PNG (0/255) per slice, `mask_rle` row-major run lengths "
                     "per slice."),
    TaskSpec("classification", "ich-classification", "ichflow.tasks.classification", "ClassificationConfig",
             "train_classification", target="bleed", label_column="has_lesion", objective="val_roc_auc",
             headline=("f1", "recall", "precision", "roc_auc", "patient_f1"), readers=("phe", "phe_nifti", "ctich"),
             synthetic_dataset="synthetic",
             summary="Bleed / no-bleed per head-CT slice. Input: ONE scan in axial order as uint8 (N, H, W) "
                     "8-bit slices windowed with the model's `window` (brain), a list of base64 PNG slices, "
                     "int16 HU (windowed by the model; `intensity=hu` when no value is outside 0..255) or one "
                     "base64 .nii.gz. Output: one row per slice, `has_lesion_probability` "
                     "(0..1) and `has_lesion` (0/1 at the threshold chosen on validation)."),
    TaskSpec("detection", "ich-detection", "ichflow.tasks.detection", "DetectionConfig", "train_detection",
             target="lesion_box", label_column="has_lesion", objective="val_map50",
             headline=("map50", "map50_95", "slice_f1", "slice_recall"), readers=("phe",),
             synthetic_dataset="synthetic",
             summary="Boxes around hematoma + perihematomal edema on head-CT slices. Input: ONE scan in axial order as "
                     "uint8 (N, H, W) 8-bit slices windowed with the model's `window` (brain), a list of base64 "
                     "PNG slices, int16 HU (windowed by the model; `intensity=hu` when no value is outside "
                     "0..255) or one base64 .nii.gz. Output: one row per box "
                     "(`slice_index`, `x1, y1, x2, y2` in input pixels, `score`) with score >= `conf_threshold` "
                     "(default: chosen on validation); a slice without rows is negative."),
    TaskSpec("multilabel", "ich-subtypes", "ichflow.tasks.multilabel", "MultilabelConfig", "train_multilabel",
             target="subtypes", label_column="IVH", objective="val_macro_auc",
             headline=("macro_auc", "macro_f1", "micro_f1"), readers=("ctich",),
             synthetic_dataset="synthetic-ctich", cross_validated=True,
             summary="Hemorrhage subtypes per head-CT slice (multi-label, IVH / IPH / SAH by default), selected "
                     "by patient-level cross-validation. Input: ONE scan in axial order as uint8 (N, H, W) "
                     "8-bit slices windowed with the model's `window` (brain), a list of base64 PNG slices, "
                     "int16 HU (windowed by the model; `intensity=hu` when no value is outside 0..255) or one "
                     "base64 .nii.gz. Output: one row per slice, `<class>_probability` and "
                     "`<class>` (0/1 at each class's threshold chosen on inner validation)."),
)}


def task_spec(name: str, parameter: str = "task") -> TaskSpec:
    """The spec of task ``name``; an unknown name is a :class:`ParameterError` naming ``parameter``."""
    if name not in TASKS:
        raise ParameterError(parameter, f"unknown task {name!r}; one of {', '.join(TASKS)}")
    return TASKS[name]


def spec_by_model_name(model_name: str) -> TaskSpec | None:
    return next((s for s in TASKS.values() if s.registered_name == model_name), None)
