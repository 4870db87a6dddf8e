"""Images a user opens next to a scan: a slice with its predicted mask or boxes drawn in.

Two kinds: the served ``predict`` overlays (PIL images, :func:`mask_overlay` / :func:`boxes_overlay`, one per
slice where something was found) and the pieces of the evaluation figures logged to MLflow
(:func:`draw_segmentation`: truth and prediction as contours, the TP / FP / FN pixels colour-coded, and the
lesion volumes; :func:`box_legend_handles`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

# colour-blind-safe (Okabe-Ito) colours of the segmentation overlays, RGB 0-1
TP_COLOUR = (0.94, 0.89, 0.26)     # yellow: predicted and true
FP_COLOUR = (0.84, 0.37, 0.0)      # vermilion: predicted only
FN_COLOUR = (0.34, 0.71, 0.91)     # sky blue: missed
TRUTH_COLOUR = (0.0, 0.62, 0.45)   # bluish green
PRED_COLOUR = (0.8, 0.47, 0.65)    # reddish purple
OUTCOMES = {1: ("TP: predicted and true", TP_COLOUR), 2: ("FP: predicted only", FP_COLOUR),
            3: ("FN: missed", FN_COLOUR)}
FILL_ALPHA = 0.45

SERVED_COLOUR = (255, 40, 40)


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (outside the image counts as background)."""
    m = np.pad(mask.astype(bool), 1)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def boundary(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The pixels of ``mask`` within ``width`` pixels of its edge (its contour, drawn on pixels)."""
    mask = np.asarray(mask).astype(bool)
    inner = mask
    for _ in range(max(1, width)):
        inner = _erode(inner)
    return mask & ~inner


def outcome_map(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per pixel 0 = true negative, 1 = TP (both), 2 = FP (predicted only), 3 = FN (missed)."""
    t, p = np.asarray(truth).astype(bool), np.asarray(pred).astype(bool)
    out = np.zeros(t.shape, np.uint8)
    out[t & p], out[~t & p], out[t & ~p] = 1, 2, 3
    return out


def outcome_rgba(truth: np.ndarray, pred: np.ndarray, alpha: float = FILL_ALPHA) -> np.ndarray:
    """RGBA (0-1) layer: TP / FP / FN pixels in their colours at ``alpha``, the outline of each region opaque,
    everything else transparent."""
    codes = outcome_map(truth, pred)
    rgba = np.zeros((*codes.shape, 4))
    for code, (_, colour) in OUTCOMES.items():
        region = codes == code
        rgba[region] = (*colour, alpha)
        rgba[boundary(region)] = (*colour, 1.0)
    return rgba


def volume_text(pred_ml: float, truth_ml: float, slice_pred_ml: float | None = None,
                slice_truth_ml: float | None = None) -> str:
    """``lesion volume: pred 12.3 mL / truth 10.1 mL`` (and the shown slice's share, when given)."""
    text = f"volume: pred {pred_ml:.1f} mL / truth {truth_ml:.1f} mL"
    if slice_pred_ml is not None and slice_truth_ml is not None:
        text += f"\nthis slice: pred {slice_pred_ml:.2f} mL / truth {slice_truth_ml:.2f} mL"
    return text


def draw_segmentation(axes, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, corner_text: str = "") -> None:
    """On three axes: the slice alone; truth (solid) and prediction (dashed) contours, not filled, with
    ``corner_text`` (the volumes) in the top-left corner; the TP / FP / FN pixels colour-coded."""
    clean, contours, outcomes = axes
    truth, pred = np.asarray(truth).astype(bool), np.asarray(pred).astype(bool)
    for ax in axes:
        ax.imshow(image, cmap="gray", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    for mask, colour, style in ((truth, TRUTH_COLOUR, "solid"), (pred, PRED_COLOUR, "dashed")):
        if mask.any() and not mask.all():
            contours.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.8, linestyles=style)
    if corner_text:
        contours.text(0.02, 0.98, corner_text, transform=contours.transAxes, ha="left", va="top", fontsize=8,
                      color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "edgecolor": "none"})
    outcomes.imshow(outcome_rgba(truth, pred), interpolation="nearest")
    codes = outcome_map(truth, pred)
    counts = ", ".join(f"{name.split(':')[0]} {int((codes == c).sum())} px" for c, (name, _) in OUTCOMES.items())
    outcomes.text(0.02, 0.98, counts, transform=outcomes.transAxes, ha="left", va="top", fontsize=8,
                  color="white", bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "edgecolor": "none"})
    clean.set_title("CT slice", fontsize=9)


def segmentation_legend_handles(threshold: float | None = None) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    pred = "prediction" + (f" (p ≥ {threshold:g})" if threshold is not None else "")
    return [Line2D([], [], color=TRUTH_COLOUR, lw=2, ls="solid", label="truth contour"),
            Line2D([], [], color=PRED_COLOUR, lw=2, ls="dashed", label=f"{pred} contour"),
            *(Patch(facecolor=(*c, FILL_ALPHA), edgecolor=c, label=name) for name, c in OUTCOMES.values())]


def box_legend_handles(threshold: float | None = None) -> list:
    """Legend entries of the detection figures: true boxes (lime) and predicted boxes (red, with their score)."""
    from matplotlib.patches import Patch

    kept = f" (score ≥ {threshold:.3f})" if threshold is not None else ""
    return [Patch(fill=False, edgecolor="lime", lw=1.5, label="truth box"),
            Patch(fill=False, edgecolor="red", lw=1.5, label=f"predicted box{kept}, number = score")]


# ------------------------------------------------------------------------------------ served (predict)

def mask_overlay(img: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The slice with the predicted mask's contour (2 px) drawn over a faint tint, so the anatomy under the
    prediction stays visible."""
    rgb = np.repeat(np.asarray(img)[..., None], 3, axis=-1).astype(np.float32)
    m = np.asarray(mask) > 0
    colour = np.array(SERVED_COLOUR, np.float32)
    rgb[m] = 0.8 * rgb[m] + 0.2 * colour
    rgb[boundary(m, width=2)] = colour
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def boxes_overlay(img: np.ndarray, boxes: pd.DataFrame) -> Image.Image:
    """The slice with every predicted box and its score (on a dark label so it reads on any background)."""
    pil = Image.fromarray(img).convert("RGB")
    draw = ImageDraw.Draw(pil)
    for b in boxes.itertuples():
        draw.rectangle([b.x1, b.y1, b.x2, b.y2], outline=(255, 60, 60), width=2)
        text, xy = f"{b.score:.2f}", (b.x1 + 2, max(0, b.y1 - 12))
        draw.rectangle(draw.textbbox(xy, text), fill=(0, 0, 0))
        draw.text(xy, text, fill=(255, 255, 0))
    return pil


def save_image(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
