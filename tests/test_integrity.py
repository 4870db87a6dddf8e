"""Model integrity: SHA-256 of every model file recorded at registration, checked before anything is unpickled.

A tampered ``python_model.pkl`` (a pickle runs code when loaded) or weights file in the artifact store is
refused with one line; an untouched model loads. The marker file proves the tampered pickle never ran.
"""

import json
import pickle
from pathlib import Path

import mlflow
import pytest

from ichflow.engine.modelio import SHA256_FILES_TAG, SHA256_TAG, log_pyfunc
from ichflow.errors import DataError
from ichflow.evaluation import load_model


class EchoModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.weights = Path(context.artifacts["weights"]).read_bytes()

    def predict(self, context, model_input, params=None):
        return model_input


def _register(tmp_path: Path, name: str) -> tuple[str, str]:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x01" * 4096)
    with mlflow.start_run():
        info = log_pyfunc(EchoModel(), {"weights": str(weights)}, None, None, name,
                          metadata={"task": "segmentation"})
    return f"models:/{name}/{info.registered_model_version}", str(info.registered_model_version)


def _stored_file(name: str, version: str, rel: str) -> Path:
    """The file ``rel`` of a registered version inside the (local) artifact store."""
    location = mlflow.MlflowClient().get_model_version_download_uri(name, version)
    root = Path(location.removeprefix("file://"))
    return root / rel


class Payload:
    """What an attacker would pickle: code that runs on unpickling (here: it writes a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_untouched_model_loads_and_records_every_file(store, tmp_path):
    uri, version = _register(tmp_path, "integrity-ok")
    tags = mlflow.MlflowClient().get_model_version("integrity-ok", version).tags
    files = json.loads(tags[SHA256_FILES_TAG])
    assert {"MLmodel", "python_model.pkl", "artifacts/weights.bin"} <= set(files)
    assert any(f.startswith("code/ichflow/") for f in files)
    assert len(tags[SHA256_TAG]) == 64
    loaded = load_model(uri)
    assert loaded.task == "segmentation" and loaded.version == version
    assert loaded.unwrap().weights == b"\x01" * 4096


def test_tampered_pickle_is_refused_before_it_runs(store, tmp_path):
    uri, version = _register(tmp_path, "integrity-pkl")
    marker = tmp_path / "payload-ran"
    _stored_file("integrity-pkl", version, "python_model.pkl").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(DataError) as err:
        load_model(uri)
    assert str(err.value) == (f"model {uri}: file python_model.pkl does not match the SHA-256 recorded at "
                              "registration (tampered or corrupted); not loaded")
    assert not marker.exists(), "the tampered pickle was unpickled"


def test_tampered_weights_and_an_added_file_are_refused(store, tmp_path):
    uri, version = _register(tmp_path, "integrity-weights")
    _stored_file("integrity-weights", version, "artifacts/weights.bin").write_bytes(b"\x02" * 4096)
    with pytest.raises(DataError, match="file artifacts/weights.bin does not match the SHA-256"):
        load_model(uri)

    uri2, version2 = _register(tmp_path, "integrity-extra")
    _stored_file("integrity-extra", version2, "code/ichflow/sitecustomize.py").write_text("import os\n")
    with pytest.raises(DataError, match="file code/ichflow/sitecustomize.py was not part of the model"):
        load_model(uri2)


def test_tampered_model_through_the_predict_entry_point(store, tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    import numpy as np
    from PIL import Image

    uri, version = _register(tmp_path, "integrity-cli")
    mlflow.MlflowClient().set_registered_model_alias("integrity-cli", "champion", version)
    _stored_file("integrity-cli", version, "python_model.pkl").write_bytes(b"\x80\x04N.")
    image = tmp_path / "slice.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["pipelines/predict.py", "--model_uri", "models:/integrity-cli@champion",
                                      "--input", str(image), "--output", str(out)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "pipelines" / "predict.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: model models:/integrity-cli@champion: file python_model.pkl does not match the SHA-256 recorded "
        "at registration (tampered or corrupted); not loaded"]
    assert not out.exists()
