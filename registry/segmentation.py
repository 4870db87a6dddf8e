"""Promotion rule for ich-segmentation (edit freely).

Decided on VALIDATION metrics only (per-patient 3D Dice of the edema, on the candidate's val patients); the
test split is reported on the version page and never decides.
"""

PRIMARY = "val_dice"                  # per-patient mean Dice on validation
MARGIN = 0.005                        # the candidate must beat the champion by at least this much
GUARDS = {"val_sensitivity": 0.02}    # may not drop by more than this (under-segmenting the rim)
FLOOR = {"val_dice": 0.20}            # below: registered, never aliased (a model that learned nothing)
REPORT = ("test_dice", "test_dice_median", "test_dice_pooled", "test_sensitivity", "test_slice_f1")
