"""Promotion rule for ich-classification (edit freely).

Decided on VALIDATION metrics only; the test split is reported on the version page and never decides.
ROC-AUC is threshold-free: each candidate's threshold was itself chosen on validation.
"""

PRIMARY = "val_roc_auc"
MARGIN = 0.005
GUARDS = {"val_recall": 0.02}         # missing a bleed is the costly error: recall may barely move
FLOOR = {"val_roc_auc": 0.60}         # below: registered, never aliased
REPORT = ("test_f1", "test_recall", "test_precision", "test_roc_auc", "test_patient_f1")
