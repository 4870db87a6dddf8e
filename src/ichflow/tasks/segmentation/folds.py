"""Patient-level folds of the development patients (train + val) for the segmentation fold ensemble."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ichflow.errors import ParameterError


def patient_folds(part: pd.DataFrame, edema_pixels: np.ndarray, n_folds: int, seed: int = 0) -> pd.Series:
    """Fold (0..n_folds-1) of every patient of ``part``, balanced by edema volume.

    Patients are ranked by their edema pixels (``edema_pixels``: per row of ``part``); each run of
    ``n_folds`` consecutive patients is dealt to the folds in a seeded random order, so every fold gets
    small and large lesions alike. Every fold then holds patients with edema whenever ``n_folds`` of them do.
    """
    volume = pd.Series(np.asarray(edema_pixels), index=part.index).groupby(part["patient_id"].astype(str)).sum()
    if len(volume) < n_folds:
        raise ParameterError("n_folds", f"{len(volume)} train+val patients cannot fill {n_folds} folds")
    rng = np.random.default_rng(seed)
    ranked = volume.sort_values(ascending=False, kind="stable").index.to_numpy()
    fold = np.empty(len(ranked), int)
    for start in range(0, len(ranked), n_folds):
        block = slice(start, min(start + n_folds, len(ranked)))
        fold[block] = rng.permutation(n_folds)[: block.stop - block.start]
    return pd.Series(fold, index=ranked, name="fold").sort_index()
