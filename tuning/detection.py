"""Search space of the detection study (edit freely). See tuning/segmentation.py for the fields.

The YOLO confidence threshold needs no retraining: each trial trains once and the threshold that
maximises slice-level F1 on that trial's validation predictions is recorded (user attr
best_conf_threshold) and used by the refit of the best trial.
"""

MONITOR = "val_map50"
FIXED = {"epochs": 8}


def suggest(trial):
    return {
        "lr": trial.suggest_float("lr", 1e-4, 2e-2, log=True),
        "aug_strength": trial.suggest_float("aug_strength", 0.0, 1.0),
    }
