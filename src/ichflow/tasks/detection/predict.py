"""``predict`` glue: per-slice box counts, one row per box (``boxes.csv``) and overlays of one scan."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ichflow.engine.overlays import boxes_overlay, save_image

TABLE = "boxes.csv"


def predict_scan(model, meta: dict, scan: str, files, arr: np.ndarray, out, overlays: bool):
    """(per-slice columns, rows of boxes.csv) for one scan; writes overlays/<scan>/."""
    boxes = pd.DataFrame(model.predict(arr))
    columns = []
    for i, f in enumerate(files):
        mine = boxes[boxes["slice_index"] == i]
        columns.append({"n_boxes": len(mine), "max_score": float(mine["score"].max()) if len(mine) else 0.0})
        if overlays and len(mine):
            save_image(boxes_overlay(arr[i], mine), out / "overlays" / scan / f"{f.stem}.png")
    rows = [{"scan": scan, "image": str(files[int(b.slice_index)]), **b._asdict()}
            for b in boxes.itertuples(index=False)]
    return columns, rows
