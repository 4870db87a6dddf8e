"""The segmentation model as an MLflow pyfunc: slices of one scan in, PHE probability maps out."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from ichflow.engine.augment import Normalizer
from ichflow.engine.device import resolve_device
from ichflow.engine.modelio import log_pyfunc
from ichflow.engine.scan import as_scan
from ichflow.tasks.segmentation.data import predict_scan
from ichflow.paths import MODEL_CONFIG
from ichflow.tasks.segmentation.engines import build_network

OUTPUTS = ("probability", "mask")


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """Perihematomal-edema (PHE) segmentation of one head-CT scan.

    Input: numpy array (N, H, W) of the 8-bit, brain-windowed axial slices of ONE scan in axial order
    (uint8; float 0..255 is rounded), at native resolution (~0.5 mm pixels; any H, W: padded to a
    multiple of 32 internally). The model z-scores with the training split's mean/std and builds the
    2.5D input itself (slice below/slice/slice above, edge slices replicated).
    Output: float32 (N, H, W) probability of edema per pixel; with ``params={"output": "mask"}`` a uint8
    0/1 mask at the threshold selected on the validation split (stored in the model's metadata).
    """

    def load_context(self, context):
        with open(context.artifacts["config"]) as fh:
            self.config = json.load(fh)
        self.device = resolve_device("auto")
        self.model = build_network(self.config["model"])
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.to(self.device).to(memory_format=torch.channels_last).eval()
        self.normalizer = Normalizer(self.config["norm_mean"], self.config["norm_std"])

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        output = (params or {}).get("output", "probability")
        if output not in OUTPUTS:
            raise ValueError(f"params.output must be one of {OUTPUTS}, got {output!r}")
        probs, _ = predict_scan(self.model, as_scan(model_input), self.normalizer,
                                self.config["model"]["in_channels"], self.device)
        if output == "mask":
            return (probs >= self.config["threshold"]).astype(np.uint8)
        return probs


def signature() -> ModelSignature:
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
                          params=ParamSchema([ParamSpec("output", "string", "probability")]))


def log_model(weights: str | Path, config: dict, example: np.ndarray, registered_name: str | None):
    """Write ``config`` (model spec, normalisation, threshold, target, voxel size) as model_config.json next to
    ``weights`` and log the pyfunc, registered under ``registered_name`` when given; MLflow's ModelInfo."""
    path = Path(weights).parent / MODEL_CONFIG
    path.write_text(json.dumps(config, indent=2))
    spec = config["model"]
    return log_pyfunc(SegmentationModel(), {"weights": str(weights), "config": str(path)}, signature(), example,
                      registered_name,
                      metadata={"task": "segmentation", "target": config["target"], "threshold": config["threshold"],
                                **{k: spec[k] for k in ("engine", "arch", "encoder", "in_channels") if k in spec},
                                "input": "uint8 (N, H, W) slices of one scan, axial order",
                                "output": "float32 (N, H, W) PHE probability; params output=mask -> 0/1"})
