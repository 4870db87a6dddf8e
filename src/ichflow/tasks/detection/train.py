"""``train_detection(cfg)``: the task recipe with a detection engine (YOLO or Faster R-CNN) chosen by name."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import mlflow
import numpy as np

from ichflow.engine.budget import TimeBudget
from ichflow.engine.degenerate import box_reasons, score_reasons
from ichflow.errors import ParameterError, check_choice, check_range
from ichflow.metric_names import log_metrics
from ichflow.paths import MODEL_CONFIG
from ichflow.tasks.common import run_folder
from ichflow.tasks.detection import report
from ichflow.tasks.detection.config import PRESETS, DetectionConfig
from ichflow.tasks.detection.engines import ENGINES, engine_class
from ichflow.tasks.detection.metrics import best_conf_threshold, predictions_frame, slice_scores
from ichflow.tasks.recipe import TaskRecipe, run_task
from ichflow.tasks.spec import TASKS
from ichflow.tracking import log_params_once

log = logging.getLogger(__name__)

REGISTERED_NAME = TASKS["detection"].registered_name
FALLBACK_THRESHOLD = 0.25  # the slice decision when there is no validation split to choose it on


class DetectionRecipe(TaskRecipe):
    spec = TASKS["detection"]
    presets = PRESETS

    def resolve(self, cfg: DetectionConfig) -> DetectionConfig:
        if cfg.engine == "fasterrcnn" and cfg.model == "n":  # the default model param means the light backbone
            cfg = dataclasses.replace(cfg, model="mobilenet")
        if cfg.lr == 0 and cfg.engine in ENGINES:
            cfg = dataclasses.replace(cfg, lr=ENGINES[cfg.engine].default_lr)
        return cfg

    def validate(self, cfg: DetectionConfig) -> None:
        engine = engine_class(cfg.engine)
        if cfg.imgsz < 64 or cfg.imgsz % 32:
            raise ParameterError("imgsz", f"must be a multiple of 32 and >= 64; got {cfg.imgsz}")
        if not (cfg.conf_threshold == -1 or 0.0 <= cfg.conf_threshold <= 1.0):
            raise ParameterError("conf_threshold", "must be in [0, 1], or -1 for the val-optimal threshold; got "
                                                   f"{cfg.conf_threshold}")
        check_choice("in_channels", cfg.in_channels, (1, 3))
        for name in ("epochs", "batch_size", "max_det"):
            check_range(name, getattr(cfg, name), 1)
        check_range("overlays", cfg.overlays, 0)
        check_range("neg_fraction", cfg.neg_fraction, 0.0, 1.0, low_open=True)
        check_range("time_budget_min", cfg.time_budget_min, 0.0)
        check_range("aug_strength", cfg.aug_strength, 0.0, 1.0)
        check_range("mosaic", cfg.mosaic, 0.0, 1.0)
        check_range("close_mosaic", cfg.close_mosaic, 0)
        engine.check(cfg)

    def run_name(self, cfg: DetectionConfig) -> str:
        return f"detection-{cfg.engine}-{Path(cfg.model).stem}"

    def setup(self, cfg: DetectionConfig) -> None:
        self.engine = engine_class(cfg.engine)()
        log_params_once({"device_resolved": str(self.device), "metric_definition": report.METRIC_DEFINITION})
        self.table = self.engine.slices(cfg, self.prep)
        self.folder = run_folder()
        self.outputs: dict[str, list] = {}

    def fit(self, cfg: DetectionConfig, on_epoch_end):
        budget = TimeBudget(cfg.time_budget_min, cfg.epochs)
        self.engine_fit = self.engine.train(cfg, self.prep, self.folder, self.device, on_epoch_end, budget)
        return self.engine_fit

    def part(self, split: str):
        return self.table[self.table["split"] == split].reset_index(drop=True)

    def predict(self, split: str) -> list:
        if split not in self.outputs:
            self.outputs[split] = self.engine.predict(self.part(split))
        return self.outputs[split]

    def select(self, cfg: DetectionConfig, fit) -> dict:
        """The slice-decision threshold: the val-optimal one (max slice F1) unless ``conf_threshold`` is set."""
        val = self.part("val")
        if len(val):
            best_t, best_f1 = best_conf_threshold(predictions_frame(self.predict("val")), val["has_lesion"])
        else:
            best_t, best_f1 = FALLBACK_THRESHOLD, float("nan")
            log.warning("no validation patients: conf_threshold falls back to %s", FALLBACK_THRESHOLD)
        self.threshold = cfg.conf_threshold if cfg.conf_threshold >= 0 else best_t
        log_params_once({"conf_threshold_used": round(self.threshold, 6)})
        chosen = {"conf_threshold_used": self.threshold, "best_conf_threshold": best_t, "val_best_slice_f1": best_f1}
        log_metrics({k: v for k, v in chosen.items() if np.isfinite(v)})
        return chosen

    def report(self, cfg: DetectionConfig, split: str, step: int) -> dict:
        part = self.part(split)
        if not len(part):
            log.warning("no %s patients: nothing to evaluate on %s", split, split)
            return {}
        return report.evaluate_split(part, self.predict(split), self.threshold, split, seed=cfg.seed,
                                     overlays=cfg.overlays, step=step)

    def degenerate_reasons(self, cfg: DetectionConfig) -> list[str]:
        part, outputs = self.part("val"), self.predict("val")
        if not len(part):
            return []
        kept = [(boxes[scores >= self.threshold], len(boxes[scores >= self.threshold])) for boxes, scores in outputs]
        boxes = np.concatenate([b for b, _ in kept]) if kept else np.zeros((0, 4))
        sizes = np.repeat(part[["width", "height"]].to_numpy(float), [n for _, n in kept], axis=0)
        max_scores = slice_scores(predictions_frame(outputs), len(part))
        return score_reasons(part["has_lesion"], max_scores, self.threshold) + box_reasons(boxes, sizes)

    def export(self, cfg: DetectionConfig):
        config = {**self.engine_fit.model_config, "conf_threshold": float(self.threshold)}
        (self.folder / MODEL_CONFIG).write_text(json.dumps(config, indent=2))
        example = self.part("test") if len(self.part("test")) else self.table
        return _log_model(self.engine_fit.weights, self.folder / MODEL_CONFIG, config, example,
                          REGISTERED_NAME if cfg.register else None)

    def summary_lines(self, cfg: DetectionConfig, result) -> list[str]:
        return [f"{cfg.engine}/{cfg.model} imgsz {cfg.imgsz}; val-optimal conf "
                f"{result['best_conf_threshold']:.3f}, used {result['conf_threshold_used']:.3f}"]


def train_detection(cfg: DetectionConfig, on_epoch_end=None):
    """Train and evaluate one detector in one MLflow run; returns the TaskResult."""
    return run_task(DetectionRecipe, cfg, on_epoch_end)


def _log_model(weights: Path, config_path: Path, config: dict, part, registered: str | None):
    import cv2
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from ichflow.data.images import read_gray
    from ichflow.engine.modelio import log_pyfunc
    from ichflow.engine.scan import INPUT_DOC, input_schema, intensity_param, record_window
    from ichflow.tasks.detection.pyfunc import OUTPUT_COLUMNS, DetectionPyfunc

    # any accepted form of one scan (Tensor('object', (-1,)) passes them all through; as_scan validates)
    signature = ModelSignature(
        inputs=input_schema(),
        outputs=Schema([ColSpec("long", "slice_index"), *(ColSpec("double", c) for c in OUTPUT_COLUMNS[1:])]),
        params=ParamSchema([ParamSpec("conf_threshold", "double", float(config["conf_threshold"])),
                            intensity_param()]))
    config, recorded = record_window(config)   # the window of its 8-bit input, in model_config.json and metadata
    config_path.write_text(json.dumps(config, indent=2))
    # a small real example: three consecutive slices of one scan, downsized to keep the example file small
    first = part.sort_values(["patient_id", "slice_index"]).head(3)
    example = np.stack([cv2.resize(read_gray(p), (128, 128), interpolation=cv2.INTER_AREA)
                        for p in first["source_image"]]).astype(np.uint8)
    return log_pyfunc(DetectionPyfunc(), artifacts={"weights": str(weights), "config": str(config_path)},
                      signature=signature, input_example=example, registered_model_name=registered,
                      metadata={"task": "detection", "engine": config["engine"], **recorded, "input": INPUT_DOC,
                                "output": "DataFrame slice_index, x1, y1, x2, y2, score"})
