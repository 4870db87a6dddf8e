"""Store faults: a model that cannot be written whole is one line, nothing registered, nothing partial left;
``predict`` failing partway leaves the previous output intact.

The artifact store "fills up" through a real OS limit: ``RLIMIT_FSIZE`` makes every write past the limit fail
with EFBIG after a partial write, exactly like a full disk mid-file (root ignores read-only folders, not this).
"""

import contextlib
import os
import resource
import signal
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from ichflow.engine.modelio import FAILURE_TAG, log_pyfunc
from ichflow.errors import DataError
from ichflow.tracking import task_run


class EchoModel(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return np.asarray(model_input, dtype=np.float32) / 255.0


@contextlib.contextmanager
def file_size_limit(limit_bytes: int):
    """Writes past ``limit_bytes`` in any file fail (EFBIG) while inside: a full disk, without root."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the default kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def _weights(folder: Path, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint_best.pt"
    path.write_bytes(os.urandom(size))
    return path


def _versions(name: str) -> list:
    return mlflow.MlflowClient().search_model_versions(f"name='{name}'")


def test_store_filling_up_while_logging_a_model(store, tmp_path):
    db = Path(store.removeprefix("sqlite:///"))
    limit = max(db.stat().st_size * 4, 2 << 20)  # the tracking database itself stays writable
    weights = _weights(tmp_path / "runs" / "r1", limit + (1 << 20))
    with pytest.raises(DataError) as err:
        with task_run("faults", run_name="store-full") as run:
            with file_size_limit(limit):
                log_pyfunc(EchoModel(), {"weights": str(weights)}, None, None, "faults-full",
                           metadata={"task": "segmentation"})
    text = str(err.value)
    assert text.startswith("artifact store ") and "\n" not in text
    assert "File too large" in text and "nothing registered" in text
    assert f"checkpoint kept locally: {weights.parent}" in text
    finished = mlflow.get_run(run.info.run_id)
    assert finished.info.status == "FAILED"
    assert finished.data.tags[FAILURE_TAG].startswith("model not written to the artifact store: ")
    assert _versions("faults-full") == []
    logged = mlflow.last_logged_model()
    assert logged.source_run_id == run.info.run_id and str(logged.status) == "FAILED"
    root = Path(logged.artifact_location.removeprefix("file://"))
    assert not any(p.is_file() for p in root.rglob("*")) if root.exists() else True, "partial model files left"
    assert weights.is_file(), "the local checkpoint must survive"


def test_read_only_artifact_folder(store, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: permissions do not stop root (the file-size-limit test covers the fault)")
    weights = _weights(tmp_path / "runs" / "r2", 4096)
    with pytest.raises(DataError, match=r"^artifact store .*Permission denied.*nothing registered"):
        with task_run("faults", run_name="store-read-only") as run:
            root = Path(mlflow.get_experiment(run.info.experiment_id).artifact_location.removeprefix("file://"))
            root.mkdir(parents=True, exist_ok=True)
            root.chmod(0o555)
            try:
                log_pyfunc(EchoModel(), {"weights": str(weights)}, None, None, "faults-ro",
                           metadata={"task": "segmentation"})
            finally:
                root.chmod(0o755)
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"
    assert _versions("faults-ro") == []


def _scans(folder: Path, n: int) -> Path:
    for k in range(n):
        scan = folder / f"scan{k}"
        scan.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((32, 32), 200 * (i % 2), np.uint8)).save(scan / f"{i}.png")
    return folder


def test_predict_failing_partway_keeps_the_previous_output(store, tmp_path, monkeypatch):
    from ichflow import serving
    from ichflow.tasks.segmentation import predict as seg_predict

    weights = _weights(tmp_path / "runs" / "r3", 1024)
    with mlflow.start_run():
        info = log_pyfunc(EchoModel(), {"weights": str(weights)}, None, None, "faults-predict",
                          metadata={"task": "segmentation", "threshold": 0.5})
    uri = f"models:/faults-predict/{info.registered_model_version}"
    inputs, out = _scans(tmp_path / "in", 3), tmp_path / "out"
    cfg = serving.PredictConfig(model_uri=uri, input=str(inputs), output=str(out))
    first = serving.run_predict(cfg)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len(first) == 6 and Path("predictions.csv") in before

    real, calls = seg_predict.predict_scan, []

    def fails_on_the_third_scan(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(seg_predict, "predict_scan", fails_on_the_third_scan)
    (inputs / "scan0" / "0.png").unlink()
    with pytest.raises(OSError):
        serving.run_predict(cfg)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before, "a failed predict changed the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "runs"], "temporary folders left behind"

    monkeypatch.setattr(seg_predict, "predict_scan", real)
    second = serving.run_predict(cfg)
    assert len(second) == 5 and not (out / "masks" / "scan0" / "0.png").exists()
