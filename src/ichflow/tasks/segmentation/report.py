"""The report of one split, the same for the training run (val, test) and ``evaluate`` (eval).

:func:`log_split` summarises a split's counts at the selected threshold and logs, under ``prefix``: the
metrics (``<prefix>_*``), ``eval/<prefix>_per_patient.csv``, ``eval/<prefix>_metrics.json``,
``eval/val_threshold_sweep.csv`` (mean patient Dice at every threshold of the grid: where the threshold was
chosen; validation only, so no test-split sweep invites a choice on test),
``eval/<prefix>_summary.md`` (the headline table: per-patient mean [95 % CI], median and pooled Dice, IoU,
sensitivity, HD95 in mm and NSD at the tolerance), ``figures/<prefix>_pixel_confusion.png`` and
``figures/<prefix>_overlays.png`` (best / median / worst patient).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from ichflow.engine import figures
from ichflow.engine.stats import finite
from ichflow.paths import eval_artifact, figure_artifact
from ichflow.tasks.segmentation.metrics import SplitStats, select_threshold, summarise


def log_split(prefix: str, stats: SplitStats, threshold: float, step: int, pixel_mm: float = 0.508,
              slice_mm: float = 5.0, min_pixels: int = 1, nsd_tolerance_mm: float = 2.0) -> dict:
    """Summarise ``stats`` at ``threshold``, log the split's metrics, tables and figures; the metrics as
    ``<prefix>_<name>`` (NaN = undefined: returned, not logged to MLflow, null in the JSON)."""
    metrics, table = summarise(stats, threshold, pixel_mm, slice_mm, min_pixels, nsd_tolerance_mm, surface=True)
    mlflow.log_metrics(finite({f"{prefix}_{k}": v for k, v in metrics.items()}), step=step)
    mlflow.log_text(table.to_csv(index=False), eval_artifact(prefix, "per_patient"))
    mlflow.log_dict({k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()},
                    eval_artifact(prefix, "metrics", "json"))
    if prefix == "val":
        sweep = pd.DataFrame({"threshold": stats.thresholds, "mean_patient_dice": select_threshold(stats)[1]})
        mlflow.log_text(sweep.to_csv(index=False), eval_artifact(prefix, "threshold_sweep"))
    mlflow.log_text(summary_markdown(metrics, prefix), eval_artifact(prefix, "summary", "md"))
    _log_figure(pixel_confusion_figure(metrics, f"{prefix}: pixel confusion at p>={threshold:g}"),
                figure_artifact(prefix, "pixel_confusion"))
    _log_figure(overlay_figure(stats, table, threshold,
                               f"{prefix}: best / median / worst patient (largest-edema slice)"),
                figure_artifact(prefix, "overlays"))
    return {f"{prefix}_{k}": v for k, v in metrics.items()}


def _fmt(v, digits: int) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def summary_markdown(metrics: dict, prefix: str) -> str:
    """The split's headline metrics as a Markdown table (per-patient over patients with truth; pooled)."""
    tol = metrics.get("nsd_tolerance_mm")
    rows = [("Dice", "dice", 3), ("IoU", "iou", 3), ("Sensitivity", "sensitivity", 3),
            ("HD95 (mm)", "hd95_mm", 1), (f"NSD @ {_fmt(tol, 1)} mm", "nsd", 3)]
    lines = [f"{prefix}: {metrics['n_patients']} patients ({metrics['n_patients_no_truth']} without edema, "
             f"left out of the per-patient columns), threshold {metrics['threshold']:g}", "",
             "| metric | mean [95 % CI] | median | pooled |", "|---|---|---|---|"]
    for label, key, d in rows:
        if key not in metrics and f"{key}_pooled" not in metrics:
            continue
        mean = (f"{_fmt(metrics.get(key), d)} [{_fmt(metrics.get(f'{key}_ci_low'), d)}, "
                f"{_fmt(metrics.get(f'{key}_ci_high'), d)}]") if key in metrics else "n/a"
        lines.append(f"| {label} | {mean} | {_fmt(metrics.get(f'{key}_median'), d)} | "
                     f"{_fmt(metrics.get(f'{key}_pooled'), d)} |")
    if "n_patients_hd95_undefined" in metrics:
        lines += ["", f"HD95 undefined (nothing predicted) for {metrics['n_patients_hd95_undefined']} patient(s) "
                      "with edema, left out of its mean and median. Pooled HD95: the 95th percentiles of "
                      "all patients' edge distances together (patients with both masks non-empty); pooled "
                      "NSD: edge voxels within tolerance / all edge voxels, every patient."]
    return "\n".join(lines) + "\n"


def _log_figure(fig, artifact: str) -> None:
    mlflow.log_figure(fig, artifact)
    figures.close(fig)


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
