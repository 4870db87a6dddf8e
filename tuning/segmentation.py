"""Search space of the segmentation study (edit freely: one suggest_* call per dimension).

MONITOR: the per-epoch validation metric the pruner sees (the task's objective, higher is better).
FIXED: settings every trial shares (short schedules keep a study affordable; the refit of the best
trial uses them too, so raise `epochs` here for a longer final model).
"""

MONITOR = "val_dice"
FIXED = {"epochs": 6, "patience": 3}


def suggest(trial):
    return {
        "lr": trial.suggest_float("lr", 3e-4, 5e-3, log=True),
        "aug_strength": trial.suggest_float("aug_strength", 0.0, 1.0),
        "fg_fraction": trial.suggest_float("fg_fraction", 0.3, 0.8),
        "loss": trial.suggest_categorical("loss", ["dice+bce", "dice+focal", "tversky+bce"]),
        "in_channels": trial.suggest_categorical("in_channels", [3, 5]),   # 2.5D context: 1 or 2 slices each side
    }
