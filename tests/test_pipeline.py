"""The main job as users run it: `mlflow run . -e main` (quick=tiny), then what its store and console show."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from ichflow.metric_names import run_metrics
from ichflow.model_pages import value_text
from ichflow.registry import load_rule
from ichflow.tasks.spec import TASKS

REPO = Path(__file__).resolve().parents[1]
RUN_NAMES = {"segmentation": "segmentation-Unet-resnet18", "classification": "classification-resnet18",
             "detection": "detection-yolo-n", "multilabel": "multilabel-resnet10t-3fold"}


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """One tiny main job into a fresh store: (completed process, client, store URI)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('main-job') / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "main", "--env-manager", "local",
                           "-P", "quick=tiny"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, mlflow.MlflowClient(tracking_uri=uri), uri


@pytest.mark.slow
def test_main_job_closing_summary_and_what_the_ui_shows(main_job, tmp_path):
    proc, client, uri = main_job
    # the pipeline run is in ichflow-pipeline; the run `mlflow run` opened in Default points at it
    exp = client.get_experiment_by_name("ichflow-pipeline")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "pipeline"
    assert run.data.params["quick"] == "tiny" and run.data.tags["mlflow.project.entryPoint"] == "main"
    (launch,) = client.search_runs(["0"])
    assert launch.info.run_name == "pipeline-launch" and launch.info.status == "FINISHED"
    assert launch.data.tags["ichflow.pipeline_run_id"] == run.info.run_id

    # a log file, not a terminal: no progress-bar frames, none of the libraries' known per-model notes
    console = proc.stdout + proc.stderr
    for noise in ("Downloading artifacts", "\r", "\x1b[", "Passing a Python object as `python_model`",
                  "Hint: Inferred schema contains integer", "Add type hints to the `predict` method",
                  "Validating input example", "system_metrics_monitor"):
        assert noise not in console, noise
    # the closing summary: printed (plain Markdown off a TTY), the run's description and summary.md alike
    summary = run.data.tags["mlflow.note.content"]
    assert summary in proc.stdout
    assert summary == Path(client.download_artifacts(run.info.run_id, "summary.md", str(tmp_path))).read_text()
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")
            for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| task")}
    assert set(rows) == set(TASKS)
    for task, (_, champion, val, test, candidate) in rows.items():
        spec, rule = TASKS[task], load_rule(task)
        assert re.fullmatch(r"v\d+ (promoted|rejected \(kept as @challenger\)|below floor|degenerate)(; tuned "
                            r"refit v\d+ .+)?", candidate), candidate
        if champion == f"{spec.registered_name}: none":
            assert val == test == "—"
            continue
        version = client.get_model_version_by_alias(spec.registered_name, "champion")
        assert champion == f"{spec.registered_name} v{version.version}"
        metrics = run_metrics(client.get_run(version.run_id))   # the champion's own training run
        assert val == f"{rule['primary']} {value_text(metrics, rule['primary'])}"
        assert test == f"{rule['report'][0]} {value_text(metrics, rule['report'][0])}"
    assert f"mlflow ui --backend-store-uri {uri}" in summary and "http://127.0.0.1:5000" in summary
    predict = run.data.tags.get("ichflow.step.predict")
    if predict:
        out = client.get_run(predict).data.params["output"]
        assert f"Predictions of ich-segmentation@champion: {out}/" in summary and Path(out, "predictions.csv").is_file()
    else:
        assert "Predictions: none" in summary

    # each task's training run: a descriptive name, its description, MLflow's system metrics
    for task, name in RUN_NAMES.items():
        step = client.get_run(run.data.tags[f"ichflow.step.{task}"])
        assert step.info.run_name == name
        note, metrics = step.data.tags["mlflow.note.content"], run_metrics(step)
        key = f"test_{TASKS[task].headline[0]}"
        assert f"| {TASKS[task].headline[0]} | " in note and value_text(metrics, key) in note, (task, note)
        # the first line (all the UI shows before "Show more") carries the test headline
        assert f"test {TASKS[task].headline[0]} {value_text(metrics, key)}" in note.splitlines()[0], (task, note)
        assert "system/cpu_utilization_percentage" in metrics, task
    # Ultralytics' own plots of the YOLO step
    figures = {f.path for f in client.list_artifacts(run.data.tags["ichflow.step.detection"], "figures")}
    assert {"figures/training_yolo_results.png", "figures/training_yolo_boxpr_curve.png"} <= figures, figures


@pytest.mark.slow
def test_mlflow_ui_shows_the_main_job(main_job):
    """scripts/browser_check.py on the main job's store: headless Chromium on `mlflow ui` pages (CI needs it)."""
    if not shutil.which("chromium") and not os.environ.get("ICHFLOW_REQUIRE_BROWSER"):
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium); CI installs it")
    _, _, uri = main_job
    out = REPO / "work" / "browser-check"    # screenshots and report.md stay there for people (and CI) to look at
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "browser_check.py"), "--tracking-uri", uri,
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    report = out / "report.md"
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:] + (report.read_text() if report.exists() else "")


def test_summary_footer_names_the_predictions_and_a_store_usable_from_anywhere(tmp_path, monkeypatch):
    from ichflow.pipeline import summary_footer, summary_markdown

    monkeypatch.chdir(tmp_path)
    footer = summary_footer(tmp_path / "predictions" / "abc", "sqlite:///mlflow.db")
    assert footer == [f"Predictions of ich-segmentation@champion: {tmp_path}/predictions/abc/ (predictions.csv, "
                      "masks/, overlays/)",
                      f"Runs and models: mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db",
                      "then open http://127.0.0.1:5000"]
    assert summary_footer(None, "https://admin:s3cret@mlflow.example:5000")[1:] == [
        "Runs and models: open https://admin:***@mlflow.example:5000"]
    text = summary_markdown([("classification", "ich-classification v2", "val_roc_auc 0.900", "test_f1 0.800",
                              "v1 promoted")], footer)
    assert "| classification | ich-classification v2 | val_roc_auc 0.900 | test_f1 0.800 | v1 promoted |" in text
