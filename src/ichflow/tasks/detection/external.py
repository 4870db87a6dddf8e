"""Detection metrics of a served model on any labelled data (the ``evaluate`` entry point).

Boxes come from the pyfunc (each scan in axial order) at confidence >= 0.001, as the training run predicts
its test split; the slice-level decision uses the threshold the model carries (its ``conf_threshold``, chosen
on validation). Everything is scored by the training code's definitions (``metrics.box_metrics``,
``slice_metrics``, ``patient_bootstrap_map``; ``analysis.difficulty`` / ``overlays`` / ``pr_figure``), with the
training run's names under ``prefix``: ``map50``, ``map50_95``, ``precision``, ``recall``, ``slice_*`` and CIs.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

from ichflow.engine.figures import close, confusion_figure, roc_pr_figure
from ichflow.engine.stats import patient_bootstrap_ci
from ichflow.errors import DataError
from ichflow.tasks.detection import analysis
from ichflow.tasks.detection.dataset import slice_table
from ichflow.tasks.detection.metrics import (box_metrics, confusion, patient_bootstrap_map, predictions_frame,
                                             slice_metrics, slice_scores, truths_from_index)

BOX_CONF = 0.001   # every box down to this score, as the training evaluation keeps (mAP needs the whole ranking)


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
    from ichflow.data.scans import iter_scans

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
    seed = _param(params, "seed", 0)
    threshold = conf_threshold(model)
    split = pd.DataFrame({"patient_id": sorted(part["patient_id"].unique()), "split": "test", "fold": 0})
    index = slice_table(part, split)
    preds = predictions_frame(predict_boxes(model.pyfunc, part))
    truths = truths_from_index(index)
    y = index["has_lesion"].to_numpy(bool)
    bm = box_metrics(preds, truths)
    sm = slice_metrics(preds, y, threshold)
    metrics = {f"{prefix}_{k}": float(bm[k]) for k in ("precision", "recall", "map50", "map50_95")}
    metrics.update({f"{prefix}_slice_{k}": float(sm[k]) for k in ("accuracy", "precision", "recall", "f1",
                                                                  "specificity")})
    cis = patient_bootstrap_map(preds, truths, index["patient_id"].to_numpy(), seed=seed)
    slices = pd.DataFrame({"slice_id": np.arange(len(index)), "patient_id": index["patient_id"].to_numpy(),
                           "slice_index": index["slice_index"].to_numpy(), "has_lesion": y,
                           "max_score": slice_scores(preds, len(index))})
    for key in ("f1", "recall", "precision"):
        cis[f"slice_{key}"] = patient_bootstrap_ci(
            slices, lambda f, k=key: slice_metrics(f["max_score"].to_numpy(), f["has_lesion"].to_numpy(),
                                                   threshold)[k], seed=seed)
    for k, (lo, hi) in cis.items():
        metrics[f"{prefix}_{k}_ci_low"], metrics[f"{prefix}_{k}_ci_high"] = lo, hi
    metrics.update({f"{prefix}_conf_threshold": threshold, f"{prefix}_slices": len(index),
                    f"{prefix}_lesion_slices": int(y.sum()), f"{prefix}_boxes": int(sum(len(t) for t in truths))})
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})

    per_patient = []
    for pid, g in slices.groupby("patient_id", sort=True):
        m = slice_metrics(g["max_score"].to_numpy(), g["has_lesion"].to_numpy(), threshold)
        per_patient.append({"patient_id": pid, "slices": len(g), "lesion_slices": int(g["has_lesion"].sum()),
                            **{k: m[k] for k in ("tp", "fp", "fn", "tn")}, "slice_recall": m["recall"],
                            "slice_precision": m["precision"], "slice_f1": m["f1"]})
    mlflow.log_text(pd.DataFrame(per_patient).to_csv(index=False), f"evaluation/{prefix}_per_patient.csv")
    mlflow.log_text(preds.assign(patient_id=index["patient_id"].to_numpy()[preds["slice_id"].to_numpy(int)]
                                 if len(preds) else []).to_csv(index=False), f"predictions/{prefix}_predictions.csv")
    fig = confusion_figure(confusion(sm), ["no lesion", "lesion"],
                           title=f"{prefix} slice-level (score >= {threshold:.3f})")
    mlflow.log_figure(fig, f"figures/confusion_{prefix}.png")
    close(fig)
    if 0 < y.sum() < len(y):
        fig = roc_pr_figure(y, slices["max_score"].to_numpy(), title=f"{prefix} slice-level (max box score)")
        mlflow.log_figure(fig, f"figures/slice_roc_pr_{prefix}.png")
        close(fig)
    fig = analysis.pr_figure({prefix: bm})
    mlflow.log_figure(fig, "figures/pr_curve.png")
    close(fig)
    fig, text, gts, _ = analysis.difficulty(index, preds, truths, threshold, prefix)
    mlflow.log_figure(fig, f"figures/difficulty_{prefix}.png")
    close(fig)
    mlflow.log_text(text, f"evaluation/difficulty_{prefix}.md")
    mlflow.log_text(gts.to_csv(index=False), f"evaluation/difficulty_{prefix}_boxes.csv")
    n_overlays = _param(params, "overlays", 8)
    if n_overlays > 0:
        fig = analysis.overlays(index, preds, truths, threshold, n_overlays, prefix, seed=seed)
        mlflow.log_figure(fig, f"figures/overlays_{prefix}.png")
        close(fig)
    return metrics
