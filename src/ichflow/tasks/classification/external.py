"""Bleed / no-bleed metrics of a served model on any labelled data (the ``evaluate`` entry point).

Scores come from the pyfunc (``has_lesion_probability`` per slice, each scan in axial order); the threshold
is the one the model carries (chosen on its validation split). Slice- and patient-level metrics with
patient-bootstrap CIs, the classification report, confusion matrices and ROC/PR curves are produced by the
training run's own split evaluation, under ``prefix``, with the training run's bootstrap settings.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ichflow.data.scans import iter_scans
from ichflow.errors import DataError
from ichflow.metric_names import log_metrics
from ichflow.tasks.classification.config import LABEL
from ichflow.tasks.classification.report import evaluate_split

log = logging.getLogger(__name__)


def _param(params: dict, key: str, default, cast):
    try:
        return cast(float(params[key])) if cast is not str else str(params[key])
    except (KeyError, TypeError, ValueError):
        return default


def slice_scores(pyfunc, part: pd.DataFrame, column: str) -> pd.DataFrame:
    """(row, patient_id, slice_index, y, score) per slice of ``part``; ``column`` of the pyfunc output."""
    frames = []
    for pid, group, slices in iter_scans(part):
        out = pyfunc.predict(slices)
        if not isinstance(out, pd.DataFrame) or column not in out.columns or len(out) != len(group):
            raise ValueError(f"the model's output for patient {pid} has no {column!r} column per slice")
        frames.append(pd.DataFrame({"row": group.index.to_numpy(), "patient_id": pid,
                                    "slice_index": group["slice_index"].to_numpy(),
                                    "y": group[LABEL].astype(int).to_numpy(),
                                    "score": out[column].to_numpy(float)}))
    return pd.concat(frames, ignore_index=True)


def check_data(model, part: pd.DataFrame) -> None:
    """DataError unless every slice has the bleed label."""
    if LABEL not in part.columns or part[LABEL].isna().any():
        raise DataError("data", f"bleed classification needs the slice label {LABEL!r} on every slice")


def evaluate_external(model, part: pd.DataFrame, prefix: str) -> dict:
    """Log the classification metric set of ``model`` (a LoadedModel) on ``part`` as ``<prefix>_*``."""
    check_data(model, part)
    params = model.train_params
    threshold = float(model.meta.get("threshold", 0.5))
    frame = slice_scores(model.pyfunc, part, f"{LABEL}_probability")
    if frame["y"].min() == frame["y"].max():
        log.warning("the evaluated slices have a single class: ROC-AUC and PR-AUC are undefined")
    metrics = evaluate_split(prefix, frame, threshold, n_boot=_param(params, "n_boot", 1000, int),
                             seed=_param(params, "seed", 0, int),
                             threshold_goal=_param(params, "threshold_goal", "f1", str))
    extra = {f"{prefix}_threshold": threshold, f"{prefix}_slices": len(frame),
             f"{prefix}_positive_slices": int(np.sum(frame["y"]))}
    log_metrics(extra)
    return {**metrics, **extra}
