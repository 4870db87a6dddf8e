"""Detection metrics of a served model on any labelled data (the ``evaluate`` entry point).

Boxes come from the pyfunc (each scan in axial order) at confidence >= ``BOX_CONF``, as the training run
predicts its splits; the slice-level decision uses the threshold the model carries (its ``conf_threshold``,
chosen on validation). Scored and logged by ``report.evaluate_split``, the training run's own code, so the
names under ``prefix`` are the training run's: ``map50``, ``map50_95``, ``precision``, ``recall``,
``slice_*`` and CIs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ichflow.data.scans import iter_scans
from ichflow.errors import DataError
from ichflow.metric_names import log_metrics
from ichflow.tasks.detection.base import BOX_CONF
from ichflow.tasks.detection.dataset import slice_table
from ichflow.tasks.detection.report import evaluate_split


def conf_threshold(model) -> float:
    """The slice-decision threshold the model carries (its conf_threshold param default)."""
    schema = model.pyfunc.metadata.get_params_schema()
    for spec in (schema.params if schema is not None else []):
        if spec.name == "conf_threshold" and spec.default is not None:
            return float(spec.default)
    config = getattr(model.unwrap(), "config", None) or {}
    if "conf_threshold" in config:
        return float(config["conf_threshold"])
    raise ValueError(f"{model.uri}: the detection model does not carry a conf_threshold")


def _param(params: dict, key: str, default: int) -> int:
    try:
        return int(float(params[key]))
    except (KeyError, TypeError, ValueError):
        return default


def predict_boxes(pyfunc, part: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes xyxy, scores) per row of ``part`` (reset index), each scan predicted as one input."""
    outputs: list = [(np.zeros((0, 4)), np.zeros(0))] * len(part)
    for pid, group, slices in iter_scans(part):
        boxes = pd.DataFrame(pyfunc.predict(slices, params={"conf_threshold": BOX_CONF}))
        need = {"slice_index", "x1", "y1", "x2", "y2", "score"}
        if not need <= set(boxes.columns):
            raise ValueError(f"the model's output for patient {pid} lacks the columns {sorted(need)}")
        rows = group.index.to_numpy()
        for pos, g in boxes.groupby("slice_index"):
            if not 0 <= int(pos) < len(rows):
                raise ValueError(f"the model returned slice_index {pos} for a scan of {len(rows)} slices")
            outputs[rows[int(pos)]] = (g[["x1", "y1", "x2", "y2"]].to_numpy(float), g["score"].to_numpy(float))
    return outputs


def check_data(model, part: pd.DataFrame) -> None:
    """DataError unless the data has lesion boxes (PHE-SICH-CT-IDS annotations)."""
    readers = sorted(set(part["dataset"].astype(str))) if "dataset" in part.columns else []
    if readers != ["phe"]:
        raise DataError("data", "detection evaluation needs lesion boxes (a PHE-SICH-CT-IDS layout with "
                                f"annotation/ VOC files); this is {'/'.join(readers) or 'unknown'} data")


def evaluate_external(model, part: pd.DataFrame, prefix: str) -> dict:
    """Log the detection metric set of ``model`` (a LoadedModel) on ``part`` as ``<prefix>_*``."""
    check_data(model, part)
    params = model.train_params
    threshold = conf_threshold(model)
    split = pd.DataFrame({"patient_id": sorted(part["patient_id"].unique()), "split": "test", "fold": 0})
    index = slice_table(part, split)
    metrics = evaluate_split(index, predict_boxes(model.pyfunc, part), threshold, prefix,
                             seed=_param(params, "seed", 0), overlays=_param(params, "overlays", 8))
    log_metrics({f"{prefix}_conf_threshold": threshold})
    return {**metrics, f"{prefix}_conf_threshold": threshold}
