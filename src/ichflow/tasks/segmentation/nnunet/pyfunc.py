"""The nnU-Net segmentation model as an MLflow pyfunc, with the smp model's signature and contract."""

from __future__ import annotations

import json

import numpy as np

from ichflow.engine.device import resolve_device
from ichflow.engine.modelio import log_pyfunc
from ichflow.engine.scan import record_window
from ichflow.paths import MODEL_CONFIG
from ichflow.tasks.segmentation.nnunet.engine import NnUNetNetwork
from ichflow.tasks.segmentation.pyfunc import INPUT, OUTPUT, SegmentationModel, signature

_NETWORK_FILES = ("plans", "dataset", "checkpoint")   # what the predictor needs; the fingerprint is provenance


class NnUNetSegmentationModel(SegmentationModel):
    """Perihematomal-edema (PHE) segmentation of one head-CT scan by an nnU-Net v2 2d U-Net.

    Input and output: as :class:`~ichflow.tasks.segmentation.pyfunc.SegmentationModel` (same signature):
    ONE scan as uint8 (N, H, W) 8-bit slices windowed with the model's window, a list of base64 PNG slices,
    HU (int16; the model windows it; ``params={"intensity": "hu"}`` when no value is outside 0..255) or one
    base64 NIfTI; at native resolution (any H, W). nnU-Net's own preprocessing (crop to the non-zero region,
    z-score with the training fingerprint's statistics) and sliding-window prediction with mirroring, at the
    voxel size stored in ``model_config.json``.
    Output: float32 (N, H, W) probability of edema per pixel, with predicted 3D components smaller than the
    size chosen on validation set to 0; ``params={"output": ...}`` ``mask`` (uint8 0/1 at the threshold
    selected on validation), ``mask_png`` (base64 PNG 0/255 per slice) or ``mask_rle`` (run lengths per slice).
    Threshold, minimum size, voxel size and window: the model's metadata and model_config.json.
    """

    def load_context(self, context):
        with open(context.artifacts["config"]) as fh:
            self.config = json.load(fh)
        self.predictor = NnUNetNetwork.from_files(   # SegmentationModel.predict calls it
            {k: context.artifacts[k] for k in _NETWORK_FILES}, self.config["spacing_zyx"], resolve_device("auto"),
            mirroring=self.config["tta"] == "mirror", threshold=self.config["threshold"],
            min_voxels=int(self.config.get("min_component_voxels", 0)))


def log_model(network: NnUNetNetwork, config: dict, example: np.ndarray, registered_name: str | None):
    """Log ``network`` (its plans.json, dataset.json, fingerprint and served checkpoint) as the pyfunc,
    registered under ``registered_name`` when given; MLflow's ModelInfo.

    ``config``: threshold, min_component_voxels, target, pixel_spacing_mm, slice_thickness_mm (as the smp
    engine's); the network's spec, voxel size and TTA are added, and it is written as model_config.json
    next to plans.json with the HU ``window`` of its 8-bit input (brain unless given). ``example``: uint8 (N, H, W)
    slices, the input example.
    """
    config = {**config, "model": network.spec(), "spacing_zyx": list(network.spacing_zyx), "tta": network.tta}
    config, recorded = record_window(config)   # model_config.json and metadata name the same window
    path = network.files["plans"].parent / MODEL_CONFIG
    path.write_text(json.dumps(config, indent=2))
    artifacts = {k: str(f) for k, f in network.files.items()}
    spec = config["model"]
    return log_pyfunc(NnUNetSegmentationModel(), {**artifacts, "config": str(path)}, signature(), example,
                      registered_name,
                      metadata={"task": "segmentation", "target": config["target"], "threshold": config["threshold"],
                                "tta": config["tta"], "members": 1,
                                "min_component_voxels": int(config.get("min_component_voxels", 0)),
                                "engine": spec["engine"], "configuration": spec["configuration"],
                                **recorded, "input": INPUT, "output": OUTPUT})
