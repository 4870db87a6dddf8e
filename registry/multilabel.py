"""Promotion rule for ich-subtypes (edit freely).

Decided on OUT-OF-FOLD metrics (every cross-validated patient scored once by the fold model that did not train
on it, pooled); the held-out-fold means (test_*) are reported on the version page.
"""

PRIMARY = "oof_macro_auc"
MARGIN = 0.005
GUARDS = {"oof_macro_f1": 0.02}
FLOOR = {"oof_macro_auc": 0.60}       # below: registered, never aliased
REPORT = ("test_macro_auc", "test_macro_f1", "test_micro_f1")
