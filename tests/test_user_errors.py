"""Every bad parameter of every entry point: one ``error: parameter <name>: ...`` line, exit 2, no run started.

The real entry scripts (``pipelines/<entry>.py``) run in-process (as ``mlflow run`` would start them, minus the
interpreter start-up), against the module's own empty tracking store.
"""

import runpy
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

CASES = [
    ("classification", ["--imbalance", "smote"], "imbalance"),
    ("classification", ["--val_fraction", "0.6", "--test_fraction", "0.5"], "val_fraction/test_fraction"),
    ("multilabel", ["--n_folds", "1"], "n_folds"),
    ("segmentation", ["--loss", "dice+nope"], "loss"),
    ("segmentation", ["--preset", "nope"], "preset"),
    ("detection", ["--engine", "detr"], "engine"),
    ("prepare", ["--dataset", "dicom"], "dataset"),
    ("prepare", ["--test_fraction", "1.5"], "test_fraction"),
    ("tune", ["--task", "segmentaton"], "task"),
    ("tune", ["--pruner", "sometimes"], "pruner"),
    ("tune", ["--overrides", "epochs=abc"], "overrides"),
    ("tune", ["--overrides", "no_such_param=1"], "overrides"),
    ("tune", ["--space", "/no/such/space.py"], "space"),
    ("promote", ["--task", "segmentaton"], "task"),
    ("promote", ["--task", "segmentation"], "run_id"),                       # no tune study yet: no candidate
    ("promote", ["--task", "segmentation", "--run_id", "0123456789abcdef"], "run_id"),
    ("history", ["--task", "segmentaton"], "task"),
    ("evaluate", ["--model_uri", "models:/ich-segmentation@champion"], "model_uri"),  # nothing registered
    ("evaluate", ["--patients", "some"], "patients"),
    ("main", ["--quick", "maybe"], "quick"),
]


def _all_runs() -> int:
    client = mlflow.MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(exps)) if exps else 0


def _run_entry(entry: str, argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [f"pipelines/{entry}.py", *argv])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(REPO / "pipelines" / f"{entry}.py"), run_name="__main__")
    return stop.value.code


@pytest.mark.parametrize("entry,argv,param", CASES, ids=[f"{e}:{' '.join(a)}" for e, a, _ in CASES])
def test_bad_parameter_is_one_line_and_starts_nothing(entry, argv, param, store, monkeypatch, capsys):
    before = _all_runs()
    code = _run_entry(entry, argv, monkeypatch)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"error: parameter {param}: "), err
    assert _all_runs() == before, "a run was opened before the parameters were checked"


def test_predict_with_a_mistyped_alias(store, monkeypatch, capsys, tmp_path):
    image = tmp_path / "slice.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    code = _run_entry("predict", ["--model_uri", "models:/ich-segmentation@champoin", "--input", str(image)],
                      monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        line for line in err.splitlines() if line.startswith("error: parameter model_uri: cannot load")]
