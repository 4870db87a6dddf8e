"""The fit loop every torch task uses.

One epoch = a pass over the train loader (or ``steps_per_epoch`` batches of it), then ``evaluate(model)``
on the validation split. Per-epoch metrics go to MLflow with ``step=epoch``; the best checkpoint (by
``monitor``) is kept on disk and restored at the end; training stops early after ``patience`` epochs
without improvement, or when the :class:`~ichflow.engine.budget.TimeBudget` says one more epoch would overrun
(``FitResult.stopped_by_time_budget``). However the loop ends (a signal included), the best checkpoint is
restored; it is written to a temporary file and renamed, so an interruption never leaves half a checkpoint.
``on_epoch_end(epoch, metrics)`` is the hook Optuna pruning uses (it may raise ``optuna.TrialPruned``; the loop
lets it through after restoring the best checkpoint). Each epoch ends with one line on stderr (:func:`epoch_line`);
the batch progress bar is drawn on a terminal only.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import mlflow
import torch

from ichflow.engine.budget import TimeBudget
from ichflow.engine.device import autocast
from ichflow.engine.progress import progress
from ichflow.metric_names import log_metrics


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    stopped_early: bool = False
    stopped_by_time_budget: bool = False
    checkpoint: str = ""


def default_loss(loss_fn: Callable) -> Callable:
    def compute(model, batch, device):
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        return loss_fn(out.float(), y), x.shape[0]
    return compute


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it exists (CPU, CUDA): one kernel over all parameters instead of a
    Python loop per tensor (reports/BENCHMARKS.md)."""
    params = list(model.parameters())
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: ``path`` is the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        torch.save(state, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def epoch_line(metrics: dict, monitor: str, best: bool, seconds: float) -> str:
    """``epoch 3: train_loss 0.4123, val_dice 0.5120 (best), 41 s``."""
    return (f"epoch {metrics['epoch']}: train_loss {metrics['train_loss']:.4f}, {monitor} {metrics[monitor]:.4f}"
            f"{' (best)' if best else ''}, {seconds:.0f} s")


class Trainer:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, compute_loss: Callable,
                 device: torch.device, amp_dtype: torch.dtype | None = None, scheduler=None,
                 grad_clip: float | None = 1.0, log_to_mlflow: bool = True, progress: bool = True):
        self.model = model
        self.optimizer = optimizer
        self.compute_loss = compute_loss  # (model, batch, device) -> (loss tensor, batch size)
        self.device = device
        self.amp_dtype = amp_dtype
        self.scheduler = scheduler  # stepped once per optimizer step
        self.grad_clip = grad_clip
        self.log_to_mlflow = log_to_mlflow and mlflow.active_run() is not None
        self.progress = progress
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def train_epoch(self, loader: Iterable, epoch: int, steps: int | None = None) -> dict:
        self.model.train()
        total, count, n_steps = 0.0, 0, 0
        limit = steps if steps else len(loader)
        bar = progress(total=limit, desc=f"epoch {epoch}", leave=False, disable=not self.progress, unit="batch")
        with bar:  # closed on an exception (a signal) too: the error line does not land on a half-drawn bar
            t0 = time.perf_counter()
            while n_steps < limit:
                for batch in loader:
                    with autocast(self.device, self.amp_dtype):
                        loss, bs = self.compute_loss(self.model, batch, self.device)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite training loss at epoch {epoch} step {n_steps}; "
                                                 "lower the learning rate")
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scaler.scale(loss).backward()
                    if self.grad_clip:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    if self.scheduler is not None:
                        self.scheduler.step()
                    total += loss.item() * bs
                    count += bs
                    n_steps += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{total / count:.4f}")
                    if n_steps >= limit:
                        break
        secs = time.perf_counter() - t0
        return {"train_loss": total / max(count, 1), "train_images_per_s": count / max(secs, 1e-9),
                "epoch_seconds": secs}

    def fit(self, train_loader, evaluate: Callable[[torch.nn.Module], dict], max_epochs: int, monitor: str,
            mode: str = "max", patience: int = 10, checkpoint: str | Path | None = None,
            steps_per_epoch: int | None = None, on_epoch_end: Callable[[int, dict], None] | None = None,
            budget: TimeBudget | None = None) -> FitResult:
        sign = 1.0 if mode == "max" else -1.0
        best, best_epoch, history = -math.inf, -1, []
        checkpoint = Path(checkpoint) if checkpoint else None
        t_start = time.perf_counter()
        if budget is not None:
            budget.start()
        stopped = False
        try:
            for epoch in range(max_epochs):
                t_epoch = time.perf_counter()
                metrics = {"epoch": epoch, **self.train_epoch(train_loader, epoch, steps_per_epoch)}
                metrics.update(evaluate(self.model))
                metrics["lr"] = self.optimizer.param_groups[0]["lr"]
                history.append(metrics)
                if self.log_to_mlflow:
                    log_metrics({k: float(v) for k, v in metrics.items() if k != "epoch"}, step=epoch)
                if monitor not in metrics:
                    raise KeyError(f"evaluate() returned no {monitor!r} to monitor; it returned {sorted(metrics)}")
                improved = sign * metrics[monitor] > best
                if improved:
                    best, best_epoch = sign * metrics[monitor], epoch
                    if checkpoint:
                        save_atomically(self.model.state_dict(), checkpoint)
                print(epoch_line(metrics, monitor, improved, time.perf_counter() - t_epoch), file=sys.stderr, flush=True)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, metrics)
                if epoch - best_epoch >= patience:
                    stopped = True
                    break
                if budget is not None and budget.should_stop(epoch):
                    break
        finally:
            if checkpoint and checkpoint.exists():
                self.model.load_state_dict(torch.load(checkpoint, map_location=self.device, weights_only=True))
        return FitResult(best_epoch=best_epoch, best_score=sign * best, epochs_run=len(history), history=history,
                         train_seconds=time.perf_counter() - t_start, stopped_early=stopped,
                         stopped_by_time_budget=bool(budget and budget.reached), checkpoint=str(checkpoint or ""))
