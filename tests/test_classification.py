"""Bleed / no-bleed slice classification: threshold choice, patient aggregation, model building, the run."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from ichflow.errors import DataError, ParameterError
from ichflow.metric_names import mlflow_key, run_metrics
from ichflow.tasks import slice_classifier as sc
from ichflow.tasks.classification import ClassificationConfig, train_classification
from ichflow.tasks.classification.train import ClassificationRecipe
from ichflow.tasks.classification.figures import pick_examples

REPO = Path(__file__).resolve().parents[1]

# hand-made validation scores: 3 bleeds, 3 clean slices
Y = np.array([1, 1, 1, 0, 0, 0])
S = np.array([0.9, 0.8, 0.4, 0.5, 0.2, 0.1])


def test_threshold_maximising_f1_lies_between_validation_scores():
    thr, info = sc.select_threshold(Y, S, goal="f1")
    # F1 per cut: 0.9 -> .50, 0.8 -> .80, 0.5 -> .67, 0.4 -> .857 (best), 0.2 -> .75
    assert thr == pytest.approx(0.3)          # halfway between the chosen 0.4 and the next lower score 0.2
    assert info["f1"] == pytest.approx(6 / 7)
    assert sc.binary_metrics(Y, S, thr)["f1"] == pytest.approx(6 / 7)


def test_threshold_for_a_recall_target_takes_the_best_precision_reaching_it():
    thr, info = sc.select_threshold(Y, S, goal="recall", target_recall=1.0)
    assert thr == pytest.approx(0.3) and info["recall"] == 1.0 and info["precision"] == pytest.approx(0.75)
    thr, info = sc.select_threshold(Y, S, goal="recall", target_recall=0.6)
    assert thr == pytest.approx(0.65)         # cut at 0.8: recall 2/3, precision 1
    assert info["precision"] == 1.0


def test_threshold_with_ties_and_single_class():
    thr, _ = sc.select_threshold([1, 0, 1, 0], [0.7, 0.7, 0.7, 0.1], goal="f1")
    assert 0.1 < thr < 0.7
    thr, info = sc.select_threshold([0, 0, 0], [0.2, 0.4, 0.9])
    assert thr == 0.5 and "single class" in info["note"]
    with pytest.raises(ValueError, match="threshold_goal"):
        sc.select_threshold(Y, S, goal="accuracy")


def test_binary_metrics_counts_and_undefined_auc():
    m = sc.binary_metrics(Y, S, 0.45)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["roc_auc"] == pytest.approx(8 / 9)
    assert np.isnan(sc.binary_metrics([1, 1], [0.2, 0.9], 0.5)["roc_auc"])


def test_patient_level_positive_when_any_slice_is():
    frame = pd.DataFrame({"patient_id": ["a", "a", "a", "b", "b", "c"],
                          "y": [0, 1, 0, 0, 0, 1],
                          "score": [0.1, 0.3, 0.8, 0.2, 0.6, 0.05]})
    pt = sc.patient_level(frame)
    assert pt["patient_id"].tolist() == ["a", "b", "c"]
    assert pt["y"].tolist() == [1, 0, 1]
    assert pt["score"].tolist() == [0.8, 0.6, 0.05]   # the highest slice score
    m = sc.binary_metrics(pt["y"], pt["score"], 0.5)   # a and b predicted positive, c missed
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 0)


def test_bootstrap_ci_over_patients_brackets_the_estimate():
    rng = np.random.default_rng(0)
    rows = []
    for p in range(20):
        for s in range(6):
            y = int(s in (2, 3))
            rows.append({"patient_id": f"p{p}", "y": y, "score": float(np.clip(y * 0.6 + rng.normal(0.2, 0.2), 0, 1))})
    frame = pd.DataFrame(rows)
    m = sc.metrics_with_ci(frame, 0.5, n_boot=200)
    for k in ("accuracy", "f1", "roc_auc"):
        assert m[f"{k}_ci_low"] <= m[k] <= m[f"{k}_ci_high"]
    assert m["f1_ci_high"] - m["f1_ci_low"] > 0


def test_examples_for_gradcam_cover_each_outcome():
    frame = pd.DataFrame({"row": range(6), "y": Y, "score": S})
    frame["pred"] = (frame["score"] >= 0.45).astype(int)
    picks = pick_examples(frame, per_group=1)
    assert picks == [("TP", 0), ("FP", 3), ("FN", 2), ("TN", 5)]


def test_build_model_channels_classes_and_bad_names(tmp_path):
    m = sc.build_model("resnet18", 1, 3)
    assert m(torch.zeros(2, 1, 64, 64)).shape == (2, 3)
    with pytest.raises(ParameterError, match="parameter model: 'resnet_does_not_exist' is not a timm model"):
        sc.build_model("resnet_does_not_exist", 3, 1)
    with pytest.raises(ParameterError, match="parameter in_channels"):
        sc.build_model("resnet18", 2, 1)
    with pytest.raises(ParameterError, match="nothing is downloaded"):
        sc.build_model("resnet18", 3, 1, pretrained="true")
    with pytest.raises(DataError, match="weights file not found"):
        sc.build_model("resnet18", 3, 1, pretrained=str(tmp_path / "missing.pth"))


def test_local_weights_file_is_loaded_and_adapted(tmp_path):
    source = sc.build_model("resnet18", 3, 1000)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = sc.build_model("resnet18", 1, 1, pretrained=str(path))
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert model.conv1.weight.shape[1] == 1                 # first conv adapted to one channel
    assert model.fc.out_features == 1                       # the 1000-class head dropped
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.pth"):
        sc.build_model("resnet18", 3, 1, pretrained=str(bad))


def test_pyfunc_prediction_any_size_uint8_or_float():
    cfg = {"model": "resnet18", "in_channels": 3, "image_size": 64, "classes": ["has_lesion"],
           "thresholds": [0.5], "norm_mean": 90.0, "norm_std": 60.0}
    model = sc.build_model("resnet18", 3, 1)
    scan = (np.random.default_rng(0).random((5, 100, 80)) * 255).astype(np.uint8)
    out = sc.predict_scan(model, cfg, scan)
    assert list(out.columns) == ["has_lesion_probability", "has_lesion"]
    assert len(out) == 5 and out["has_lesion_probability"].between(0, 1).all()
    assert ((out["has_lesion_probability"] >= 0.5).astype(int) == out["has_lesion"]).all()
    again = sc.predict_scan(model, cfg, scan.astype(np.float32))
    np.testing.assert_allclose(again["has_lesion_probability"], out["has_lesion_probability"], rtol=1e-5)


def test_bad_parameters_are_rejected_before_training():
    for change, msg in (({"imbalance": "smote"}, "parameter imbalance: must be one of weighted_loss, sampler, none"),
                        ({"threshold_goal": "auc"}, "parameter threshold_goal"),
                        ({"target_recall": 1.5}, r"parameter target_recall: must be in \(0, 1\]"),
                        ({"pos_weight": -1.0}, "parameter pos_weight"), ({"image_size": 16}, "parameter image_size"),
                        ({"in_channels": 2}, "parameter in_channels"), ({"epochs": 0}, "parameter epochs"),
                        ({"model": "nope"}, "parameter model"), ({"preset": "nope"}, "unknown preset")):
        with pytest.raises(ParameterError, match=msg):
            train_classification(dataclasses.replace(ClassificationConfig(), **change))


def test_a_bad_parameter_on_the_command_line_is_one_error_line_and_exit_2():
    proc = subprocess.run([sys.executable, "pipelines/classification.py", "--imbalance", "smote"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: parameter imbalance:"), proc.stderr
    assert "weighted_loss, sampler, none" in lines[0]


TINY = ClassificationConfig(image_size=64, epochs=2, patience=2, batch_size=8, n_boot=50, gradcam_per_group=1,
                            num_workers=0)


def test_scan_context_averages_neighbours_within_a_scan_only():
    scores = np.array([0.0, 0.0, 0.9, 0.0, 0.0, 0.6, 0.6, 0.6])
    np.testing.assert_allclose(sc.smooth_along_scan(scores, "none"), scores)
    mean3 = sc.smooth_along_scan(scores, "mean3")
    np.testing.assert_allclose(mean3[[1, 2, 3]], [0.3, 0.3, 0.3])           # a lone spike is flattened
    assert mean3[-1] == pytest.approx(0.6) and mean3[6] == pytest.approx(0.6)   # a run keeps its level, end replicated
    two_classes = sc.smooth_along_scan(np.stack([scores, 1 - scores], 1), "tri5")
    np.testing.assert_allclose(two_classes[:, 0], sc.smooth_along_scan(scores, "tri5"))
    # the frame version smooths each patient's scan in axial order, never across patients
    frame = pd.DataFrame({"patient_id": ["a"] * 3 + ["b"] * 3, "slice_index": [2, 0, 1, 0, 1, 2],
                          "y": [0, 0, 0, 1, 1, 1], "score": [0.9, 0.0, 0.0, 1.0, 1.0, 1.0]})
    out = sc.smooth_frame(frame, "mean3")
    assert out["score"].tolist() == pytest.approx([0.6, 0.0, 0.3, 1.0, 1.0, 1.0])


def test_smooth_rows_keeps_the_order_of_the_rows_given():
    manifest = pd.DataFrame({"patient_id": ["a", "a", "a", "b", "b"], "slice_index": [0, 1, 2, 0, 1]})
    rows = np.array([2, 3, 0, 4, 1])                           # shuffled, two patients
    probs = np.array([[0.9, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.3]])
    out = sc.smooth_rows(manifest, rows, probs, "mean3")
    # patient a in axial order: slice 0 = 0.0, 1 = 0.0, 2 = 0.9 (first column)
    assert out[[2, 4, 0], 0] == pytest.approx([0.0, 0.3, 0.6])
    assert out[[1, 3], 1] == pytest.approx([1.0, 1.0])    # patient b's two slices never mix with a's
    np.testing.assert_array_equal(sc.smooth_rows(manifest, rows, probs, "none"), probs)
    chosen, scores = sc.best_scan_context("auto", lambda c: float("nan") if c == "mean5" else len(c))
    assert chosen == "mean3" and np.isnan(scores["mean5"])   # NaN never wins; ties: the first listed


def test_auto_scan_context_is_chosen_on_validation_scores():
    rng = np.random.default_rng(0)
    rows = []
    for pid in range(12):   # a lesion run of 5 slices in each scan; lone noisy spikes on negative slices
        y = np.zeros(20, int)
        y[8:13] = 1
        score = 0.55 * y + rng.random(20) * 0.6
        rows.append(pd.DataFrame({"patient_id": str(pid), "slice_index": np.arange(20), "y": y, "score": score}))
    frame = pd.concat(rows, ignore_index=True)
    chosen, pr_auc = sc.choose_scan_context(frame, "auto")
    assert set(pr_auc) == set(sc.SCAN_CONTEXT) and chosen != "none"
    assert pr_auc[chosen] == max(pr_auc.values()) > pr_auc["none"]
    assert sc.choose_scan_context(frame, "none")[0] == "none"
    with pytest.raises(ParameterError, match="scan_context"):
        ClassificationRecipe().validate(dataclasses.replace(TINY, scan_context="lstm"))


def test_pyfunc_applies_the_models_scan_context():
    cfg = {"model": "resnet18", "in_channels": 3, "image_size": 64, "classes": ["has_lesion"],
           "thresholds": [0.5], "norm_mean": 90.0, "norm_std": 60.0}
    model = sc.build_model("resnet18", 3, 1)
    scan = (np.random.default_rng(0).random((6, 64, 64)) * 255).astype(np.uint8)
    raw = sc.predict_scan(model, cfg, scan)["has_lesion_probability"].to_numpy()
    smoothed = sc.predict_scan(model, {**cfg, "scan_context": "mean3"}, scan)["has_lesion_probability"]
    np.testing.assert_allclose(smoothed, sc.smooth_along_scan(raw, "mean3"), rtol=1e-6)


@pytest.mark.slow
def test_tiny_run_logs_metrics_figures_and_a_loadable_registered_model(synthetic_phe):
    result = train_classification(TINY)
    assert result["objective_name"] == "val_roc_auc" and result["objective"] == result["val_roc_auc"]
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    m = run_metrics(run)
    for key in ("threshold", "val_f1", "test_accuracy", "test_precision", "test_recall", "test_f1",
                "test_roc_auc", "test_pr_auc", "test_f1_ci_low", "test_f1_ci_high", "test_patient_recall",
                "train_loss", "val_loss", "best_epoch"):
        assert key in m, key
    assert m["test_f1_ci_low"] <= m["test_f1"] <= m["test_f1_ci_high"]
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, mlflow_key("train_loss"))
    assert [h.step for h in history] == [0, 1]
    arts = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "figures")}
    for name in ("test_confusion.png", "test_patient_confusion.png", "test_roc_pr.png", "test_gradcam.png",
                 "val_confusion.png"):
        assert f"figures/{name}" in arts
    # the per-epoch curves are MLflow's own metric charts: no PNG duplicates them
    assert not [a for a in arts if a.startswith("figures/training_")], arts
    evals = {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id, "eval")}
    assert {"eval/test_classification_report.txt", "eval/val_threshold.json", "eval/test_predictions.csv",
            "eval/val_predictions.csv"} <= evals
    for key in ("best_epoch", "epochs_run", "train_seconds", "wall_seconds", "threshold"):
        assert key in result, key
    assert run.data.tags["ichflow.split_digest"] and run.data.params["model"] == "resnet18"
    contexts = {next(t.value for t in d.tags if t.key == "mlflow.data.context") for d in run.inputs.dataset_inputs}
    assert contexts == {"training", "validation", "testing"}

    version = result["model_version"]
    assert isinstance(version, int)
    loaded = mlflow.pyfunc.load_model(f"models:/ich-classification/{version}")
    scan = (np.random.default_rng(1).random((4, 512, 512)) * 255).astype(np.uint8)
    out = loaded.predict(scan)
    assert list(out.columns) == ["has_lesion_probability", "has_lesion"] and len(out) == 4
    thr = m["threshold"]
    assert ((out["has_lesion_probability"] >= thr).astype(int) == out["has_lesion"]).all()
    assert run.data.params["scan_context_used"] in sc.SCAN_CONTEXT
    assert any(k.startswith("val_pr_auc_scan_context_") for k in m)


@pytest.mark.slow
def test_tiny_run_page_name_description_and_system_metrics(tiny_model, shared_store):
    """What the MLflow UI shows on the run: a descriptive name, the description, MLflow's system metrics."""
    result = tiny_model("classification")
    run = mlflow.MlflowClient().get_run(result["run_id"])
    assert run.info.run_name == "classification-resnet18"
    note = run.data.tags["mlflow.note.content"]
    m = run_metrics(run)
    assert f"| f1 | {m['val_f1']:.3f}" in note and f"{m['test_f1']:.3f} [{m['test_f1_ci_low']:.3f}, " in note
    assert note.startswith(f"**classification** — test f1 {m['test_f1']:.3f} [")   # the line shown before "Show more"
    assert "Target `bleed`" in note and "reader `phe` (synthetic)" in note
    assert f"patients train {m['patients_train']:.0f} · val {m['patients_val']:.0f}" in note
    assert f"`ich-classification` version {result['model_version']}" in note
    assert "system/cpu_utilization_percentage" in m and "system/system_memory_usage_megabytes" in m
    import threading

    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]   # ended with the run


@pytest.mark.slow
def test_tuning_trial_leaves_test_untouched_and_registers_nothing(synthetic_phe):
    seen = []
    cfg = dataclasses.replace(TINY, epochs=1, evaluate_test=False, register=False, in_channels=1,
                              imbalance="sampler", threshold_goal="recall")
    result = train_classification(cfg, on_epoch_end=lambda epoch, metrics: seen.append((epoch, metrics)))
    assert [e for e, _ in seen] == [0] and "val_roc_auc" in seen[0][1]
    assert not any(k.startswith("test_") for k in result) and "model_version" not in result
    run = mlflow.get_run(result["run_id"])
    assert not any(k.startswith("test_") for k in run_metrics(run))


@pytest.mark.slow
def test_mlflow_run_cli_classification(tmp_path):
    """The README's way: `mlflow run . -e classification` with -P params, into a fresh store."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'cli.db'}"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    params = {"image_size": 64, "epochs": 1, "n_boot": 20, "in_channels": 1, "register": "false"}
    cmd = [sys.executable, "-m", "mlflow", "run", str(repo), "-e", "classification", "--env-manager", "local"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["in_channels"] == "1" and "test_f1" in run_metrics(runs[0])
    assert "[classification] best epoch" in proc.stdout and "phe (synthetic)" in proc.stdout


def test_adamw_uses_the_fused_kernel_on_cpu_and_matches_the_loop_version():
    from ichflow.engine.trainer import adamw

    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = adamw(models[0], 1e-2, 1e-4)
    loop = torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=1e-4)
    assert fused.defaults["fused"] is True
    x = torch.randn(8, 4)
    for model, opt in zip(models, (fused, loop)):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)
