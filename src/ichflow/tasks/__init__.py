"""Per-task parts (model, loss, evaluation, pyfunc) over the shared engine: one subpackage per task."""
