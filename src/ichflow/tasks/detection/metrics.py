"""One definition of detection quality for both engines, plus the slice-level decision.

Box metrics (``box_metrics``): every prediction (conf >= 0.001 after NMS, as Ultralytics' validator keeps) is
matched greedily in descending confidence to the unclaimed ground-truth box of highest IoU, at each IoU
threshold 0.50:0.05:0.95 (Ultralytics' ``match_predictions``); AP, precision and recall then come from
Ultralytics' ``ap_per_class`` (101-point interpolated AP; P and R at the confidence that maximises F1).
So YOLO's own per-epoch validation numbers and our final numbers share one definition, and Faster R-CNN is
scored by the same code.

Slice-level decision (``slice_metrics``): a slice is called "lesion" when it has at least one box with
score >= ``conf_threshold``; Accuracy, Precision, Recall, F1 and the confusion matrix against ``has_lesion``.
It is a pure function of stored predictions, so the threshold can be tuned without retraining.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
PRED_COLUMNS = ["slice_id", "x1", "y1", "x2", "y2", "score"]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes."""
    a = np.asarray(a, float).reshape(-1, 4)
    b = np.asarray(b, float).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(br - tl, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    return inter / np.clip(area_a[:, None] + area_b[None, :] - inter, 1e-9, None)


def match_slice(pred_boxes: np.ndarray, scores: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """(n_pred, 10) bool: prediction j is a true positive at IoU threshold t (greedy by confidence)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    correct = np.zeros((len(order), len(IOU_THRESHOLDS)), bool)
    if not len(order) or not len(gt_boxes):
        return correct
    iou = box_iou(gt_boxes, np.asarray(pred_boxes)[order])  # (gt, pred sorted)
    matched = np.zeros((iou.shape[0], len(IOU_THRESHOLDS)), bool)
    cols = range(len(IOU_THRESHOLDS))
    for j in range(iou.shape[1]):
        available = np.where(matched, 0.0, iou[:, j, None])
        k = available.argmax(0)
        correct[j] = available[k, cols] >= IOU_THRESHOLDS
        matched[k, cols] |= correct[j]
    out = np.zeros_like(correct)
    out[order] = correct
    return out


def truths_from_index(index: pd.DataFrame) -> list[np.ndarray]:
    """Ground-truth pixel boxes per slice (row order of ``index``)."""
    return [np.asarray(json.loads(b), float).reshape(-1, 4) for b in index["boxes"]]


def predictions_frame(outputs: list[tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Engine outputs (boxes, scores) per slice -> the long table every evaluation uses."""
    rows = [np.column_stack([np.full(len(s), i), np.asarray(b).reshape(-1, 4), s])
            for i, (b, s) in enumerate(outputs) if len(s)]
    data = np.concatenate(rows) if rows else np.zeros((0, 6))
    df = pd.DataFrame(data, columns=PRED_COLUMNS)
    df["slice_id"] = df["slice_id"].astype(int)
    return df


def match_all(preds: pd.DataFrame, truths: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correct (P,10), scores (P,), slice_id (P,)) for every prediction, in ``preds`` row order."""
    preds = preds.reset_index(drop=True)
    correct = np.zeros((len(preds), len(IOU_THRESHOLDS)), bool)
    for sid, idx in preds.groupby("slice_id").indices.items():
        group = preds.iloc[idx]
        correct[idx] = match_slice(group[["x1", "y1", "x2", "y2"]].to_numpy(), group["score"].to_numpy(),
                                   truths[int(sid)])
    return correct, preds["score"].to_numpy(float), preds["slice_id"].to_numpy(int)


def ap_from_matches(correct: np.ndarray, scores: np.ndarray, n_gt: int) -> dict:
    """Precision/recall (max-F1 point), mAP@0.5, mAP@0.5:0.95 and the PR curve at IoU 0.5."""
    if n_gt == 0:
        return {"precision": float("nan"), "recall": float("nan"), "map50": float("nan"),
                "map50_95": float("nan"), "pr_recall": np.linspace(0, 1, 1000), "pr_precision": np.zeros(1000)}
    if len(scores) == 0:
        return {"precision": 0.0, "recall": 0.0, "map50": 0.0, "map50_95": 0.0,
                "pr_recall": np.linspace(0, 1, 1000), "pr_precision": np.zeros(1000)}
    if "ultralytics" not in sys.modules:   # first import: through the set-up that undoes its OMP_NUM_THREADS
        from ichflow.tasks.detection.yolo import setup_ultralytics

        setup_ultralytics()
    from ultralytics.utils.metrics import ap_per_class

    res = ap_per_class(correct, scores, np.zeros(len(scores)), np.zeros(n_gt))
    _, _, p, r, _, ap = res[:6]
    prec_values, x = res[-1], res[-2]
    return {"precision": float(p.mean()), "recall": float(r.mean()), "map50": float(ap[:, 0].mean()),
            "map50_95": float(ap.mean()), "pr_recall": np.asarray(x), "pr_precision": np.asarray(prec_values)[0]}


def box_metrics(preds: pd.DataFrame, truths: list[np.ndarray]) -> dict:
    correct, scores, _ = match_all(preds, truths)
    return ap_from_matches(correct, scores, sum(len(t) for t in truths))


def patient_bootstrap_map(preds: pd.DataFrame, truths: list[np.ndarray], patients: np.ndarray,
                          n_boot: int = 300, seed: int = 0, alpha: float = 0.05) -> dict[str, tuple[float, float]]:
    """95 % CIs of mAP@0.5 and mAP@0.5:0.95 resampling whole patients (matching done once)."""
    correct, scores, sids = match_all(preds, truths)
    patients = np.asarray(patients)
    ids = np.unique(patients)
    if len(ids) < 2:
        m = ap_from_matches(correct, scores, sum(len(t) for t in truths))
        return {"map50": (m["map50"], m["map50"]), "map50_95": (m["map50_95"], m["map50_95"])}
    pred_pt = patients[sids] if len(sids) else np.array([], dtype=patients.dtype)
    by_pt = {p: (np.flatnonzero(pred_pt == p), sum(len(truths[i]) for i in np.flatnonzero(patients == p)))
             for p in ids}
    rng = np.random.default_rng(seed)
    stats = {"map50": [], "map50_95": []}
    for _ in range(n_boot):
        pick = rng.choice(ids, size=len(ids), replace=True)
        rows = np.concatenate([by_pt[p][0] for p in pick])
        n_gt = sum(by_pt[p][1] for p in pick)
        if n_gt == 0:
            continue
        m = ap_from_matches(correct[rows], scores[rows], n_gt)
        stats["map50"].append(m["map50"])
        stats["map50_95"].append(m["map50_95"])
    return {k: (float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))) if v else
            (float("nan"), float("nan")) for k, v in stats.items()}


def slice_scores(predictions, n_slices: int | None = None) -> np.ndarray:
    """Highest box score per slice (0 where a slice has no box). Accepts the long table or the array itself."""
    if isinstance(predictions, pd.DataFrame):
        if n_slices is None:
            raise ValueError("n_slices is needed with a predictions table (slices without boxes have no rows)")
        out = np.zeros(n_slices)
        if len(predictions):
            best = predictions.groupby("slice_id")["score"].max()
            out[best.index.to_numpy(int)] = best.to_numpy(float)
        return out
    return np.asarray(predictions, float)


def slice_metrics(predictions, truths, conf_threshold: float) -> dict:
    """Slice-level decision at ``conf_threshold``: a slice with any box scoring >= it is called "lesion".

    ``predictions``: the long table (slice_id, x1, y1, x2, y2, score) or an array of per-slice max scores;
    ``truths``: per-slice has_lesion booleans (position = slice_id). Returns accuracy, precision, recall,
    f1, specificity and tn/fp/fn/tp. Pure: nothing is logged or retrained.
    """
    y = np.asarray(truths, bool)
    s = slice_scores(predictions, len(y))
    if len(s) != len(y):
        raise ValueError(f"{len(s)} slice scores for {len(y)} truths")
    pred = s >= conf_threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / max(len(y), 1), "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "specificity": tn / (tn + fp) if tn + fp else 0.0, "tn": tn, "fp": fp, "fn": fn, "tp": tp}


def best_conf_threshold(predictions, truths, min_threshold: float = 0.001) -> tuple[float, float]:
    """(threshold, F1): the score threshold with the highest slice-level F1 (ties: the higher threshold)."""
    y = np.asarray(truths, bool)
    s = slice_scores(predictions, len(y))
    cands = np.unique(np.concatenate([s[s >= min_threshold], [min_threshold]]))
    best_i, best_f1 = 0, -1.0
    for i, t in enumerate(cands):
        f1 = slice_metrics(s, y, float(t))["f1"]
        if f1 >= best_f1:
            best_i, best_f1 = i, f1
    # the F1 is the same for every threshold in (previous score, chosen score]: take the middle of that gap
    lower = cands[best_i - 1] if best_i > 0 else 0.0
    return float((lower + cands[best_i]) / 2) if best_i > 0 else float(cands[best_i]), float(best_f1)


def confusion(m: dict) -> np.ndarray:
    return np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
