"""Whole-scan evaluation of one split: predictions per patient -> pixel counts at a threshold grid."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import torch

from ichflow.data.images import mask_foreground
from ichflow.engine.progress import progress as progress_bar
from ichflow.tasks.segmentation.data import ScanPredictor
from ichflow.tasks.segmentation.metrics import SplitStats, accumulate, surface_crop

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.91, 0.1))


def collect(scans: Iterable, thresholds) -> SplitStats:
    """Counts of a split from its scans, each ``(patient_id, slice_index, slices, truth, probs, loss or None)``
    with (N,) slice numbers, (N, H, W) uint8 slices, bool truth and float probabilities in axial order.

    Keeps one example per patient for the overlays: its slice with the most truth (else the most predicted),
    and its truth / grid-level crops for the surface metrics (HD95, NSD) at whichever threshold is chosen.
    """
    thresholds = np.asarray(thresholds, float)
    patients, counts, s_truth, s_pred, s_patient, s_index, losses, weights = ([] for _ in range(8))
    examples: dict = {}
    surfaces: dict = {}
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
        surfaces[str(pid)] = surface_crop(probs, truth, thresholds)
    return SplitStats(patients=patients, thresholds=thresholds, counts=np.stack(counts),
                      slice_truth=np.concatenate(s_truth), slice_pred=np.concatenate(s_pred),
                      slice_patient=np.concatenate(s_patient), slice_index=np.concatenate(s_index),
                      loss=float(np.average(losses, weights=weights)) if losses else float("nan"),
                      examples=examples, surfaces=surfaces)


def predict_split(predictor: ScanPredictor, part: pd.DataFrame, images, masks, loss_fn=None,
                  progress: bool = True, desc: str = "eval") -> Iterator[tuple]:
    """Every patient of ``part`` (rows aligned with images/masks) as one scan in axial order, predicted by
    ``predictor`` (the same code path as the pyfunc): the tuples :func:`collect` takes."""
    members = [m for m in predictor.models]
    was_training = [m.training for m in members]
    for m in members:
        m.eval()
    try:
        for pid, group in progress_bar(list(part.groupby("patient_id", sort=True)), desc=desc, leave=False,
                                       disable=not progress, unit="patient"):
            rows = group.sort_values("slice_index").index.to_numpy()
            slices = np.asarray(images[rows])
            truth = mask_foreground(masks[rows])
            probs, logits = predictor(slices)
            loss = None
            if loss_fn is not None:
                with torch.no_grad():
                    loss = float(loss_fn(torch.from_numpy(logits)[:, None],
                                         torch.from_numpy(truth.astype(np.float32))[:, None]))
            yield pid, group.loc[rows, "slice_index"].to_numpy(), slices, truth, probs, loss
    finally:
        for m, training in zip(members, was_training):
            m.train(training)


def evaluate_split(predictor: ScanPredictor, part: pd.DataFrame, images, masks, loss_fn=None,
                   thresholds=THRESHOLDS, progress: bool = True, desc: str = "eval") -> SplitStats:
    """Predict every slice of every patient of ``part`` and count at every threshold of the grid."""
    return collect(predict_split(predictor, part, images, masks, loss_fn, progress, desc), thresholds)
