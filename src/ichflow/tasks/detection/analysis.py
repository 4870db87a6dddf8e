"""Figures and the difficulty analysis: where the detector finds lesions hard, and what its errors look like."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ichflow.data.images import read_gray
from ichflow.engine.figures import DPI, MIN_WIDTH_IN, new_figure, plt
from ichflow.engine.overlays import box_legend_handles
from ichflow.tasks.detection.metrics import box_iou

POSITION_BINS = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0001])
POSITION_LABELS = ["0-20%", "20-40%", "40-60%", "60-80%", "80-100%"]


def gt_table(index: pd.DataFrame, preds: pd.DataFrame, truths: list[np.ndarray], threshold: float) -> pd.DataFrame:
    """One row per ground-truth box: size, slice position, best IoU / score of kept predictions, found or not."""
    kept = preds[preds["score"] >= threshold]
    by_slice = {sid: g for sid, g in kept.groupby("slice_id")}
    rows = []
    for sid, boxes in enumerate(truths):
        for b in boxes:
            g = by_slice.get(sid)
            iou = box_iou(b[None], g[["x1", "y1", "x2", "y2"]].to_numpy())[0] if g is not None else np.zeros(0)
            j = int(iou.argmax()) if len(iou) else -1
            w, h = b[2] - b[0], b[3] - b[1]
            rows.append({"slice_id": sid, "patient_id": index.at[sid, "patient_id"],
                         "slice_index": int(index.at[sid, "slice_index"]), "position": float(index.at[sid, "position"]),
                         "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3], "size_px": float(np.sqrt(max(w * h, 0))),
                         "best_iou": float(iou[j]) if j >= 0 else 0.0,
                         "best_score": float(g["score"].to_numpy()[j]) if j >= 0 else 0.0,
                         "found": bool(j >= 0 and iou[j] >= 0.5)})
    return pd.DataFrame(rows)


def fp_table(index: pd.DataFrame, preds: pd.DataFrame, truths: list[np.ndarray], threshold: float) -> pd.DataFrame:
    """Kept predictions that overlap no true box with IoU >= 0.5 (false positives), highest score first."""
    kept = preds[preds["score"] >= threshold]
    rows = []
    for r in kept.itertuples(index=False):
        gt = truths[int(r.slice_id)]
        iou = box_iou(np.array([[r.x1, r.y1, r.x2, r.y2]]), gt)[0] if len(gt) else np.zeros(0)
        if not len(iou) or iou.max() < 0.5:
            sid = int(r.slice_id)
            rows.append({"slice_id": sid, "patient_id": index.at[sid, "patient_id"],
                         "slice_index": int(index.at[sid, "slice_index"]), "position": float(index.at[sid, "position"]),
                         "x1": r.x1, "y1": r.y1, "x2": r.x2, "y2": r.y2, "score": float(r.score),
                         "negative_slice": not len(gt)})
    cols = ["slice_id", "patient_id", "slice_index", "position", "x1", "y1", "x2", "y2", "score", "negative_slice"]
    return pd.DataFrame(rows, columns=cols).sort_values("score", ascending=False).reset_index(drop=True)


def _size_bins(sizes: pd.Series) -> tuple[pd.Series, list[str]]:
    if sizes.nunique() < 3:
        return pd.Series(["all"] * len(sizes), index=sizes.index), ["all"]
    edges = np.unique(np.quantile(sizes, [0, 1 / 3, 2 / 3, 1]))
    edges[-1] += 1e-6
    labels = [f"{lo:.0f}-{hi:.0f}px" for lo, hi in zip(edges[:-1], edges[1:])]
    return pd.cut(sizes, edges, labels=labels, include_lowest=True, right=False).astype(str), labels


def difficulty(index: pd.DataFrame, preds: pd.DataFrame, truths: list[np.ndarray], threshold: float,
               split: str, n_examples: int = 4):
    """(figure of recall/IoU by box size and slice position + worst FN/FP examples, markdown text, tables)."""
    gts = gt_table(index, preds, truths, threshold)
    fps = fp_table(index, preds, truths, threshold)
    pos_bin = lambda p: pd.cut(p, POSITION_BINS, labels=POSITION_LABELS, right=False).astype(str)  # noqa: E731
    by_size = by_pos = pd.DataFrame()
    if len(gts):
        gts["size_bin"], size_labels = _size_bins(gts["size_px"])
        gts["position_bin"] = pos_bin(gts["position"])
        agg = {"boxes": ("found", "size"), "recall": ("found", "mean"), "mean_iou": ("best_iou", "mean"),
               "mean_size_px": ("size_px", "mean")}
        by_size = gts.groupby("size_bin").agg(**agg).reindex(size_labels)
        by_pos = gts.groupby("position_bin").agg(**agg).reindex(POSITION_LABELS)
    neg = index[~index["has_lesion"].astype(bool)].copy()
    neg["position_bin"] = pos_bin(neg["position"])
    fp_slices = set(fps.loc[fps["negative_slice"], "slice_id"]) if len(fps) else set()
    neg["fp"] = [sid in fp_slices for sid in neg.index]
    fp_pos = neg.groupby("position_bin").agg(slices=("fp", "size"), fp_rate=("fp", "mean")).reindex(POSITION_LABELS)

    fns = gts[~gts["found"]].sort_values(["best_score", "best_iou"]) if len(gts) else gts
    n_fn = min(n_examples, len(fns))
    # false positives to draw: not the slices already drawn as false negatives (a misplaced box is both)
    fps_drawn = fps[~fps["slice_id"].isin(set(fns["slice_id"].head(n_fn)))] if len(fps) else fps
    n_fp = min(n_examples, len(fps_drawn))
    ncols = max(n_fn, n_fp, 3)
    nrows = 1 + (n_fn > 0) + (n_fp > 0)
    fig = plt.figure(figsize=(max(MIN_WIDTH_IN, 3.4 * ncols), 3.6 * nrows + 1.0), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(nrows, ncols)
    ax = fig.add_subplot(grid[0, : ncols // 2])
    if len(by_size):
        x = np.arange(len(by_size))
        ax.bar(x - 0.2, by_size["recall"].fillna(0), 0.4, label="recall")
        ax.bar(x + 0.2, by_size["mean_iou"].fillna(0), 0.4, label="mean best IoU")
        ax.set_xticks(x, [f"{lbl}\n(n={int(n) if n == n else 0})" for lbl, n in zip(by_size.index, by_size["boxes"])],
                      fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
    ax.set_xlabel("true box size (sqrt of area)")
    ax.set_ylabel("fraction")
    ax.set_title("by box size (sqrt area)")
    ax = fig.add_subplot(grid[0, ncols // 2:])
    x = np.arange(len(POSITION_LABELS))
    if len(by_pos):
        ax.bar(x - 0.27, by_pos["recall"].fillna(0), 0.27, label="recall")
        ax.bar(x, by_pos["mean_iou"].fillna(0), 0.27, label="mean best IoU")
    ax.bar(x + 0.27, fp_pos["fp_rate"].fillna(0), 0.27, label="FP rate (negative slices)")
    ax.set_xticks(x, POSITION_LABELS, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_xlabel("slice position in the scan (0% = first slice)")
    ax.set_ylabel("fraction")
    ax.set_title("by slice position in the scan")
    for k in range(n_fn):
        r = fns.iloc[k]
        _draw(fig.add_subplot(grid[1, k]), index, int(r["slice_id"]), truths, preds, threshold,
              f"FN · patient {r['patient_id']} · slice {int(r['slice_index'])}\n"
              f"best IoU {r['best_iou']:.2f}, score {r['best_score']:.2f}")
    for k in range(n_fp):
        r = fps_drawn.iloc[k]
        _draw(fig.add_subplot(grid[nrows - 1, k]), index, int(r["slice_id"]), truths, preds, threshold,
              f"FP · patient {r['patient_id']} · slice {int(r['slice_index'])}\nscore {r['score']:.2f}"
              f"{' (negative slice)' if r['negative_slice'] else ''}")
    if n_fn or n_fp:
        fig.legend(handles=box_legend_handles(threshold), loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(f"Difficulty analysis on {split} (conf >= {threshold:.3f})")
    lesion_keys = set(zip(index.loc[index["has_lesion"].astype(bool), "patient_id"],
                          index.loc[index["has_lesion"].astype(bool), "slice_index"]))
    neg_fp = neg[neg["fp"]]
    adjacent = sum(((p, s - 1) in lesion_keys) or ((p, s + 1) in lesion_keys)
                   for p, s in zip(neg_fp["patient_id"], neg_fp["slice_index"]))
    text = _difficulty_text(split, threshold, gts, fps, by_size, by_pos, fp_pos, neg, adjacent)
    return fig, text, gts, fps


def _fmt_table(df: pd.DataFrame) -> str:
    if df is None or not len(df):
        return "(none)\n"

    def cell(v):
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        if isinstance(v, (bool, np.bool_)):
            return "yes" if v else "no"
        if isinstance(v, (float, np.floating)):
            return f"{v:.0f}" if float(v).is_integer() and abs(v) > 1 else f"{v:.3f}"
        return str(v)

    cols = [df.index.name or ""] + list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples():
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _difficulty_text(split, threshold, gts, fps, by_size, by_pos, fp_pos, neg, adjacent: int) -> str:
    out = [f"# Detection difficulty analysis ({split})", "",
           f"Decision threshold: box score >= {threshold:.3f}. A true box counts as found when a kept prediction "
           "overlaps it with IoU >= 0.5.", ""]
    if len(gts):
        missed = gts[~gts["found"]]
        out.append(f"- {len(gts)} true boxes, recall {gts['found'].mean():.3f}, mean best IoU "
                   f"{gts['best_iou'].mean():.3f}; {len(missed)} missed, of which "
                   f"{int((missed['best_iou'] >= 0.3).sum())} have a kept box at IoU 0.3-0.5 (found but misplaced: "
                   "such a box also counts as a false positive) and "
                   f"{int((missed['best_iou'] < 0.3).sum())} have none.")
        rec = by_size["recall"].dropna()
        if len(rec) > 1:
            out.append(f"- Hardest size bin: {rec.idxmin()} (recall {rec.min():.3f}); easiest {rec.idxmax()} "
                       f"(recall {rec.max():.3f}).")
        rp = by_pos["recall"].dropna()
        if len(rp) > 1:
            out.append(f"- Hardest scan position: {rp.idxmin()} (recall {rp.min():.3f}, mean box size "
                       f"{by_pos.loc[rp.idxmin(), 'mean_size_px']:.0f}px); easiest {rp.idxmax()} "
                       f"(recall {rp.max():.3f}, mean box size {by_pos.loc[rp.idxmax(), 'mean_size_px']:.0f}px).")
    out.append(f"- {len(fps)} false-positive boxes; {int(neg['fp'].sum())} of {len(neg)} negative slices get a "
               f"box above the threshold, {adjacent} of them next to (±1 slice) an annotated lesion slice.")
    fr = fp_pos["fp_rate"].dropna()
    if len(fr) and fr.max() > 0:
        out.append(f"- Highest false-positive rate on negative slices at scan position {fr.idxmax()} "
                   f"(rate {fr.max():.3f}).")
    out += ["", "## Recall and IoU by box size", "", _fmt_table(by_size), "## By slice position in the scan", "",
            _fmt_table(by_pos), "## False-positive rate on negative slices by position", "", _fmt_table(fp_pos)]
    if len(gts):
        worst = gts[~gts["found"]].sort_values(["best_score", "best_iou"]).head(10)
        out += ["## Worst false negatives", "",
                _fmt_table(worst.set_index("slice_id")[["patient_id", "slice_index", "size_px", "best_iou",
                                                         "best_score"]])]
    if len(fps):
        out += ["## Worst false positives", "",
                _fmt_table(fps.head(10).set_index("slice_id")[["patient_id", "slice_index", "score",
                                                                "negative_slice"]])]
    return "\n".join(out)


def _draw(ax, index: pd.DataFrame, sid: int, truths, preds: pd.DataFrame, threshold: float, title: str) -> None:
    img = read_gray(index.at[sid, "source_image"])
    ax.imshow(img, cmap="gray", vmin=0, vmax=255)
    for b in truths[sid]:
        ax.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=1.5))
    for r in preds[(preds["slice_id"] == sid) & (preds["score"] >= threshold)].itertuples(index=False):
        ax.add_patch(plt.Rectangle((r.x1, r.y1), r.x2 - r.x1, r.y2 - r.y1, fill=False, ec="red", lw=1.2))
        ax.text(r.x1, max(r.y1 - 4, 8), f"{r.score:.2f}", color="red", fontsize=8,
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "edgecolor": "none"})
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def overlays(index: pd.DataFrame, preds: pd.DataFrame, truths, threshold: float, n: int, split: str, seed: int = 0):
    """A grid of slices (lesion and negative, fixed random pick) with true and predicted boxes."""
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(index["has_lesion"].to_numpy(bool))
    neg = np.flatnonzero(~index["has_lesion"].to_numpy(bool))
    k_pos = min(len(pos), max(n - min(len(neg), n // 3), 0))
    pick = list(rng.choice(pos, k_pos, replace=False)) if k_pos else []
    pick += list(rng.choice(neg, min(len(neg), n - k_pos), replace=False)) if n - k_pos > 0 and len(neg) else []
    pick = sorted(pick, key=lambda i: (index.at[i, "patient_id"], index.at[i, "slice_index"]))
    cols = min(4, max(1, len(pick)))
    rows = max(1, int(np.ceil(len(pick) / cols)))
    fig, axes = new_figure(rows, cols, width_in=3.4 * cols, height_in=3.6 * rows + 1.0)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, sid in zip(axes.ravel(), pick):
        _draw(ax, index, int(sid), truths, preds, threshold,
              f"patient {index.at[sid, 'patient_id']} · slice {int(index.at[sid, 'slice_index'])}\n"
              f"{'lesion' if index.at[sid, 'has_lesion'] else 'negative'} slice")
    fig.legend(handles=box_legend_handles(threshold), loc="outside lower center", ncols=2, fontsize=9)
    fig.suptitle(f"{split}: true and predicted boxes on lesion and negative slices")
    return fig


def pr_figure(curves: dict[str, dict]):
    """Box precision-recall curves at IoU 0.5 (one per split)."""
    fig, axes = new_figure(1, 1, width_in=9, height_in=6)
    ax = axes[0, 0]
    for name, m in curves.items():
        ax.plot(m["pr_recall"], m["pr_precision"], lw=2, label=f"{name} (AP@0.5 = {m['map50']:.3f})")
    ax.set_xlabel("Recall (fraction of true boxes found at IoU ≥ 0.5)")
    ax.set_ylabel("Precision (fraction of predicted boxes that are true)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left")
    ax.set_title("Box precision-recall at IoU 0.5")
    return fig
