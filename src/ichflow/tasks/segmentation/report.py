"""The report of one split, the same for the training run (val, test) and ``evaluate`` (eval).

:func:`log_split` summarises a split's counts at the selected threshold and logs, under ``prefix``: the
metrics (``<prefix>_*``), ``eval/<prefix>_per_patient.csv``, ``eval/<prefix>_metrics.json``,
``eval/val_threshold_sweep.csv`` (mean patient Dice at every threshold of the grid: where the threshold was
chosen; validation only, so no test-split sweep invites a choice on test),
``eval/<prefix>_summary.md`` (the headline table: per-patient mean [95 % CI], median and pooled Dice, IoU,
sensitivity, HD95 in mm and NSD at the tolerance), ``figures/<prefix>_pixel_confusion.png`` and
``figures/<prefix>_overlays.png`` (best / median / worst patient: truth and prediction contours, TP / FP / FN
pixels, lesion volumes in mL).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from ichflow.engine import figures, overlays
from ichflow.engine.stats import finite
from ichflow.metric_names import log_metrics
from ichflow.paths import eval_artifact, figure_artifact
from ichflow.tasks.segmentation.metrics import SplitStats, select_threshold, summarise


def log_split(prefix: str, stats: SplitStats, threshold: float, step: int, pixel_mm: float = 0.508,
              slice_mm: float = 5.0, min_pixels: int = 1, nsd_tolerance_mm: float = 2.0) -> dict:
    """Summarise ``stats`` at ``threshold``, log the split's metrics, tables and figures; the metrics as
    ``<prefix>_<name>`` (NaN = undefined: returned, not logged to MLflow, null in the JSON)."""
    metrics, table = summarise(stats, threshold, pixel_mm, slice_mm, min_pixels, nsd_tolerance_mm, surface=True)
    log_metrics(finite({f"{prefix}_{k}": v for k, v in metrics.items()}), step=step)
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
                               f"{prefix}: best / median / worst patient by Dice (slice with the most edema)",
                               pixel_mm, slice_mm),
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
    figures.log_figure(fig, artifact)


def pixel_confusion_figure(metrics: dict, title: str):
    cm = np.array([[metrics["pixels_tn"], metrics["pixels_fp"]], [metrics["pixels_fn"], metrics["pixels_tp"]]],
                  dtype=np.int64)
    return figures.confusion_figure(cm, ["background", "PHE"], title=title)


def overlay_figure(stats: SplitStats, table: pd.DataFrame, threshold: float, title: str, pixel_mm: float = 0.508,
                   slice_mm: float = 5.0):
    """The best, median and worst patients by Dice (with truth), one row each: the slice alone; truth and
    prediction as contours with the patient's lesion volumes (mL, predicted vs true); the TP / FP / FN pixels.

    Each row shows the patient's slice with the most edema, zoomed on truth and prediction.
    """
    ranked = table[table["has_truth"]].sort_values("dice", ascending=False).reset_index(drop=True)
    if ranked.empty:
        ranked = table.reset_index(drop=True)
    n, chosen = len(ranked), {}
    for label, i in (("best", 0), ("worst", n - 1), ("median", n // 2)):
        chosen.setdefault(i, label)
    picks = [(label, ranked.iloc[i]) for i, label in sorted(chosen.items())]
    fig, axes = figures.new_figure(len(picks), 3, width_in=12, height_in=4.0 * len(picks) + 1.0)
    voxel_ml = pixel_mm * pixel_mm * slice_mm / 1000.0
    for r, (label, row) in enumerate(picks):
        image, truth, prob, sidx = stats.examples[row["patient_id"]]
        pred = prob.astype(np.float32) >= threshold
        truth = truth.astype(bool)
        slice_ml = (pred.sum() * voxel_ml, truth.sum() * voxel_ml)
        window = _zoom(truth | pred, image.shape)
        text = overlays.volume_text(float(row["pred_ml"]), float(row["truth_ml"]), *slice_ml) \
            if "pred_ml" in row else ""
        draw_axes = axes[r]
        overlays.draw_segmentation(draw_axes, image[window], truth[window], pred[window], corner_text=text)
        draw_axes[0].set_title(f"{label}: patient {row['patient_id']}, slice {sidx}\n3D Dice {_fmt(row['dice'], 3)}",
                               fontsize=9)
        draw_axes[1].set_title(f"truth (solid) vs prediction (dashed, p ≥ {threshold:g})", fontsize=9)
        draw_axes[2].set_title("TP / FP / FN pixels", fontsize=9)
    fig.legend(handles=overlays.segmentation_legend_handles(threshold), loc="outside lower center", ncols=5,
               fontsize=8)
    fig.suptitle(title)
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
