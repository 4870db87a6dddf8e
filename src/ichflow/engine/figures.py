"""Matplotlib figures logged with ``mlflow.log_figure``."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_figure(cm: np.ndarray, labels: list[str], title: str = "Confusion matrix"):
    """Counts and row-normalised side by side."""
    cm = np.asarray(cm)
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, data, fmt, sub in ((axes[0], cm, "d", "counts"), (axes[1], norm, ".2f", "normalised by truth")):
        ax.imshow(data, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("truth")
        ax.set_title(sub)
        for (r, c), v in np.ndenumerate(data):
            ax.text(c, r, format(v, fmt), ha="center", va="center",
                    color="white" if data[r, c] > data.max() / 2 else "black")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def roc_pr_figure(y_true, scores, title: str = ""):
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    RocCurveDisplay.from_predictions(y_true, scores, ax=axes[0])
    PrecisionRecallDisplay.from_predictions(y_true, scores, ax=axes[1])
    axes[0].set_title("ROC")
    axes[1].set_title("Precision-recall")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def curves_figure(history: list[dict], keys: list[str], title: str = "Training curves"):
    """Per-epoch curves of the given history keys (missing epochs skipped)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
