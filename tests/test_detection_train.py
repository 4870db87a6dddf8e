"""Detection training on the synthetic phantom: our MLflow run only, the learning path, the served model."""

from __future__ import annotations

import socket

import numpy as np
import pandas as pd
import pytest
import torch

import mlflow
from ichflow.data.images import read_gray
from ichflow.metric_names import mlflow_key, run_metrics
from ichflow.prepare import DataConfig, prepare_data
from ichflow.tasks.detection import REGISTERED_NAME, DetectionConfig, slice_metrics, train_detection

# small enough for CI on 2 cores, long enough to learn the phantom's lesions (mAP@0.5 >= 0.5 on test)
LEARN = dict(imgsz=160, epochs=16, patience=16, batch_size=8, mosaic=0.0, overlays=4)


def _all_runs(client):
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


def _record_connections(monkeypatch) -> list:
    """Every network connection this process tries from now on (refused; local AF_UNIX ones go through, the
    data loader's workers use them): Ultralytics must stay offline."""
    tried = []

    def refusing(original):
        def connect(sock, address):
            if sock.family == socket.AF_UNIX:
                return original(sock, address)
            tried.append(address)
            raise OSError("network disabled in this test")
        return connect

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refusing(getattr(socket.socket, name)))
    return tried


@pytest.mark.slow
def test_yolo_logs_into_our_run_only_learns_and_serves(synthetic_phe, monkeypatch):
    tried = _record_connections(monkeypatch)
    client = mlflow.MlflowClient()
    exps_before = {e.name for e in client.search_experiments()}
    runs_before = len(_all_runs(client))
    seen, threads = [], torch.get_num_threads()
    res = train_detection(DetectionConfig(**LEARN), on_epoch_end=lambda e, m: seen.append((e, torch.get_num_threads())))
    # Ultralytics pins CPU training to cpu_count - 1 threads (1 of 2 cores); we train with all of ours
    assert {t for _, t in seen} == {threads}

    # one run, ours; Ultralytics' MLflow callback opened nothing and logged nothing
    assert len(_all_runs(client)) == runs_before + 1
    assert {e.name for e in client.search_experiments()} - exps_before <= {"ichflow-detection"}
    assert mlflow.active_run() is None
    run = client.get_run(res["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["ichflow.task"] == "detection"
    assert "warmup_epochs" not in run.data.params and "mosaic" in run.data.params   # their args.yaml dump is not
    # per-epoch val metrics at step=epoch; the selected model's one step later (what run.data.metrics shows)
    history = sorted(client.get_metric_history(run.info.run_id, mlflow_key("val_map50")), key=lambda m: m.step)
    assert [m.step for m in history[:-1]] == list(range(res["epochs_run"])) == [e for e, _ in seen]
    assert history[-1].step == res["epochs_run"] and history[-1].value == pytest.approx(res["val_map50"])
    assert run_metrics(run)["val_map50"] == pytest.approx(res["val_map50"])
    assert len(client.get_metric_history(run.info.run_id, mlflow_key("train_box_loss"))) == res["epochs_run"]
    assert run.data.tags["ichflow.split_digest"] == run.data.params["split_digest"]
    files = {f.path for d in ("figures", "eval") for f in client.list_artifacts(run.info.run_id, d)}
    for split in ("val", "test"):
        for name in ("pr_curve", "confusion", "slice_roc_pr", "difficulty", "overlays"):
            assert f"figures/{split}_{name}.png" in files, (split, name, files)
        for name in ("predictions.csv", "slices.csv", "per_patient.csv", "difficulty.md", "difficulty_boxes.csv"):
            assert f"eval/{split}_{name}" in files, (split, name, files)
    assert not {"figures/training_losses.png", "figures/training_val_map.png"} & files   # MLflow charts them
    # Ultralytics' own plots (labels, batches, curves), drawn with the font we ship: nothing fetched
    assert {"figures/training_yolo_results.png", "figures/training_yolo_boxpr_curve.png",
            "figures/training_yolo_confusion_matrix.png"} <= files, files
    assert not tried, tried

    # the learning path: the phantom's lesions are found on held-out patients
    assert res["test_map50"] >= 0.5, res
    assert res["objective"] == res["val_map50"] and res["objective_name"] == "val_map50"
    assert run_metrics(run)["test_map50_ci_low"] <= res["test_map50"] <= run_metrics(run)["test_map50_ci_high"]

    # the threshold can be re-tuned from the stored val predictions without retraining
    slices = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                             artifact_path="eval/val_slices.csv"))
    again = slice_metrics(slices["max_score"].to_numpy(), slices["has_lesion"].to_numpy(), res["conf_threshold_used"])
    assert again["f1"] == pytest.approx(run_metrics(run)["val_slice_f1"])

    # registered pyfunc: one test scan (N, H, W) uint8 in, boxes per slice out, same calls as the evaluation
    version = client.get_model_version(REGISTERED_NAME, str(res["model_version"]))
    assert version.run_id == run.info.run_id
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_NAME}/{res['model_version']}")
    prep = prepare_data(DataConfig())
    test_ids = prep.split.loc[prep.split["split"] == "test", "patient_id"]
    scan_rows = prep.manifest[prep.manifest["patient_id"] == test_ids.iloc[0]].sort_values("slice_index")
    scan = np.stack([read_gray(p) for p in scan_rows["image_path"]])
    out = model.predict(scan)
    assert torch.get_num_threads() == threads   # predicting did not slow down the rest of the process
    assert list(out.columns) == ["slice_index", "x1", "y1", "x2", "y2", "score"]
    assert out["slice_index"].between(0, len(scan) - 1).all() and (out["score"] >= res["conf_threshold_used"]).all()
    assert ((out["x2"] > out["x1"]) & (out["y2"] > out["y1"])).all()
    stored = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                             artifact_path="eval/test_predictions.csv"))
    test_part = prep.manifest[prep.manifest["patient_id"].isin(test_ids)].sort_values(["patient_id", "slice_index"])
    first = (test_part["patient_id"] == test_ids.iloc[0]).to_numpy().nonzero()[0]
    kept = stored[stored["slice_id"].isin(first) & (stored["score"] >= res["conf_threshold_used"])]
    assert set(out["slice_index"]) == {int(s) - int(first[0]) for s in kept["slice_id"]}
    lower = model.predict(scan, params={"conf_threshold": 0.001})
    assert len(lower) >= len(out)


@pytest.mark.slow
def test_fasterrcnn_trial_keeps_off_test_and_registry(synthetic_phe):
    client = mlflow.MlflowClient()
    before = {v.version for v in client.search_model_versions(f"name='{REGISTERED_NAME}'")}
    seen = []
    res = train_detection(DetectionConfig(engine="fasterrcnn", model="mobilenet", imgsz=64, epochs=1, batch_size=8,
                                          evaluate_test=False, register=False),
                          on_epoch_end=lambda e, m: seen.append((e, m["val_map50"])))
    assert [e for e, _ in seen] == [0] and res["epochs_run"] == 1
    assert not any(k.startswith("test_") for k in res) and "model_uri" not in res
    run = client.get_run(res["run_id"])
    assert not any(k.startswith("test_") for k in run_metrics(run))
    assert "val_map50" in run_metrics(run) and 0.0 <= res["best_conf_threshold"] <= 1.0
    assert {v.version for v in client.search_model_versions(f"name='{REGISTERED_NAME}'")} == before


@pytest.mark.slow
def test_fasterrcnn_budget_stop_restores_the_best_checkpoint(synthetic_phe, tmp_path):
    """The time budget stops Faster R-CNN by the Trainer's flag (no exception) with the best weights loaded."""
    from ichflow.engine.budget import TimeBudget
    from ichflow.paths import CHECKPOINT
    from ichflow.tasks.detection.engines import engine_class

    cfg = DetectionConfig(engine="fasterrcnn", model="mobilenet", imgsz=64, epochs=3, batch_size=8,
                          num_workers=0, time_budget_min=1e-6)
    prep = prepare_data(DataConfig())
    engine = engine_class("fasterrcnn")()
    seen = []

    def spoil(epoch, metrics):  # after the checkpoint was saved: only a restore brings the weights back
        seen.append(epoch)
        with torch.no_grad():
            for p in engine.predictor.model.parameters():
                p.zero_()

    with mlflow.start_run(run_name="fasterrcnn-budget"):   # the engine logs into the task's run
        table = engine.slices(cfg, prep)
        fit = engine.train(cfg, prep, tmp_path, torch.device("cpu"), spoil, TimeBudget(cfg.time_budget_min,
                                                                                         cfg.epochs))
    assert fit.stopped_by_time_budget and not fit.stopped_early and fit.epochs_run == 1 and seen == [0]
    assert fit.weights == tmp_path / CHECKPOINT and fit.best_epoch == 0
    best = torch.load(fit.weights, map_location="cpu", weights_only=True)
    live = engine.predictor.model.state_dict()
    assert all(torch.equal(live[k].cpu(), v) for k, v in best.items())
    assert any(v.abs().sum() > 0 for k, v in best.items() if v.is_floating_point())
    assert fit.model_config["engine"] == "fasterrcnn" and fit.model_config["arch"] == "mobilenet"
    val = table[table["split"] == "val"].reset_index(drop=True)
    outputs = engine.predict(val)
    assert len(outputs) == len(val) and all(b.shape[1:] == (4,) for b, _ in outputs)
