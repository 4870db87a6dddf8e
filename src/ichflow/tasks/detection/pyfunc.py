"""The served detection model: one scan's slices in, lesion boxes out."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd

OUTPUT_COLUMNS = ["slice_index", "x1", "y1", "x2", "y2", "score"]


def as_slices(model_input) -> np.ndarray:
    """(N, H, W) uint8 from an array of 8-bit slices (uint8, or float in 0..255); (H, W) is one slice."""
    if isinstance(model_input, dict) and len(model_input) == 1:  # a named tensor from a serving payload
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, pd.DataFrame):
        raise TypeError("expected a numpy array (N, H, W) of 8-bit slices, got a DataFrame")
    arr = np.asarray(model_input)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected slices of one scan as (N, H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float32)), 0, 255).astype(np.uint8)
    return arr


def stacked(arr: np.ndarray, channels: int) -> list[np.ndarray]:
    """(H, W, C) per slice; C=3 = (slice below, slice, slice above) in axial order, ends replicated."""
    n = len(arr)
    prev_idx = np.maximum(np.arange(n) - 1, 0)
    next_idx = np.minimum(np.arange(n) + 1, n - 1)
    if channels == 1:
        return [arr[i][..., None] for i in range(n)]
    return [np.stack([arr[prev_idx[i]], arr[i], arr[next_idx[i]]], axis=-1) for i in range(n)]


def to_frame(outputs) -> pd.DataFrame:
    rows = [(i, *map(float, b), float(s)) for i, (boxes, scores) in enumerate(outputs)
            for b, s in zip(boxes, scores)]
    df = pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
    return df.astype({"slice_index": "int64", **{c: "float64" for c in OUTPUT_COLUMNS[1:]}})


class DetectionPyfunc(mlflow.pyfunc.PythonModel):
    """Lesion boxes (hematoma + perihematomal edema) on head-CT slices.

    Input: a numpy array (N, H, W), uint8, the 8-bit (brain-windowed) slices of ONE scan in axial order.
    The model builds its own 2.5D input (slice below, slice, slice above; the first/last slice repeated),
    resizes and normalises internally. Any H, W.

    Output: a DataFrame with one row per detected box: ``slice_index`` (0-based position in the input),
    ``x1, y1, x2, y2`` (pixels of the input slice, xyxy) and ``score`` (0..1). Only boxes with
    score >= ``conf_threshold`` are returned (param, default: the threshold chosen on validation data). A
    slice is called "lesion" when it has at least one row; slices without rows are negative.
    """

    def load_context(self, context):
        import torch

        with open(context.artifacts["config"]) as fh:
            self.config = json.load(fh)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.config["engine"] == "yolo":
            from ichflow.tasks.detection.yolo import YoloPredictor

            self.predictor = YoloPredictor(context.artifacts["weights"], self.config["imgsz"], device,
                                           self.config.get("max_det", 50))
        else:
            from ichflow.tasks.detection.fasterrcnn import FasterRCNNPredictor

            self.predictor = FasterRCNNPredictor.from_files(context.artifacts["weights"], self.config, device)

    def predict(self, context, model_input, params=None):
        arr = as_slices(model_input)
        conf = float((params or {}).get("conf_threshold", self.config["conf_threshold"]))
        outputs = self.predictor(stacked(arr, int(self.config["in_channels"])), conf=conf)
        return to_frame(outputs)
