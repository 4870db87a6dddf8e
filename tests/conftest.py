"""Shared fixtures: an isolated MLflow store and work dir per test session, real data when present."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

import ichflow  # noqa: F401  (offline env before anything else)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ICHFLOW_SHARED", REPO.parent / "shared"))
PHE_DIR = SHARED / "phe-sich-ct-ids" / "SubdatasetC_PNG"
CTICH_DIR = SHARED / "ct-ich"


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Every test session gets its own work dir and sqlite tracking store; nothing leaks into the repo."""
    base = tmp_path_factory.mktemp("ichflow")
    old = {k: os.environ.get(k) for k in ("ICHFLOW_WORK_DIR", "MLFLOW_TRACKING_URI", "ICHFLOW_DATA_DIR",
                                          "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")}
    os.environ["ICHFLOW_WORK_DIR"] = str(base / "work")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{base / 'mlflow.db'}"
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"   # tiny training runs get system/* samples too
    os.environ.pop("ICHFLOW_DATA_DIR", None)
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    yield base
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def no_run_left_active():
    """A test that leaves an MLflow run active would make every later run a child of it: fail that test."""
    yield
    import mlflow

    run = mlflow.active_run()
    if run is not None:
        mlflow.end_run("FAILED")
        pytest.fail(f"the test left MLflow run {run.info.run_id} ({run.info.run_name}) active")


def _need(path: Path):
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set ICHFLOW_SHARED)")
    return path


@pytest.fixture(scope="session")
def phe_dir():
    return _need(PHE_DIR)


@pytest.fixture(scope="session")
def ctich_dir():
    return _need(CTICH_DIR)


@pytest.fixture(scope="session")
def synthetic_phe(isolated_env):
    from ichflow.data.synthetic import ensure_synthetic

    return ensure_synthetic("phe")


@pytest.fixture(scope="session")
def synthetic_ctich(isolated_env):
    from ichflow.data.synthetic import ensure_synthetic

    return ensure_synthetic("ctich")


@contextlib.contextmanager
def use_store(uri: str, experiment: str):
    """Point MLflow (and child processes, via the environment) at ``uri`` and ``experiment``; restore after."""
    import mlflow
    from mlflow.tracking import fluent

    old = (os.environ["MLFLOW_TRACKING_URI"], os.environ.get("MLFLOW_EXPERIMENT_ID"), fluent._active_experiment_id)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)   # not an experiment id of another store
    try:
        yield uri
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = old[0]
        mlflow.set_tracking_uri(old[0])
        if old[1] is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = old[1]
        fluent._active_experiment_id = old[2]


def _module_name(request) -> str:
    return request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")


@pytest.fixture(scope="module")
def store(tmp_path_factory, request):
    """The requesting module's own tracking store and registry (its tests move @champion); restored after."""
    name = _module_name(request)
    with use_store(f"sqlite:///{tmp_path_factory.mktemp(name) / 'mlflow.db'}", f"{name}-tests") as uri:
        yield uri


@pytest.fixture(scope="session")
def models_store_uri(tmp_path_factory):
    """The store the session's tiny models are trained and registered in (see ``tiny_model``)."""
    return f"sqlite:///{tmp_path_factory.mktemp('tiny-models') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def shared_store(models_store_uri, request):
    """Like ``store``, but the store holding ``tiny_model``'s registered versions (set the aliases you need)."""
    with use_store(models_store_uri, f"{_module_name(request)}-tests") as uri:
        yield uri


# The smallest schedules that still log, register and serve a model of each task (not meant to be good).
TINY = {
    "segmentation": dict(epochs=1, steps_per_epoch=2, batch_size=4, patch_size=64, num_workers=0, eval_batch_size=4,
                         tta="none"),
    "classification": dict(image_size=64, epochs=1, batch_size=8, num_workers=0, n_boot=50, gradcam_per_group=0),
    "detection": dict(imgsz=64, epochs=1, batch_size=8, mosaic=0.0, overlays=0),   # YOLO, as the main job
    "detection-fasterrcnn": dict(engine="fasterrcnn", model="mobilenet", imgsz=64, epochs=1, batch_size=8,
                                 overlays=2),
    "multilabel": dict(image_size=64, epochs=1, batch_size=8, num_workers=0, n_folds=3),
}


@pytest.fixture(scope="session")
def tiny_model(models_store_uri):
    """``tiny_model(name)`` -> the TaskResult of a tiny registered model (``TINY[name]``), trained once a session."""
    from ichflow.tasks.spec import TASKS

    trained = {}

    def get(name: str):
        if name not in trained:
            spec = TASKS[name.split("-")[0]]
            with use_store(models_store_uri, "tiny-models"):
                trained[name] = spec.train_function()(spec.config_class()(**TINY[name]))
        return trained[name]

    return get
