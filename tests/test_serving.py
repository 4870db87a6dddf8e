"""predict and serve with a registered model: files written, REST answers match in-process predictions."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ichflow.errors import DataError
from ichflow.serving import PredictConfig, discover_scans, run_predict
from ichflow.tasks.segmentation import SegmentationConfig, train_segmentation

TINY = dict(epochs=1, steps_per_epoch=2, batch_size=4, patch_size=64, num_workers=0, eval_batch_size=4)


@pytest.fixture(scope="module")
def seg_model():
    result = train_segmentation(SegmentationConfig(**TINY))
    return f"models:/ich-segmentation/{result['model_version']}"


def test_discover_scans_layouts(tmp_path, synthetic_phe):
    scan = tmp_path / "scanA"
    scan.mkdir()
    for i in (10, 2, 1):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(scan / f"slice{i}.png")
    assert [p.name for p in discover_scans(scan)["scanA"]] == ["slice1.png", "slice2.png", "slice10.png"]
    assert list(discover_scans(tmp_path)) == ["scanA"]
    by_patient = discover_scans(synthetic_phe)
    assert len(by_patient) == 12 and all(len(v) == 12 for v in by_patient.values())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no slice images"):
        discover_scans(tmp_path / "empty")


@pytest.mark.slow
def test_predict_writes_masks_overlays_and_csv(seg_model, synthetic_phe, tmp_path):
    scan_dir = synthetic_phe / "SubdatasetC_PNG" / "set" / "image1"
    table = run_predict(PredictConfig(model_uri=seg_model, input=str(scan_dir), output=str(tmp_path / "out")))
    assert len(table) == 12 and set(table["scan"]) == {"image1"}
    csv = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert {"scan", "slice", "image", "lesion_pixels", "max_probability", "positive", "lesion_ml"} <= set(csv.columns)
    masks = sorted((tmp_path / "out" / "masks" / "image1").glob("*.png"))
    assert len(masks) == 12
    model = mlflow.pyfunc.load_model(seg_model)
    arr = np.stack([np.asarray(Image.open(p)) for p in sorted(scan_dir.glob("*.png"))])
    probs = model.predict(arr)
    expected = (probs >= model.metadata.metadata["threshold"]).sum(axis=(1, 2))
    assert csv["lesion_pixels"].tolist() == expected.tolist()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_round_trip(seg_model, synthetic_phe):
    port = _free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", seg_model, "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300  # the server imports torch + mlflow: slow on a busy 2-core machine
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(proc.stdout.read().decode()[-3000:])
                time.sleep(1)
        scan_dir = synthetic_phe / "SubdatasetC_PNG" / "set" / "image2"
        arr = np.stack([np.asarray(Image.open(p)) for p in sorted(scan_dir.glob("*.png"))[4:7]])
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps({"inputs": arr.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            served = np.asarray(json.loads(resp.read())["predictions"], dtype=np.float32)
        local = mlflow.pyfunc.load_model(seg_model).predict(arr)
        assert served.shape == local.shape == arr.shape
        np.testing.assert_allclose(served, local, atol=1e-4)
    finally:
        proc.terminate()
        proc.wait(30)
