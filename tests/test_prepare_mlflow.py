"""The prepare step as users run it: `mlflow run . -e prepare` leaves a complete run in the store."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd

from ichflow.metric_names import run_metrics
from ichflow.prepare import DataConfig, run_prepare

REPO = Path(__file__).resolve().parents[1]


def _artifacts(run_id):
    return {f.path for f in mlflow.MlflowClient().list_artifacts(run_id, "data")}


def test_run_prepare_logs_report_manifest_split_and_inputs():
    prep = run_prepare(DataConfig())
    run = mlflow.last_active_run()
    assert run.info.status == "FINISHED"
    assert _artifacts(run.info.run_id) == {"data/manifest.csv", "data/split.csv", "data/validation_report.md",
                                           "data/validation_report.json"}
    assert run.data.tags["ichflow.split_digest"] == prep.split_digest
    assert run.data.params["reader"] == "phe" and run.data.params["data_source"] == "synthetic"
    contexts = {}
    for ds_input in run.inputs.dataset_inputs:
        ctx = next(t.value for t in ds_input.tags if t.key == "mlflow.data.context")
        contexts[ctx] = ds_input.dataset
    assert set(contexts) == {"training", "validation", "testing"}
    # the logged training dataset lists exactly the train patients of the split
    split = prep.split
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data/split.csv")
    pd.testing.assert_frame_equal(pd.read_csv(path, dtype={"patient_id": str}), split.astype({"patient_id": str}))
    assert run_metrics(run)["slices"] == 144


def test_mlflow_run_cli_prepare(tmp_path):
    """The README's way: `mlflow run . -e prepare --env-manager local`, nothing else set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'cli.db'}"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "prepare", "--env-manager",
                           "local", "-P", "dataset=synthetic-ctich"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["reader"] == "ctich"
    assert run_metrics(run)["IVH_patients"] >= 3
    assert "[prepare] ctich (synthetic)" in proc.stdout


def test_bad_data_dir_exits_with_clear_error(tmp_path):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "prepare.py"), "--data_dir",
                           str(tmp_path / "nope")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"error: {tmp_path / 'nope'}: data folder does not exist" in proc.stderr


def test_preset_values_are_recorded_next_to_the_command_line_defaults():
    """`mlflow run` logs -P defaults first; a preset that changed a field must still show what ran."""
    from ichflow.tracking import log_params_once

    with mlflow.start_run() as run:
        mlflow.log_params({"epochs": "20", "data_dir": "''", "lr": "0.003", "register": "True"})
        log_params_once({"epochs": 7, "data_dir": "", "lr": 0.003, "register": True, "patience": 3})
        log_params_once({"epochs": 9})  # a later call does not rewrite what ran
    params = mlflow.get_run(run.info.run_id).data.params
    assert params["resolved.epochs"] == "7" and params["epochs"] == "20" and params["patience"] == "3"
    assert not {"resolved.data_dir", "resolved.lr", "resolved.register"} & set(params)
