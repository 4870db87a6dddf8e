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
from ichflow.tasks.segmentation.data import ScanPredictor
from ichflow.paths import MODEL_CONFIG
from ichflow.tasks.segmentation.engines import build_network

OUTPUTS = ("probability", "mask")


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """Perihematomal-edema (PHE) segmentation of one head-CT scan.

    Input: numpy array (N, H, W) of the 8-bit, brain-windowed axial slices of ONE scan in axial order
    (uint8; float 0..255 is rounded), at native resolution (~0.5 mm pixels; any H, W: padded to a
    multiple of 32 internally). The model z-scores with the training split's mean/std and builds the
    2.5D input itself (neighbouring slices, edge slices replicated).
    Output: float32 (N, H, W) probability of edema per pixel: the mean over the ensemble members and the
    test-time flips, with predicted 3D components smaller than the size chosen on validation set to 0; with
    ``params={"output": "mask"}`` a uint8 0/1 mask at the threshold selected on validation. Which members,
    TTA, threshold and minimum size: the model's metadata and ``model_config.json``.
    """

    def load_context(self, context):
        with open(context.artifacts["config"]) as fh:
            self.config = json.load(fh)
        device = resolve_device("auto")
        members = []
        for key in weight_keys(context.artifacts):
            net = build_network(self.config["model"])
            net.load_state_dict(torch.load(context.artifacts[key], map_location="cpu", weights_only=True))
            members.append(net.to(device).to(memory_format=torch.channels_last).eval())
        self.predictor = ScanPredictor(members, Normalizer(self.config["norm_mean"], self.config["norm_std"]),
                                       self.config["model"]["in_channels"], device,
                                       tta=self.config.get("tta", "none"), threshold=self.config["threshold"],
                                       min_voxels=int(self.config.get("min_component_voxels", 0)))

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        output = (params or {}).get("output", "probability")
        if output not in OUTPUTS:
            raise ValueError(f"params.output must be one of {OUTPUTS}, got {output!r}")
        probs, _ = self.predictor(as_scan(model_input))
        if output == "mask":
            return (probs >= self.config["threshold"]).astype(np.uint8)
        return probs


def weight_keys(artifacts) -> list[str]:
    """The artifact names of the member weights: ``weights`` (one network) or ``weights_0``.. (an ensemble)."""
    if "weights" in artifacts:
        return ["weights"]
    return sorted((k for k in artifacts if k.startswith("weights_")), key=lambda k: int(k.split("_")[1]))


def signature() -> ModelSignature:
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
                          params=ParamSchema([ParamSpec("output", "string", "probability")]))


def log_model(weights, config: dict, example: np.ndarray, registered_name: str | None):
    """Write ``config`` (model spec, normalisation, threshold, TTA, minimum component size, target, voxel size)
    as model_config.json next to the first weights file and log the pyfunc, registered under
    ``registered_name`` when given; MLflow's ModelInfo. ``weights``: one checkpoint, or a list (an ensemble)."""
    files = [Path(w) for w in (weights if isinstance(weights, (list, tuple)) else [weights])]
    path = files[0].parent / MODEL_CONFIG
    path.write_text(json.dumps(config, indent=2))
    spec = config["model"]
    artifacts = {"weights": str(files[0])} if len(files) == 1 else {f"weights_{k}": str(f) for k, f in enumerate(files)}
    return log_pyfunc(SegmentationModel(), {**artifacts, "config": str(path)}, signature(), example,
                      registered_name,
                      metadata={"task": "segmentation", "target": config["target"], "threshold": config["threshold"],
                                "tta": config.get("tta", "none"), "members": len(files),
                                "min_component_voxels": int(config.get("min_component_voxels", 0)),
                                **{k: spec[k] for k in ("engine", "arch", "encoder", "in_channels") if k in spec},
                                "input": "uint8 (N, H, W) slices of one scan, axial order",
                                "output": "float32 (N, H, W) PHE probability; params output=mask -> 0/1"})
