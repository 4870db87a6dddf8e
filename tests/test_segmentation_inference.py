"""Segmentation inference choices: flip TTA, fold ensembles, small-component post-processing chosen on
validation, and the patient folds. Hand-built cases, no training (the fold-ensemble run is in
tests/test_segmentation.py)."""

import numpy as np
import pandas as pd
import pytest
import torch

from ichflow.engine.augment import Normalizer
from ichflow.errors import ParameterError
from ichflow.tasks.segmentation import metrics as M
from ichflow.tasks.segmentation.data import ScanPredictor, predict_scan
from ichflow.tasks.segmentation.evaluate import collect
from ichflow.tasks.segmentation.folds import patient_folds
from ichflow.tasks.segmentation.model import build_model, model_spec
from ichflow.tasks.segmentation.postprocess import (MIN_VOXEL_GRID, dice_grid, drop_small_components,
                                                    parse_min_voxels, select_postprocessing)

CPU = torch.device("cpu")
NORM = Normalizer(50.0, 30.0)


def _net(seed: int):
    torch.manual_seed(seed)
    return build_model(model_spec("Unet", "resnet18", 3, "16,16,16,16,16")).eval()


def _scan(seed=0, shape=(3, 40, 72)):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def test_flip_tta_is_the_mean_of_the_scan_and_its_mirror():
    net, scan = _net(0), _scan()
    plain, _ = predict_scan(net, scan, NORM, 3, CPU)
    mirrored, _ = predict_scan(net, scan[:, :, ::-1].copy(), NORM, 3, CPU)
    tta, _ = predict_scan(net, scan, NORM, 3, CPU, tta="flip")
    np.testing.assert_allclose(tta, (plain + mirrored[:, :, ::-1]) / 2, atol=1e-5)
    assert not np.allclose(tta, plain, atol=1e-3)   # a random network is not mirror-symmetric: TTA did something


def test_an_ensemble_is_the_mean_of_its_members():
    nets, scan = [_net(0), _net(1)], _scan(1)
    each = [predict_scan(n, scan, NORM, 3, CPU, tta="flip")[0] for n in nets]
    both, logits = predict_scan(nets, scan, NORM, 3, CPU, tta="flip")
    np.testing.assert_allclose(both, (each[0] + each[1]) / 2, atol=1e-5)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), both, atol=1e-5)   # logits of the mean probability


def test_small_components_are_dropped_in_3d():
    probs = np.zeros((3, 10, 10), np.float32)
    probs[0:2, 1:4, 1:4] = 0.9       # 18 voxels over two slices: one 3D component
    probs[2, 8, 8] = 0.8             # 1 voxel
    probs[1, 8, 0] = 0.6             # 1 voxel, diagonal to nothing
    probs[2, 4, 4] = 0.7             # touches the big component's corner across a slice: 26-connected
    out = drop_small_components(probs, 0.5, 10)
    assert out[2, 8, 8] == 0 and out[1, 8, 0] == 0
    assert (out[0:2, 1:4, 1:4] == 0.9).all() and out[2, 4, 4] == pytest.approx(0.7)
    assert drop_small_components(probs, 0.5, 0) is probs                 # 0: nothing done
    assert (drop_small_components(probs, 0.5, 2) == probs).sum() == probs.size - 2
    assert drop_small_components(probs, 0.95, 10) is probs              # nothing predicted at 0.95


def _patients():
    """Two patients with a true lesion each; the model also predicts scattered single-voxel specks."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(2):
        truth = np.zeros((4, 32, 32), bool)
        truth[1:3, 8:16, 8:16] = True
        probs = np.where(truth, 0.85, 0.05).astype(np.float32)
        ys, xs, zs = rng.integers(20, 31, 12), rng.integers(20, 31, 12), rng.integers(0, 4, 12)
        probs[zs, ys, xs] = 0.75 + 0.02 * k          # specks: false positives at thresholds <= 0.7
        out.append((truth, probs))
    return out


def test_the_size_grid_at_zero_agrees_with_the_threshold_selection():
    scans = _patients()
    thresholds = (0.3, 0.5, 0.7, 0.8, 0.9)
    stats = collect([(f"p{k}", np.arange(4), np.zeros((4, 32, 32), np.uint8), t, p, None)
                     for k, (t, p) in enumerate(scans)], thresholds)
    np.testing.assert_allclose(dice_grid(scans, thresholds)[:, 0], M.select_threshold(stats)[1])


def test_postprocessing_is_chosen_with_the_threshold_and_honours_fixed_values():
    scans = _patients()
    thresholds = (0.3, 0.5, 0.8, 0.9)      # 0.8: the lesion (0.85) without the specks (0.75, 0.77)
    t, size, grid = select_postprocessing(scans, thresholds)
    assert grid.shape == (len(thresholds), len(MIN_VOXEL_GRID))
    assert t < 0.75 and size > 1 and grid[thresholds.index(t), MIN_VOXEL_GRID.index(size)] == pytest.approx(1.0)
    # nothing dropped: the specks cost Dice at every threshold below 0.75
    assert grid[thresholds.index(0.5), 0] < 0.96
    t_fixed, size_free, _ = select_postprocessing(scans, thresholds, fixed_threshold=0.8)
    assert t_fixed == 0.8 and size_free == 0          # at 0.8 the specks are gone: the least post-processing
    assert select_postprocessing(scans, thresholds, fixed_min_voxels=0)[:2] == (0.8, 0)
    no_truth = [(np.zeros((2, 8, 8), bool), np.zeros((2, 8, 8), np.float32))]
    assert select_postprocessing(no_truth, thresholds)[:2] == (0.5, 0)


def test_min_component_voxels_parameter():
    assert parse_min_voxels("auto") is None and parse_min_voxels("100") == 100 and parse_min_voxels(0) == 0
    for bad in ("-1", "7", "lots"):
        with pytest.raises(ParameterError, match="min_component_voxels"):
            parse_min_voxels(bad)


def test_predictor_output_is_postprocessed_at_its_threshold():
    net, scan = _net(2), _scan(2, (4, 64, 64))
    raw, _ = predict_scan([net], scan, NORM, 3, CPU, tta="flip")
    threshold = float(np.quantile(raw, 0.97))     # a threshold that leaves a few components
    pred = ScanPredictor([net], NORM, 3, CPU, tta="flip", threshold=threshold, min_voxels=25)(scan)[0]
    np.testing.assert_array_equal(pred, drop_small_components(raw, threshold, 25))


def test_patient_folds_are_balanced_by_edema_and_reproducible():
    pids = [f"p{i:02d}" for i in range(10) for _ in range(3)]
    part = pd.DataFrame({"patient_id": pids})
    volume = np.repeat(np.arange(10) * 100, 3)            # patient i has 300*i edema pixels
    folds = patient_folds(part, volume, 3, seed=1)
    assert sorted(folds.index) == sorted(set(pids)) and set(folds) == {0, 1, 2}
    assert folds.value_counts().max() - folds.value_counts().min() <= 1
    # the three largest lesions land in three different folds
    assert folds.loc[["p09", "p08", "p07"]].nunique() == 3
    assert folds.equals(patient_folds(part, volume, 3, seed=1))
    with pytest.raises(ParameterError, match="n_folds"):
        patient_folds(part, volume, 11)
