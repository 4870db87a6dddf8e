"""``predict`` glue: the subtype model answers per slice like the bleed classifier."""

from ichflow.tasks.classification.predict import TABLE, predict_scan  # noqa: F401
