"""``train_detection(cfg)``: prepare, train (YOLO or Faster R-CNN), evaluate on val (and test), log, register."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from ichflow.engine.device import resolve_device, seed_everything
from ichflow.engine.figures import close, confusion_figure, curves_figure, roc_pr_figure
from ichflow.engine.stats import patient_bootstrap_ci
from ichflow.errors import DataError
from ichflow.prepare import log_prepared, prepare_data
from ichflow.tasks.common import apply_preset, log_config, run_folder
from ichflow.tasks.detection import analysis
from ichflow.tasks.detection.config import ENGINES, PRESETS, DetectionConfig
from ichflow.tasks.detection.metrics import (best_conf_threshold, box_metrics, confusion, patient_bootstrap_map,
                                             predictions_frame, slice_metrics, slice_scores, truths_from_index)
from ichflow.tracking import log_params_once, task_run

log = logging.getLogger(__name__)

REGISTERED_NAME = "ich-detection"
METRIC_DEFINITION = ("boxes: greedy IoU matching per IoU threshold 0.50:0.95 + Ultralytics ap_per_class "
                     "(same code for both engines); slice: any box with score >= conf_threshold")


def check_config(cfg: DetectionConfig) -> None:
    if cfg.engine not in ENGINES:
        raise DataError("parameter engine", f"must be one of {ENGINES}, got {cfg.engine!r}")
    if cfg.imgsz < 64 or cfg.imgsz % 32:
        raise DataError("parameter imgsz", f"must be a multiple of 32 and >= 64, got {cfg.imgsz}")
    if not (cfg.conf_threshold == -1 or 0.0 <= cfg.conf_threshold <= 1.0):
        raise DataError("parameter conf_threshold", f"must be in [0, 1], or -1 for the val-optimal threshold; got "
                                          f"{cfg.conf_threshold}")
    if cfg.in_channels not in (1, 3):
        raise DataError("parameter in_channels", f"must be 1 or 3 (2.5D), got {cfg.in_channels}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise DataError("parameter epochs/batch_size", "must be >= 1")
    if not 0.0 < cfg.neg_fraction <= 1.0:
        raise DataError("parameter neg_fraction", f"must be in (0, 1], got {cfg.neg_fraction}")
    if cfg.time_budget_min < 0:
        raise DataError("parameter time_budget_min", f"must be >= 0 (0 = no limit), got {cfg.time_budget_min}")
    if not 0.0 <= cfg.aug_strength <= 1.0:
        raise DataError("parameter aug_strength", f"must be in [0, 1], got {cfg.aug_strength}")
    if cfg.engine == "yolo":
        from ichflow.tasks.detection.yolo import resolve_model

        resolve_model(cfg.model)  # a missing .pt fails here, before any run is opened
    if cfg.engine == "fasterrcnn":
        from ichflow.tasks.detection.fasterrcnn import ARCHS

        if cfg.model not in ARCHS:
            raise DataError("parameter model", f"engine=fasterrcnn takes model={' or '.join(ARCHS)}, got {cfg.model!r}")


def _prefixed(prefix: str, m: dict, keys) -> dict:
    return {f"{prefix}{k}": float(m[k]) for k in keys if k in m}


def _evaluate_split(part: pd.DataFrame, outputs):
    preds = predictions_frame(outputs)
    truths = truths_from_index(part)
    y = part["has_lesion"].to_numpy(bool)
    return preds, truths, y, box_metrics(preds, truths)


def _slice_frame(part: pd.DataFrame, preds: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"slice_id": np.arange(len(part)), "patient_id": part["patient_id"].to_numpy(),
                         "slice_index": part["slice_index"].to_numpy(), "has_lesion": part["has_lesion"].to_numpy(bool),
                         "max_score": slice_scores(preds, len(part))})


def _per_patient(slices: pd.DataFrame, threshold: float) -> pd.DataFrame:
    rows = []
    for pid, g in slices.groupby("patient_id", sort=True):
        m = slice_metrics(g["max_score"].to_numpy(), g["has_lesion"].to_numpy(), threshold)
        rows.append({"patient_id": pid, "slices": len(g), "lesion_slices": int(g["has_lesion"].sum()),
                     **{k: m[k] for k in ("tp", "fp", "fn", "tn")}, "slice_recall": m["recall"],
                     "slice_precision": m["precision"], "slice_f1": m["f1"]})
    return pd.DataFrame(rows)


def train_detection(cfg: DetectionConfig, on_epoch_end=None) -> dict:
    """Train and evaluate one detector in one MLflow run; returns the metrics (see the task contract)."""
    try:
        cfg = apply_preset(cfg, PRESETS)
    except ValueError as exc:
        raise DataError("parameter preset", str(exc)) from exc
    if cfg.engine == "fasterrcnn" and cfg.model == "n":  # the default model param means the light backbone
        cfg = dataclasses.replace(cfg, model="mobilenet")
    check_config(cfg)
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    with task_run("detection", run_name=f"detection-{cfg.engine}-{Path(cfg.model).stem}") as run:
        log_config(cfg)
        _log_preset_values(cfg)
        prep = prepare_data(cfg)
        log_prepared(prep, target="has_lesion")
        folder = run_folder()
        params = {"device_resolved": str(device), "metric_definition": METRIC_DEFINITION}
        if cfg.engine == "yolo":
            from ichflow.tasks.detection.dataset import export_yolo
            from ichflow.tasks.detection.yolo import YoloPredictor, resolve_model, setup_ultralytics, train_yolo

            setup_ultralytics()
            ds = export_yolo(prep.manifest, prep.split, cfg.in_channels, cfg.neg_fraction, cfg.seed)
            table = ds.index
            log_params_once({**params, "model_resolved": resolve_model(cfg.model), "yolo_dataset": str(ds.root),
                             "yolo_dataset_digest": ds.digest})
            mlflow.log_artifact(str(ds.data_yaml), artifact_path="data/yolo")
            fit = train_yolo(cfg, ds.data_yaml, folder / "yolo", device, on_epoch_end)
            for extra in ("args.yaml", "results.csv"):
                if (fit["weights"].parent.parent / extra).exists():
                    mlflow.log_artifact(str(fit["weights"].parent.parent / extra), artifact_path="yolo")
            predictor = YoloPredictor(fit["weights"], cfg.imgsz, device, cfg.max_det)
            model_config = {"engine": "yolo", "imgsz": cfg.imgsz, "in_channels": cfg.in_channels,
                            "max_det": cfg.max_det, "model": resolve_model(cfg.model)}

            def predict(part):
                return predictor(list(part["image"]), conf=0.001)
        else:
            from ichflow.engine.slices import stack_channels
            from ichflow.tasks.detection.dataset import slice_table
            from ichflow.tasks.detection.fasterrcnn import train_fasterrcnn

            table = slice_table(prep.manifest, prep.split)
            log_params_once({**params, "model_resolved": f"fasterrcnn_{cfg.model}_fpn (weights=None)"})
            fit = train_fasterrcnn(cfg, prep.manifest, table, device, folder, on_epoch_end)
            log_params_once({k: v for k, v in fit["config"].items() if k.startswith("norm")})
            model_config = fit["config"]

            def predict(part):
                imgs = [stack_channels(fit["images"], int(r), fit["prev_idx"], fit["next_idx"], cfg.in_channels)
                        for r in part["row"]]
                outs = fit["predictor"](imgs, conf=0.001)
                scale = np.stack([part["width"] / cfg.imgsz, part["height"] / cfg.imgsz] * 2, 1).astype(np.float32)
                return [(b * scale[i], s) for i, (b, s) in enumerate(outs)]

        history = fit["history"]
        mlflow.log_metrics({"epochs_run": fit["epochs_run"], "best_epoch": fit["best_epoch"],
                            "train_seconds": fit["train_seconds"]})
        if history:
            keys = [k for k in history[0] if k.endswith("loss")]
            for name, ks in (("losses", keys), ("val_map", ["val_map50", "val_map50_95"])):
                fig = curves_figure(history, ks, title=f"per-epoch {name.replace('_', ' ')}")
                mlflow.log_figure(fig, f"figures/curves_{name}.png")
                close(fig)

        # ---- validation: box metrics, slice decision, threshold chosen here only
        val = table[table["split"] == "val"].reset_index(drop=True)
        results = {"run_id": run.info.run_id, "epochs_run": fit["epochs_run"], "best_epoch": fit["best_epoch"],
                   "train_seconds": fit["train_seconds"],
                   "stopped_by_time_budget": float(fit.get("stopped_by_time_budget", False))}
        curves = {}
        if len(val):
            preds_v, truths_v, y_v, bm_v = _evaluate_split(val, predict(val))
            best_t, best_f1 = best_conf_threshold(preds_v, y_v)
        else:
            preds_v, truths_v, y_v, bm_v = pd.DataFrame(), [], np.zeros(0, bool), {}
            best_t, best_f1 = 0.25, float("nan")
            log.warning("no validation patients: conf_threshold falls back to 0.25")
        threshold = cfg.conf_threshold if cfg.conf_threshold >= 0 else best_t
        log_params_once({"conf_threshold_used": round(threshold, 6)})
        results.update({"best_conf_threshold": best_t, "val_best_slice_f1": best_f1,
                        "conf_threshold_used": threshold})
        if len(val):
            sm_v = slice_metrics(preds_v, y_v, threshold)
            results.update(_prefixed("val_", bm_v, ("precision", "recall", "map50", "map50_95")))
            results.update(_prefixed("val_slice_", sm_v, ("accuracy", "precision", "recall", "f1", "specificity")))
            curves["val"] = bm_v
            slices_v = _slice_frame(val, preds_v)
            val_pred_path = folder / "val_predictions.csv"
            preds_v.assign(patient_id=val["patient_id"].to_numpy()[preds_v["slice_id"].to_numpy(int)]
                           if len(preds_v) else []).to_csv(val_pred_path, index=False)
            slices_v.to_csv(folder / "val_slices.csv", index=False)
            mlflow.log_artifact(str(val_pred_path), artifact_path="predictions")
            mlflow.log_artifact(str(folder / "val_slices.csv"), artifact_path="predictions")
            results["val_predictions_path"] = str(val_pred_path)
            fig = confusion_figure(confusion(sm_v), ["no lesion", "lesion"],
                                   title=f"val slice-level (score >= {threshold:.3f})")
            mlflow.log_figure(fig, "figures/confusion_val.png")
            close(fig)

        # ---- test: touched once, with the threshold fixed above
        analysed = ("val", val, preds_v, truths_v)
        if cfg.evaluate_test:
            test = table[table["split"] == "test"].reset_index(drop=True)
            if len(test):
                preds_t, truths_t, y_t, bm_t = _evaluate_split(test, predict(test))
                sm_t = slice_metrics(preds_t, y_t, threshold)
                results.update(_prefixed("test_", bm_t, ("precision", "recall", "map50", "map50_95")))
                results.update(_prefixed("test_slice_", sm_t, ("accuracy", "precision", "recall", "f1",
                                                                 "specificity")))
                cis = patient_bootstrap_map(preds_t, truths_t, test["patient_id"].to_numpy(), seed=cfg.seed)
                slices_t = _slice_frame(test, preds_t)
                for key in ("f1", "recall", "precision"):
                    lo, hi = patient_bootstrap_ci(
                        slices_t, lambda f, k=key: slice_metrics(f["max_score"].to_numpy(), f["has_lesion"].to_numpy(),
                                                                 threshold)[k], seed=cfg.seed)
                    cis[f"slice_{key}"] = (lo, hi)
                for k, (lo, hi) in cis.items():
                    results[f"test_{k}_ci_low"], results[f"test_{k}_ci_high"] = lo, hi
                curves["test"] = bm_t
                per_pt = _per_patient(slices_t, threshold)
                mlflow.log_text(per_pt.to_csv(index=False), "evaluation/test_per_patient.csv")
                mlflow.log_text(preds_t.to_csv(index=False), "predictions/test_predictions.csv")
                fig = confusion_figure(confusion(sm_t), ["no lesion", "lesion"],
                                       title=f"test slice-level (score >= {threshold:.3f})")
                mlflow.log_figure(fig, "figures/confusion_test.png")
                close(fig)
                if 0 < y_t.sum() < len(y_t):
                    fig = roc_pr_figure(y_t, slices_t["max_score"].to_numpy(), title="test slice-level (max box score)")
                    mlflow.log_figure(fig, "figures/slice_roc_pr_test.png")
                    close(fig)
                analysed = ("test", test, preds_t, truths_t)
            else:
                log.warning("no test patients: nothing to evaluate on test")
        if curves:
            fig = analysis.pr_figure(curves)
            mlflow.log_figure(fig, "figures/pr_curve.png")
            close(fig)
        name, part, preds, truths = analysed
        if len(part):
            fig, text, gts, fps = analysis.difficulty(part, preds, truths, threshold, name)
            mlflow.log_figure(fig, f"figures/difficulty_{name}.png")
            close(fig)
            mlflow.log_text(text, f"evaluation/difficulty_{name}.md")
            mlflow.log_text(gts.to_csv(index=False), f"evaluation/difficulty_{name}_boxes.csv")
            if cfg.overlays > 0:
                fig = analysis.overlays(part, preds, truths, threshold, cfg.overlays, name, seed=cfg.seed)
                mlflow.log_figure(fig, f"figures/overlays_{name}.png")
                close(fig)

        metric_values = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                         and np.isfinite(v) and k not in ("epochs_run", "best_epoch", "train_seconds")}
        mlflow.log_metrics(metric_values)

        # ---- model: weights + pyfunc; registered only for a run that was evaluated on test
        if cfg.evaluate_test:
            model_config.update(conf_threshold=float(threshold))
            info = _log_model(fit["weights"], model_config, folder, part if len(part) else table,
                              REGISTERED_NAME if cfg.register else None)
            results["model_uri"] = info.model_uri
            if info.registered_model_version is not None:
                results["model_version"] = int(info.registered_model_version)
        results["objective"] = results.get("val_map50", 0.0)
        results["objective_name"] = "val_map50"
        results["wall_seconds"] = time.perf_counter() - t_start
        mlflow.log_metric("wall_seconds", results["wall_seconds"])
    _print_summary(cfg, results)
    return results


def _log_preset_values(cfg: DetectionConfig) -> None:
    """A preset changes fields after ``mlflow run`` logged the -P values: record what was really used."""
    if not cfg.preset:
        return
    params = mlflow.get_run(mlflow.active_run().info.run_id).data.params

    def same(a, b) -> bool:
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return str(a) == str(b)

    log_params_once({f"preset.{k}": getattr(cfg, k) for k in PRESETS[cfg.preset]
                     if not same(params.get(k), getattr(cfg, k))})


def _log_model(weights: Path, config: dict, folder: Path, part: pd.DataFrame, registered: str | None):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from ichflow.data.images import read_gray
    from ichflow.engine.modelio import log_pyfunc
    from ichflow.tasks.detection.pyfunc import DetectionPyfunc

    cfg_path = folder / "detection_model.json"
    cfg_path.write_text(json.dumps(config, indent=2))
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
        outputs=Schema([ColSpec("long", "slice_index"), *(ColSpec("double", c) for c in ("x1", "y1", "x2", "y2",
                                                                                         "score"))]),
        params=ParamSchema([ParamSpec("conf_threshold", "double", float(config["conf_threshold"]))]))
    # a small real example: three consecutive slices of one scan, downsized to keep the example file small
    first = part.sort_values(["patient_id", "slice_index"]).head(3)
    import cv2

    example = np.stack([cv2.resize(read_gray(p), (128, 128), interpolation=cv2.INTER_AREA)
                        for p in first["source_image"]]).astype(np.uint8)
    return log_pyfunc(DetectionPyfunc(), artifacts={"weights": str(weights), "config": str(cfg_path)},
                      signature=signature, input_example=example, registered_model_name=registered,
                      metadata={"task": "detection", "engine": config["engine"],
                                "output": "DataFrame slice_index, x1, y1, x2, y2, score"})


def _print_summary(cfg: DetectionConfig, r: dict) -> None:
    def f(k):
        v = r.get(k)
        return "n/a" if v is None else f"{v:.3f}"

    print(f"[detection] {cfg.engine}/{cfg.model} imgsz {cfg.imgsz}: {r['epochs_run']} epochs, "
          f"train {r['train_seconds']:.0f}s, wall {r['wall_seconds']:.0f}s")
    print(f"  val  mAP50 {f('val_map50')}  mAP50-95 {f('val_map50_95')}  slice F1 {f('val_slice_f1')}  "
          f"(val-optimal conf {r['best_conf_threshold']:.3f}, used {r['conf_threshold_used']:.3f})")
    if "test_map50" in r:
        print(f"  test mAP50 {f('test_map50')} [{f('test_map50_ci_low')}, {f('test_map50_ci_high')}]  "
              f"mAP50-95 {f('test_map50_95')}  slice F1 {f('test_slice_f1')} "
              f"[{f('test_slice_f1_ci_low')}, {f('test_slice_f1_ci_high')}]")
    if r.get("model_uri"):
        print(f"  model {r['model_uri']}" + (f" -> {REGISTERED_NAME} v{r['model_version']}"
                                             if r.get("model_version") else ""))


