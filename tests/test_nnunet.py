"""nnU-Net v2 as a segmentation engine, on a small phantom (64 x 64 slices): the raw dataset it is given, a
tiny training that streams its epochs into MLflow, and the served model, which predicts what the trained
network predicts behind the smp model's signature."""

import dataclasses
import json
import os

import mlflow
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from ichflow.data.splits import subset
from ichflow.data.synthetic import PhantomSpec, ensure_synthetic
from ichflow.engine.slices import slice_cache
from ichflow.metric_names import mlflow_key, run_metrics
from ichflow.prepare import DataConfig, prepare_data
from ichflow.tasks.segmentation import SegmentationConfig, train_segmentation
from ichflow.tasks.segmentation import pyfunc as smp_pyfunc
from ichflow.tasks.segmentation.evaluate import evaluate_split
from ichflow.tasks.segmentation.nnunet import pyfunc
from ichflow.tasks.segmentation.nnunet.dataset import DATASET_NAME, case_id, write_raw_dataset
from ichflow.tasks.segmentation.nnunet.engine import NnUNetNetwork, spacing_zyx, train_nnunet

TINY = dict(epochs=2, steps_per_epoch=2, num_workers=0)
EPOCH_METRICS = ("train_loss", "val_loss", "val_pseudo_dice", "val_pseudo_dice_ema", "lr", "epoch_seconds")


@pytest.fixture(scope="module")
def parts(isolated_env):
    folder = ensure_synthetic("phe", PhantomSpec(n_patients=8, n_slices=6, size=64))
    prep = prepare_data(DataConfig(data_dir=str(folder), dataset="phe"))
    return {name: subset(prep.manifest, prep.split, name) for name in ("train", "val", "test")}


def patients(part) -> list[str]:
    return sorted(case_id(p) for p in part["patient_id"].unique())


def test_raw_dataset_has_one_case_per_train_and_val_patient_and_our_split(parts, tmp_path):
    cfg = SegmentationConfig()
    folder = write_raw_dataset(parts["train"], parts["val"], tmp_path, spacing_zyx(cfg))
    assert folder == tmp_path / DATASET_NAME
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (folder / "labelsTr").iterdir())
    assert cases == sorted(patients(parts["train"]) + patients(parts["val"]))
    assert not set(cases) & set(patients(parts["test"]))
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in cases]
    splits = json.loads((folder / "splits_final.json").read_text())
    assert [sorted(s["train"]) for s in splits] == [patients(parts["train"])]
    assert [sorted(s["val"]) for s in splits] == [patients(parts["val"])]
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "edema": 1} and meta["numTraining"] == len(cases)
    assert "ct" not in {name.lower() for name in meta["channel_names"].values()}   # 8-bit PNGs, not HU

    # a case as nnU-Net reads it: the patient's slices in axial order, (z, y, x) spacing, labels 0/1
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    part = parts["val"]
    pid = part["patient_id"].iloc[0]
    rows = part[part["patient_id"] == pid].sort_values("slice_index").index.to_numpy()
    image, props = SimpleITKIO().read_images([str(folder / "imagesTr" / f"{case_id(pid)}_0000.nii.gz")])
    label, _ = SimpleITKIO().read_seg(str(folder / "labelsTr" / f"{case_id(pid)}.nii.gz"))
    np.testing.assert_array_equal(image[0], slice_cache(part["image_path"].tolist())[rows])
    truth = slice_cache(part["mask_path"].tolist(), is_mask=True)[rows] > 0
    np.testing.assert_array_equal(label[0], truth.astype(label.dtype))
    assert np.allclose(props["spacing"], (cfg.slice_thickness_mm, cfg.pixel_spacing_mm, cfg.pixel_spacing_mm))
    assert sitk.ReadImage(str(folder / "labelsTr" / f"{case_id(pid)}.nii.gz")).GetSize() == (64, 64, len(rows))


FORKS_OF_THIS_PROCESS = []
os.register_at_fork(before=lambda: FORKS_OF_THIS_PROCESS.append(os.getpid()))


@pytest.fixture(scope="module")
def trained(parts, store, tmp_path_factory):
    cfg = SegmentationConfig(**TINY)
    seen, forks_before = [], len(FORKS_OF_THIS_PROCESS)
    with mlflow.start_run() as run:
        network = train_nnunet(cfg, parts, tmp_path_factory.mktemp("nnunet"), torch.device("cpu"),
                               on_epoch=lambda epoch, metrics: seen.append((epoch, sorted(metrics))))
    return cfg, network, run.info.run_id, seen, FORKS_OF_THIS_PROCESS[forks_before:]


@pytest.mark.slow
def test_tiny_training_streams_epochs_to_mlflow_and_predicts_probabilities(trained, parts):
    cfg, network, run_id, seen, forks = trained
    # nnU-Net's planning forks Pools; forked from this process (MLflow's and torch's threads) they can hang
    assert forks == []
    assert seen == [(epoch, sorted(EPOCH_METRICS)) for epoch in range(cfg.epochs)]
    client = mlflow.MlflowClient()
    for key in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run_id, mlflow_key(key))] == list(range(cfg.epochs)), key
    params = client.get_run(run_id).data.params
    assert params["nnunet_configuration"] == "2d" and params["nnunet_iterations_per_epoch"] == "2"
    fit = network.fit_result
    assert fit.epochs_run == cfg.epochs and 0 <= fit.best_epoch < cfg.epochs and not fit.stopped_by_time_budget
    folder = network.files["plans"].parent
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json", "fold_0/checkpoint_best.pth",
                 "fold_0/checkpoint_final.pth", "fold_0/checkpoint_served.pth"):
        assert (folder / name).is_file(), name

    slices = np.asarray(slice_cache(parts["test"]["image_path"].tolist()))   # a patient nnU-Net never saw
    probs = network.predict_scan(slices)
    assert probs.shape == slices.shape and probs.dtype == np.float32
    assert 0.0 <= probs.min() and probs.max() <= 1.0

    # the smp engine's evaluation takes the network as it is: one entry per patient
    images = slice_cache(parts["val"]["image_path"].tolist())
    masks = slice_cache(parts["val"]["mask_path"].fillna("").tolist(), is_mask=True)
    stats = evaluate_split(network, parts["val"], images, masks, progress=False)
    assert stats.patients == sorted(parts["val"]["patient_id"].unique())
    assert stats.slice_truth.shape == (len(parts["val"]),)


@pytest.mark.slow
def test_served_model_predicts_like_the_network_with_the_smp_signature(trained, parts):
    cfg, network, run_id, *_ = trained
    network = dataclasses.replace(network, threshold=0.5, min_voxels=10)
    slices = np.asarray(slice_cache(parts["test"]["image_path"].tolist()))
    config = {"threshold": 0.5, "min_component_voxels": 10, "target": cfg.target,
              "pixel_spacing_mm": cfg.pixel_spacing_mm, "slice_thickness_mm": cfg.slice_thickness_mm}
    with mlflow.start_run(run_id=run_id):
        info = pyfunc.log_model(network, config, slices[:2], "phe-segmentation-nnunet-test")
    assert info.registered_model_version is not None
    assert info.signature == smp_pyfunc.signature()
    assert info.metadata["engine"] == "nnunet" and info.metadata["min_component_voxels"] == 10

    served = mlflow.pyfunc.load_model(info.model_uri)
    expected, _ = network(slices)
    np.testing.assert_allclose(served.predict(slices), expected, atol=1e-6)
    mask = served.predict(slices, params={"output": "mask"})
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, (expected >= 0.5).astype(np.uint8))
    assert isinstance(served.unwrap_python_model().predictor, NnUNetNetwork)


@pytest.mark.slow
def test_engine_nnunet_runs_the_segmentation_recipe_and_registers_what_it_reported(parts):
    """``-P engine=nnunet``: the same selection on val, the same report and the same registry as smp."""
    folder = ensure_synthetic("phe", PhantomSpec(n_patients=8, n_slices=6, size=64))
    res = train_segmentation(SegmentationConfig(data_dir=str(folder), dataset="phe", engine="nnunet", epochs=1,
                                                steps_per_epoch=2, num_workers=0))
    client = mlflow.MlflowClient()
    run = client.get_run(res["run_id"])
    assert run.info.run_name == "segmentation-nnunet-2d" and run.data.params["nnunet_configuration"] == "2d"
    assert {"train_loss", "val_pseudo_dice", "val_dice", "test_dice", "min_component_voxels"} <= set(run_metrics(run))
    ablation = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=res["run_id"],
                                                               artifact_path="eval/inference_ablation.csv"))
    assert ablation["variant"].tolist()[0] == "nnU-Net mirroring"
    assert ablation["test_dice"].iloc[-1] == pytest.approx(res["test_dice"])
    served = mlflow.pyfunc.load_model(res["model_uri"])
    assert served.metadata.metadata["engine"] == "nnunet" and served.metadata.signature == smp_pyfunc.signature()
    assert served.metadata.metadata["threshold"] == res["threshold"]
    per_patient = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=res["run_id"],
                                                                  artifact_path="eval/test_per_patient.csv"),
                              dtype={"patient_id": str}).set_index("patient_id")
    test = parts["test"]
    pid = sorted(test["patient_id"].unique())[0]
    group = test[test["patient_id"] == pid].sort_values("slice_index")
    mask = served.predict(np.asarray(slice_cache(group["image_path"].tolist())), params={"output": "mask"})
    truth = slice_cache(group["mask_path"].fillna("").tolist(), is_mask=True) > 0
    assert int((mask.astype(bool) & truth).sum()) == per_patient.loc[str(pid), "tp"]
    assert int((mask.astype(bool) & ~truth).sum()) == per_patient.loc[str(pid), "fp"]
