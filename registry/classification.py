"""Promotion rule for ich-classification (edit freely)."""

PRIMARY = "test_f1"
MARGIN = 0.005
GUARDS = {"test_recall": 0.01}   # missing a bleed is the costly error: recall may barely move
