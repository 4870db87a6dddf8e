"""Promotion rule for ich-detection (edit freely).

Decided on VALIDATION metrics only; the test split is reported on the version page and never decides.
"""

PRIMARY = "val_map50"
MARGIN = 0.005
GUARDS = {"val_slice_recall": 0.02}
FLOOR = {"val_map50": 0.30}           # below: registered, never aliased (e.g. a detector that boxes everything)
REPORT = ("test_map50", "test_map50_95", "test_slice_f1", "test_slice_recall")
