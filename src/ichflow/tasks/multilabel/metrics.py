"""Multi-label metrics (per class, micro / macro), support, cross-validation aggregation and figures."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ichflow.engine import figures
from ichflow.tasks import slice_classifier as sc

PER_CLASS = ("precision", "recall", "f1", "roc_auc", "pr_auc")


def multilabel_metrics(y: np.ndarray, p: np.ndarray, thresholds, classes: list[str]) -> dict:
    """Per class ``<c>_{precision,recall,f1,roc_auc,pr_auc}``, and ``macro_*`` / ``micro_*`` F1 and AUC.

    A class without positives (or without negatives) in ``y`` has undefined AUCs (NaN) and recall; the
    macro averages are over the classes where the metric is defined (``macro_auc_classes`` says how many).
    ``micro_f1`` pools TP/FP/FN of all classes; ``micro_auc`` ranks all (slice, class) pairs together.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, dtype=float).reshape(len(y), -1) > 0
    p = np.asarray(p, dtype=float).reshape(len(p), -1)
    thr = np.asarray(thresholds, dtype=float).reshape(-1)
    out: dict = {}
    tp = fp = fn = 0
    for j, c in enumerate(classes):
        m = sc.binary_metrics(y[:, j], p[:, j], thr[j])
        for k in PER_CLASS:
            out[f"{c}_{k}"] = m[k]
        if not y[:, j].any():  # precision of a class that never occurs is not informative
            out[f"{c}_f1"] = float("nan")
        tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
    for k, name in (("roc_auc", "auc"), ("pr_auc", "pr_auc"), ("f1", "f1")):
        vals = [out[f"{c}_{k}"] for c in classes if out[f"{c}_{k}"] == out[f"{c}_{k}"]]
        out[f"macro_{name}"] = float(np.mean(vals)) if vals else float("nan")
        if k == "roc_auc":
            out["macro_auc_classes"] = len(vals)
    out["micro_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    flat_y, flat_p = y.ravel(), p.ravel()
    out["micro_auc"] = float(roc_auc_score(flat_y, flat_p)) if 0 < flat_y.sum() < len(flat_y) else float("nan")
    return out


def support(manifest_rows: pd.DataFrame, y: np.ndarray, classes: list[str]) -> dict:
    """``<c>_slices`` and ``<c>_patients`` (positives) of the given rows."""
    y = np.asarray(y).reshape(len(y), -1) > 0
    pids = manifest_rows["patient_id"].astype(str).to_numpy()
    out = {}
    for j, c in enumerate(classes):
        out[f"{c}_slices"] = int(y[:, j].sum())
        out[f"{c}_patients"] = int(len(set(pids[y[:, j]])))
    out["slices"], out["patients"] = len(pids), int(len(set(pids)))
    return out


def aggregate(per_fold: list[dict]) -> dict:
    """``<key>`` = mean over folds where finite, ``<key>_sd`` = sample sd, ``<key>_folds`` = how many folds."""
    keys = sorted({k for d in per_fold for k in d})
    out = {}
    for k in keys:
        vals = [float(d[k]) for d in per_fold if k in d and isinstance(d[k], (int, float, np.number))
                and math.isfinite(float(d[k]))]
        if not vals:
            continue
        out[k] = float(np.mean(vals))
        out[f"{k}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out[f"{k}_folds"] = len(vals)
    return out


def pooled_metrics(y: np.ndarray, p: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    """Out-of-fold metrics: every CV patient scored once by the model that did not see it, ``pred`` made
    with that fold's own thresholds (so the cut is given, not one threshold per class)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y) > 0
    out: dict = {}
    tp = fp = fn = 0
    aucs, f1s = [], []
    for j, c in enumerate(classes):
        t, q = y[:, j], pred[:, j]
        ctp, cfp, cfn = int((t & q).sum()), int((~t & q).sum()), int((t & ~q).sum())
        tp, fp, fn = tp + ctp, fp + cfp, fn + cfn
        out[f"{c}_precision"] = ctp / (ctp + cfp) if ctp + cfp else 0.0
        out[f"{c}_recall"] = ctp / (ctp + cfn) if ctp + cfn else float("nan")
        out[f"{c}_f1"] = 2 * ctp / (2 * ctp + cfp + cfn) if t.any() else float("nan")
        if 0 < t.sum() < len(t):
            out[f"{c}_roc_auc"] = float(roc_auc_score(t, p[:, j]))
            out[f"{c}_pr_auc"] = float(average_precision_score(t, p[:, j]))
            aucs.append(out[f"{c}_roc_auc"])
        if out[f"{c}_f1"] == out[f"{c}_f1"]:
            f1s.append(out[f"{c}_f1"])
    out["macro_auc"] = float(np.mean(aucs)) if aucs else float("nan")
    out["macro_f1"] = float(np.mean(f1s)) if f1s else float("nan")
    out["micro_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return out


N_BOOT = 1000          # patient resamples of the out-of-fold CIs
CI_METRICS = ("roc_auc", "pr_auc")


def pooled_cis(y: np.ndarray, p: np.ndarray, pids, classes: list[str], seed: int = 0, n_boot: int = N_BOOT,
               alpha: float = 0.05) -> dict:
    """``<c>_{roc_auc,pr_auc}_ci_low/_ci_high`` and ``macro_auc_ci_low/_ci_high``: percentile bootstrap over
    patients of the pooled scores.

    The slices of one patient are not independent (one bleed spans several slices), so whole patients are
    resampled: the draws of :func:`ichflow.engine.stats.patient_bootstrap_ci` for the same seed, each slice
    weighted by how often its patient was drawn, and the AUCs of every resample computed at once. A
    resample without positives or without negatives of a class is skipped for that class; the macro
    averages the classes defined on all the data and skips a resample where one of them is undefined.
    """
    y = np.asarray(y).reshape(len(y), len(classes)) > 0
    p = np.asarray(p, dtype=float).reshape(len(p), len(classes))
    _, pidx = np.unique(np.asarray(pids).astype(str), return_inverse=True)
    n_pat = int(pidx.max()) + 1 if len(pidx) else 0
    out = {f"{c}_{m}_ci_{end}": float("nan") for c in classes for m in CI_METRICS for end in ("low", "high")}
    out.update(macro_auc_ci_low=float("nan"), macro_auc_ci_high=float("nan"))
    if n_pat == 0:
        return out
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.integers(0, n_pat, size=n_pat) for _ in range(n_boot)])
    counts = np.bincount((np.arange(n_boot)[:, None] * n_pat + picks).ravel(), minlength=n_boot * n_pat)
    weights = counts.reshape(n_boot, n_pat)[:, pidx].astype(float)          # (resample, slice)
    macro = []
    for j, c in enumerate(classes):
        roc, ap = _weighted_aucs(y[:, j], p[:, j], weights)
        for m, vals in (("roc_auc", roc), ("pr_auc", ap)):
            out[f"{c}_{m}_ci_low"], out[f"{c}_{m}_ci_high"] = _percentiles(vals, alpha)
        if 0 < y[:, j].sum() < len(y):
            macro.append(roc)
    if macro:
        out["macro_auc_ci_low"], out["macro_auc_ci_high"] = _percentiles(np.mean(macro, axis=0), alpha)
    return out


def _weighted_aucs(t: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ROC-AUC, average precision) of truth ``t`` and scores ``s`` under each row of slice weights ``w``;
    the same tie handling as sklearn's roc_auc_score / average_precision_score. NaN where a row has no
    positive or no negative weight."""
    order = np.argsort(-s, kind="stable")
    starts = np.r_[0, np.nonzero(np.diff(s[order]))[0] + 1]              # groups of tied scores, high first
    wo = w[:, order]
    pos = np.add.reduceat(wo * t[order], starts, axis=1)
    neg = np.add.reduceat(wo, starts, axis=1) - pos
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        roc = (pos * (n_neg[:, None] - fp + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
        ap = (pos * tp / np.where(tp + fp > 0, tp + fp, 1)).sum(axis=1) / n_pos
    bad = (n_pos == 0) | (n_neg == 0)
    roc[bad], ap[bad] = np.nan, np.nan
    return roc, ap


def _percentiles(vals: np.ndarray, alpha: float) -> tuple[float, float]:
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return float("nan"), float("nan")
    return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))


def multilabel_confusion_figure(y: np.ndarray, p: np.ndarray, thresholds, classes: list[str], title: str = ""):
    """One 2x2 confusion matrix per class (counts, with row-normalised fractions)."""
    from sklearn.metrics import multilabel_confusion_matrix

    y = np.asarray(y).reshape(len(y), -1) > 0
    pred = np.asarray(p) >= np.asarray(thresholds, dtype=float)[None, :]
    mcm = multilabel_confusion_matrix(y, pred)
    rows, cols = figures.grid_shape(len(classes), 4)
    fig, axes = figures.new_figure(rows, cols, width_in=3.4 * cols + 1.2, height_in=3.4 * rows + 0.8)
    for ax in axes.ravel()[len(classes):]:
        ax.axis("off")
    im = None
    for ax, cm, c in zip(axes.ravel(), mcm, classes):
        norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        figures.annotate_cells(ax, im, [[f"{v}\n{norm[r, k]:.2f}" for k, v in enumerate(row)]
                                        for r, row in enumerate(cm)], fontsize=9)
        ax.set_xticks([0, 1], [f"no {c}", c])
        ax.set_yticks([0, 1], [f"no {c}", c])
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        ax.set_title(c)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="fraction of the true row")
    fig.suptitle(title or "Per-class confusion (counts, fraction of truth row)")
    return fig


def cooccurrence_figure(y: np.ndarray, pids: np.ndarray, classes: list[str], pred: np.ndarray | None = None):
    """Slices (and patients) where two classes occur together; diagonal = the class alone or not."""
    y = np.asarray(y).reshape(len(y), -1) > 0
    panels = [("truth: slices", y.T.astype(int) @ y.astype(int))]
    pt = pd.DataFrame(y, columns=classes).groupby(np.asarray(pids)).max().to_numpy()
    panels.append(("truth: patients", pt.T.astype(int) @ pt.astype(int)))
    if pred is not None:
        pr = np.asarray(pred).reshape(len(pred), -1) > 0
        panels.append(("predicted: slices", pr.T.astype(int) @ pr.astype(int)))
    fig, axes = figures.new_figure(1, len(panels), width_in=4.2 * len(panels), height_in=5.0)
    for ax, (name, mat) in zip(axes[0], panels):
        im = ax.imshow(mat, cmap="Oranges", vmin=0, vmax=max(int(mat.max()), 1))
        figures.annotate_cells(ax, im, [[str(v) for v in row] for row in mat], fontsize=9)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_title(name)
    fig.suptitle("Label co-occurrence (diagonal: slices / patients with the class)")
    return fig


def summary_markdown(agg: dict, sup: dict, classes: list[str], prefix: str = "cv") -> str:
    """Per-class table of mean ± sd over folds with support."""
    def fmt(key):
        m, s = agg.get(f"{prefix}_{key}"), agg.get(f"{prefix}_{key}_sd")
        if m is None:
            return "n/a"
        n = agg.get(f"{prefix}_{key}_folds")
        return f"{m:.3f} ± {s:.3f}" + (f" ({n} folds)" if n is not None else "")

    lines = ["| class | slices | patients | ROC-AUC | PR-AUC | F1 | precision | recall |",
             "|---|---|---|---|---|---|---|---|"]
    for c in classes:
        lines.append(f"| {c} | {sup.get(f'{c}_slices', '')} | {sup.get(f'{c}_patients', '')} | {fmt(c + '_roc_auc')} | "
                     f"{fmt(c + '_pr_auc')} | {fmt(c + '_f1')} | {fmt(c + '_precision')} | {fmt(c + '_recall')} |")
    lines += ["", f"macro ROC-AUC {fmt('macro_auc')}, micro ROC-AUC {fmt('micro_auc')}, "
                  f"macro F1 {fmt('macro_f1')}, micro F1 {fmt('micro_f1')}"]
    return "\n".join(lines)


def ci_text(metrics: dict, key: str) -> str:
    """``0.693 (95 % CI 0.601–0.779)`` of ``<key>`` and ``<key>_ci_low/_ci_high`` ('n/a' when undefined)."""
    v, lo, hi = (metrics.get(k) for k in (key, f"{key}_ci_low", f"{key}_ci_high"))
    if v is None or v != v:
        return "n/a"
    return f"{v:.3f}" + ("" if lo is None or lo != lo else f" (95 % CI {lo:.3f}–{hi:.3f})")


def mean_sd_text(metrics: dict, key: str) -> str:
    """``0.736 ± 0.140`` of ``<key>`` and ``<key>_sd`` ('n/a' when no fold defined it)."""
    m, s = metrics.get(key), metrics.get(f"{key}_sd")
    return "n/a" if m is None else f"{m:.3f} ± {s:.3f}"


def headline_markdown(metrics: dict, sup: dict, classes: list[str]) -> str:
    """Per-class table of the headline: pooled out-of-fold ROC-AUC and PR-AUC with their patient-bootstrap
    CIs (``oof_*``), and beside each the mean ± sd over the held-out folds (``cv_*``)."""
    lines = ["| class | slices | patients | ROC-AUC, out-of-fold | ROC-AUC, fold mean ± sd | "
             "PR-AUC, out-of-fold | PR-AUC, fold mean ± sd |", "|---|---|---|---|---|---|---|"]
    for c in classes:
        lines.append(f"| {c} | {sup.get(f'{c}_slices', '')} | {sup.get(f'{c}_patients', '')} | "
                     f"{ci_text(metrics, f'oof_{c}_roc_auc')} | {mean_sd_text(metrics, f'cv_{c}_roc_auc')} | "
                     f"{ci_text(metrics, f'oof_{c}_pr_auc')} | {mean_sd_text(metrics, f'cv_{c}_pr_auc')} |")
    lines.append(f"| **macro** | | | {ci_text(metrics, 'oof_macro_auc')} | {mean_sd_text(metrics, 'cv_macro_auc')} "
                 f"| | {mean_sd_text(metrics, 'cv_macro_pr_auc')} |")
    return "\n".join(lines)
