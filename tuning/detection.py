"""Search space of the detection study (edit freely). See tuning/segmentation.py for the fields.

The YOLO confidence threshold needs no retraining: each trial trains once and the threshold that
maximises slice-level F1 on that trial's validation predictions is recorded (user attr
best_conf_threshold) and used by the refit of the best trial.

Trials must be long enough to learn: YOLO from scratch found nothing in 5-8 epoch trials (every trial of
reports/tuning_synthetic.md scored 0), while 16 epochs without mosaic learn the phantom (the main job's
QUICK schedule). AdamW above ~1e-2 diverges from scratch.
"""

MONITOR = "val_map50"
FIXED = {"epochs": 16, "patience": 16, "mosaic": 0.0}


def suggest(trial):
    return {
        "lr": trial.suggest_float("lr", 5e-4, 1e-2, log=True),
        "aug_strength": trial.suggest_float("aug_strength", 0.0, 1.0),
    }
