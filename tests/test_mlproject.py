"""MLproject's parameter defaults are the config dataclasses' defaults.

`mlflow run` passes every MLproject default on the command line, and a preset fills only the fields
still at their dataclass default: a drifted MLproject default silently changes what runs and disables
the preset for that field.
"""

import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml

from ichflow.tasks.spec import TASKS

MLPROJECT = yaml.safe_load((Path(__file__).resolve().parents[1] / "MLproject").read_text())
OTHER_ENTRIES = {
    "prepare": ("ichflow.prepare", "DataConfig"),
    "tune": ("ichflow.tuning", "TuneConfig"),
    "evaluate": ("ichflow.evaluation", "EvaluateConfig"),
    "predict": ("ichflow.serving", "PredictConfig"),
    "promote": ("ichflow.registry", "PromoteConfig"),
    "history": ("ichflow.registry", "HistoryConfig"),
    "main": ("ichflow.pipeline", "PipelineConfig"),
}


def _config_class(entry: str):
    if entry in TASKS:
        return TASKS[entry].config_class()
    module, name = OTHER_ENTRIES[entry]
    return getattr(importlib.import_module(module), name)


def _same(mlproject_default, value) -> bool:
    if isinstance(value, bool):
        return str(mlproject_default).lower() == str(value).lower()
    if isinstance(value, (int, float)):
        return float(mlproject_default) == float(value)
    return str(mlproject_default if mlproject_default is not None else "") == str(value)


def test_every_entry_point_is_checked():
    assert set(MLPROJECT["entry_points"]) == set(TASKS) | set(OTHER_ENTRIES)


@pytest.mark.parametrize("entry", sorted(set(TASKS) | set(OTHER_ENTRIES)))
def test_entry_point_defaults_match_the_config(entry):
    cls = _config_class(entry)
    params = MLPROJECT["entry_points"][entry]["parameters"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(params) <= set(fields), f"{entry}: MLproject params without a config field"
    drift = {k: (spec.get("default"), fields[k].default) for k, spec in params.items()
             if not _same(spec.get("default"), fields[k].default)}
    assert not drift, f"{entry}: MLproject default vs dataclass default: {drift}"
