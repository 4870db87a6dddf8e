"""Killed runs are closed honestly: real training processes, real signals, a real tracking store.

SIGTERM / SIGINT end the run KILLED (exit 143 / 130) with the best checkpoint kept; SIGKILL leaves the run
RUNNING until the next command in its experiment marks it FAILED; ``mlflow run`` killed by SIGTERM takes its
training process with it; a SIGKILLed tune worker's trial is failed and retried once (journal storage).
Every training is the classification task on the synthetic phantom at 64², two steps per epoch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from ichflow.metric_names import run_metrics
from ichflow.paths import CHECKPOINT
from ichflow.tracking import process_tags
from ichflow.tuning import open_storage

REPO = Path(__file__).resolve().parents[1]
TINY = {"image_size": 64, "epochs": 200, "patience": 200, "steps_per_epoch": 2, "batch_size": 8, "num_workers": 0,
        "in_channels": 1, "n_boot": 0, "gradcam_per_group": 0, "register": "false", "evaluate_test": "false"}
TRAIN = [sys.executable, "pipelines/classification.py"] + [a for k, v in TINY.items() for a in (f"--{k}", str(v))]


@pytest.fixture()
def env(tmp_path, synthetic_phe):
    """Child processes write to their own sqlite store and one experiment; one CPU thread each."""
    values = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    values.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", MLFLOW_EXPERIMENT_NAME="signals",
                  OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return values


def _client(env) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def _runs(env, where: str = "") -> list:
    client = _client(env)
    experiment = client.get_experiment_by_name("signals")
    return client.search_runs([experiment.experiment_id], where) if experiment else []


def _wait_for(find, proc: subprocess.Popen, timeout: float = 240):
    """Poll ``find()`` until it returns something; fail at once when ``proc`` ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the process ended (exit {proc.returncode}) before it got there:\n{err[-3000:]}")
        time.sleep(0.3)
    proc.kill()
    pytest.fail("timed out waiting for the training to log an epoch")


def _training_run(env, proc, where: str = "attributes.status = 'RUNNING'"):
    """The first RUNNING run that has logged an epoch."""
    return _wait_for(lambda: [r for r in _runs(env, where) if "train_loss" in run_metrics(r)], proc)[0]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _start(cmd, env) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_keeps_the_best_checkpoint(env):
    proc = _start(TRAIN, env)
    run = _training_run(env, proc)
    # The epoch's metrics are logged before its checkpoint is written: wait for the file, not the metric.
    saved = Path(env["ICHFLOW_WORK_DIR"]) / "runs" / run.info.run_id / CHECKPOINT
    _wait_for(saved.is_file, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert _client(env).get_run(run.info.run_id).info.status == "KILLED"
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("interrupted by SIGTERM")]
    assert len(lines) == 1 and f"run {run.info.run_id} marked KILLED" in lines[0], err[-3000:]
    checkpoint = Path(lines[0].rpartition("best checkpoint kept: ")[2])
    assert checkpoint.is_file() and checkpoint.parent.name == run.info.run_id
    assert not list(checkpoint.parent.glob(".*partial")), "a half-written checkpoint was left behind"
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigkill_leaves_running_until_the_next_command_marks_it_failed(env):
    proc = _start(TRAIN, env)
    run = _training_run(env, proc)
    pid = int(run.data.tags["ichflow.pid"])
    assert run.data.tags["ichflow.host"] == socket.gethostname() and pid == proc.pid
    proc.kill()
    proc.communicate(timeout=60)
    client = _client(env)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # nothing could close it
    experiment_id = run.info.experiment_id
    elsewhere = client.create_run(experiment_id, tags={**process_tags(), "ichflow.host": "another-host"})
    alive_here = client.create_run(experiment_id, tags=process_tags())  # this test process: alive
    reused_pid = client.create_run(experiment_id, tags={**process_tags(), "ichflow.pid_start": "1"})

    nxt = subprocess.run([sys.executable, "pipelines/prepare.py"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "FAILED"
    assert killed.data.tags["ichflow.failure"] == f"process gone (pid {pid} on host {socket.gethostname()})"
    assert client.get_run(reused_pid.info.run_id).info.status == "FAILED"  # same pid, another process
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"  # its process cannot be seen here
    assert client.get_run(alive_here.info.run_id).info.status == "RUNNING"
    for other in (elsewhere, alive_here):
        client.set_terminated(other.info.run_id, "FINISHED")
    assert {r.info.status for r in _runs(env, "tags.`ichflow.task` = 'prepare'")} == {"FINISHED"}


@pytest.mark.slow
def test_sigterm_to_mlflow_run_leaves_no_orphan_and_the_run_killed(env):
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "classification", "--env-manager", "local",
           "--experiment-name", "signals"]
    for key, value in TINY.items():
        cmd += ["-P", f"{key}={value}"]
    proc = _start(cmd, env)
    run = _training_run(env, proc)
    child = int(run.data.tags["ichflow.pid"])
    assert child != proc.pid
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 60
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not _alive(child), f"the training process {child} outlived mlflow run"
    assert _client(env).get_run(run.info.run_id).info.status == "KILLED"


@pytest.mark.slow
def test_sigkilled_tune_worker_trial_is_failed_and_retried_once(env, tmp_path):
    journal = tmp_path / "study.journal"
    overrides = "image_size=64,epochs=6,steps_per_epoch=2,batch_size=8,n_boot=0,gradcam_per_group=0,in_channels=1"
    proc = _start([sys.executable, "pipelines/tune.py", "--task", "classification", "--n_trials", "2",
                   "--n_workers", "2", "--study_name", "killed", "--storage", f"journal:{journal}",
                   "--overrides", overrides, "--refit_best", "false", "--pruner", "none", "--heartbeat_s", "1"], env)
    trial_run = _training_run(env, proc, "attributes.status = 'RUNNING' and tags.`optuna.trial` != ''")
    worker = int(trial_run.data.tags["ichflow.pid"])
    assert worker != proc.pid
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="killed", storage=open_storage(f"journal:{journal}"))
    states = optuna.trial.TrialState
    killed_number = int(trial_run.data.tags["optuna.trial"])
    by_number = {t.number: t for t in study.trials}
    assert not [t.number for t in study.trials if t.state in (states.RUNNING, states.WAITING)]
    assert by_number[killed_number].state == states.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retries) == 1 and retries[0].state == states.COMPLETE
    assert len(study.trials) == 3 and sum(t.state == states.COMPLETE for t in study.trials) == 2
    killed_run = _client(env).get_run(trial_run.info.run_id)
    assert killed_run.info.status == "FAILED" and "worker lost" in killed_run.data.tags["ichflow.failure"]
    assert not _runs(env, "attributes.status = 'RUNNING'")
