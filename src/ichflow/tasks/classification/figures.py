"""Figures of a classification training as a whole: Grad-CAM examples.

The per-epoch loss / validation curves are MLflow's own metric charts (the trainer logs every epoch at
step = epoch); no PNG duplicates them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ichflow.engine import figures
from ichflow.paths import figure_artifact
from ichflow.tasks import slice_classifier as sc


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
    captions = [f"{group} · p = {scores[r]:.2f}\npatient {data.manifest.loc[r, 'patient_id']} · "
                f"slice {data.manifest.loc[r, 'slice_index']}" for group, r in picks]
    fig = gradcam_figure([data.images[r] for _, r in picks], maps, captions,
                         f"Grad-CAM of the bleed logit ({split}; last stage of {model_name})")
    figures.log_figure(fig, figure_artifact(split, "gradcam"))


def gradcam_figure(images, maps, captions: list[str], title: str, max_cols: int = 4):
    """Each image with its Grad-CAM map over it, a two-line caption per panel, one shared colour bar."""
    rows, cols = figures.grid_shape(len(images), max_cols)
    fig, axes = figures.new_figure(rows, cols, width_in=3.0 * cols + 1.2, height_in=3.3 * rows + 0.8)
    heat = None
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, cam, caption in zip(axes.ravel(), images, maps, captions):
        ax.imshow(image, cmap="gray")
        heat = ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=9)
    if heat is not None:
        fig.colorbar(heat, ax=axes.ravel().tolist(), shrink=0.8, label="Grad-CAM (0 = none, 1 = strongest)")
    fig.suptitle(title)
    return fig
