"""Figures of a classification training as a whole: loss / validation curves, Grad-CAM examples."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch

from ichflow.engine import figures
from ichflow.paths import figure_artifact
from ichflow.tasks import slice_classifier as sc


def log_curves(history: list[dict]) -> None:
    """``figures/training_loss_curves.png`` and ``figures/training_val_curves.png``."""
    for what, keys, title in (("loss_curves", ["train_loss", "val_loss"], "Loss per epoch"),
                              ("val_curves", ["val_pr_auc", "val_roc_auc", "val_f1_at_0.5"],
                               "Validation metrics per epoch")):
        fig = figures.curves_figure(history, keys, title=title)
        mlflow.log_figure(fig, figure_artifact("training", what))
        figures.close(fig)


def pick_examples(frame: pd.DataFrame, per_group: int) -> list[tuple[str, int]]:
    """(group, row) for the most confident TP / FP and the most missed FN / clearest TN."""
    groups = {
        "TP": frame[(frame["y"] == 1) & (frame["pred"] == 1)].sort_values("score", ascending=False),
        "FP": frame[(frame["y"] == 0) & (frame["pred"] == 1)].sort_values("score", ascending=False),
        "FN": frame[(frame["y"] == 1) & (frame["pred"] == 0)].sort_values("score"),
        "TN": frame[(frame["y"] == 0) & (frame["pred"] == 0)].sort_values("score"),
    }
    return [(name, int(r)) for name, g in groups.items() for r in g["row"].head(per_group)]


def log_gradcam(model, dataset: sc.SliceDataset, frame: pd.DataFrame, per_group: int, device, split: str,
                model_name: str) -> None:
    """``figures/<split>_gradcam.png``: Grad-CAM of the bleed logit on a few TP / FP / FN / TN slices.

    ``dataset`` yields the (unaugmented) input of every manifest row; ``frame`` has ``row``, ``y``, ``score``,
    ``pred`` of the split.
    """
    picks = pick_examples(frame, per_group) if per_group > 0 else []
    if not picks:
        return
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    data = dataset.data
    ds = sc.SliceDataset(data, np.array([r for _, r in picks]), dataset.labels, dataset.in_channels,
                         dataset.normalizer)
    x = torch.stack([ds[j][0] for j in range(len(ds))]).to(device)
    model.eval()
    with GradCAM(model=model, target_layers=[sc.gradcam_layer(model)]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * len(x))
    scores = frame.set_index("row")["score"]
    fig, axes = figures.plt.subplots(1, len(picks), figsize=(2.6 * len(picks), 3.0), squeeze=False)
    for ax, (group, r), heat in zip(axes[0], picks, maps):
        ax.imshow(data.images[r], cmap="gray")
        ax.imshow(heat, cmap="jet", alpha=0.35)
        pid, sl = data.manifest.loc[r, "patient_id"], data.manifest.loc[r, "slice_index"]
        ax.set_title(f"{group} p={scores[r]:.2f}\npt {pid} sl {sl}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"Grad-CAM of the bleed logit ({split}; last stage of {model_name})")
    fig.tight_layout()
    mlflow.log_figure(fig, figure_artifact(split, "gradcam"))
    figures.close(fig)
