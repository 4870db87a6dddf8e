"""predict and serve with registered models: files written, REST answers match in-process predictions.

The session's tiny model of each task (conftest ``tiny_model``, trained once on the synthetic phantoms) is made ``@champion`` of ``ich-<task>``. For every task: ``models:/ich-<task>@champion`` predicts what the
training run's checkpoint predicts, and a real ``mlflow models serve`` process answers ``/invocations`` with
the in-process predictions.
"""

import contextlib
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
import torch
from PIL import Image

from ichflow.data.images import read_gray
from ichflow.errors import DataError
from ichflow.paths import CHECKPOINT, MODEL_CONFIG, work_dir
from ichflow.prepare import DataConfig, prepare_data
from ichflow.tasks.spec import TASKS as SPECS
from ichflow.serving import PredictConfig, discover_scans, run_predict

TASKS = ("segmentation", "classification", "detection", "multilabel")


@pytest.fixture(scope="module")
def champion(shared_store, tiny_model):
    """``champion(task)`` -> the result of the session's tiny model of ``task``, made ``@champion`` now."""
    def get(task: str):
        res = tiny_model(task)
        mlflow.MlflowClient().set_registered_model_alias(SPECS[task].registered_name, "champion",
                                                         str(res["model_version"]))
        return res

    return get


def _uri(task: str) -> str:
    return f"models:/{SPECS[task].registered_name}@champion"


def _scan(task: str, n: int = 3) -> np.ndarray:
    """``n`` middle slices of the first test patient of the data the task's tiny model was trained on."""
    if task == "multilabel":
        from ichflow.tasks.multilabel import MultilabelConfig

        ml = MultilabelConfig()
        prep = prepare_data(DataConfig(dataset=SPECS["multilabel"].synthetic_dataset,
                                       synthetic_patients=ml.synthetic_patients,
                                       synthetic_slices=ml.synthetic_slices, n_folds=3))
    else:
        prep = prepare_data(DataConfig())
    pid = sorted(prep.split.loc[prep.split["split"] == "test", "patient_id"])[0]
    paths = prep.manifest[prep.manifest["patient_id"] == pid].sort_values("slice_index")["image_path"].tolist()
    mid = len(paths) // 2 - n // 2
    return np.stack([read_gray(p) for p in paths[mid:mid + n]])


# the detection comparison keeps every box (an untrained tiny model has few above its val-chosen threshold)
PARAMS = {"detection": {"conf_threshold": 0.001}}


def _assert_same(task: str, got, expected) -> None:
    if task == "segmentation":
        got = np.asarray(got, dtype=np.float32)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4)
        return
    got = pd.DataFrame(got)
    assert list(got.columns) == list(expected.columns) and len(got) == len(expected)
    if task == "detection":
        assert len(expected) > 0    # at conf 0.001 a YOLO model always proposes boxes: the comparison is real
        np.testing.assert_array_equal(got["slice_index"], expected["slice_index"])
    np.testing.assert_allclose(got.to_numpy(dtype=np.float64), expected.to_numpy(dtype=np.float64),
                               rtol=1e-4, atol=1e-4)


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
def test_predict_writes_masks_overlays_and_csv(champion, synthetic_phe, tmp_path):
    res = champion("segmentation")
    scan_dir = synthetic_phe / "SubdatasetC_PNG" / "set" / "image1"
    table = run_predict(PredictConfig(model_uri=_uri("segmentation"), input=str(scan_dir),
                                      output=str(tmp_path / "out")))
    assert len(table) == 12 and set(table["scan"]) == {"image1"}
    # the predict run names the version the alias stood for when it ran
    run = mlflow.last_active_run()
    assert run.info.run_name == "predict-segmentation" and run.data.params["model_uri"] == _uri("segmentation")
    assert run.data.params["model_version"] == str(res["model_version"])
    csv = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert {"scan", "slice", "image", "lesion_pixels", "max_probability", "positive", "lesion_ml"} <= set(csv.columns)
    masks = sorted((tmp_path / "out" / "masks" / "image1").glob("*.png"))
    assert len(masks) == 12
    model = mlflow.pyfunc.load_model(_uri("segmentation"))
    arr = np.stack([np.asarray(Image.open(p)) for p in sorted(scan_dir.glob("*.png"))])
    probs = model.predict(arr)
    expected = (probs >= model.metadata.metadata["threshold"]).sum(axis=(1, 2))
    assert csv["lesion_pixels"].tolist() == expected.tolist()


# ------------------------------------------------------------------ registry model == training checkpoint
def _checkpoint_predict(task: str, res: dict, arr: np.ndarray):
    """What the training run's own best checkpoint (its scratch folder work/runs/<run_id>/) predicts."""
    runs = work_dir() / "runs"
    if task == "segmentation":
        from ichflow.engine.augment import Normalizer
        from ichflow.tasks.segmentation.data import predict_scan
        from ichflow.tasks.segmentation.model import build_model
        from ichflow.tasks.segmentation.postprocess import drop_small_components

        cfg = json.loads((runs / res["run_id"] / MODEL_CONFIG).read_text())
        model = build_model(cfg["model"])
        model.load_state_dict(torch.load(runs / res["run_id"] / CHECKPOINT, map_location="cpu", weights_only=True))
        model.eval()
        probs, _ = predict_scan(model, arr, Normalizer(cfg["norm_mean"], cfg["norm_std"]),
                                cfg["model"]["in_channels"], torch.device("cpu"), tta=cfg["tta"])
        return drop_small_components(probs, cfg["threshold"], cfg["min_component_voxels"])
    if task == "detection":
        from ichflow.tasks.detection.pyfunc import stacked, to_frame
        from ichflow.tasks.detection.yolo import YoloPredictor

        best = runs / res["run_id"] / "yolo" / "train" / "weights" / "best.pt"
        predictor = YoloPredictor(best, 64, "cpu")
        return to_frame(predictor(stacked(arr, 3), conf=PARAMS["detection"]["conf_threshold"]))
    from ichflow.tasks import slice_classifier as sc

    cfg = json.loads((runs / res["run_id"] / MODEL_CONFIG).read_text())
    if task == "classification":
        ckpt = runs / res["run_id"] / CHECKPOINT
    else:   # the subtype model is the checkpoint of the fold the training run chose (tag ichflow.final_model)
        client = mlflow.MlflowClient()
        parent = client.get_run(res["run_id"])
        fold = parent.data.tags["ichflow.final_model"].split()[0]
        assert fold.startswith("fold-"), fold
        child = client.search_runs([parent.info.experiment_id],
                                   f"tags.mlflow.parentRunId = '{res['run_id']}' and tags.mlflow.runName = '{fold}'")
        assert len(child) == 1
        ckpt = runs / child[0].info.run_id / CHECKPOINT
    model = sc.build_model(cfg["model"], cfg["in_channels"], len(cfg["classes"]))
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    return sc.predict_scan(model, cfg, arr)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_champion_predicts_what_the_training_checkpoint_predicts(champion, task):
    res = champion(task)
    model = mlflow.pyfunc.load_model(_uri(task))
    info = mlflow.MlflowClient().get_model_version_by_alias(SPECS[task].registered_name, "champion")
    assert info.run_id == res["run_id"] and model.metadata.metadata["task"] == task
    arr = _scan(task)
    _assert_same(task, model.predict(arr, params=PARAMS.get(task)), _checkpoint_predict(task, res, arr))


# ------------------------------------------------------------------ mlflow models serve, one server per model
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, payload: dict):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())["predictions"]


@contextlib.contextmanager
def served(uri: str, store: str):
    """A real ``mlflow models serve -m uri --env-manager local`` process; yields its port."""
    port = _free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=store)
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300  # the server imports torch + mlflow: slow on a busy 2-core machine
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise AssertionError(proc.stdout.read().decode()[-3000:])
                if time.time() > deadline:
                    raise AssertionError(f"mlflow models serve -m {uri} did not answer /ping in 300 s")
                time.sleep(1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_serve_round_trip(champion, task, shared_store):
    champion(task)
    with served(_uri(task), shared_store) as port:
        arr = _scan(task)
        payload = {"inputs": arr.tolist()}
        if task in PARAMS:
            payload["params"] = PARAMS[task]
        answer = _post(port, payload)
        local = mlflow.pyfunc.load_model(_uri(task)).predict(arr, params=PARAMS.get(task))
        _assert_same(task, answer, local)
