"""Search space of the multilabel (subtype) study (edit freely). See tuning/segmentation.py.

pos_weight multipliers scale the prevalence-based BCE pos_weight of each class (IVH, IPH, SAH order of
the `classes` parameter).
"""

MONITOR = "val_macro_auc"
FIXED = {"epochs": 6, "patience": 3}


def suggest(trial):
    mult = [trial.suggest_float(f"pos_weight_mult_{c}", 0.25, 4.0, log=True) for c in ("IVH", "IPH", "SAH")]
    return {
        "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "aug_strength": trial.suggest_float("aug_strength", 0.0, 1.0),
        "pos_weight_multipliers": ",".join(f"{m:.4g}" for m in mult),
    }
