"""``predict`` glue: per-slice edema figures, 0/255 masks and overlays of one scan (see ``serving``)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ichflow.engine.overlays import mask_overlay, save_image

TABLE = None   # no table besides predictions.csv


def predict_scan(model, meta: dict, scan: str, files, arr: np.ndarray, out, overlays: bool):
    """(per-slice columns, extra table rows) for one scan; writes masks/<scan>/ and overlays/<scan>/."""
    probs = np.asarray(model.predict(arr))
    masks = (probs >= float(meta.get("threshold", 0.5))).astype(np.uint8)
    voxel_ml = float(meta.get("pixel_spacing_mm", 0.508)) ** 2 * float(meta.get("slice_thickness_mm", 5.0)) / 1000
    columns = []
    for i, f in enumerate(files):
        columns.append({"lesion_pixels": int(masks[i].sum()), "max_probability": float(probs[i].max()),
                        "positive": int(masks[i].any()), "lesion_ml": masks[i].sum() * voxel_ml})
        save_image(Image.fromarray(masks[i] * 255), out / "masks" / scan / f"{f.stem}.png")
        if overlays and masks[i].any():
            save_image(mask_overlay(arr[i], masks[i]), out / "overlays" / scan / f"{f.stem}.png")
    return columns, []
