"""The quality gate: degenerate-model checks on validation predictions, and a real model that learned nothing
never becoming @champion."""

import mlflow
import numpy as np
import pytest

from ichflow.engine.degenerate import box_reasons, mask_reasons, score_reasons
from ichflow.metric_names import run_metrics
from ichflow.tasks.spec import DEGENERATE_TAG


def test_constant_scores_and_one_sided_decisions_are_degenerate():
    truth = np.array([0, 1, 1, 0, 1])
    assert score_reasons(truth, np.full(5, 0.31), 0.5)[0].startswith("near-constant scores on 5 val slices")
    assert score_reasons(truth, np.full(5, 0.31), 0.3) == [
        "near-constant scores on 5 val slices (spread 0)", "every val slice called positive (2 negatives)"]
    assert score_reasons(truth, np.array([0.1, 0.2, 0.3, 0.15, 0.25]), 0.5) == [
        "every val slice called negative (3 positives)"]
    assert score_reasons(truth, np.array([0.1, 0.9, 0.8, 0.2, 0.7]), 0.5) == []
    assert score_reasons(np.ones(3), np.array([0.6, 0.7, 0.9]), 0.5) == []   # all positive data, all called: fine


def test_whole_image_boxes_and_empty_masks_are_degenerate():
    sizes = np.array([[512, 512]] * 3)
    assert box_reasons([[0, 0, 512, 512], [2, 1, 500, 511], [100, 100, 160, 150]], sizes) == [
        "2 of 3 val boxes cover >= 80% of the image"]
    assert box_reasons([[100, 100, 160, 150], [10, 10, 90, 80]], sizes[:2]) == []
    assert mask_reasons([0, 40, 12], [0, 0, 0], 512 * 512) == ["empty masks on all 3 val slices (2 have edema)"]
    assert mask_reasons([0, 40, 12], [0, 35, 0], 512 * 512) == []
    assert mask_reasons([0, 40], [200_000, 150_000], 512 * 512)[0].startswith("masks cover half the image")


@pytest.mark.slow
def test_a_segmentation_model_that_learned_nothing_is_tagged_and_never_champion(store, capfd):
    from ichflow.registry import PromoteConfig, run_promote
    from ichflow.tasks.segmentation import SegmentationConfig, train_segmentation

    # no learning (lr 1e-9) and a fixed high threshold: the untrained sigmoid (~0.5) never reaches 0.9
    res = train_segmentation(SegmentationConfig(epochs=1, steps_per_epoch=2, batch_size=4, patch_size=64,
                                                num_workers=0, lr=1e-9, threshold="0.9"))
    err = capfd.readouterr().err
    run = mlflow.MlflowClient().get_run(res["run_id"])
    assert run.data.tags[DEGENERATE_TAG].startswith("empty masks on all")
    assert res["degenerate"] == 1.0 and run_metrics(run)["degenerate"] == 1.0
    assert "WARNING [segmentation] degenerate model" in err
    decision = run_promote(PromoteConfig(task="segmentation", run_id=res["run_id"]))
    version = mlflow.MlflowClient().get_model_version("ich-segmentation", decision.candidate_version)
    assert decision.decision == "degenerate" and not decision.promoted and version.aliases == []
    assert version.tags["ichflow.decision"] == "degenerate"
    assert "**Decision: not promoted: degenerate model (no alias)**" in version.description
