"""Matplotlib figures logged with ``mlflow.log_figure``.

Every figure is drawn at :data:`DPI` (150) and at least :data:`MIN_WIDTH_IN` (8 in, so >= 1200 px) wide, with
matplotlib's constrained layout so titles, tick labels and legends are neither clipped nor overlapping. The
size / resolution defaults are set once, here, on import (every module that draws imports this one); :func:`new_figure`
is the way to open a figure, :func:`log_figure` the way to log and close one (it widens a figure that came
out narrower than :data:`MIN_WIDTH_IN`, e.g. one drawn by a third-party library).
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 150
MIN_WIDTH_IN = 8.0              # 8 in x 150 dpi = 1200 px
DEFAULT_SIZE_IN = (10.0, 6.0)

# the size and resolution defaults only: a figure drawn by another library (Optuna, ...) keeps its own layout
matplotlib.rcParams.update({"figure.dpi": DPI, "savefig.dpi": DPI, "figure.figsize": DEFAULT_SIZE_IN,
                            "savefig.facecolor": "white", "figure.facecolor": "white"})


def new_figure(nrows: int = 1, ncols: int = 1, width_in: float = DEFAULT_SIZE_IN[0],
               height_in: float = DEFAULT_SIZE_IN[1], **kwargs):
    """``plt.subplots`` at :data:`DPI`, >= :data:`MIN_WIDTH_IN` wide, constrained layout; (fig, axes)."""
    kwargs.setdefault("layout", "constrained")
    kwargs.setdefault("squeeze", False)
    return plt.subplots(nrows, ncols, figsize=(max(float(width_in), MIN_WIDTH_IN), float(height_in)), dpi=DPI,
                        **kwargs)


def ensure_min_width(fig, min_width_in: float = MIN_WIDTH_IN) -> None:
    """Scale ``fig`` up (aspect kept) to >= ``min_width_in`` at :data:`DPI`, and settle its layout: one draw
    without rendering first (constrained layout places rotated tick labels right only from the second draw)."""
    fig.set_dpi(DPI)
    w, h = fig.get_size_inches()
    if w < min_width_in:
        fig.set_size_inches(min_width_in, h * min_width_in / w)
    fig.draw_without_rendering()


def log_figure(fig, artifact: str) -> None:
    """``mlflow.log_figure`` at >= 1200 px wide (150 dpi), then close the figure."""
    import mlflow

    try:
        ensure_min_width(fig)
        mlflow.log_figure(fig, artifact)
    finally:
        close(fig)


# ------------------------------------------------------------------------------------------------ colour

def relative_luminance(rgba) -> float:
    """WCAG relative luminance (0 = black, 1 = white) of an RGB(A) colour in 0-1."""
    def lin(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (lin(float(c)) for c in rgba[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_colour(background) -> str:
    """``"black"`` or ``"white"``, whichever contrasts more with ``background`` (an RGB(A) colour in 0-1)."""
    lum = relative_luminance(background)
    # WCAG contrast ratios against black ((L + .05) / .05) and white (1.05 / (L + .05)) cross at L ~ 0.179
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def annotate_cells(ax, image, texts, fontsize: float = 10) -> list:
    """Write ``texts[r][c]`` on every cell of the ``imshow`` ``image``, in the colour that contrasts with the
    cell's own colour (dark text on pale cells, white on dark ones); the Text artists."""
    data = np.asarray(image.get_array())
    out = []
    for (r, c), v in np.ndenumerate(data):
        colour = text_colour(image.cmap(image.norm(v)))
        out.append(ax.text(c, r, texts[r][c], ha="center", va="center", color=colour, fontsize=fontsize))
    return out


# ------------------------------------------------------------------------------------------------ figures

def confusion_figure(cm: np.ndarray, labels: list[str], title: str = "Confusion matrix"):
    """Counts and row-normalised (fraction of each true class) side by side."""
    cm = np.asarray(cm)
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    fig, axes = new_figure(1, 2, width_in=10, height_in=4.8)
    panels = ((axes[0, 0], cm, "d", "counts", None), (axes[0, 1], norm, ".2f", "fraction of the true class", 1.0))
    for ax, data, fmt, sub, vmax in panels:
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=vmax if vmax is not None else max(int(data.max()), 1))
        annotate_cells(ax, im, [[format(v, fmt) for v in row] for row in data], fontsize=11)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        ax.set_title(sub)
        fig.colorbar(im, ax=ax, shrink=0.85)
    fig.suptitle(title)
    return fig


def roc_pr_figure(y_true, scores, title: str = "", threshold: float | None = None):
    """ROC (with the chance diagonal) and precision-recall (with the prevalence line), the AUCs in the legends;
    the operating point at ``threshold`` marked on both when given."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    n_pos, n = int(y.sum()), len(y)
    fig, axes = new_figure(1, 2, width_in=11, height_in=5.2)
    roc_ax, pr_ax = axes[0]
    if 0 < n_pos < n:
        fpr, tpr, _ = roc_curve(y, s)
        roc_ax.plot(fpr, tpr, lw=2, color="C0", label=f"model (ROC-AUC = {roc_auc_score(y, s):.3f})")
        precision, recall, _ = precision_recall_curve(y, s)
        pr_ax.step(recall, precision, where="post", lw=2, color="C0",
                   label=f"model (PR-AUC / average precision = {average_precision_score(y, s):.3f})")
    roc_ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="chance (AUC = 0.5)")
    prevalence = n_pos / n if n else float("nan")
    pr_ax.axhline(prevalence, ls="--", color="0.5", lw=1, label=f"chance = prevalence ({prevalence:.3f})")
    if threshold is not None and 0 < n_pos < n:
        pred = s >= threshold
        tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
        sens, fpr_at = tp / n_pos, fp / (n - n_pos)
        ppv = tp / (tp + fp) if tp + fp else float("nan")
        roc_ax.plot(fpr_at, sens, "o", color="C3", ms=8, label=f"threshold {threshold:.3f}")
        if ppv == ppv:
            pr_ax.plot(sens, ppv, "o", color="C3", ms=8, label=f"threshold {threshold:.3f}")
    roc_ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="False positive rate (1 − specificity)",
               ylabel="True positive rate (sensitivity)", title="ROC curve")
    pr_ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="Recall (sensitivity)",
              ylabel="Precision (positive predictive value)", title="Precision-recall curve")
    roc_ax.set_aspect("equal")
    pr_ax.set_aspect("equal")
    roc_ax.legend(loc="lower right")
    pr_ax.legend(loc="best")
    for ax in (roc_ax, pr_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title + ' — ' if title else ''}n = {n} ({n_pos} positive, {n - n_pos} negative)")
    return fig


def grid_shape(n: int, max_cols: int) -> tuple[int, int]:
    """(rows, cols) of a grid of ``n`` panels at most ``max_cols`` wide."""
    cols = max(1, min(n, max_cols))
    return max(1, math.ceil(n / cols)), cols


# ------------------------------------------------------------------------------------------------ Optuna

STUDY_PLOTS = ("optimization_history", "parallel_coordinate", "slice", "param_importances")
TIGHT_STUDY_PLOTS = ("optimization_history", "param_importances")


def study_figures(study, target_name: str = "Objective"):
    """(name, figure) of Optuna's matplotlib plots of ``study`` (optimisation history, parallel coordinates,
    slice, parameter importances), the objective named ``target_name`` on their axes, >= 1200 px wide with
    room for long parameter names. Plots Optuna cannot draw for this study (no completed trial; importances
    with < 2 completed trials or a single distinct value) are skipped. The caller logs and closes them."""
    import logging
    import warnings

    import optuna
    from optuna.visualization import matplotlib as ovm

    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        return
    fns = {"optimization_history": ovm.plot_optimization_history, "parallel_coordinate": ovm.plot_parallel_coordinate,
           "slice": ovm.plot_slice, "param_importances": ovm.plot_param_importances}
    sizes = {"optimization_history": (11, 6), "parallel_coordinate": (13, 7), "param_importances": (11, 6)}
    for name in STUDY_PLOTS:
        if name == "param_importances" and len(completed) < 2:
            continue
        try:
            with warnings.catch_warnings(), matplotlib.rc_context():   # Optuna switches the global style to ggplot
                warnings.simplefilter("ignore")      # Optuna marks its matplotlib plots experimental
                ax = fns[name](study, target_name=target_name)
        except (ValueError, RuntimeError) as exc:   # e.g. importances need >1 distinct param value
            logging.getLogger(__name__).info("skipped %s plot: %s", name, exc)
            continue
        first = np.ravel(ax)[0] if isinstance(ax, np.ndarray) else ax
        fig = first.figure
        n_panels = len(np.ravel(ax)) if isinstance(ax, np.ndarray) else 1
        w, h = sizes.get(name, (max(MIN_WIDTH_IN, 4.5 * min(n_panels, 4) + 1.5), 6.0))
        fig.set_dpi(DPI)
        fig.set_size_inches(max(w, MIN_WIDTH_IN), h)
        if name == "param_importances":
            fig.gca().set_xlabel(f"Hyperparameter importance for {target_name}")
        if name in TIGHT_STUDY_PLOTS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig.tight_layout()
        else:   # their colour bars are placed by hand (tight_layout would overlap them): make room below instead
            for a in fig.axes:
                a.xaxis.label.set_fontsize(9)
            _raise_axes(fig, bottom=0.24 if name == "parallel_coordinate" else 0.14)
        yield name, fig


def _raise_axes(fig, bottom: float, top: float = 0.9) -> None:
    """Map every axes' vertical extent (colour bars included) from [0, 1] into [bottom, top]: room for rotated
    or long tick labels under a figure whose axes were positioned by hand."""
    ys = [a.get_position() for a in fig.axes]
    lo, hi = min(b.y0 for b in ys), max(b.y1 for b in ys)
    scale = (top - bottom) / max(hi - lo, 1e-9)
    for a, b in zip(fig.axes, ys):
        a.set_position([b.x0, bottom + (b.y0 - lo) * scale, b.width, b.height * scale])


def close(fig) -> None:
    plt.close(fig)
