"""The command line: a value given always beats a preset, ``--help`` is real and light, ``ichflow <entry>``.

Nothing here trains: a config goes through its recipe's preset + resolve (and checks), no further.
"""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ichflow.cli import build_parser, field_comments, given_fields, mark_given, parse_config
from ichflow.entrypoints import ENTRY_POINTS, main
from ichflow.tasks.classification import PRESETS as CLASSIFICATION_PRESETS
from ichflow.tasks.classification import ClassificationConfig
from ichflow.tasks.common import apply_preset
from ichflow.tasks.segmentation import PRESETS as SEGMENTATION_PRESETS
from ichflow.tasks.segmentation import SegmentationConfig

REPO = Path(__file__).resolve().parents[1]


def _resolved(recipe_cls, cfg):
    recipe = recipe_cls()
    return recipe.resolve(apply_preset(cfg, recipe.presets))


def test_a_given_model_beats_the_preset():
    from ichflow.tasks.classification.train import ClassificationRecipe

    cfg = _resolved(ClassificationRecipe, parse_config(ClassificationConfig, ["--preset", "phe", "--model", "resnet18"]))
    assert cfg.model == "resnet18"
    assert cfg.steps_per_epoch == CLASSIFICATION_PRESETS["phe"]["steps_per_epoch"]   # what was not given: preset


def test_a_given_number_equal_to_the_default_beats_the_preset():
    from ichflow.tasks.segmentation.train import SegmentationRecipe

    argv = ["--preset", "phe", "--time_budget_min", "0", "--epochs", str(SegmentationConfig.epochs)]
    cfg = SegmentationRecipe().checked(parse_config(SegmentationConfig, argv))
    assert (cfg.time_budget_min, cfg.epochs) == (0.0, SegmentationConfig.epochs)
    assert cfg.steps_per_epoch == SEGMENTATION_PRESETS["phe"]["steps_per_epoch"] and cfg.dataset == "phe"


def test_an_empty_value_is_not_given():
    cfg = parse_config(SegmentationConfig, ["--preset", "phe", "--epochs", "", "--dataset", "", "--register", ""])
    assert given_fields(cfg) == {"preset"}
    assert (cfg.epochs, cfg.dataset, cfg.register) == (SegmentationConfig.epochs, "auto", True)
    assert apply_preset(cfg, SEGMENTATION_PRESETS).epochs == SEGMENTATION_PRESETS["phe"]["epochs"]


def test_a_config_built_in_python_gives_what_differs_from_the_defaults():
    cfg = SegmentationConfig(preset="phe", epochs=2)
    assert given_fields(cfg) == {"preset", "epochs"}
    assert given_fields(mark_given(SegmentationConfig(preset="phe"), ["preset", "epochs"])) == {"preset", "epochs"}
    assert apply_preset(mark_given(SegmentationConfig(preset="phe"), ["preset", "epochs"]),
                        SEGMENTATION_PRESETS).epochs == SegmentationConfig.epochs


def test_field_comments_read_trailing_continued_and_above_comments():
    @dataclasses.dataclass
    class Example:
        plain: int = 1            # trailing
        continued: str = "a"      # first part,
        #                           second part
        # above the field
        above: float = 0.5
        bare: bool = True

    assert field_comments(Example) == {"plain": "trailing", "continued": "first part, second part",
                                       "above": "above the field"}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_field_has_help(entry):
    cls = ENTRY_POINTS[entry].config_class()
    comments = field_comments(cls)
    assert not [f.name for f in dataclasses.fields(cls) if not comments.get(f.name)], f"{entry}: fields without help"
    shown = {a.dest: a.help for a in build_parser(cls)._actions if a.help != "==SUPPRESS=="}
    assert set(shown) == {f.name for f in dataclasses.fields(cls)} | {"help"}


HELP_PROBE = """
import json, sys
from ichflow.entrypoints import main
try:
    main([sys.argv[1], "--help"])
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "mlflow") if m in sys.modules)}))
"""


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_help_exits_0_lists_every_field_and_imports_neither_torch_nor_mlflow(entry):
    done = subprocess.run([sys.executable, "-c", HELP_PROBE, entry], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    text, result = done.stdout.rsplit("\n", 2)[0], json.loads(done.stdout.splitlines()[-1])
    assert result["code"] == 0, done.stderr
    assert all(f"--{f.name} " in text for f in dataclasses.fields(ENTRY_POINTS[entry].config_class()))
    assert result["heavy"] == [], f"--help of {entry} imported {result['heavy']}"


def test_help_shows_the_choices_and_the_default(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["segmentation", "--help"])
    out = " ".join(capsys.readouterr().out.split())   # argparse wraps lines
    assert stop.value.code == 0
    assert "--preset TEXT named preset: sets every parameter you do not give ('' = none) (one of phe, phe-quick; " \
           "default: '')" in out
    assert "(one of auto, bf16, fp16, off; default: auto)" in out


def test_pipelines_run_the_entry_point_of_their_name():
    scripts = {p.stem for p in (REPO / "pipelines").glob("*.py")}
    assert scripts == set(ENTRY_POINTS)
    for name in scripts:
        assert f'run_entry_point("{name}")' in (REPO / "pipelines" / f"{name}.py").read_text()


def _ichflow(*args):
    script = Path(sys.executable).with_name("ichflow")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "ichflow"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_ichflow_help_lists_the_entry_points():
    done = _ichflow("--help")
    assert done.returncode == 0, done.stderr
    for entry in ENTRY_POINTS.values():
        assert f"{entry.name}  " in done.stdout and entry.summary in done.stdout


def test_ichflow_entry_parses_like_the_pipeline_script():
    done = _ichflow("segmentation", "--epochs", "abc")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: parameter epochs: expected an integer; got 'abc'"
    done = subprocess.run([sys.executable, "-m", "ichflow", "nope"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and done.stderr.startswith("error: ichflow: argument <entry>: invalid choice")


def test_ichflow_entry_runs_the_entry_points_function(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["prepare", "--dataset", "dicom"])   # run_prepare's own check, before anything is read
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: parameter dataset: ")


def test_a_training_runs_data_config_is_what_ran():
    """`mlflow run` logs '' for a parameter left to the preset; the value the run used is logged as
    ``resolved.<name>`` / ``preset.<name>``, and that is what evaluate and promote rebuild the split from."""
    from types import SimpleNamespace

    from ichflow.evaluation import data_config_from_run

    params = {"dataset": "''", "resolved.dataset": "phe", "preset.dataset": "phe", "data_dir": "''",
              "val_fraction": "0.2", "n_folds": "''", "split_seed": "7"}
    cfg = data_config_from_run(SimpleNamespace(data=SimpleNamespace(params=params)))
    assert (cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.n_folds, cfg.split_seed) == ("phe", "", 0.2, 5, 7)


def test_a_tuning_trials_values_beat_a_preset_given_in_overrides():
    from ichflow.tuning import trial_config

    cfg = apply_preset(trial_config(SegmentationConfig, {"preset": "phe", "epochs": SegmentationConfig.epochs}),
                       SEGMENTATION_PRESETS)
    assert cfg.epochs == SegmentationConfig.epochs and cfg.dataset == SEGMENTATION_PRESETS["phe"]["dataset"]
