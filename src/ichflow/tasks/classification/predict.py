"""``predict`` glue of the slice classifiers (bleed, subtypes): the model's per-slice columns as they come."""

from __future__ import annotations

import numpy as np
import pandas as pd

TABLE = None


def predict_scan(model, meta: dict, scan: str, files, arr: np.ndarray, out, overlays: bool):
    scores = pd.DataFrame(model.predict(arr)).reset_index(drop=True)
    return [scores.iloc[i].to_dict() for i in range(len(files))], []
