"""Search space of the classification study (edit freely). See tuning/segmentation.py for the fields."""

MONITOR = "val_roc_auc"
FIXED = {"epochs": 6, "patience": 3}


def suggest(trial):
    return {
        "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "aug_strength": trial.suggest_float("aug_strength", 0.0, 1.0),
        # weight of the positive (bleed) class in the loss; missing a bleed is the costly error
        "pos_weight": trial.suggest_float("pos_weight", 0.5, 8.0, log=True),
    }
