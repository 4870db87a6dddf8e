"""Metric names in MLflow: grouped by split, bookkeeping under info/, flat names back for code."""

import pytest

from ichflow.metric_names import flat_name, mlflow_key


@pytest.mark.parametrize("flat, key", [
    ("val_dice", "val/dice"), ("test_dice_ci_low", "test/dice_ci_low"), ("train_loss", "train/loss"),
    ("cv_IVH_roc_auc_sd", "cv/IVH_roc_auc_sd"), ("oof_macro_auc", "oof/macro_auc"),
    ("heldout_macro_auc", "heldout/macro_auc"), ("eval_dice", "eval/dice"),
    ("patients_train", "info/patients_train"), ("epochs_run", "info/epochs_run"), ("threshold", "info/threshold"),
    ("objective", "objective"), ("best_value", "best_value"), ("system/cpu_utilization_percentage",
                                                                "system/cpu_utilization_percentage"),
])
def test_names_map_both_ways(flat, key):
    assert mlflow_key(flat) == key
    assert flat_name(key) == flat


def test_a_run_logged_with_flat_names_reads_unchanged():
    assert flat_name("test_dice") == "test_dice" and flat_name("patients_train") == "patients_train"
