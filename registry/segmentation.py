"""Promotion rule for ich-segmentation (edit freely). Metrics are the candidate run's test metrics."""

PRIMARY = "test_dice"          # per-patient mean Dice on the test split
MARGIN = 0.005                 # the candidate must beat the champion by at least this much
GUARDS = {"test_sensitivity": 0.02}   # may not drop by more than this (under-segmenting the rim)
