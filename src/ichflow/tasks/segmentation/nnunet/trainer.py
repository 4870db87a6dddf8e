"""nnU-Net's trainer with this project's budget and per-epoch MLflow metrics.

:class:`BudgetedTrainer` is ``nnUNetTrainer`` (its network, loss, augmentation, poly learning rate and
checkpoints: ``checkpoint_best.pth`` by EMA pseudo-Dice, ``checkpoint_final.pth``) with a schedule set from
the run's config instead of nnU-Net's 1000 x 250 iterations, and an ``on_epoch_end`` that logs the epoch into
the active MLflow run, calls the run's hook and applies the time budget. It is instantiated directly (nnU-Net's
lookup of trainers by class name is never used, neither here nor at inference).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ichflow.engine.budget import TimeBudget
from ichflow.metric_names import log_metrics


class StopTraining(Exception):
    """Raised after an epoch when the time budget says another one would overrun: nnU-Net's ``run_training``
    loops over a range fixed when it starts, so leaving it early takes an exception (or a copy of its loop)."""


class BudgetedTrainer(nnUNetTrainer):
    """``nnUNetTrainer`` plus :meth:`set_schedule`; the constructor is nnU-Net's (it records its own arguments
    for the checkpoints, so it must keep that signature)."""

    on_epoch: Callable[[int, dict], None] | None = None
    budget: TimeBudget | None = None

    def set_schedule(self, epochs: int, iterations_per_epoch: int, val_iterations_per_epoch: int,
                     time_budget_min: float = 0.0, on_epoch: Callable[[int, dict], None] | None = None) -> None:
        """Before :meth:`run_training`. ``on_epoch(epoch, metrics)`` runs after each epoch's metrics are logged
        (it may raise, e.g. ``optuna.TrialPruned``)."""
        self.num_epochs = epochs
        self.num_iterations_per_epoch = iterations_per_epoch
        self.num_val_iterations_per_epoch = val_iterations_per_epoch
        self.budget = TimeBudget(time_budget_min, epochs)
        self.on_epoch = on_epoch

    def on_train_start(self):
        super().on_train_start()
        if self.budget is not None:
            self.budget.start()   # planning, preprocessing and the data loaders' start are not epochs

    def on_epoch_end(self):
        epoch = self.current_epoch
        super().on_epoch_end()    # saves checkpoint_best on a new best EMA pseudo-Dice, then counts the epoch
        metrics = self.epoch_metrics(epoch)
        log_metrics(metrics, step=epoch)
        if self.on_epoch is not None:
            self.on_epoch(epoch, metrics)
        if self.budget is not None and self.budget.should_stop(epoch):
            raise StopTraining(f"time budget reached after epoch {epoch}")

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        """What nnU-Net's logger holds for ``epoch``: losses (Dice + CE on patches), pseudo-Dice of the val
        patches and its EMA (nnU-Net's checkpoint criterion), learning rate and epoch time."""
        keys = {"train_loss": "train_losses", "val_loss": "val_losses", "val_pseudo_dice": "mean_fg_dice",
                "val_pseudo_dice_ema": "ema_fg_dice", "lr": "lrs"}
        metrics = {name: float(self.logger.get_value(key, step=epoch)) for name, key in keys.items()}
        metrics["epoch_seconds"] = float(self.logger.get_value("epoch_end_timestamps", step=epoch) -
                                         self.logger.get_value("epoch_start_timestamps", step=epoch))
        return metrics

    def best_epoch(self) -> int:
        """The epoch of ``checkpoint_best.pth``: the first with the highest EMA pseudo-Dice."""
        return int(np.argmax(self.logger.get_value("ema_fg_dice", step=None)))

    def stop_data_loaders(self) -> None:
        """End the augmentation worker processes (nnU-Net does so only at the end of a complete training)."""
        for loader in (self.dataloader_train, self.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()
