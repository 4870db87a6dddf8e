"""Promotion rule for ich-detection (edit freely)."""

PRIMARY = "test_map50"
MARGIN = 0.005
GUARDS = {"test_slice_recall": 0.02}
