"""Whole-scan evaluation of one split: predictions per patient -> pixel counts at a threshold grid."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ichflow.engine.augment import Normalizer
from ichflow.tasks.segmentation.data import predict_scan
from ichflow.tasks.segmentation.metrics import SplitStats, accumulate

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.91, 0.1))


def collect(scans: Iterable, thresholds) -> SplitStats:
    """Counts of a split from its scans, each ``(patient_id, slice_index, slices, truth, probs, loss or None)``
    with (N,) slice numbers, (N, H, W) uint8 slices, bool truth and float probabilities in axial order.

    Keeps one example per patient for the overlays: its slice with the most truth (else the most predicted).
    """
    thresholds = np.asarray(thresholds, float)
    patients, counts, s_truth, s_pred, s_patient, s_index, losses, weights = ([] for _ in range(8))
    examples: dict = {}
    for p, (pid, index, slices, truth, probs, loss) in enumerate(scans):
        c, st, sp = accumulate(probs, truth, thresholds)
        patients.append(str(pid))
        counts.append(c)
        s_truth.append(st)
        s_pred.append(sp)
        s_patient.append(np.full(len(index), p))
        s_index.append(np.asarray(index))
        if loss is not None:
            losses.append(loss)
            weights.append(len(index))
        k = int(np.argmax(st)) if st.max() > 0 else int(np.argmax(sp[:, len(thresholds) // 2]))
        examples[str(pid)] = (slices[k].copy(), truth[k].copy(), probs[k].astype(np.float16), int(index[k]))
    return SplitStats(patients=patients, thresholds=thresholds, counts=np.stack(counts),
                      slice_truth=np.concatenate(s_truth), slice_pred=np.concatenate(s_pred),
                      slice_patient=np.concatenate(s_patient), slice_index=np.concatenate(s_index),
                      loss=float(np.average(losses, weights=weights)) if losses else float("nan"),
                      examples=examples)


def evaluate_split(model: torch.nn.Module, part: pd.DataFrame, images, masks, normalizer: Normalizer,
                   channels: int, device: torch.device, loss_fn=None, thresholds=THRESHOLDS,
                   batch_size: int = 4, amp_dtype=None, progress: bool = True, desc: str = "eval") -> SplitStats:
    """Predict every slice of every patient of ``part`` (rows aligned with images/masks) and count.

    Each patient's slices are predicted as one scan in axial order (the same code path as the pyfunc).
    """
    was_training = model.training
    model.eval()

    def scans():
        for pid, group in tqdm(list(part.groupby("patient_id", sort=True)), desc=desc, leave=False,
                               disable=not progress, unit="patient"):
            rows = group.sort_values("slice_index").index.to_numpy()
            slices = np.asarray(images[rows])
            truth = np.asarray(masks[rows]) > 127
            probs, logits = predict_scan(model, slices, normalizer, channels, device, batch_size, amp_dtype)
            loss = None
            if loss_fn is not None:
                with torch.no_grad():
                    loss = float(loss_fn(torch.from_numpy(logits)[:, None],
                                         torch.from_numpy(truth.astype(np.float32))[:, None]))
            yield pid, group.loc[rows, "slice_index"].to_numpy(), slices, truth, probs, loss

    try:
        return collect(scans(), thresholds)
    finally:
        if was_training:
            model.train()
