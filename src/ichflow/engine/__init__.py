"""Task-agnostic training engine: device/AMP, seeding, slice cache, augmentation, fit loop, stats, figures.

Per-task code (``ichflow.tasks.<task>``) brings the model, the loss and the evaluation; the engine brings
everything else, so every task trains, checkpoints, stops early and logs to MLflow the same way.
"""
