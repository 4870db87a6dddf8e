"""The served detection model: one scan in (8-bit slices, base64 PNG, HU, NIfTI), lesion boxes out."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd

from ichflow.engine.scan import as_scan, model_window, neighbours

OUTPUT_COLUMNS = ["slice_index", "x1", "y1", "x2", "y2", "score"]


def stacked(arr: np.ndarray, channels: int) -> list[np.ndarray]:
    """(H, W, C) per slice; C=3 = (slice below, slice, slice above) in axial order, ends replicated."""
    if channels == 1:
        return [arr[i][..., None] for i in range(len(arr))]
    below, above = neighbours(len(arr))
    return [np.stack([arr[below[i]], arr[i], arr[above[i]]], axis=-1) for i in range(len(arr))]


def to_frame(outputs) -> pd.DataFrame:
    rows = [(i, *map(float, b), float(s)) for i, (boxes, scores) in enumerate(outputs)
            for b, s in zip(boxes, scores)]
    df = pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
    return df.astype({"slice_index": "int64", **{c: "float64" for c in OUTPUT_COLUMNS[1:]}})


class DetectionPyfunc(mlflow.pyfunc.PythonModel):
    """Lesion boxes (hematoma + perihematomal edema) on head-CT slices.

    Input: ONE scan, slices in axial order, any H, W: uint8 slices, base64 PNG slices, HU (int16, windowed with
    the model's recorded window) or one base64 NIfTI; ``params={"intensity": ...}``. The contract and what is
    refused (HTTP 400): :func:`ichflow.engine.scan.as_scan` and docs/serving.md.
    The model builds its own 2.5D input (slice below, slice, slice above; the first/last slice repeated),
    resizes and normalises internally.

    Output: a DataFrame with one row per detected box: ``slice_index`` (0-based position in the input),
    ``x1, y1, x2, y2`` (pixels of the input slice, xyxy) and ``score`` (0..1). Only boxes with
    score >= ``conf_threshold`` are returned (param, default: the threshold chosen on validation data). A
    slice is called "lesion" when it has at least one row; slices without rows are negative.
    """

    def load_context(self, context):
        import torch

        from ichflow.tasks.detection.engines import ENGINES

        with open(context.artifacts["config"]) as fh:
            self.config = json.load(fh)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = ENGINES[self.config["engine"]].load_predictor(context.artifacts["weights"], self.config,
                                                                       device)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        params = params or {}
        arr = as_scan(model_input, model_window(self.config), params.get("intensity") or "auto")
        conf = float(params.get("conf_threshold", self.config["conf_threshold"]))
        outputs = self.predictor(stacked(arr, int(self.config["in_channels"])), conf=conf)
        return to_frame(outputs)
