"""The segmentation model as an MLflow pyfunc: one scan in (8-bit slices, base64 PNG, HU, NIfTI), PHE out."""

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
from ichflow.engine.scan import (INPUT_DOC, PayloadError, as_scan, encode_png, input_schema, intensity_param,
                                 mask_rle, model_window, record_window)
from ichflow.tasks.segmentation.data import ScanPredictor
from ichflow.paths import MODEL_CONFIG
from ichflow.tasks.segmentation.engines import build_network

OUTPUTS = ("probability", "mask", "mask_png", "mask_rle")


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """Perihematomal-edema (PHE) segmentation of one head-CT scan.

    Input (one request = ONE scan, slices in axial order, native resolution ~0.5 mm pixels, any H, W: padded
    to a multiple of 32 internally), any of (:mod:`ichflow.engine.scan`):

    - uint8 (N, H, W) (or one (H, W) slice): 8-bit slices windowed with the model's window (brain, as the
      training PNGs); over REST ``{"inputs": [[[0, 12, ...], ...], ...]}`` (JSON integers);
    - a list of base64 PNG slices (8-bit grayscale): ``{"inputs": ["iVBORw0...", ...]}``;
    - HU: an integer (int16) array in Hounsfield units, windowed by the model with its recorded window
      (``model_config.json`` / metadata ``window``);
    - one base64 NIfTI (``.nii.gz`` bytes) string: a HU volume, read in display orientation and windowed.

    ``params={"intensity": ...}``: ``auto`` (default: integers with any value outside 0..255 are HU, uint8 /
    PNG are 8-bit, floats must be whole numbers 0..255), ``uint8`` or ``hu``. Anything else (a 0..1 float
    image, NaN, ragged slices, a non-PNG string) is refused with an MlflowException (HTTP 400) saying what
    to send. The model z-scores with the training split's mean/std and builds the 2.5D input itself
    (neighbouring slices, edge slices replicated).

    Output, ``params={"output": ...}``:

    - ``probability`` (default): float32 (N, H, W) probability of edema per pixel: the mean over the ensemble
      members and the test-time flips, with predicted 3D components smaller than the size chosen on
      validation set to 0;
    - ``mask``: uint8 (N, H, W) 0/1 at the threshold selected on validation;
    - ``mask_png``: a list of N base64 PNG strings, 0/255 masks, one per slice;
    - ``mask_rle``: a list of N ``{"size": [H, W], "counts": [...]}`` run lengths (row-major, starting with
      background; :func:`ichflow.engine.scan.mask_rle`).

    Which members, TTA, threshold and minimum size: the model's metadata and ``model_config.json``.
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
        params = params or {}
        output = params.get("output") or "probability"
        if output not in OUTPUTS:
            raise PayloadError(f"params.output must be one of {', '.join(OUTPUTS)}; got {output!r}")
        scan = as_scan(model_input, model_window(self.config), params.get("intensity") or "auto")
        probs, _ = self.predictor(scan)
        if output == "probability":
            return probs
        mask = (probs >= self.config["threshold"]).astype(np.uint8)
        if output == "mask_png":
            return [encode_png(m) for m in mask]
        if output == "mask_rle":
            return [mask_rle(m) for m in mask]
        return mask


def weight_keys(artifacts) -> list[str]:
    """The artifact names of the member weights: ``weights`` (one network) or ``weights_0``.. (an ensemble)."""
    if "weights" in artifacts:
        return ["weights"]
    return sorted((k for k in artifacts if k.startswith("weights_")), key=lambda k: int(k.split("_")[1]))


def signature() -> ModelSignature:
    """Input ``Tensor('object', (-1,))`` (MLflow passes every accepted form through; ``as_scan`` validates),
    output the default float32 probabilities, params ``output`` and ``intensity``."""
    return ModelSignature(inputs=input_schema(),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
                          params=ParamSchema([ParamSpec("output", "string", "probability"), intensity_param()]))


INPUT = INPUT_DOC
OUTPUT = ("float32 (N, H, W) PHE probability; params output=mask -> uint8 0/1, mask_png -> base64 PNG 0/255 per "
          "slice, mask_rle -> {size, counts} per slice (row-major run lengths)")


def log_model(weights, config: dict, example: np.ndarray, registered_name: str | None):
    """Write ``config`` (model spec, normalisation, threshold, TTA, minimum component size, target, voxel size,
    the HU ``window`` of its 8-bit input: brain unless given) as model_config.json next to the first weights
    file and log the pyfunc, registered under ``registered_name`` when given; MLflow's ModelInfo.
    ``weights``: one checkpoint, or a list (an ensemble)."""
    files = [Path(w) for w in (weights if isinstance(weights, (list, tuple)) else [weights])]
    config, recorded = record_window(config)   # model_config.json and metadata name the same window
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
                                **recorded, "input": INPUT, "output": OUTPUT})
