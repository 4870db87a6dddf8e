"""Shared fixtures: an isolated MLflow store and work dir per test session, real data when present."""

from __future__ import annotations

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
    old = {k: os.environ.get(k) for k in ("ICHFLOW_WORK_DIR", "MLFLOW_TRACKING_URI", "ICHFLOW_DATA_DIR")}
    os.environ["ICHFLOW_WORK_DIR"] = str(base / "work")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{base / 'mlflow.db'}"
    os.environ.pop("ICHFLOW_DATA_DIR", None)
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    yield base
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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


@pytest.fixture(scope="module")
def store(tmp_path_factory, request):
    """The requesting module's own tracking store and registry (its tests move @champion); restored after."""
    import mlflow
    from mlflow.tracking import fluent

    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    old = (os.environ["MLFLOW_TRACKING_URI"], os.environ.get("MLFLOW_EXPERIMENT_ID"), fluent._active_experiment_id)
    uri = f"sqlite:///{tmp_path_factory.mktemp(name) / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(f"{name}-tests")   # not an experiment id of the session's store
    yield uri
    os.environ["MLFLOW_TRACKING_URI"] = old[0]
    mlflow.set_tracking_uri(old[0])
    if old[1] is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = old[1]
    fluent._active_experiment_id = old[2]
