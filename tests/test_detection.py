"""Detection without training: VOC -> YOLO export, offline Ultralytics set-up, metrics, slice decision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ichflow.data.splits import split_patients, subset
from ichflow.engine.scan import as_scan
from ichflow.errors import DataError, ParameterError
from ichflow.prepare import DataConfig, prepare_data
from ichflow.tasks.detection import DetectionConfig, best_conf_threshold, box_metrics, slice_metrics
from ichflow.tasks.detection.config import ENGINES
from ichflow.tasks.detection.dataset import export_yolo, voc_to_yolo, yolo_label_text
from ichflow.tasks.detection.engines import ENGINES as ENGINE_CLASSES
from ichflow.tasks.detection.engines import engine_class
from ichflow.tasks.detection.metrics import predictions_frame
from ichflow.tasks.detection.pyfunc import stacked
from ichflow.tasks.detection.train import DetectionRecipe

REPO = Path(__file__).resolve().parents[1]


def _read_label(path) -> np.ndarray:
    text = Path(path).read_text().strip()
    return np.array([[float(v) for v in line.split()] for line in text.splitlines()]) if text else np.zeros((0, 5))


def test_voc_to_yolo_normalises_and_clips():
    assert voc_to_yolo([10, 20, 110, 220], 512, 400) == pytest.approx((60 / 512, 120 / 400, 100 / 512, 200 / 400))
    # a box reaching past the image is clipped before normalising
    assert voc_to_yolo([-5, 0, 50, 600], 100, 500) == pytest.approx((0.25, 0.5, 0.5, 1.0))
    assert yolo_label_text([], 512, 512) == ""
    assert yolo_label_text([[0, 0, 256, 512]], 512, 512) == "0 0.250000 0.500000 0.500000 1.000000\n"
    with pytest.raises(ValueError, match="empty box"):
        voc_to_yolo([10, 10, 10, 20], 512, 512)


def test_export_of_synthetic_manifest(synthetic_phe):
    prep = prepare_data(DataConfig())
    ds = export_yolo(prep.manifest, prep.split, channels=3)
    assert ds.data_yaml.is_file() and str(ds.root).startswith(os.environ["ICHFLOW_WORK_DIR"])
    import yaml

    data = yaml.safe_load(ds.data_yaml.read_text())
    assert data["names"] == {0: "lesion"} and Path(data["path"]) == ds.root
    for split in ("train", "val", "test"):
        part = subset(prep.manifest, prep.split, split)
        files = sorted((ds.root / "images" / split).glob("*.png"))
        labels = sorted((ds.root / "labels" / split).glob("*.txt"))
        assert len(files) == len(labels) == len(part)   # one label file per slice, negatives included
    idx = ds.index
    assert set(idx["patient_id"]) == set(prep.manifest["patient_id"])
    for row in idx.itertuples():
        lab = _read_label(row.label)
        boxes = json.loads(row.boxes)
        assert len(lab) == len(boxes)
        if not row.has_lesion:
            assert Path(row.label).read_text() == ""      # negative slice: an empty file
        for (cls, xc, yc, w, h), b in zip(lab, boxes):
            assert cls == 0 and 0 < w <= 1 and 0 < h <= 1 and 0 <= xc <= 1 and 0 <= yc <= 1
            assert xc * row.width == pytest.approx((b[0] + b[2]) / 2, abs=0.01)
            assert h * row.height == pytest.approx(b[3] - b[1], abs=0.01)
    # 2.5D: the middle channel is the slice itself, the others its neighbours (edge slices replicated)
    import cv2

    first = idx.sort_values(["patient_id", "slice_index"]).iloc[0]
    arr = cv2.imread(first.image, cv2.IMREAD_UNCHANGED)
    from ichflow.data.images import read_gray

    assert arr.shape[-1] == 3 and np.array_equal(arr[..., 1], read_gray(first.source_image))
    assert np.array_equal(arr[..., 0], arr[..., 1])
    # the same manifest + split reuses the folder; another split gives another one
    assert export_yolo(prep.manifest, prep.split, channels=3).root == ds.root
    other = split_patients(prep.manifest, seed=7)
    assert export_yolo(prep.manifest, other, channels=3).root != ds.root


def test_export_can_thin_train_negatives_only(synthetic_phe):
    prep = prepare_data(DataConfig())
    full = export_yolo(prep.manifest, prep.split, channels=1)
    thin = export_yolo(prep.manifest, prep.split, channels=1, neg_fraction=0.4, seed=0)
    assert thin.root != full.root
    idx = thin.index
    train = idx[idx["split"] == "train"]
    written = {p.stem for p in (thin.root / "images" / "train").glob("*.png")}
    assert written == set(train.loc[train["in_yolo"], "stem"])
    assert set(train.loc[train["has_lesion"], "stem"]) <= written                  # every lesion slice kept
    n_neg = int((~train["has_lesion"]).sum())
    assert 0 < len(written) - int(train["has_lesion"].sum()) < n_neg             # only some negatives
    for split in ("val", "test"):                                                 # evaluation: every slice
        assert len(list((thin.root / "images" / split).glob("*.png"))) == int((idx["split"] == split).sum())


@pytest.mark.realdata
def test_export_of_real_phe_keeps_patient_13(phe_dir):
    """Patient 13's XMLs are named 013_SS.xml: the reader maps them, the export turns them into labels."""
    from ichflow.data.phe import read_phe

    manifest, _ = read_phe(phe_dir)
    small = manifest[manifest["patient_id"].isin(["0013", "0001", "0002"])].reset_index(drop=True)
    p13 = small[small["patient_id"] == "0013"]
    assert len(p13) and p13["has_lesion"].any()
    split = split_patients(small, (0.34, 0.33, 0.33), seed=0)
    ds = export_yolo(small, split, channels=1)
    rows = ds.index[ds.index["patient_id"] == "0013"]
    assert len(rows) == len(p13)
    for row in rows.itertuples():
        lab = _read_label(row.label)
        assert len(lab) == len(json.loads(row.boxes)) and (len(lab) > 0) == row.has_lesion
        if len(lab):
            assert (lab[:, 1:] > 0).all() and (lab[:, 1:] <= 1).all()


def test_slice_decision_at_a_threshold():
    # 4 slices: 0 lesion (box 0.9), 1 lesion (box 0.3), 2 negative (box 0.5), 3 negative (no box)
    preds = pd.DataFrame({"slice_id": [0, 0, 1, 2], "x1": 0.0, "y1": 0.0, "x2": 10.0, "y2": 10.0,
                          "score": [0.9, 0.1, 0.3, 0.5]})
    truths = [True, True, False, False]
    m = slice_metrics(preds, truths, 0.4)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 1, 1)
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    m = slice_metrics(preds, truths, 0.2)        # slice 1 now found, slice 2 still a false positive
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 0, 1, 1) and m["f1"] == pytest.approx(0.8)
    assert slice_metrics(preds, truths, 0.95)["tp"] == 0
    # the same from per-slice max scores (what the val_slices.csv artifact stores)
    assert slice_metrics(np.array([0.9, 0.3, 0.5, 0.0]), truths, 0.2) == m
    t, f1 = best_conf_threshold(preds, [True, True, False, False])
    assert f1 == pytest.approx(0.8) and 0.0 < t <= 0.3          # only thresholds <= 0.3 keep slice 1
    t, f1 = best_conf_threshold(preds, [True, False, True, False])  # 0.9 and 0.5 are lesions, 0.3 is not
    assert f1 == 1.0 and 0.3 < t <= 0.5


def test_box_metrics_one_definition():
    truths = [np.array([[10, 10, 50, 50]], float), np.zeros((0, 4)), np.array([[100, 100, 140, 180]], float)]
    perfect = predictions_frame([(truths[0], np.array([0.9])), (np.zeros((0, 4)), np.zeros(0)),
                                 (truths[2], np.array([0.8]))])
    m = box_metrics(perfect, truths)
    assert m["map50"] > 0.99 and m["map50_95"] > 0.99 and m["recall"] == pytest.approx(1.0, abs=1e-3)
    # a box shifted to IoU ~0.33 on slice 0 and a confident false positive on the negative slice
    shifted = predictions_frame([(np.array([[30, 10, 70, 50]], float), np.array([0.95])),
                                 (np.array([[0, 0, 20, 20]], float), np.array([0.99])),
                                 (truths[2], np.array([0.8]))])
    m = box_metrics(shifted, truths)
    # ranked: FP (0.99), FP (0.95), TP (0.8) of 2 true boxes -> precision 1/3 up to recall 1/2: AP50 = 1/6
    assert m["map50"] == pytest.approx(1 / 6, abs=0.01) and m["map50_95"] <= m["map50"]


def _bad(**kw) -> ParameterError:
    with pytest.raises(ParameterError) as info:
        DetectionRecipe().validate(DetectionConfig(**kw))
    return info.value


def test_bad_parameters_are_named():
    for kw, name in ((dict(engine="detr"), "engine"), (dict(imgsz=200), "imgsz"), (dict(imgsz=32), "imgsz"),
                     (dict(conf_threshold=1.5), "conf_threshold"), (dict(in_channels=2), "in_channels"),
                     (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"),
                     (dict(neg_fraction=0.0), "neg_fraction"), (dict(time_budget_min=-1.0), "time_budget_min"),
                     (dict(aug_strength=1.5), "aug_strength"), (dict(engine="fasterrcnn", model="s"), "model"),
                     (dict(engine="fasterrcnn", model="mobilenet", anchor_sizes="8,16,32"), "anchor_sizes"),
                     (dict(engine="fasterrcnn", model="mobilenet", anchor_sizes="64,32,16,8,4"), "anchor_sizes")):
        err = _bad(**kw)
        assert err.name == name and str(err).startswith(f"parameter {name}: "), (kw, str(err))
    assert "mobilenet, resnet50" in str(_bad(engine="fasterrcnn", model="s"))
    DetectionRecipe().validate(DetectionConfig(conf_threshold=-1.0))   # -1 = the val-optimal threshold
    DetectionRecipe().validate(DetectionConfig(engine="fasterrcnn", model="resnet50"))


def test_engine_registry():
    assert ENGINES == tuple(ENGINE_CLASSES) == ("yolo", "fasterrcnn")
    for name, cls in ENGINE_CLASSES.items():
        assert engine_class(name) is cls and cls.name == name
        for hook in ("check", "slices", "train", "predict", "load_predictor"):
            assert callable(getattr(cls, hook)), (name, hook)
    with pytest.raises(ParameterError) as info:
        engine_class("detr")
    assert info.value.name == "engine" and "yolo, fasterrcnn" in str(info.value) and "'detr'" in str(info.value)


def test_bad_parameter_on_the_command_line_is_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "detection.py"), "--imgsz", "50"],
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: parameter imgsz: must be a multiple of 32 and >= 64; got 50"], proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_pt_weights_say_what_to_do():
    from ichflow.tasks.detection.yolo import resolve_model

    assert resolve_model("n") == "yolov8n.yaml" and resolve_model("s") == "yolov8s.yaml"
    with pytest.raises(DataError, match=r"yolov8n\.pt: weights file not found.*model=yolov8n\.yaml"):
        resolve_model("yolov8n.pt")
    import mlflow

    client = mlflow.MlflowClient()
    n_runs = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    proc = subprocess.run([sys.executable, str(REPO / "pipelines" / "detection.py"), "--model", "yolov8n.pt"],
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: yolov8n.pt: weights file not found" in proc.stderr
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == n_runs  # no run


def test_ultralytics_is_set_up_offline():
    from ichflow.tasks.detection.yolo import config_dir, setup_ultralytics

    setup_ultralytics()
    from ultralytics.utils import ONLINE, SETTINGS

    folder = config_dir()
    assert (folder / "Arial.ttf").stat().st_size > 100_000 and (folder / "Arial.Unicode.ttf").exists()
    assert SETTINGS["mlflow"] is False and SETTINGS["sync"] is False and ONLINE is False
    from ultralytics.utils.checks import check_font

    assert Path(check_font("Arial.ttf")) == folder / "Arial.ttf"   # found locally: no download


def test_pyfunc_input_conventions():
    scan = np.arange(3 * 4 * 5, dtype=np.float64).reshape(3, 4, 5)
    arr = as_scan(scan)
    assert arr.dtype == np.uint8 and arr.shape == (3, 4, 5)
    st = stacked(arr, 3)
    assert st[0].shape == (4, 5, 3)
    assert np.array_equal(st[0][..., 0], arr[0]) and np.array_equal(st[0][..., 2], arr[1])   # edge replicated
    assert np.array_equal(st[2][..., 0], arr[1]) and np.array_equal(st[2][..., 2], arr[2])
    assert [s.shape for s in stacked(arr, 1)] == [(4, 5, 1)] * 3


def test_fasterrcnn_anchors_span_the_training_boxes():
    """COCO's anchors (32-512 px) miss small lesions at small imgsz: auto anchors cover the boxes' sides."""
    from ichflow.tasks.detection.fasterrcnn import COCO_ANCHORS, anchor_sizes, build_model, parse_anchor_sizes

    rng = np.random.default_rng(0)
    sides = rng.uniform(10, 25, size=(40, 2))
    boxes = [np.array([[5, 5, 5 + w, 5 + h]]) for w, h in sides] + [np.zeros((0, 4))]
    sizes = anchor_sizes(boxes)
    assert len(sizes) == 5 and list(sizes) == sorted(sizes)
    geo = np.sqrt(sides[:, 0] * sides[:, 1])
    assert sizes[0] <= geo.min() and sizes[-1] >= geo.max() and sizes[-1] < COCO_ANCHORS[0] * 2
    assert anchor_sizes([]) == COCO_ANCHORS
    assert parse_anchor_sizes("auto") is None and parse_anchor_sizes("coco") == COCO_ANCHORS
    assert parse_anchor_sizes("8,16,32,64,128") == (8, 16, 32, 64, 128)
    for arch, per_level in (("mobilenet", 5), ("resnet50", 1)):
        gen = build_model(arch, 128, 0.5, 0.2, anchors=sizes).rpn.anchor_generator
        assert gen.sizes[0] == (sizes if per_level == 5 else sizes[:1])


def test_lr_zero_means_the_engines_learning_rate_and_an_explicit_one_wins():
    from ichflow.tasks.detection.train import DetectionRecipe

    recipe = DetectionRecipe()
    assert recipe.resolve(DetectionConfig()).lr == 5e-3                      # YOLO's lr0
    frcnn = recipe.resolve(DetectionConfig(engine="fasterrcnn"))
    assert frcnn.lr == 1e-3 and frcnn.model == "mobilenet"                   # from scratch it learns at 1e-3 only
    assert recipe.resolve(DetectionConfig(engine="fasterrcnn", lr=2e-3)).lr == 2e-3


def test_ultralytics_does_not_make_the_processes_we_start_single_threaded(tmp_path):
    """Importing Ultralytics sets OMP_NUM_THREADS=1 in os.environ: a model server or pipeline step started after
    it would run torch on one core. A fresh interpreter, since this one may have imported Ultralytics already."""
    code = ("import os, subprocess, sys\n"
            "from ichflow.tasks.detection.yolo import setup_ultralytics\n"
            "setup_ultralytics()\n"
            "import ultralytics.utils.metrics\n"
            "child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"OMP_NUM_THREADS\"))'],\n"
            "                       capture_output=True, text=True).stdout.strip()\n"
            "print(child)\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["ICHFLOW_WORK_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "None"
