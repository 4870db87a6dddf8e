"""Segmentation metrics against hand-computed cases, their edge cases, 2.5D stacking, patch sampling, inputs.

No training here: every test runs in well under a second or two.
"""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from ichflow.cli import main_guard
from ichflow.engine.augment import Normalizer
from ichflow.engine.scan import neighbours
from ichflow.engine.slices import neighbour_indices, stack_channels
from ichflow.engine.stats import finite
from ichflow.errors import DataError, ParameterError
from ichflow.tasks.common import apply_preset
from ichflow.tasks.segmentation import PRESETS, SegmentationConfig, train_segmentation
from ichflow.tasks.segmentation import metrics as M
from ichflow.tasks.segmentation.config import parse_threshold, validate
from ichflow.tasks.segmentation.data import PatchDataset, crop_padded, predict_scan
from ichflow.tasks.segmentation.engines import ENGINES, build_network
from ichflow.tasks.segmentation.model import build_loss, build_model, build_scheduler, load_encoder_weights, model_spec


def _mask(shape, *pixels):
    m = np.zeros(shape, bool)
    for p in pixels:
        m[p] = True
    return m


# ---------------------------------------------------------------- pixel metrics


def test_counts_and_metrics_of_a_partial_overlap():
    truth = _mask((4, 4), (0, 0), (0, 1), (1, 0), (1, 1))       # 4 pixels
    pred = _mask((4, 4), (0, 0), (0, 1), (3, 3))                 # 2 hits + 1 false positive
    tp, fp, fn, tn = M.confusion_counts(pred, truth)
    assert (tp, fp, fn, tn) == (2, 1, 2, 11)
    assert M.dice(tp, fp, fn) == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))   # 4/7
    assert M.iou(tp, fp, fn) == pytest.approx(2 / 5)
    assert M.sensitivity(tp, fn) == pytest.approx(0.5)
    assert M.specificity(tn, fp) == pytest.approx(11 / 12)


def test_edge_cases_empty_truth_and_empty_prediction():
    empty = np.zeros((3, 3), bool)
    one = _mask((3, 3), (1, 1))
    # both empty: perfect agreement; sensitivity undefined
    c = M.confusion_counts(empty, empty)
    assert M.dice(*c[:3]) == 1.0 and M.iou(*c[:3]) == 1.0
    assert math.isnan(M.sensitivity(c[0], c[2])) and M.specificity(c[3], c[1]) == 1.0
    # empty truth, a false-positive pixel: Dice 0, sensitivity still undefined
    tp, fp, fn, tn = M.confusion_counts(one, empty)
    assert M.dice(tp, fp, fn) == 0.0 and M.iou(tp, fp, fn) == 0.0
    assert math.isnan(M.sensitivity(tp, fn)) and M.specificity(tn, fp) == pytest.approx(8 / 9)
    # truth present, nothing predicted: Dice 0, sensitivity 0
    tp, fp, fn, tn = M.confusion_counts(empty, one)
    assert M.dice(tp, fp, fn) == 0.0 and M.sensitivity(tp, fn) == 0.0
    # all foreground: specificity undefined
    full = np.ones((2, 2), bool)
    tp, fp, fn, tn = M.confusion_counts(full, full)
    assert M.dice(tp, fp, fn) == 1.0 and math.isnan(M.specificity(tn, fp))
    with pytest.raises(ValueError, match="shape"):
        M.confusion_counts(np.zeros((2, 2)), np.zeros((3, 3)))


def test_slice_detection_metrics_and_undefined_values():
    d = M.detection_metrics([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert (d["slice_tp"], d["slice_fp"], d["slice_fn"], d["slice_tn"]) == (2, 1, 1, 1)
    assert d["slice_accuracy"] == pytest.approx(3 / 5)
    assert d["slice_precision"] == pytest.approx(2 / 3)
    assert d["slice_recall"] == pytest.approx(2 / 3)
    assert d["slice_f1"] == pytest.approx(2 / 3)
    none = M.detection_metrics([0, 0], [0, 0])
    assert none["slice_accuracy"] == 1.0
    assert all(math.isnan(none[k]) for k in ("slice_precision", "slice_recall", "slice_f1"))
    fp_only = M.detection_metrics([0, 0], [1, 0])
    assert fp_only["slice_precision"] == 0.0 and math.isnan(fp_only["slice_recall"]) and fp_only["slice_f1"] == 0.0


def test_volume_in_millilitres():
    # 1000 voxels of 0.508 x 0.508 x 5 mm = 1.29032 mL
    assert M.volume_ml(1000) == pytest.approx(1000 * 0.508 * 0.508 * 5 / 1000)
    assert M.volume_ml(0) == 0.0
    assert M.volume_ml(10, pixel_mm=1.0, slice_mm=1.0) == pytest.approx(0.01)


def _stats(volumes, thresholds=(0.3, 0.5, 0.7)):
    """SplitStats from {patient: (probs, truth)} via the real accumulate()."""
    counts, st, sp, spat, sidx, pids = [], [], [], [], [], []
    for p, (pid, (probs, truth)) in enumerate(volumes.items()):
        c, t, s = M.accumulate(np.asarray(probs, np.float32), truth, thresholds)
        counts.append(c)
        st.append(t)
        sp.append(s)
        spat.append(np.full(len(truth), p))
        sidx.append(np.arange(len(truth)))
        pids.append(pid)
    return M.SplitStats(pids, np.asarray(thresholds), np.stack(counts), np.concatenate(st), np.concatenate(sp),
                        np.concatenate(spat), np.concatenate(sidx))


def test_summarise_per_patient_pooled_volume_and_detection():
    # patient A: 2 slices of 2x2; truth 3 px; prob 0.6 on 2 truth px and on 1 background px
    truth_a = np.array([[[1, 1], [0, 0]], [[1, 0], [0, 0]]], bool)
    prob_a = np.array([[[0.6, 0.6], [0.6, 0.0]], [[0.2, 0.0], [0.0, 0.0]]])
    # patient B: no edema at all, one false-positive pixel at 0.9 on its 2nd slice
    truth_b = np.zeros((2, 2, 2), bool)
    prob_b = np.zeros((2, 2, 2))
    prob_b[1, 0, 0] = 0.9
    stats = _stats({"A": (prob_a, truth_a), "B": (prob_b, truth_b)})
    m, table = M.summarise(stats, 0.5, pixel_mm=1.0, slice_mm=1.0)
    a = table.set_index("patient_id").loc["A"]
    assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (2, 1, 1, 4)
    assert a["dice"] == pytest.approx(4 / 6)
    # per-patient means only over patients with truth (A); B counted separately
    assert m["dice"] == pytest.approx(4 / 6) and m["dice_median"] == pytest.approx(4 / 6)
    assert m["n_patients"] == 2 and m["n_patients_no_truth"] == 1 and m["n_patients_no_truth_with_fp"] == 1
    assert m["sensitivity"] == pytest.approx(2 / 3)
    # specificity over all patients: A 4/5, B 7/8
    assert m["specificity"] == pytest.approx((4 / 5 + 7 / 8) / 2)
    # pooled: tp 2, fp 2, fn 1, tn 11
    assert (m["pixels_tp"], m["pixels_fp"], m["pixels_fn"], m["pixels_tn"]) == (2, 2, 1, 11)
    assert m["dice_pooled"] == pytest.approx(4 / 7) and m["iou_pooled"] == pytest.approx(2 / 5)
    # volumes (1 mm voxels -> 0.001 mL): A truth 3, pred 3 -> err 0; B truth 0, pred 1 -> err 0.001
    assert table["volume_abs_err_ml"].tolist() == pytest.approx([0.0, 0.001])
    assert m["volume_abs_err_ml"] == pytest.approx(0.0005)
    # slices: A0 truth+pred, A1 truth only (0.2 < 0.5), B0 none, B1 FP  -> tp 1, fn 1, fp 1, tn 1
    assert (m["slice_tp"], m["slice_fn"], m["slice_fp"], m["slice_tn"]) == (1, 1, 1, 1)
    # at 0.7 only B's false positive survives: A's Dice 0, detection has no true positive
    m7, _ = M.summarise(stats, 0.7, pixel_mm=1.0, slice_mm=1.0)
    assert m7["dice"] == 0.0 and m7["slice_precision"] == 0.0
    # at 0.3 A gets 2 of 3 truth px + 1 FP as at 0.5 (0.2 is still below)
    thr, means = M.select_threshold(stats)
    assert thr == 0.3 and means.tolist() == pytest.approx([4 / 6, 4 / 6, 0.0])
    # a single patient -> CI collapses to the value; NaN metrics never reach MLflow
    assert m["dice_ci_low"] == m["dice_ci_high"] == pytest.approx(4 / 6)
    assert "x" not in finite({"x": float("nan"), "y": 1})
    with pytest.raises(ValueError, match="grid"):
        M.summarise(stats, 0.55)


def test_split_without_any_truth_has_no_patient_dice():
    stats = _stats({"B": (np.zeros((1, 2, 2)), np.zeros((1, 2, 2), bool))})
    m, _ = M.summarise(stats, 0.5)
    assert "dice" not in m and m["dice_pooled"] == 1.0 and m["n_patients_no_truth"] == 1


# ---------------------------------------------------------------- surface metrics (HD95, NSD)

SPACING = (5.0, 0.508, 0.508)       # (slice, row, column) mm: PHE-SICH-CT-IDS voxels


def _line(shape, z, x, y0=4, y1=16):
    """A line of voxels along y: every voxel is an edge voxel, so every distance is the offset itself."""
    m = np.zeros(shape, bool)
    m[z, y0:y1, x] = True
    return m


def _surface(pred, truth, tol=2.0):
    d_pg, d_gp, n_pred, n_truth = M.surface_distances(pred, truth, SPACING)
    within, edges = M.nsd_counts(d_pg, d_gp, n_pred, n_truth, tol)
    return M.hd95(d_pg, d_gp), (within / edges if edges else float("nan"))


def test_hd95_and_nsd_of_offsets_in_mm_with_anisotropic_spacing():
    shape = (6, 20, 20)
    truth = _line(shape, 2, 5)
    # 3 pixels sideways: 3 x 0.508 mm; one slice up: 5 mm; both: the diagonal
    assert _surface(_line(shape, 2, 8), truth) == (pytest.approx(3 * 0.508, abs=1e-5), 1.0)
    assert _surface(_line(shape, 3, 5), truth) == (pytest.approx(5.0), 0.0)
    assert _surface(_line(shape, 3, 8), truth)[0] == pytest.approx(math.hypot(5.0, 3 * 0.508), abs=1e-5)
    assert _surface(_line(shape, 3, 5), truth, tol=5.0)[1] == 1.0       # within a 5 mm tolerance
    # identical masks: HD95 0, NSD 1
    cube = np.zeros((8, 40, 40), bool)
    cube[2:6, 10:30, 10:30] = True
    assert _surface(cube, cube) == (0.0, 1.0)
    # a solid cube shifted 2 pixels (1.016 mm < 2 mm): every edge voxel within tolerance, HD95 <= the shift
    shifted = np.roll(cube, 2, axis=2)
    hd, nsd = _surface(shifted, cube)
    assert nsd == 1.0 and 0.0 < hd <= 2 * 0.508 + 1e-6
    # shifted one slice (5 mm > 2 mm): the moved top and bottom faces miss, the side walls still match
    hd, nsd = _surface(np.roll(cube, 1, axis=0), cube)
    assert hd == pytest.approx(5.0) and 0.0 < nsd < 1.0


def test_surface_edge_cases_follow_monai():
    empty = np.zeros((4, 8, 8), bool)
    blob = empty.copy()
    blob[1:3, 3:5, 3:5] = True
    both_empty = _surface(empty, empty)
    assert math.isnan(both_empty[0]) and math.isnan(both_empty[1])       # nothing to compare: undefined
    for pred, truth in ((blob, empty), (empty, blob)):                    # one side empty: NSD 0, HD95 undefined
        hd, nsd = _surface(pred, truth)
        assert math.isnan(hd) and nsd == 0.0


def test_surface_metrics_equal_monai_compute_functions():
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(0)
    truth = np.zeros((8, 48, 48), bool)
    truth[2:6, 10:30, 12:34] = True
    pred = np.roll(truth, (1, 3, -2), axis=(0, 1, 2)) | (rng.random(truth.shape) > 0.995)
    for p, t in ((pred, truth), (truth, pred), (np.zeros_like(truth), truth)):
        def onehot(m):
            m = torch.from_numpy(m)[None, None].float()
            return torch.cat([1 - m, m], dim=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")           # MONAI warns about the empty prediction
            ref_hd = float(compute_hausdorff_distance(onehot(p), onehot(t), percentile=95,
                                                      spacing=list(SPACING))[0, 0])
            ref_nsd = float(compute_surface_dice(onehot(p), onehot(t), [2.0], spacing=list(SPACING))[0, 0])
        hd, nsd = _surface(p, t)
        assert (math.isnan(hd) and math.isnan(ref_hd)) or hd == pytest.approx(ref_hd, rel=1e-5)
        assert nsd == pytest.approx(ref_nsd, rel=1e-6)


def test_surface_crop_keeps_every_threshold_exact():
    rng = np.random.default_rng(2)
    probs = np.zeros((5, 30, 30), np.float32)
    probs[1:4, 8:20, 5:15] = rng.random((3, 12, 10), dtype=np.float32)
    probs[2, 10, 10] = np.float32(0.7)           # float32 0.7 < 0.7: compared as accumulate() compares
    truth = np.zeros(probs.shape, bool)
    truth[2, 12:18, 6:12] = True
    grid = np.asarray((0.3, 0.5, 0.7))
    crop_truth, level = M.surface_crop(probs, truth, grid)
    assert level.dtype == np.uint8 and crop_truth.sum() == truth.sum()
    assert level.shape == (5, 14, 12)                                    # the box of prob >= 0.3 plus one voxel
    for k, thr in enumerate(grid, start=1):
        assert (level >= k).sum() == (probs >= thr).sum()
        full = _surface(probs >= thr, truth)
        np.testing.assert_allclose(_surface(level >= k, crop_truth), full)   # the crop changes no distance
    nothing = M.surface_crop(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool), grid)
    assert nothing[0].size == 0 and math.isnan(_surface(nothing[1] >= 1, nothing[0])[0])


def test_summarise_surface_metrics_per_patient_pooled_and_in_the_report_table():
    from ichflow.tasks.segmentation.evaluate import collect
    from ichflow.tasks.segmentation.report import summary_markdown

    shape = (6, 20, 20)
    truth_a, truth_b = _line(shape, 2, 5), _line(shape, 2, 5)
    prob_a = _line(shape, 2, 6) * 0.9                    # A: 1 pixel off (0.508 mm), all 12+12 edges within 2 mm
    prob_b = _line(shape, 3, 5) * 0.9                    # B: one slice off (5 mm), no edge within 2 mm
    prob_c = _line(shape, 1, 1) * 0.9                    # C: no edema, 12 false-positive edge voxels
    prob_d = np.zeros(shape)                             # D: edema, nothing predicted: HD95 undefined, NSD 0
    scans = [(pid, np.arange(6), np.zeros(shape, np.uint8), t, p.astype(np.float32), None)
             for pid, t, p in (("A", truth_a, prob_a), ("B", truth_b, prob_b),
                               ("C", np.zeros(shape, bool), prob_c), ("D", truth_a, prob_d))]
    stats = collect(scans, (0.3, 0.5, 0.7))
    m, table = M.summarise(stats, 0.5, 0.508, 5.0, surface=True)
    rows = table.set_index("patient_id")
    assert rows.loc["A", "hd95_mm"] == pytest.approx(0.508, abs=1e-5) and rows.loc["A", "nsd"] == 1.0
    assert rows.loc["B", "hd95_mm"] == pytest.approx(5.0) and rows.loc["B", "nsd"] == 0.0
    assert math.isnan(rows.loc["C", "hd95_mm"]) and rows.loc["C", "nsd"] == 0.0
    assert math.isnan(rows.loc["D", "hd95_mm"]) and rows.loc["D", "nsd"] == 0.0
    # per-patient over patients with truth (A, B, D); HD95 of D undefined, counted
    assert m["hd95_mm"] == pytest.approx((0.508 + 5.0) / 2, abs=1e-5) and m["n_patients_hd95_undefined"] == 1
    assert m["hd95_mm_median"] == pytest.approx(m["hd95_mm"]) and m["nsd"] == pytest.approx(1 / 3)
    assert m["nsd_median"] == 0.0 and m["hd95_mm_ci_low"] <= m["hd95_mm"] <= m["hd95_mm_ci_high"]
    # pooled NSD: A's 24 edge voxels within of A 24 + B 24 + C 12 + D 12
    assert (m["surface_edges_within_tol"], m["surface_edges"]) == (24, 72) and m["nsd_pooled"] == pytest.approx(1 / 3)
    # pooled HD95: A's and B's distances together (half 0.508, half 5 mm) -> 5 mm
    assert m["hd95_mm_pooled"] == pytest.approx(5.0) and m["nsd_tolerance_mm"] == 2.0
    # the tolerance is a parameter: at 5 mm B's edges count too
    assert M.summarise(stats, 0.5, 0.508, 5.0, nsd_tolerance_mm=5.0, surface=True)[0]["nsd_pooled"] == \
        pytest.approx(48 / 72)
    # at 0.3 / 0.7 (other grid levels) the same masks: the prediction is 0.9 everywhere it is not 0
    assert M.summarise(stats, 0.7, 0.508, 5.0, surface=True)[0]["hd95_mm"] == pytest.approx(m["hd95_mm"])
    # the per-epoch validation (surface=False) and stats without crops skip them
    assert "hd95_mm" not in M.summarise(stats, 0.5)[0] and "nsd" not in M.summarise(stats, 0.5)[1].columns
    md = summary_markdown(m, "test")
    assert "| HD95 (mm) | 2.8 [" in md and "| NSD @ 2.0 mm | 0.333 [" in md and "| Dice |" in md
    assert "undefined (nothing predicted) for 1 patient(s)" in md
    # SplitStats without crops (built from counts only) have no surface metrics even when asked
    plain = _stats({"A": (prob_a, truth_a)})
    assert "hd95_mm" not in M.summarise(plain, 0.5, surface=True)[0]


def test_log_split_logs_hd95_and_nsd_like_dice(monkeypatch):
    """What log_split hands MLflow (captured, no store): prefixed metrics, per-patient columns, the table."""
    import mlflow

    from ichflow.tasks.segmentation.evaluate import collect
    from ichflow.tasks.segmentation.report import log_split

    logged, texts = {}, {}
    monkeypatch.setattr(mlflow, "log_metrics", lambda metrics, step=None: logged.update(metrics))
    monkeypatch.setattr(mlflow, "log_text", lambda text, artifact: texts.__setitem__(artifact, text))
    monkeypatch.setattr(mlflow, "log_dict", lambda d, artifact: None)
    monkeypatch.setattr(mlflow, "log_figure", lambda fig, artifact: None)
    shape = (6, 40, 40)
    scans = [("A", np.arange(6), np.zeros(shape, np.uint8), _line(shape, 2, 15),
              (_line(shape, 3, 15) * 0.9).astype(np.float32), None)]
    out = log_split("test", collect(scans, (0.5,)), 0.5, 0, 0.508, 5.0)
    assert logged["test/hd95_mm"] == pytest.approx(5.0) and logged["test/nsd"] == 0.0
    assert logged["test/hd95_mm_median"] == pytest.approx(5.0) and logged["test/nsd_pooled"] == 0.0
    assert logged["test/nsd_tolerance_mm"] == 2.0 and out["test_hd95_mm_pooled"] == pytest.approx(5.0)
    assert "| HD95 (mm) | 5.0 [5.0, 5.0] | 5.0 | 5.0 |" in texts["eval/test_summary.md"]
    assert {"hd95_mm", "nsd"} <= set(texts["eval/test_per_patient.csv"].splitlines()[0].split(","))


# ---------------------------------------------------------------- 2.5D stacking


def test_25d_stacking_replicates_edges_and_never_mixes_patients():
    # two patients, rows deliberately out of axial order; each slice image is filled with a unique value
    manifest = pd.DataFrame({"patient_id": ["p1", "p1", "p1", "p2", "p2"], "slice_index": [2, 0, 1, 0, 1]})
    values = np.array([12, 10, 11, 20, 21], np.uint8)
    images = np.repeat(values[:, None, None], 4, axis=1).repeat(4, axis=2)
    prev_idx, next_idx = neighbour_indices(manifest)

    def chans(row):
        return stack_channels(images, row, prev_idx, next_idx, 3)[0, 0].tolist()

    assert chans(1) == [10, 10, 11]   # p1 first slice: below replicated
    assert chans(2) == [10, 11, 12]
    assert chans(0) == [11, 12, 12]   # p1 last slice: above replicated
    assert chans(3) == [20, 20, 21]   # p2 first slice does not see p1
    assert chans(4) == [20, 21, 21]
    assert stack_channels(images, 0, prev_idx, next_idx, 1).shape == (4, 4, 1)
    assert stack_channels(images, 2, prev_idx, next_idx, 5)[0, 0].tolist() == [10, 10, 11, 12, 12]  # 2 either side
    with pytest.raises(ValueError, match="in_channels"):
        stack_channels(images, 0, prev_idx, next_idx, 2)
    # the pyfunc's scan-level neighbours (one scan in axial order) follow the same rule
    prev_s, next_s = neighbours(3)
    assert prev_s.tolist() == [0, 0, 1] and next_s.tolist() == [1, 2, 2]
    assert neighbours(1)[0].tolist() == [0] and neighbours(1)[1].tolist() == [0]


def test_predict_scan_equals_per_slice_25d_input():
    """Whole-scan inference feeds each slice with its own neighbours (edge slices replicated)."""
    torch.manual_seed(0)
    model = build_model(model_spec("Unet", "resnet18", 3, "16,16,16,16,16")).eval()
    rng = np.random.default_rng(0)
    scan = rng.integers(0, 255, (3, 40, 72), dtype=np.uint8)   # odd size: padded to 64 x 96 inside
    norm = Normalizer(50.0, 30.0)
    probs, logits = predict_scan(model, scan, norm, 3, torch.device("cpu"), batch_size=2)
    assert probs.shape == (3, 40, 72) and probs.dtype == np.float32
    assert ((probs >= 0) & (probs <= 1)).all()
    # the last slice alone, stacked by hand as (s1, s2, s2), padded with air
    x = np.stack([scan[1], scan[2], scan[2]], axis=-1)[None]
    x = torch.from_numpy(norm(x).transpose(0, 3, 1, 2))
    x = torch.nn.functional.pad(x, (0, 24, 0, 24), value=float(norm(np.zeros(1))[0]))
    with torch.inference_mode():
        ref = model(x)[0, 0, :40, :72].numpy()
    np.testing.assert_allclose(logits[2], ref, atol=1e-4)
    # float input 0..255 is accepted and gives the same answer as uint8
    np.testing.assert_allclose(predict_scan(model, scan.astype(np.float64), norm, 3, torch.device("cpu"),
                                            batch_size=2)[0], probs, atol=1e-5)


# ---------------------------------------------------------------- patch sampling


def _toy_split(n=6, size=96):
    rng = np.random.default_rng(1)
    images = np.zeros((n, size, size), np.uint8)
    images[:, 10:86, 10:86] = rng.integers(60, 140, (n, 76, 76))     # "head"
    masks = np.zeros_like(images)
    masks[2, 60:66, 60:66] = 255                                      # edema on one slice only
    idx = np.arange(n)
    return images, masks, np.maximum(idx - 1, 0), np.minimum(idx + 1, n - 1)


def test_patches_oversample_foreground():
    images, masks, prev_idx, next_idx = _toy_split()
    norm = Normalizer(100, 20)
    fg = PatchDataset(images, masks, prev_idx, next_idx, 3, 32, fg_fraction=1.0, aug_strength=0.0,
                      normalizer=norm, length=40, seed=0)
    for i in range(40):
        x, y = fg[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (1, 32, 32)
        assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
        assert y.sum() > 0              # every patch centred on edema still shows edema after the crop
    bg = PatchDataset(images, masks, prev_idx, next_idx, 1, 32, fg_fraction=0.0, aug_strength=0.0,
                      normalizer=norm, length=200, seed=0)
    hits = sum(bool(bg[i][1].sum() > 0) for i in range(200))
    assert hits < 40                    # 1 edema slice of 6, 6x6 px: random patches rarely see it
    half = PatchDataset(images, masks, prev_idx, next_idx, 1, 32, fg_fraction=0.5, aug_strength=0.5,
                        normalizer=norm, length=200, seed=3)
    hits = sum(bool(half[i][1].sum() > 0) for i in range(200))
    assert 70 <= hits <= 170
    # the same seed gives the same patches
    again = PatchDataset(images, masks, prev_idx, next_idx, 1, 32, fg_fraction=0.5, aug_strength=0.5,
                         normalizer=norm, length=5, seed=3)
    assert torch.equal(again[0][0], PatchDataset(images, masks, prev_idx, next_idx, 1, 32, 0.5, 0.5, norm, 5,
                                                 seed=3)[0][0])
    with pytest.raises(ValueError, match="multiple of 32"):
        PatchDataset(images, masks, prev_idx, next_idx, 1, 40, 0.5, 0.0, norm, 5)


def test_crop_padded_fills_outside_with_air():
    arr = np.arange(16, dtype=np.uint8).reshape(4, 4) + 1
    out = crop_padded(arr, 0, 0, 4)
    assert out.shape == (4, 4)
    assert out[:2, :2].sum() == 0 and out[2:, 2:].tolist() == [[1, 2], [5, 6]]


# ---------------------------------------------------------------- model, loss, parameters


def test_build_models_and_loss():
    for arch, ch in (("Unet", "16,16,16,16,16"), ("FPN", "64,32"), ("UnetPlusPlus", "16,16,16,16,16")):
        model = build_model(model_spec(arch, "resnet18", 1, ch)).eval()
        with torch.no_grad():
            assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)
    loss = build_loss("dice+bce")
    y = torch.zeros(1, 1, 8, 8)
    y[..., 2:4, 2:4] = 1
    good, bad = loss(y * 20 - 10, y), loss(-y * 20 + 10, y)
    assert good < 0.05 < bad
    with pytest.raises(ValueError, match="loss"):
        build_loss("dice+hinge")
    with pytest.raises(ValueError, match="5 values"):
        build_model(model_spec("Unet", "resnet18", 3, "16,16"))


def test_local_encoder_weights_load_and_adapt_first_conv(tmp_path):
    src = build_model(model_spec("Unet", "resnet18", 3, "16,16,16,16,16"))
    path = tmp_path / "resnet18_encoder.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.encoder.state_dict().items()}}, path)
    dst = build_model(model_spec("Unet", "resnet18", 1, "16,16,16,16,16"))
    n = load_encoder_weights(dst, str(path))
    assert n == len(dst.encoder.state_dict())
    torch.testing.assert_close(dst.encoder.layer1[0].conv1.weight, src.encoder.layer1[0].conv1.weight)
    torch.testing.assert_close(dst.encoder.conv1.weight, src.encoder.conv1.weight.sum(dim=1, keepdim=True))
    with pytest.raises(DataError, match="not a file"):
        load_encoder_weights(dst, str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_text("not torch")
    with pytest.raises(DataError, match="not a readable"):
        load_encoder_weights(dst, str(tmp_path / "junk.pth"))


@pytest.mark.parametrize("change, param", [
    ({"arch": "DeepLabV9"}, "arch"), ({"in_channels": 2}, "in_channels"), ({"patch_size": 100}, "patch_size"),
    ({"fg_fraction": 1.5}, "fg_fraction"), ({"loss": "dice+hinge"}, "loss"), ({"threshold": "0.55"}, "threshold"),
    ({"threshold": "high"}, "threshold"), ({"encoder_weights": "imagenet"}, "encoder_weights"),
    ({"encoder": "resnet999"}, "encoder"), ({"target": "hematoma"}, "target"), ({"epochs": 0}, "epochs"),
    ({"decoder_channels": "16,16"}, "decoder_channels"), ({"decoder_channels": "a,b"}, "decoder_channels"),
    ({"engine": "monai"}, "engine"), ({"scheduler": "step"}, "scheduler"), ({"lr": 0.0}, "lr"),
    ({"warmup_fraction": 2.0}, "warmup_fraction"), ({"time_budget_min": -1.0}, "time_budget_min"),
])
def test_bad_parameters_are_named(change, param):
    with pytest.raises(ParameterError, match=f"^parameter {param}: ") as info:
        validate(SegmentationConfig(**change))
    assert info.value.name == param and "\n" not in str(info.value)


def test_bad_parameter_is_one_error_line_and_exit_code_2(capsys):
    """Refused before anything is read or tracked: one line on stderr, exit code 2."""
    with pytest.raises(SystemExit) as info:
        main_guard(train_segmentation, SegmentationConfig, ["--loss", "foo"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: parameter loss: must be '+'-joined names from dice, bce, focal, tversky, "
                                "jaccard, lovasz; got 'foo'"]


def test_threshold_and_preset():
    assert parse_threshold("auto") is None and parse_threshold("0.8") == 0.8
    cfg = apply_preset(SegmentationConfig(preset="phe", epochs=2), PRESETS)
    assert cfg.dataset == "phe" and cfg.steps_per_epoch == PRESETS["phe"]["steps_per_epoch"] and cfg.time_budget_min > 0
    assert cfg.epochs == 2          # what the user set explicitly wins over the preset
    validate(cfg)


def test_smp_engine_spec_round_trip():
    engine = ENGINES[SegmentationConfig().engine]
    spec = engine.spec(SegmentationConfig(in_channels=1, decoder_channels="16,16,16,16,16"))
    assert spec == {"engine": "smp", "arch": "Unet", "encoder": "resnet18", "in_channels": 1,
                    "decoder_channels": [16, 16, 16, 16, 16]}
    torch.manual_seed(0)
    a = build_network(spec)
    legacy = {k: v for k, v in spec.items() if k != "engine"}     # model specs stored before engines existed
    b = build_network(legacy)
    b.load_state_dict(a.state_dict())
    x = torch.zeros(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x)) and a(x).shape == (1, 1, 64, 64)


def test_schedules_warm_up_then_decay():
    def lrs(name, steps=20, warmup=0.1):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = build_scheduler(opt, name, steps, warmup, 1.0)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            if sched is not None:
                sched.step()
        return out

    cosine = lrs("cosine")
    assert cosine[0] == pytest.approx(0.5) and cosine[1] == pytest.approx(1.0)   # 2 warm-up steps
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:])) and cosine[-1] < 0.05
    assert lrs("constant") == [1.0] * 20
    one = lrs("onecycle")
    assert max(one) > 0.95 and one[0] < 0.1 and one[-1] < 0.01
