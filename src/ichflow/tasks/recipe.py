"""The one recipe every task runs; a task brings hooks, not the outline.

:meth:`TaskRecipe.run` is the outline (``run_task`` for short)::

    preset -> validate -> seed -> tracked run -> prepare (+ log data) -> setup (data, model)
    -> fit (on the engine) -> select on val (threshold, final model) -> report each split
    -> figures -> export (log + register the model) -> run description -> TaskResult (+ one summary block on stdout)

A task subclasses :class:`TaskRecipe` and overrides the hooks (``setup``, ``fit``, ``select``, ``report``,
``export``; optionally ``validate``, ``prepare``, ``figures``, ``summary_lines``). The test split is reported
only when ``cfg.evaluate_test`` (False inside tuning trials: no test touch, no model logged).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from ichflow.engine.device import resolve_device, seed_everything
from ichflow.engine.stats import finite
from ichflow.engine.trainer import FitResult
from ichflow.metric_names import log_metrics
from ichflow.model_pages import run_description
from ichflow.prepare import DATASETS, Prepared, log_prepared, prepare_data, validate_data_config
from ichflow.tasks.common import apply_preset, log_config, log_preset_values, validate_train_config
from ichflow.tasks.spec import DEGENERATE_TAG, TaskSpec
from ichflow.tracking import task_run

FIXED_KEYS = ("run_id", "objective_name", "objective", "best_epoch", "epochs_run", "train_seconds",
              "wall_seconds", "model_uri", "model_version")


@dataclass
class TaskResult(Mapping):
    """What every task returns: the same fixed fields for all tasks, plus the task's metrics by name.

    It reads like the metrics dict (``result["test_dice"]``, ``result.get("model_version")``); the fixed
    fields are attributes too. ``model_version`` is an int (None when no version was registered).
    """

    run_id: str
    objective_name: str
    objective: float
    best_epoch: int
    epochs_run: int
    train_seconds: float
    wall_seconds: float = 0.0
    model_uri: str = ""
    model_version: int | None = None
    metrics: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        fixed = {k: getattr(self, k) for k in FIXED_KEYS}
        if not self.model_uri:
            fixed.pop("model_uri")
        if self.model_version is None:
            fixed.pop("model_version")
        return {**self.metrics, **fixed}

    def __getitem__(self, key):
        if key not in FIXED_KEYS:
            return self.metrics[key]
        value = getattr(self, key)
        if value in ("", None):   # no model logged / registered: absent, as in as_dict()
            raise KeyError(key)
        return value

    def __iter__(self):
        return iter(self.as_dict())

    def __len__(self):
        return len(self.as_dict())


class TaskRecipe:
    """Base of every task's recipe: owns the outline; subclasses fill in the hooks."""

    spec: TaskSpec
    presets: dict[str, dict] = {}
    datasets: tuple[str, ...] = DATASETS   # values the ``dataset`` parameter may take

    def __init__(self):
        self.device = None
        self.prep: Prepared | None = None

    # ---------------------------------------------------------------------------------------- the outline
    def checked(self, cfg):
        """The config with its preset applied and every parameter checked (ParameterError); no work done."""
        cfg = self.resolve(apply_preset(cfg, self.presets))
        self.validate(cfg)      # the task's own checks first: its messages are the more specific ones
        validate_data_config(cfg, self.datasets)
        validate_train_config(cfg)
        return cfg

    def run(self, cfg, on_epoch_end=None) -> TaskResult:
        cfg = self.checked(cfg)
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device)
        t_wall = time.perf_counter()
        with task_run(self.spec.name, run_name=self.run_name(cfg), tags={"ichflow.target": self.spec.target},
                      log_system_metrics=True) as run:
            log_config(cfg)
            log_preset_values(cfg, self.presets)
            self.prep = self.prepare(cfg)
            log_prepared(self.prep, target=self.label_column(cfg))
            self.setup(cfg)
            fit = self.fit(cfg, on_epoch_end)
            metrics = {"stopped_early": float(fit.stopped_early),
                       "stopped_by_time_budget": float(fit.stopped_by_time_budget)}
            metrics.update(self.select(cfg, fit))
            step = fit.epochs_run  # final values one step after the per-epoch ones: the selected model
            for split in ("val", "test") if cfg.evaluate_test else ("val",):
                metrics.update(self.report(cfg, split, step))
            metrics["degenerate"] = float(self._flag_degenerate(self.degenerate_reasons(cfg)))
            self.figures(cfg, fit)
            objective = float(metrics.get(self.spec.objective, float("nan")))
            result = TaskResult(run.info.run_id, self.spec.objective, objective, fit.best_epoch, fit.epochs_run,
                                fit.train_seconds, metrics=metrics)
            if cfg.evaluate_test:
                info = self.export(cfg)
                if info is not None:
                    result.model_uri = info.model_uri
                    if info.registered_model_version is not None:
                        result.model_version = int(info.registered_model_version)
                        mlflow.set_tag("ichflow.registered_model",
                                       f"{self.spec.registered_name}/{result.model_version}")
            result.wall_seconds = time.perf_counter() - t_wall
            mlflow.set_tag(MLFLOW_RUN_NOTE, run_description(self.spec, metrics, self.prep, result.model_version))
            log_metrics(finite({k: getattr(result, k) for k in ("objective", "best_epoch", "epochs_run",
                                                                       "train_seconds", "wall_seconds")}
                                      | {k: metrics[k] for k in ("stopped_early", "stopped_by_time_budget", "degenerate")}))
        print("\n".join(self.summary(cfg, result)))
        return result

    def _flag_degenerate(self, reasons: list[str]) -> bool:
        """Tag the run and warn at once: a model that learned nothing must not look like a result."""
        if not reasons:
            return False
        text = "; ".join(reasons)
        mlflow.set_tag(DEGENERATE_TAG, text[:5000])
        print(f"WARNING [{self.spec.name}] degenerate model (it will not be promoted): {text}", file=sys.stderr)
        return True

    # ------------------------------------------------------------------------------------------- the hooks
    def resolve(self, cfg):
        """The config with values that mean "pick for me" resolved (after the preset, before validation)."""
        return cfg

    def validate(self, cfg) -> None:
        """Raise :class:`~ichflow.errors.ParameterError` for a bad parameter, before any work."""

    def run_name(self, cfg) -> str:
        """``<task>-<model>`` (``-<k>fold`` added when the task cross-validates), e.g. ``classification-resnet18``."""
        model = Path(str(getattr(cfg, "model", "") or "")).stem
        folds = f"-{cfg.n_folds}fold" if self.spec.cross_validated else ""
        return f"{self.spec.name}-{model}{folds}" if model else self.spec.name

    def label_column(self, cfg) -> str:
        return self.spec.label_column

    def prepare(self, cfg) -> Prepared:
        return prepare_data(cfg)

    def setup(self, cfg) -> None:
        """Build data and model from ``self.prep`` (on ``self.device``)."""
        raise NotImplementedError

    def fit(self, cfg, on_epoch_end) -> FitResult:
        raise NotImplementedError

    def select(self, cfg, fit: FitResult) -> dict:
        """Choices made on validation (threshold, final model); returns them as metrics to report."""
        return {}

    def report(self, cfg, split: str, step: int) -> dict:
        """Evaluate ``split`` with the selected model: log eval/<split>_*, figures/<split>_*; return metrics."""
        raise NotImplementedError

    def degenerate_reasons(self, cfg) -> list[str]:
        """Why the selected model's validation predictions show it learned nothing (engine.degenerate); []."""
        return []

    def figures(self, cfg, fit: FitResult) -> None:
        """Figures about the training as a whole (the per-split ones belong to ``report``)."""

    def export(self, cfg):
        """Log (and register, when ``cfg.register``) the model; MLflow's ModelInfo."""
        return None

    def summary(self, cfg, result: TaskResult) -> list[str]:
        """The block printed at the end: headline per split, the task's own lines, the model, the run."""
        lines = [f"[{self.spec.name}] best epoch {result.best_epoch} of {result.epochs_run}, train "
                 f"{result.train_seconds:.0f} s, wall {result.wall_seconds:.0f} s, run {result.run_id}"]
        for split in ("val", "test"):
            shown = [headline_text(result.metrics, f"{split}_{k}") for k in self.spec.headline]
            shown = [s for s in shown if s]
            if shown:
                lines.append(f"  {split}: " + ", ".join(shown))
        lines += [f"  {line}" for line in self.summary_lines(cfg, result)]
        if result.model_version is not None:
            lines.append(f"  registered {self.spec.registered_name} version {result.model_version} "
                         f"({result.model_uri})")
        return lines

    def summary_lines(self, cfg, result: TaskResult) -> list[str]:
        return []


def run_task(recipe_cls: type[TaskRecipe], cfg, on_epoch_end=None) -> TaskResult:
    return recipe_cls().run(cfg, on_epoch_end)


def headline_text(metrics: dict, key: str, name: str | None = None) -> str:
    """``dice 0.512 [0.401, 0.598]`` for a metric with optional ``_ci_low``/``_ci_high``; '' when absent."""
    if key not in metrics:
        return ""
    value = metrics[key]
    name = name or key.split("_", 1)[1]
    if value is None or not isinstance(value, (int, float)) or value != value:
        return f"{name} n/a"
    lo, hi = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    ci = f" [{lo:.3f}, {hi:.3f}]" if isinstance(lo, float) and isinstance(hi, float) and lo == lo and hi == hi else ""
    return f"{name} {value:.3f}{ci}"

