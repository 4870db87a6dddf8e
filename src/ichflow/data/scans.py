"""The scans of a manifest, one patient at a time, as every served model sees them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ichflow.data.images import read_gray
from ichflow.errors import DataError


def iter_scans(part: pd.DataFrame):
    """(patient_id, rows of ``part`` in axial order, (N, H, W) uint8 slices) per patient, patients sorted.

    Slices are decoded exactly as the training cache decodes them (``read_gray``), at native resolution:
    every model resizes internally, as when it is served.
    """
    for pid, group in part.groupby("patient_id", sort=True):
        group = group.sort_values("slice_index", kind="stable")
        slices = [read_gray(p) for p in group["image_path"]]
        shapes = {s.shape for s in slices}
        if len(shapes) > 1:
            raise DataError(group["image_path"].iloc[0], f"patient {pid}: slices of different sizes {sorted(shapes)} "
                                                         "in one scan")
        yield str(pid), group, np.stack(slices)
