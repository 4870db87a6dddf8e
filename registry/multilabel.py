"""Promotion rule for ich-subtypes (edit freely)."""

PRIMARY = "test_macro_auc"
MARGIN = 0.005
GUARDS = {"test_macro_f1": 0.02}
