"""The segmentation entry point as users run it: a tiny synthetic training leaves a complete MLflow run and a
registered model that reproduces the logged evaluation. (The quality of the default run is measured outside the
suite: reports/segmentation_phe.md.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from ichflow.data.splits import subset
from ichflow.engine.augment import Normalizer
from ichflow.engine.slices import slice_cache
from ichflow.metric_names import mlflow_key, run_metrics
from ichflow.paths import CHECKPOINT, MODEL_CONFIG, runs_dir
from ichflow.prepare import prepare_data
from ichflow.tasks.segmentation import REGISTERED_NAME, SegmentationConfig, train_segmentation
from ichflow.tasks.segmentation.data import predict_scan
from ichflow.tasks.segmentation.evaluate import THRESHOLDS
from ichflow.tasks.segmentation.postprocess import MIN_VOXEL_GRID, drop_small_components
from ichflow.tasks.segmentation.model import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = dict(epochs=2, steps_per_epoch=3, batch_size=4, patch_size=64, num_workers=0, eval_batch_size=4)


@pytest.fixture(scope="module")
def tiny_run():
    cfg = SegmentationConfig(**TINY)
    return cfg, train_segmentation(cfg)


@pytest.mark.slow
def test_tiny_run_logs_params_metrics_figures_and_inputs(tiny_run):
    cfg, res = tiny_run
    assert res["objective_name"] == "val_dice" and res["objective"] == res["val_dice"]
    for key in ("test_dice", "test_dice_ci_low", "test_dice_pooled", "model_uri", "model_version", "threshold",
                "val_threshold", "best_epoch", "epochs_run", "stopped_by_time_budget", "wall_seconds"):
        assert key in res, key
    assert isinstance(res["model_version"], int) and res["threshold"] in THRESHOLDS
    assert res["min_component_voxels"] in MIN_VOXEL_GRID and res["ensemble_members"] == 1
    client = mlflow.MlflowClient()
    run = client.get_run(res["run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["target"] == "phe" and p["arch"] == "Unet" and p["encoder"] == "resnet18" and p["in_channels"] == "3"
    assert p["patch_size"] == "64" and p["reader"] == "phe" and "norm_mean" in p and "normalisation" in p
    assert run.data.tags["ichflow.split_digest"] == p["split_digest"]
    assert run.data.tags["ichflow.target"] == "phe"
    # per-epoch curves (step = epoch) and the final metrics of val and test
    for key in ("train_loss", "val_loss", "val_dice", "val_threshold"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, mlflow_key(key))]
        assert steps[:2] == [0, 1], key
    # MLflow groups the results by split; bookkeeping goes under info/, not first in the table
    stored = set(run.data.metrics)
    assert {"test/dice", "val/dice", "train/loss", "info/patients_train", "info/best_epoch"} <= stored
    assert {k for k in stored if "/" not in k} == {"objective"}   # the one name every run and trial compares on
    m = run_metrics(run)
    for split in ("val", "test"):
        for key in ("dice", "dice_median", "dice_ci_low", "dice_ci_high", "dice_pooled", "iou", "iou_pooled",
                    "sensitivity_pooled", "specificity", "specificity_pooled", "volume_abs_err_ml",
                    "slice_accuracy", "slice_tp", "threshold"):
            assert f"{split}_{key}" in m, f"{split}_{key}"
        assert 0.0 <= m[f"{split}_dice"] <= 1.0
        assert m[f"{split}_dice_ci_low"] <= m[f"{split}_dice"] <= m[f"{split}_dice_ci_high"]
    assert m["val_dice"] == pytest.approx(res["objective"])     # the summary shows the selected checkpoint
    arts = {a.path for folder in ("figures", "eval") for a in client.list_artifacts(run.info.run_id, folder)}
    for split in ("val", "test"):
        assert {f"figures/{split}_pixel_confusion.png", f"figures/{split}_overlays.png", f"eval/{split}_per_patient.csv",
                f"eval/{split}_metrics.json"} <= arts
    assert "eval/val_threshold_sweep.csv" in arts and "eval/test_threshold_sweep.csv" not in arts  # chosen on val
    assert "eval/val_postprocessing_sweep.csv" in arts and "eval/test_postprocessing_sweep.csv" not in arts
    ablation = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=res["run_id"],
                                                               artifact_path="eval/inference_ablation.csv"))
    assert len(ablation) == 3 and ablation["test_dice"].iloc[-1] == pytest.approx(m["test_dice"])
    assert ablation["test_dice"].iloc[0] == pytest.approx(m["ablation/test_dice_plain"])
    assert not [a for a in arts if a.startswith("figures/training_")], arts   # MLflow charts the epochs itself
    contexts = {next(t.value for t in d.tags if t.key == "mlflow.data.context") for d in run.inputs.dataset_inputs}
    assert contexts == {"training", "validation", "testing"}


@pytest.mark.slow
def test_registered_model_reproduces_the_logged_evaluation(tiny_run):
    cfg, res = tiny_run
    version = res["model_version"]
    loaded = mlflow.pyfunc.load_model(f"models:/{REGISTERED_NAME}/{version}")
    assert loaded.metadata.signature is not None
    assert loaded.metadata.metadata["threshold"] == res["threshold"]
    prep = prepare_data(cfg)
    test = subset(prep.manifest, prep.split, "test")
    images = slice_cache(test["image_path"].tolist())
    masks = slice_cache(test["mask_path"].tolist(), is_mask=True)
    per_patient = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=res["run_id"],
                                                                  artifact_path="eval/test_per_patient.csv"),
                              dtype={"patient_id": str}).set_index("patient_id")
    # the training run's weights, rebuilt in memory, give the same probabilities as the served model
    folder = runs_dir() / res["run_id"]
    config = json.loads((folder / MODEL_CONFIG).read_text())
    assert config["model"]["engine"] == "smp"
    model = build_model(config["model"])
    model.load_state_dict(torch.load(folder / CHECKPOINT, weights_only=True))
    model.eval()
    norm = Normalizer(config["norm_mean"], config["norm_std"])
    for pid, group in test.groupby("patient_id"):
        rows = group.sort_values("slice_index").index.to_numpy()
        scan = np.asarray(images[rows])
        probs = loaded.predict(scan)
        assert probs.shape == scan.shape and probs.dtype == np.float32
        expected, _ = predict_scan(model, scan, norm, 3, torch.device("cpu"), tta=config["tta"])
        expected = drop_small_components(expected, config["threshold"], config["min_component_voxels"])
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        # the mask output at the selected threshold reproduces the logged per-patient counts
        mask = loaded.predict(scan, params={"output": "mask"})
        truth = np.asarray(masks[rows]) > 127
        row = per_patient.loc[str(pid)]
        assert int((mask.astype(bool) & truth).sum()) == row["tp"]
        assert int((mask.astype(bool) & ~truth).sum()) == row["fp"]
    # 8-bit slices as whole-number floats are read as 8-bit; a 0..1 float image is refused, not cast
    np.testing.assert_array_equal(loaded.predict(scan.astype(np.float64)), probs)
    with pytest.raises(Exception, match="whole numbers 0..255"):
        loaded.predict(scan / 255.0)


@pytest.mark.slow
def test_tuning_trial_does_not_touch_test_or_register():
    """Also: a time budget smaller than one epoch stops after the first epoch, with the checkpoint restored."""
    before = {v.version for v in mlflow.MlflowClient().search_model_versions(f"name='{REGISTERED_NAME}'")}
    seen = []
    res = train_segmentation(SegmentationConfig(**{**TINY, "epochs": 3}, evaluate_test=False, register=False,
                                                time_budget_min=0.001, tta="none"),
                             on_epoch_end=lambda epoch, metrics: seen.append((epoch, metrics["val_dice"])))
    assert [epoch for epoch, _ in seen] == [0]
    # without TTA the selection reuses that epoch's predictions: at no post-processing it is the same number
    if res["min_component_voxels"] == 0:
        assert res["objective"] == pytest.approx(seen[0][1])
    else:
        assert res["objective"] >= seen[0][1]
    assert res["epochs_run"] == 1 and res["stopped_by_time_budget"] == 1.0 and res["best_epoch"] == 0
    assert not any(k.startswith("test_") for k in res) and "model_uri" not in res and "model_version" not in res
    run = mlflow.MlflowClient().get_run(res["run_id"])
    assert not any(k.startswith("test_") for k in run_metrics(run))
    after = {v.version for v in mlflow.MlflowClient().search_model_versions(f"name='{REGISTERED_NAME}'")}
    assert after == before


@pytest.mark.slow
def test_fold_ensemble_has_a_run_per_fold_and_serves_the_mean_of_its_members():
    cfg = SegmentationConfig(**{**TINY, "epochs": 1}, n_folds=2, tta="none")   # TTA: tiny_run and unit tests
    res = train_segmentation(cfg)
    client = mlflow.MlflowClient()
    parent = client.get_run(res["run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{res['run_id']}'")
    assert sorted(r.info.run_name for r in children) == ["fold-0", "fold-1"]
    assert all("val_dice" in run_metrics(r) and r.info.status == "FINISHED" for r in children)
    folds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=res["run_id"],
                                                            artifact_path="eval/cv_patient_folds.csv"),
                        dtype={"patient_id": str})
    prep = prepare_data(cfg)
    dev = pd.concat([subset(prep.manifest, prep.split, s) for s in ("train", "val")])
    assert sorted(folds["patient_id"]) == sorted(dev["patient_id"].astype(str).unique())   # each patient once
    assert res["ensemble_members"] == 2
    assert {"ablation/test_dice_member_mean", "ablation/test_dice_member_best"} <= set(res)
    loaded = mlflow.pyfunc.load_model(res["model_uri"])
    assert loaded.metadata.metadata["members"] == 2
    children = sorted(children, key=lambda r: r.info.run_name)
    config = json.loads((runs_dir() / children[0].info.run_id / MODEL_CONFIG).read_text())   # beside fold-0's weights
    members = []
    for run in children:
        net = build_model(config["model"])
        net.load_state_dict(torch.load(runs_dir() / run.info.run_id / CHECKPOINT, weights_only=True))
        members.append(net.eval())
    test = subset(prep.manifest, prep.split, "test")
    group = test[test["patient_id"] == test["patient_id"].iloc[0]].sort_values("slice_index")
    scan = np.asarray(slice_cache(group["image_path"].tolist()))
    expected, _ = predict_scan(members, scan, Normalizer(config["norm_mean"], config["norm_std"]), 3,
                               torch.device("cpu"), tta="none")
    expected = drop_small_components(expected, config["threshold"], config["min_component_voxels"])
    np.testing.assert_allclose(loaded.predict(scan), expected, atol=1e-5)


@pytest.mark.slow
def test_mlflow_run_cli_segmentation(tmp_path):
    """`mlflow run . -e segmentation` with the MLproject block (tiny settings), nothing else set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'cli.db'}"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    params = ["epochs=1", "steps_per_epoch=2", "batch_size=2", "patch_size=64", "tta=none", "register=false"]
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "segmentation", "--env-manager", "local"]
    for p in params:
        cmd += ["-P", p]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["epochs"] in ("1", "1.0") and "test_dice" in run_metrics(runs[0])
    assert client.search_registered_models() == []          # register=false: logged, not registered
    assert "[segmentation] best epoch" in proc.stdout and "threshold" in proc.stdout


@pytest.mark.parametrize("args, line", [
    (["--arch", "Nope"], "error: parameter arch: must be one of Unet, UnetPlusPlus, FPN, Segformer; got 'Nope'"),
    (["--patch_size", "30"], "error: parameter patch_size: must be a positive multiple of 32; got 30"),
])
def test_bad_parameter_exits_with_one_error_line(args, line):
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "segmentation.py"), *args],
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [line]


def test_dataset_without_masks_is_refused(synthetic_ctich):
    from ichflow.errors import DataError

    with pytest.raises(DataError, match="needs PHE edema masks"):
        train_segmentation(SegmentationConfig(dataset="synthetic-ctich", **TINY))


def test_real_data_preset_needs_a_data_folder():
    env = {k: v for k, v in os.environ.items() if k != "ICHFLOW_DATA_DIR"}
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "segmentation.py"), "--preset", "phe"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "dataset=phe needs a data folder" in proc.stderr
