"""The logged figures, without training: size and resolution, readable annotations, the segmentation overlays'
TP / FP / FN colours and volumes, the served overlays, the Optuna plots, no training-curve PNGs."""

from __future__ import annotations

import inspect
import io

import matplotlib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ichflow.engine import figures, overlays

MIN_PX = 1200


def png_size(fig) -> tuple[int, int]:
    """(width, height) in pixels of the PNG ``mlflow.log_figure`` would write (savefig at the rc dpi)."""
    figures.ensure_min_width(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    figures.close(fig)
    return Image.open(io.BytesIO(buf.getvalue())).size


def assert_wide(fig) -> None:
    fig.canvas.draw()
    w_px = fig.get_size_inches()[0] * fig.dpi
    assert fig.dpi == figures.DPI and w_px >= MIN_PX, (fig.dpi, w_px)
    assert png_size(fig)[0] >= MIN_PX


def contrast(a, b) -> float:
    la, lb = sorted((figures.relative_luminance(a), figures.relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _synthetic_scores(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.25
    return y, np.clip(0.35 * y + 0.7 * rng.random(n), 0, 1)


# ------------------------------------------------------------------------------------- size, layout

def test_every_figure_helper_is_at_least_1200_px_wide_at_150_dpi(tmp_path):
    from ichflow.tasks.classification.figures import gradcam_figure
    from ichflow.tasks.detection import analysis
    from ichflow.tasks.multilabel import metrics as mm

    rng = np.random.default_rng(0)
    y, s = _synthetic_scores()
    classes = ["IPH", "IVH", "SAH", "SDH", "EDH"]
    yy = rng.random((60, 5)) < 0.3
    assert_wide(figures.confusion_figure(np.array([[50, 3], [4, 9]]), ["no", "yes"]))
    assert_wide(figures.roc_pr_figure(y, s, "val", threshold=0.5))
    assert_wide(mm.multilabel_confusion_figure(yy[:, :1], rng.random((60, 1)), [0.5], ["IVH"]))   # one class
    assert_wide(mm.multilabel_confusion_figure(yy, rng.random((60, 5)), np.full(5, 0.5), classes))
    assert_wide(mm.cooccurrence_figure(yy, np.repeat(np.arange(6), 10), classes))
    assert_wide(gradcam_figure([rng.random((32, 32))] * 2, [rng.random((32, 32))] * 2, ["TP · p = 0.9\npt 1"] * 2,
                               "Grad-CAM"))
    assert_wide(analysis.pr_figure({"val": {"pr_recall": [0, 0.5, 1], "pr_precision": [1, 0.8, 0.2], "map50": 0.6}}))
    index, preds, truths = _detection_case(tmp_path)
    assert_wide(analysis.overlays(index, preds, truths, 0.4, 2, "val"))     # two panels only: still 8 in
    assert_wide(analysis.difficulty(index, preds, truths, 0.4, "val")[0])
    assert_wide(_segmentation_overlay()[0])


def test_log_figure_widens_a_narrow_figure_and_closes_it(monkeypatch):
    import mlflow

    saved = {}

    def fake_log_figure(fig, artifact):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")          # what mlflow.log_figure does: savefig with the rc defaults
        saved[artifact] = Image.open(io.BytesIO(buf.getvalue())).size

    monkeypatch.setattr(mlflow, "log_figure", fake_log_figure)
    fig = matplotlib.pyplot.figure(figsize=(4, 3))
    fig.add_subplot().plot([0, 1])
    figures.log_figure(fig, "figures/x.png")
    assert saved["figures/x.png"][0] >= MIN_PX and saved["figures/x.png"][1] >= 900    # aspect kept
    assert not matplotlib.pyplot.fignum_exists(fig.number)


def test_titles_and_tick_labels_stay_inside_the_figure():
    from ichflow.tasks.multilabel import metrics as mm

    yy = np.random.default_rng(0).random((60, 5)) < 0.3
    for fig in (mm.cooccurrence_figure(yy, np.repeat(np.arange(6), 10), ["IPH", "IVH", "SAH", "SDH", "EDH"]),
                figures.confusion_figure(np.array([[5, 1], [2, 7]]), ["no subdural", "subdural haematoma"]),
                _segmentation_overlay()[0]):
        figures.ensure_min_width(fig)
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            box = ax.get_tightbbox(renderer)
            assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= fig.bbox.width + 1 and box.y1 <= fig.bbox.height + 1
        figures.close(fig)


def test_roc_pr_names_its_axes_and_puts_the_auc_and_chance_lines_in_the_legend():
    y, s = _synthetic_scores()
    fig = figures.roc_pr_figure(y, s, "test", threshold=0.5)
    roc, pr = fig.axes[:2]
    assert roc.get_xlabel().startswith("False positive rate") and "sensitivity" in roc.get_ylabel()
    assert pr.get_xlabel().startswith("Recall") and pr.get_ylabel().startswith("Precision")
    roc_labels = [t.get_text() for t in roc.get_legend().get_texts()]
    pr_labels = [t.get_text() for t in pr.get_legend().get_texts()]
    assert any("ROC-AUC = " in t for t in roc_labels) and any("chance" in t for t in roc_labels)
    assert any("average precision = " in t for t in pr_labels)
    assert any(f"prevalence ({y.mean():.3f})" in t for t in pr_labels)
    assert any("threshold 0.500" in t for t in roc_labels)
    figures.close(fig)


# ------------------------------------------------------------------------------------- cell text colour

def test_text_colour_follows_the_background_luminance():
    assert figures.text_colour((1, 1, 1)) == "black" and figures.text_colour((0, 0, 0)) == "white"
    assert figures.text_colour((0.97, 0.98, 1.0, 1.0)) == "black"       # the palest Blues cell
    assert figures.text_colour((0.03, 0.19, 0.42, 1.0)) == "white"      # the darkest Blues cell


@pytest.mark.parametrize("cm", [np.array([[950, 3], [12, 40]]), np.array([[0, 0], [0, 0]]),
                                np.array([[5, 5], [5, 5]]), np.array([[1, 80], [40, 39]])])
def test_confusion_cell_text_contrasts_with_its_cell(cm):
    fig = figures.confusion_figure(cm, ["no bleed", "bleed"])
    checked = 0
    for ax in fig.axes:
        if not ax.images:
            continue
        im = ax.images[0]
        data = np.asarray(im.get_array())
        for t in ax.texts:
            c, r = (int(round(v)) for v in t.get_position())
            cell = im.cmap(im.norm(data[r, c]))
            assert contrast(cell, matplotlib.colors.to_rgba(t.get_color())) >= 4.5, (cm, r, c, t.get_text())
            checked += 1
    assert checked == 8
    # pale cells get dark text, dark cells white text
    counts = fig.axes[0]
    colours = {t.get_text(): t.get_color() for t in counts.texts}
    if cm.max() == 950:
        assert colours["950"] == "white" and colours["3"] == "black"
    figures.close(fig)


def test_multilabel_and_cooccurrence_cells_contrast_with_their_text():
    from ichflow.tasks.multilabel import metrics as mm

    rng = np.random.default_rng(1)
    yy = rng.random((80, 3)) < 0.4
    for fig in (mm.multilabel_confusion_figure(yy, rng.random((80, 3)), np.full(3, 0.5), ["a", "b", "c"]),
                mm.cooccurrence_figure(yy, np.repeat(np.arange(8), 10), ["a", "b", "c"], yy)):
        for ax in fig.axes:
            if not ax.images or not ax.texts:
                continue
            im = ax.images[0]
            data = np.asarray(im.get_array())
            for t in ax.texts:
                c, r = (int(round(v)) for v in t.get_position())
                assert contrast(im.cmap(im.norm(data[r, c])), matplotlib.colors.to_rgba(t.get_color())) >= 4.5
        figures.close(fig)


# ------------------------------------------------------------------------------------- segmentation overlays

def _masks():
    yy, xx = np.mgrid[:96, :96]
    truth = (yy - 48) ** 2 + (xx - 40) ** 2 < 15 ** 2
    pred = (yy - 48) ** 2 + (xx - 56) ** 2 < 15 ** 2
    return truth, pred


def _segmentation_overlay():
    from ichflow.tasks.segmentation.metrics import SplitStats
    from ichflow.tasks.segmentation.report import overlay_figure

    truth, pred = _masks()
    image = (np.random.default_rng(0).random(truth.shape) * 100 + 60 * truth).astype(np.uint8)
    examples = {p: (image, truth, pred.astype(np.float16) * 0.9, 7 + i) for i, p in enumerate("ABC")}
    table = pd.DataFrame({"patient_id": list("ABC"), "has_truth": [True] * 3, "dice": [0.8, 0.5, 0.2],
                          "truth_ml": [12.34, 4.5, 1.0], "pred_ml": [11.02, 6.0, 0.25]})
    stats = SplitStats(patients=list("ABC"), thresholds=np.array([0.5]), counts=np.zeros((3, 1, 4), np.int64),
                       slice_truth=np.zeros(1, np.int64), slice_pred=np.zeros((1, 1), np.int64),
                       slice_patient=np.zeros(1, int), slice_index=np.zeros(1, int), examples=examples)
    return overlay_figure(stats, table, 0.5, "val: best / median / worst"), truth, pred


def test_outcome_map_colours_tp_fp_fn_pixels_three_ways():
    truth, pred = _masks()
    codes = overlays.outcome_map(truth, pred)
    assert (codes[truth & pred] == 1).all() and (codes[~truth & pred] == 2).all() and (codes[truth & ~pred] == 3).all()
    assert (codes[~truth & ~pred] == 0).all()
    rgba = overlays.outcome_rgba(truth, pred)
    colours = {name: {tuple(np.round(v[:3], 3)) for v in rgba[region]}
               for name, region in (("tp", truth & pred), ("fp", ~truth & pred), ("fn", truth & ~pred))}
    assert all(len(c) == 1 for c in colours.values())                 # one colour per outcome
    assert len(set().union(*colours.values())) == 3                    # three different colours
    assert (rgba[~truth & ~pred][:, 3] == 0).all()                     # the rest of the slice untouched
    edge = overlays.boundary(truth & pred)
    assert (rgba[edge][:, 3] == 1).all() and (rgba[(truth & pred) & ~edge][:, 3] < 1).all()   # opaque outline


def test_segmentation_overlay_draws_contours_legend_and_volumes():
    fig, truth, pred = _segmentation_overlay()
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 9                                              # 3 patients x (slice, contours, outcomes)
    contour_ax, outcome_ax = axes[1], axes[2]
    assert len(contour_ax.images) == 1 and contour_ax.collections      # contours, no filled mask layer
    layer = np.asarray(outcome_ax.images[-1].get_array())
    # the zoom window keeps the whole 96 px slice (smaller than the minimum window): pixels line up
    assert layer.shape[:2] == truth.shape
    picks = {"tp": layer[48, 48, :3], "fp": layer[48, 66, :3], "fn": layer[48, 30, :3]}
    assert len({tuple(np.round(v, 3)) for v in picks.values()}) == 3
    # the rendered panel (not only the legend) shows the three colours too
    fig.canvas.draw()
    canvas = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    box = outcome_ax.get_window_extent()
    height = canvas.shape[0]
    panel = canvas[int(height - box.y1) + 2:int(height - box.y0) - 2, int(box.x0) + 2:int(box.x1) - 2]
    pixels = panel.reshape(-1, 3).astype(int)
    for _, colour in overlays.OUTCOMES.values():
        target = np.round(np.array(colour) * 255).astype(int)
        assert (np.abs(pixels - target).max(axis=1) <= 3).any(), colour
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("pred 11.0 mL / truth 12.3 mL" in t for t in texts), texts
    assert "slice 7" in axes[0].get_title()
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert any(lbl.startswith("TP") for lbl in labels) and any(lbl.startswith("FP") for lbl in labels)
    assert any(lbl.startswith("FN") for lbl in labels) and any("truth" in lbl for lbl in labels)
    figures.close(fig)


def test_served_mask_overlay_outlines_the_mask_and_keeps_the_anatomy():
    truth, _ = _masks()
    img = np.full(truth.shape, 100, np.uint8)
    out = np.asarray(overlays.mask_overlay(img, truth))
    assert out.shape == (*truth.shape, 3) and out.dtype == np.uint8
    edge = overlays.boundary(truth, width=2)
    assert (out[edge] == overlays.SERVED_COLOUR).all()                 # the contour in full colour
    inside = truth & ~edge
    assert (out[inside] != overlays.SERVED_COLOUR).any(axis=1).all()   # the inside only tinted
    assert (out[~truth] == 100).all()                                  # background untouched
    boxes = pd.DataFrame({"x1": [10.0], "y1": [20.0], "x2": [40.0], "y2": [50.0], "score": [0.87]})
    assert overlays.boxes_overlay(img, boxes).size == (96, 96)


# ------------------------------------------------------------------------------------- detection legend

def _detection_case(tmp_path):
    rng = np.random.default_rng(0)
    rows, truths, preds = [], [], []
    for i in range(6):
        path = tmp_path / f"s{i}.png"
        Image.fromarray((rng.random((64, 64)) * 80).astype(np.uint8)).save(path)
        lesion = i % 2 == 0
        rows.append({"patient_id": f"p{i // 3}", "slice_index": i, "position": i / 6, "has_lesion": lesion,
                     "source_image": str(path)})
        truths.append(np.array([[10.0, 10.0, 30.0, 34.0]]) if lesion else np.zeros((0, 4)))
        preds.append({"slice_id": i, "x1": 12.0 + 14 * (i == 2), "y1": 10.0, "x2": 31.0, "y2": 35.0,
                      "score": 0.3 + 0.1 * i})
    return pd.DataFrame(rows), pd.DataFrame(preds), truths


def test_detection_overlays_have_a_truth_vs_prediction_legend(tmp_path):
    from ichflow.tasks.detection import analysis

    index, preds, truths = _detection_case(tmp_path)
    fig = analysis.overlays(index, preds, truths, 0.4, 4, "val")
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert labels == ["truth box", "predicted box (score ≥ 0.400), number = score"]
    assert any(t.get_text() == "0.70" for ax in fig.axes for t in ax.texts)      # the score of a kept box
    figures.close(fig)


# ------------------------------------------------------------------------------------- Optuna

def test_study_figures_name_the_objective_and_leave_room_for_parameter_names():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("a_rather_long_learning_rate_name", 1e-4, 1e-2, log=True)
                   + t.suggest_float("weight_decay_of_the_optimiser", 0, 1), n_trials=6)
    rc_before = dict(matplotlib.rcParams)
    made = dict(figures.study_figures(study, target_name="val_dice"))
    assert set(made) == set(figures.STUDY_PLOTS)
    assert matplotlib.rcParams["axes.facecolor"] == rc_before["axes.facecolor"]   # Optuna's ggplot undone
    history = made["optimization_history"].axes[0]
    assert history.get_ylabel() == "val_dice"
    importance = made["param_importances"]
    assert "val_dice" in importance.axes[0].get_xlabel()
    importance.canvas.draw()
    renderer = importance.canvas.get_renderer()
    for label in importance.axes[0].get_yticklabels():      # the parameter names are not clipped
        assert label.get_window_extent(renderer).x0 >= 0, label.get_text()
    for fig in made.values():
        assert png_size(fig)[0] >= MIN_PX


def test_study_figures_skip_a_study_without_completed_trials():
    import optuna

    assert list(figures.study_figures(optuna.create_study())) == []


# ------------------------------------------------------------------------------------- no curve PNGs

def test_no_training_curve_pngs_duplicate_mlflow_metric_charts():
    """The per-epoch metrics are MLflow metrics (step = epoch): the tasks draw no curve PNG of them."""
    from ichflow.tasks.classification import figures as cls_figures
    from ichflow.tasks.classification import train as cls_train
    from ichflow.tasks.detection import train as det_train
    from ichflow.tasks.recipe import TaskRecipe
    from ichflow.tasks.segmentation import train as seg_train

    assert not hasattr(cls_figures, "log_curves")
    for module in (cls_train, det_train, seg_train):
        source = inspect.getsource(module)
        assert "curves_figure" not in source and "log_curves" not in source and "training_curves" not in source
    assert det_train.DetectionRecipe.figures is TaskRecipe.figures
    assert seg_train.SegmentationRecipe.figures is TaskRecipe.figures
