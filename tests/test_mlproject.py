"""MLproject's parameter defaults agree with the config dataclasses, and a -P value always beats a preset.

`mlflow run` passes every MLproject default on the command line, and every value on the command line counts
as given. So a parameter some preset sets has the default "" (not given: the preset's value, else the
dataclass default); every other default is the dataclass default, or the entry point would silently run
with another value than `python pipelines/<entry>.py`.
"""

import dataclasses
import importlib
import shlex
from pathlib import Path

import pytest
import yaml
from mlflow.projects._project_spec import load_project

from ichflow.cli import parse_config
from ichflow.entrypoints import ENTRY_POINTS
from ichflow.tasks.spec import TASKS

REPO = Path(__file__).resolve().parents[1]
MLPROJECT = yaml.safe_load((REPO / "MLproject").read_text())


def _same(mlproject_default, value) -> bool:
    if isinstance(value, bool):
        return str(mlproject_default).lower() == str(value).lower()
    if isinstance(value, (int, float)):
        return float(mlproject_default) == float(value)
    return str(mlproject_default if mlproject_default is not None else "") == str(value)


def _preset_keys(entry: str) -> set[str]:
    if entry not in TASKS:
        return set()
    presets = importlib.import_module(f"{TASKS[entry].package}.config").PRESETS
    return set().union(*presets.values())


def test_every_entry_point_is_checked():
    assert set(MLPROJECT["entry_points"]) == set(ENTRY_POINTS)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_entry_point_defaults_match_the_config(entry):
    cls = ENTRY_POINTS[entry].config_class()
    params = MLPROJECT["entry_points"][entry]["parameters"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(params) <= set(fields), f"{entry}: MLproject params without a config field"
    preset_keys = _preset_keys(entry)
    expected = {k: "" if k in preset_keys else fields[k].default for k in params}
    drift = {k: (spec.get("default"), expected[k]) for k, spec in params.items()
             if not _same(spec.get("default"), expected[k])}
    assert not drift, f"{entry}: MLproject default vs expected ('' where a preset sets it): {drift}"


def _mlflow_run_config(entry: str, user_params: dict):
    """The config `mlflow run . -e <entry> -P ...` starts with: MLflow's own rendering of the command."""
    command = load_project(str(REPO)).get_entry_point(entry).compute_command(user_params, None)
    argv = shlex.split(command)
    assert argv[:2] == ["python", f"pipelines/{entry}.py"]
    return parse_config(ENTRY_POINTS[entry].config_class(), argv[2:])


def _checked(entry: str, cfg):
    recipe = importlib.import_module(f"{TASKS[entry].package}.train")
    recipe_cls = next(v for v in vars(recipe).values()
                      if isinstance(v, type) and getattr(v, "spec", None) is TASKS[entry])
    return recipe_cls().checked(cfg)


def test_mlflow_run_with_a_preset_gets_the_preset_values():
    cfg = _checked("segmentation", _mlflow_run_config("segmentation", {"preset": "phe"}))
    assert (cfg.dataset, cfg.epochs, cfg.steps_per_epoch, cfg.time_budget_min) == ("phe", 6, 400, 30.0)
    plain = _checked("segmentation", _mlflow_run_config("segmentation", {}))
    assert (plain.dataset, plain.epochs, plain.time_budget_min) == ("auto", 8, 0.0)


def test_a_p_value_beats_the_preset_even_at_the_dataclass_default():
    cfg = _checked("segmentation", _mlflow_run_config("segmentation", {"preset": "phe", "time_budget_min": 0,
                                                                       "epochs": 8}))
    assert (cfg.time_budget_min, cfg.epochs, cfg.steps_per_epoch) == (0.0, 8, 400)
    cfg = _checked("classification", _mlflow_run_config("classification", {"preset": "phe", "model": "resnet18",
                                                                           "pretrained": "none"}))
    assert (cfg.model, cfg.pretrained, cfg.dataset, cfg.steps_per_epoch) == ("resnet18", "none", "phe", 100)
