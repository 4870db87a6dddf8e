"""The engine's fit loop: early stopping, best-checkpoint restore, the time budget, and hook errors.

A real (tiny) torch model trained by the real Trainer; the validation score per epoch is scripted so each
test knows which epoch is best.
"""

import io
import sys
import time

import pytest
import torch

from ichflow.engine.budget import TimeBudget
from ichflow.engine.schedule import warmup_cosine
from ichflow.engine.trainer import Trainer, adamw, default_loss


class Scripted:
    """evaluate(): returns the next scripted score and remembers the model's weights at each epoch."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.weights = []

    def __call__(self, model):
        self.weights.append(model.weight.detach().clone())
        return {"val_score": self.scores[len(self.weights) - 1]}


def _trainer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = adamw(model, lr=0.1, weight_decay=0.0)
    loss = default_loss(torch.nn.MSELoss())
    return model, Trainer(model, opt, loss, torch.device("cpu"), log_to_mlflow=False, progress=False)


def _loader():
    x = torch.randn(16, 4)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def test_patience_stops_and_the_best_epoch_is_restored(tmp_path):
    model, trainer = _trainer()
    ev = Scripted([0.1, 0.5, 0.3, 0.2, 0.9, 0.95])
    fit = trainer.fit(_loader(), ev, max_epochs=6, monitor="val_score", patience=2, checkpoint=tmp_path / "b.pt")
    assert (fit.best_epoch, fit.epochs_run, fit.stopped_early) == (1, 4, True)
    assert fit.best_score == pytest.approx(0.5)
    # weights after the loop are those evaluated at epoch 1, not the last epoch's
    assert torch.equal(model.weight.detach(), ev.weights[1])
    assert not torch.equal(ev.weights[1], ev.weights[3])


def test_min_mode_keeps_the_lowest(tmp_path):
    _, trainer = _trainer()
    fit = trainer.fit(_loader(), Scripted([3.0, 1.0, 2.0]), max_epochs=3, monitor="val_score", mode="min",
                      patience=5, checkpoint=tmp_path / "b.pt")
    assert fit.best_epoch == 1 and fit.best_score == pytest.approx(1.0) and not fit.stopped_early


def test_time_budget_stops_by_flag_and_restores_the_best(tmp_path):
    model, trainer = _trainer()
    ev = Scripted([0.9, 0.1, 0.1, 0.1])

    def slow_evaluate(m):
        time.sleep(0.3)
        return ev(m)

    budget = TimeBudget(minutes=0.9 / 60, max_epochs=4)   # 0.9 s: two 0.3 s epochs fit, a third would not
    fit = trainer.fit(_loader(), slow_evaluate, max_epochs=4, monitor="val_score", patience=10,
                      checkpoint=tmp_path / "b.pt", budget=budget)
    assert fit.stopped_by_time_budget and budget.reached and not fit.stopped_early
    assert 1 <= fit.epochs_run < 4
    assert torch.equal(model.weight.detach(), ev.weights[0])


def test_budget_never_cuts_the_last_epoch_and_zero_means_none():
    assert not TimeBudget(1e-9, max_epochs=1).should_stop(0)
    unlimited = TimeBudget(0, max_epochs=100)
    time.sleep(0.01)
    assert not unlimited.should_stop(0) and not unlimited.reached


def test_a_hook_error_propagates_after_restoring_the_best_checkpoint(tmp_path):
    model, trainer = _trainer()
    ev = Scripted([0.8, 0.2, 0.1])

    class Pruned(Exception):
        pass

    def hook(epoch, metrics):
        if epoch == 1:
            raise Pruned

    with pytest.raises(Pruned):
        trainer.fit(_loader(), ev, max_epochs=3, monitor="val_score", patience=5, checkpoint=tmp_path / "b.pt",
                    on_epoch_end=hook)
    assert torch.equal(model.weight.detach(), ev.weights[0])


def test_a_missing_monitored_metric_is_named():
    _, trainer = _trainer()
    with pytest.raises(KeyError, match="no 'val_dice' to monitor"):
        trainer.fit(_loader(), Scripted([0.5]), max_epochs=1, monitor="val_dice")


def test_warmup_cosine_rises_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup_fraction=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0) and lrs.index(1.0) == 9
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _fit_with_bars(stderr, monkeypatch) -> str:
    monkeypatch.setattr(sys, "stderr", stderr)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    trainer = Trainer(model, adamw(model, lr=0.1, weight_decay=0.0), default_loss(torch.nn.MSELoss()),
                      torch.device("cpu"), log_to_mlflow=False, progress=True)
    trainer.fit(_loader(), Scripted([0.1, 0.5, 0.3]), max_epochs=3, monitor="val_score", patience=5)
    return stderr.getvalue()


def test_without_a_terminal_no_bar_is_drawn_and_each_epoch_is_one_line(monkeypatch):
    err = _fit_with_bars(io.StringIO(), monkeypatch)
    assert "\r" not in err and "it/s" not in err and "batch/s" not in err
    lines = err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 0", "epoch 1", "epoch 2"]
    assert lines[1].startswith("epoch 1: train_loss ") and "val_score 0.5000 (best)" in lines[1]
    assert "(best)" not in lines[2] and lines[2].endswith(" s")


def test_on_a_terminal_the_bar_is_drawn_and_the_epoch_lines_stay(monkeypatch):
    err = _fit_with_bars(_Terminal(), monkeypatch)
    assert "\r" in err and "batch/s" in err
    assert len([line for line in err.replace("\r", "\n").splitlines() if "train_loss" in line]) == 3
