"""Silent data corruption closed: one mask convention, data_dir never replaced by the phantom, prepared folders
keyed by manifest + split."""

import dataclasses
import importlib
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ichflow.data.ctich import read_ctich
from ichflow.data.images import mask_foreground, read_mask
from ichflow.data.phe import read_phe
from ichflow.data.synthetic import PhantomSpec, write_ctich, write_phe
from ichflow.errors import ParameterError
from ichflow.prepare import DataConfig, log_prepared, prepare_data, resolve_source, run_prepare, split_digest
from ichflow.tasks.common import apply_preset
from ichflow.tasks.recipe import TaskRecipe
from ichflow.tasks.spec import TASKS

SPEC = PhantomSpec(n_patients=3, n_slices=6, size=96)


@pytest.fixture(scope="module")
def phe_0255(tmp_path_factory):
    return write_phe(tmp_path_factory.mktemp("phe0255"), SPEC)


@pytest.fixture(scope="module")
def phe_01(tmp_path_factory, phe_0255):
    """The same phantom with every mask rewritten as 0/1 (a common export)."""
    root = tmp_path_factory.mktemp("phe01") / phe_0255.name
    shutil.copytree(phe_0255, root)
    for mask in (root / "label").glob("*/*.png"):
        arr = np.asarray(Image.open(mask))
        Image.fromarray((arr > 0).astype(np.uint8)).save(mask)
    return root


@pytest.fixture(scope="module")
def ctich_root(tmp_path_factory):
    return write_ctich(tmp_path_factory.mktemp("ctich"), PhantomSpec(n_patients=10, n_slices=4, size=96))


# ------------------------------------------------------------------------------------------ mask convention
def test_mask_rule_any_nonzero_pixel_is_lesion():
    mask = np.array([[0, 1, 127, 128, 255]], np.uint8)
    assert mask_foreground(mask).tolist() == [[False, True, True, True, True]]
    assert mask_foreground(mask, lossy=True).tolist() == [[False, False, False, True, True]]


def test_faint_jpeg_mask_is_empty_and_reported(tmp_path, caplog):
    root = write_phe(tmp_path, PhantomSpec(n_patients=2, n_slices=4, size=96))
    for png in sorted((root / "label").glob("*/*.png")):  # the SubdatasetB_JPG way: JPEG masks
        Image.open(png).save(png.with_suffix(".jpg"), quality=95)
        png.unlink()
    faint = root / "label" / "label1" / "0001_02.jpg"
    Image.fromarray((np.asarray(Image.open(faint)) > 127).astype(np.uint8)).save(faint, quality=100)  # 0/1
    assert not read_mask(faint).any() and read_mask(root / "label" / "label1" / "0001_01.jpg").any()
    manifest, report = read_phe(root)
    assert manifest.loc[(manifest["patient_id"] == "0001") & (manifest["slice_index"] == 2), "mask_pixels"].item() == 0
    assert [a.path for a in report.of_kind("faint_jpeg_mask")] == [str(faint.resolve())]
    assert "0/1 mask cannot be told from JPEG noise" in report.of_kind("faint_jpeg_mask")[0].detail
    assert [r for r in caplog.records if r.levelname == "WARNING" and str(faint.resolve()) in r.getMessage()]


def test_01_masks_give_the_same_manifest_as_0255(phe_0255, phe_01):
    m255, r255 = read_phe(phe_0255)
    m01, r01 = read_phe(phe_01)
    assert (m255["mask_pixels"] > 0).sum() > 0
    assert m01["mask_pixels"].tolist() == m255["mask_pixels"].tolist()
    assert m01["has_lesion"].tolist() == m255["has_lesion"].tolist()
    assert r01.counts["mask_positive_slices"] == r255.counts["mask_positive_slices"]
    assert not r01.of_kind("box_mask_disagree")


def test_01_masks_give_the_same_cached_targets_and_evaluate_truth(phe_0255, phe_01):
    import torch

    from ichflow.engine.augment import Normalizer
    from ichflow.engine.slices import slice_cache
    from ichflow.tasks.segmentation.data import ScanPredictor
    from ichflow.tasks.segmentation.evaluate import evaluate_split
    from ichflow.tasks.segmentation.external import split_stats

    class Blank(torch.nn.Module):  # predicts nothing: FN counts are the truth pixels
        def forward(self, x):
            return torch.full_like(x[:, :1], -10.0)

    class BlankPyfunc:
        def predict(self, slices):
            return np.zeros(slices.shape, np.float32)

    per_source = []
    for root in (phe_0255, phe_01):
        manifest, _ = read_phe(root)
        images = slice_cache(manifest["image_path"].tolist())
        masks = slice_cache(manifest["mask_path"].tolist(), is_mask=True)
        trained = evaluate_split(ScanPredictor([Blank()], Normalizer(0, 1), 1, torch.device("cpu")), manifest,
                                 images, masks, progress=False)
        served = split_stats(BlankPyfunc(), manifest, (0.5,))
        per_source.append((np.asarray(masks), trained.slice_truth, served.slice_truth))
    (cache255, train255, serve255), (cache01, train01, serve01) = per_source
    assert cache255.any() and set(np.unique(cache255)) == {0, 255}
    np.testing.assert_array_equal(cache01, cache255)
    np.testing.assert_array_equal(train01, train255)
    np.testing.assert_array_equal(serve01, serve255)
    np.testing.assert_array_equal(serve255, train255)


# ---------------------------------------------------------------------------------- data_dir -> its data
def _recipe(task: str) -> TaskRecipe:
    module = importlib.import_module(f"{TASKS[task].package}.train")
    cls = next(v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, TaskRecipe) and v is not TaskRecipe)
    return cls()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_data_dir_with_default_dataset_reads_that_folder(task, phe_0255, ctich_root):
    recipe = _recipe(task)
    for reader, folder in (("phe", phe_0255), ("ctich", ctich_root)):
        cfg = TASKS[task].config_class()(data_dir=str(folder))
        cfg = recipe.resolve(apply_preset(cfg, recipe.presets))
        assert resolve_source(cfg) == (reader, "real", folder)


def test_no_data_dir_still_trains_on_the_tasks_phantom():
    recipe = _recipe("multilabel")
    cfg = recipe.resolve(TASKS["multilabel"].config_class()())
    assert resolve_source(cfg)[:2] == ("ctich", "synthetic")


def test_multilabel_on_a_folder_without_subtypes_is_an_error_not_the_phantom(phe_0255):
    from ichflow.tasks.multilabel import MultilabelConfig, train_multilabel

    with pytest.raises(ParameterError, match="no labels in the phe data"):
        train_multilabel(MultilabelConfig(data_dir=str(phe_0255)))


@pytest.mark.parametrize("dataset", ["synthetic", "synthetic-ctich"])
def test_phantom_dataset_with_a_data_dir_is_a_parameter_error(dataset, ctich_root):
    with pytest.raises(ParameterError, match=f"parameter dataset: {dataset} generates a phantom"):
        prepare_data(DataConfig(data_dir=str(ctich_root), dataset=dataset))


# -------------------------------------------------------------------- prepared folders: manifest + split
def _logged_split(run_id) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="data/split.csv")
    return pd.read_csv(path, dtype={"patient_id": str})


@pytest.mark.parametrize("change", [{"split_seed": 7}, {"n_folds": 3}])
def test_another_split_gets_its_own_folder_and_logged_split(change, ctich_root):
    base = DataConfig(data_dir=str(ctich_root))
    preps, runs = [], []
    for cfg in (base, dataclasses.replace(base, **change)):
        preps.append(run_prepare(cfg))
        runs.append(mlflow.last_active_run())
    assert preps[0].manifest.equals(preps[1].manifest)
    assert preps[0].split_digest != preps[1].split_digest
    assert preps[0].out_dir != preps[1].out_dir
    for prep, run in zip(preps, runs):
        logged = _logged_split(run.info.run_id)
        assert split_digest(logged) == run.data.tags["ichflow.split_digest"] == prep.split_digest


@pytest.mark.parametrize("change", [{"split_seed": 7}, {"n_folds": 3}])
def test_labels_csv_folder_follows_the_split_too(change, ctich_root, tmp_path):
    from ichflow.tasks.multilabel import MultilabelConfig
    from ichflow.tasks.multilabel.labels_csv import prepare_labels_csv

    manifest, _ = read_ctich(ctich_root)
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"image": manifest["image_path"], "patient_id": manifest["patient_id"],
                  "slice_index": manifest["slice_index"], "IVH": manifest["IVH"].astype(int),
                  "IPH": manifest["IPH"].astype(int)}).to_csv(csv, index=False)
    base = MultilabelConfig(data_dir=str(csv), dataset="csv")
    preps = [prepare_labels_csv(cfg) for cfg in (base, dataclasses.replace(base, **change))]
    assert preps[0].out_dir != preps[1].out_dir
    for prep in preps:
        with mlflow.start_run() as run:
            log_prepared(prep)
        tag = mlflow.get_run(run.info.run_id).data.tags["ichflow.split_digest"]
        assert split_digest(_logged_split(run.info.run_id)) == tag == prep.split_digest


def test_a_failed_slice_cache_leaves_no_temporary_file(phe_0255, tmp_path):
    from ichflow.engine.slices import slice_cache
    from ichflow.errors import DataError
    from ichflow.paths import cache_dir

    images = sorted((phe_0255 / "set").rglob("*.png"))[:3]
    broken = tmp_path / images[1].name
    broken.write_bytes(images[1].read_bytes()[:120])
    with pytest.raises(DataError) as err:
        slice_cache([str(images[0]), str(broken), str(images[2])])
    assert err.value.path == str(broken)
    assert not list((cache_dir() / "slices").glob(".*.tmp"))
