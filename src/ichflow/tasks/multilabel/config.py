"""Parameters of the multi-label subtype classifier, its presets and the parsing of its list parameters."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ichflow.cli import choice
from ichflow.configs import TrainConfig
from ichflow.errors import ParameterError
from ichflow.tasks.spec import TASKS

REGISTERED_NAME = TASKS["multilabel"].registered_name
FINAL_MODELS = ("best_fold", "refit")
SAMPLERS = ("none", "balanced")
POS_WEIGHTS = ("prevalence", "none")

PRESETS = {
    # CT-ICH (82 patients, 2,501 slices), 5 folds. The balanced sampler draws half the batch from slices with
    # a bleed of a selected class; an epoch is steps_per_epoch batches.
    "ctich": {"dataset": "ctich", "image_size": 128, "epochs": 6, "patience": 3, "batch_size": 16,
              "steps_per_epoch": 30, "sampler": "balanced", "lr": 1e-3},
}


@dataclass
class MultilabelConfig(TrainConfig):
    """Multi-label subtype classifier (timm CNN, k sigmoid outputs), evaluated by patient-level k-fold CV."""

    preset: str = choice("", PRESETS)  # named preset: sets every parameter you do not give ('' = none)
    dataset: str = "auto"             # auto: data_dir's layout, or synthetic-ctich without data; ctich; csv
                                      # (data_dir = a labels CSV image,<class>,...); synthetic-ctich
    synthetic_patients: int = 20      # phantom when no data_dir: 20 patients x 8 slices, each class in 8 patients
    synthetic_slices: int = 8         # phantom without data_dir: slices per patient
    classes: str = "IVH,IPH,SAH"      # comma-separated subset of IVH,IPH,SAH,EDH,SDH,any (or the CSV's columns);
                                      # any = any hemorrhage on the slice (labels.py)
    model: str = "resnet10t"          # any timm model; resnet10t: fast, its 3x3 stem keeps thin SAH lines
    pretrained: str = ""              # '' or none = from scratch; a local weights file (nothing is downloaded);
                                      # or efficientnet_lite0_imagenet: ImageNet weights shipped in a package,
                                      # with model=tf_efficientnet_lite0
    image_size: int = 128             # slices are resized to image_size x image_size
    batch_size: int = 8
    epochs: int = 18
    patience: int = 8
    lr: float = 3e-3
    aug_strength: float = 0.3
    pos_weight: str = choice("prevalence", POS_WEIGHTS)  # BCE pos_weight per class: prevalence = negatives /
    #                                                     positives in training; none = plain BCE
    pos_weight_multipliers: str = ""  # per-class factors on pos_weight, e.g. "1,2,0.5" ('' = all 1)
    sampler: str = choice("none", SAMPLERS)  # balanced: half of each batch has a bleed of a selected class
    steps_per_epoch: int = 0          # 0 = one pass over the training slices
    scan_context: str = "none"        # probabilities averaged over axial neighbours: none | mean3 | tri5 | mean5;
                                      # auto = per fold, the kernel with the best inner-validation macro-AUC
                                      # (on CT-ICH it did not raise the out-of-fold AUC: reports/multilabel_ctich.md)
    threshold_goal: str = "f1"        # per class on inner validation: f1 | recall (>= target_recall)
    target_recall: float = 0.9        # threshold_goal=recall: the recall each class's threshold must reach
    cv_repeats: int = 1               # repeated patient CV: R fold sets (repeat r > 0 re-deals the folds with
    #                                   seed split_seed + r); the out-of-fold headline averages each slice's R
    #                                   held-out scores, and the spread over repeats is logged (_repeat_sd)
    final_model: str = choice("best_fold", FINAL_MODELS)  # the registered model: the best fold's, or one more
    #                                                       trained on all folds but one (see the package doc)


def parse_classes(text: str) -> list[str]:
    classes = [c.strip() for c in str(text).split(",") if c.strip()]
    if not classes:
        raise ParameterError("classes", "is empty; e.g. classes=IVH,IPH,SAH")
    if len(set(classes)) != len(classes):
        raise ParameterError("classes", f"has duplicates: {classes}")
    return classes


SUBTYPES = ("IVH", "IPH", "SAH", "EDH", "SDH")        # the CT-ICH subtype columns (a labels CSV may have others)
NO_SUBTYPE_LABELS = ("phe", "phe_nifti", "synthetic")             # datasets whose readers carry no subtype labels


def validate_labels(classes: list[str], dataset: str) -> None:
    """The classes exist in the chosen dataset, before it is read (a labels CSV is checked when read)."""
    from ichflow.tasks.multilabel.labels import ANY   # pandas: not needed to parse a command line

    if dataset in NO_SUBTYPE_LABELS:
        raise ParameterError("dataset", f"{dataset!r} has no subtype labels; use ctich, synthetic-ctich, csv or auto")
    unknown = [c for c in classes if c not in (*SUBTYPES, ANY)]   # what a CT-ICH-layout dataset can label
    if dataset in ("ctich", "synthetic-ctich") and unknown:  # auto may be a labels CSV with its own columns
        raise ParameterError("classes", f"{unknown} are not subtypes of CT-ICH ({', '.join(SUBTYPES)}) or "
                                        f"{ANY!r} (any of them); other classes need a labels CSV (dataset=csv)")


def parse_multipliers(text: str, n: int) -> np.ndarray:
    if not str(text).strip():
        return np.ones(n, dtype=np.float32)
    name = "pos_weight_multipliers"
    try:
        vals = np.array([float(v) for v in str(text).split(",")], dtype=np.float32)
    except ValueError as exc:
        raise ParameterError(name, f"must be comma-separated numbers; got {text!r}") from exc
    if len(vals) != n:
        raise ParameterError(name, f"has {len(vals)} values for {n} classes")
    if (vals <= 0).any():
        raise ParameterError(name, f"must be > 0; got {text!r}")
    return vals
