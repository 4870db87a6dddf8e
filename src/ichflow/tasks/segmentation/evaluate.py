"""Whole-scan evaluation of one split: predictions per patient -> counts at a threshold grid; figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ichflow.engine import figures
from ichflow.engine.augment import Normalizer
from ichflow.tasks.segmentation.data import predict_scan
from ichflow.tasks.segmentation.metrics import SplitStats, accumulate

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.91, 0.1))


def evaluate_split(model: torch.nn.Module, part: pd.DataFrame, images, masks, normalizer: Normalizer,
                   channels: int, device: torch.device, loss_fn=None, thresholds=THRESHOLDS,
                   batch_size: int = 4, amp_dtype=None, keep_examples: bool = False,
                   progress: bool = True, desc: str = "eval") -> SplitStats:
    """Predict every slice of every patient of ``part`` (rows aligned with images/masks) and count.

    Each patient's slices are predicted as one scan in axial order (the same code path as the pyfunc).
    """
    was_training = model.training
    model.eval()
    thresholds = np.asarray(thresholds, float)
    patients, counts, s_truth, s_pred, s_patient, s_index = [], [], [], [], [], []
    losses, weights, examples = [], [], {}
    groups = list(part.groupby("patient_id", sort=True))
    for p, (pid, group) in enumerate(tqdm(groups, desc=desc, leave=False, disable=not progress, unit="patient")):
        rows = group.sort_values("slice_index").index.to_numpy()
        slices = np.asarray(images[rows])
        truth = np.asarray(masks[rows]) > 127
        probs, logits = predict_scan(model, slices, normalizer, channels, device, batch_size, amp_dtype)
        c, st, sp = accumulate(probs, truth, thresholds)
        patients.append(str(pid))
        counts.append(c)
        s_truth.append(st)
        s_pred.append(sp)
        s_patient.append(np.full(len(rows), p))
        s_index.append(group.loc[rows, "slice_index"].to_numpy())
        if loss_fn is not None:
            with torch.no_grad():
                lt = loss_fn(torch.from_numpy(logits)[:, None], torch.from_numpy(truth.astype(np.float32))[:, None])
            losses.append(float(lt))
            weights.append(len(rows))
        if keep_examples:
            k = int(np.argmax(st)) if st.max() > 0 else int(np.argmax(sp[:, len(thresholds) // 2]))
            examples[str(pid)] = (slices[k].copy(), truth[k].copy(), probs[k].astype(np.float16),
                                  int(group.loc[rows[k], "slice_index"]))
    if was_training:
        model.train()
    loss = float(np.average(losses, weights=weights)) if losses else float("nan")
    return SplitStats(patients=patients, thresholds=thresholds, counts=np.stack(counts),
                      slice_truth=np.concatenate(s_truth), slice_pred=np.concatenate(s_pred),
                      slice_patient=np.concatenate(s_patient), slice_index=np.concatenate(s_index), loss=loss,
                      examples=examples)


def pixel_confusion_figure(metrics: dict, title: str):
    cm = np.array([[metrics["pixels_tn"], metrics["pixels_fp"]], [metrics["pixels_fn"], metrics["pixels_tp"]]],
                  dtype=np.int64)
    return figures.confusion_figure(cm, ["background", "PHE"], title=title)


def overlay_figure(stats: SplitStats, table: pd.DataFrame, threshold: float, title: str):
    """Image / truth / prediction for the best, median and worst patients by Dice (with truth).

    Each row shows the patient's slice with the most edema, zoomed on truth and prediction.
    """
    plt = figures.plt
    ranked = table[table["has_truth"]].sort_values("dice", ascending=False).reset_index(drop=True)
    if ranked.empty:
        ranked = table.reset_index(drop=True)
    n, chosen = len(ranked), {}
    for label, i in (("best", 0), ("worst", n - 1), ("median", n // 2)):
        chosen.setdefault(i, label)
    picks = [(label, ranked.iloc[i]) for i, label in sorted(chosen.items())]
    fig, axes = plt.subplots(len(picks), 3, figsize=(10, 3.4 * len(picks)), squeeze=False)
    for r, (label, row) in enumerate(picks):
        image, truth, prob, sidx = stats.examples[row["patient_id"]]
        pred = prob.astype(np.float32) >= threshold
        window = _zoom(truth | pred, image.shape)
        image, truth, pred = image[window], truth[window], pred[window]
        axes[r, 0].imshow(image, cmap="gray")
        axes[r, 0].set_title(f"{label}: patient {row['patient_id']} slice {sidx}\n3D Dice {row['dice']:.3f}",
                             fontsize=9)
        for ax, m, colour, name in ((axes[r, 1], truth, (0.1, 0.9, 0.1), "truth"),
                                    (axes[r, 2], pred, (0.95, 0.2, 0.1), f"prediction (p>={threshold:g})")):
            ax.imshow(image, cmap="gray")
            rgba = np.zeros((*m.shape, 4))
            rgba[m] = (*colour, 0.55)
            ax.imshow(rgba)
            ax.set_title(name, fontsize=9)
        for ax in axes[r]:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _zoom(region: np.ndarray, shape, margin: int = 48, min_size: int = 192):
    """Slices of a square window around ``region`` (the whole image when it is empty)."""
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return slice(None), slice(None)
    h, w = shape
    side = min(max(h, w), max(min_size, int(np.ptp(ys)) + 2 * margin, int(np.ptp(xs)) + 2 * margin))
    cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
    y0 = int(np.clip(cy - side // 2, 0, max(0, h - side)))
    x0 = int(np.clip(cx - side // 2, 0, max(0, w - side)))
    return slice(y0, y0 + side), slice(x0, x0 + side)


def threshold_sweep(stats: SplitStats, means: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"threshold": stats.thresholds, "mean_patient_dice": means})
