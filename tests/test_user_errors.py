"""Every bad parameter of every entry point: one ``error: parameter <name>: ...`` line, exit 2, no run started.

The real entry scripts (``pipelines/<entry>.py``) run in-process (as ``mlflow run`` would start them, minus the
interpreter start-up), against the module's own empty tracking store.
"""

import os
import runpy
import subprocess
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
    # argparse's own errors: one line too, no usage block
    ("classification", ["--epochs", "abc"], "epochs"),
    ("segmentation", ["--epochs", "1.5"], "epochs"),
    ("classification", ["--register", "maybe"], "register"),
    ("predict", ["--overlays", "maybe"], "overlays"),
    ("prepare", ["--split_seed", "abc"], "split_seed"),
    ("evaluate", ["--model_uri"], "model_uri"),
    ("tune", ["--val_fraction", "0.2"], "val_fraction"),          # not a parameter of tune
    ("main", ["--unknown", "3"], "unknown"),
    ("segmentation", ["--lr", "nan"], "lr"),
    # the knobs every training task shares
    ("classification", ["--lr", "0"], "lr"),
    ("classification", ["--device", "tpu"], "device"),
    ("classification", ["--amp", "maybe"], "amp"),
    ("classification", ["--num_workers", "-5"], "num_workers"),
    ("classification", ["--weight_decay", "-1"], "weight_decay"),
    ("classification", ["--pretrained", "/no/such.pt"], "pretrained"),
    ("classification", ["--aug_strength", "3"], "aug_strength"),
    ("classification", ["--seed", "-1"], "seed"),
    ("detection", ["--patience", "0"], "patience"),
    # memory: one training step cannot fit (instead of the kernel killing the process)
    ("segmentation", ["--patch_size", "16384"], "patch_size"),
    ("classification", ["--image_size", "16384"], "image_size"),
    ("detection", ["--imgsz", "16384"], "imgsz"),
    ("multilabel", ["--image_size", "8192", "--batch_size", "256"], "image_size"),
    # task parameters
    ("segmentation", ["--pixel_spacing_mm", "0"], "pixel_spacing_mm"),
    ("segmentation", ["--detect_min_pixels", "0"], "detect_min_pixels"),
    ("segmentation", ["--threshold", "0.37"], "threshold"),
    ("segmentation", ["--encoder_weights", "imagenet"], "encoder_weights"),
    ("detection", ["--mosaic", "2"], "mosaic"),
    ("detection", ["--close_mosaic", "-1"], "close_mosaic"),
    ("detection", ["--conf_threshold", "2"], "conf_threshold"),
    ("multilabel", ["--classes", "FOO"], "classes"),
    ("multilabel", ["--dataset", "phe"], "dataset"),
    ("multilabel", ["--sampler", "x"], "sampler"),
    ("prepare", ["--n_folds", "0"], "n_folds"),
    ("prepare", ["--synthetic_patients", "2"], "synthetic_patients"),
    # tune: its own parameters, and the task config every trial would get
    ("tune", ["--n_trials", "0"], "n_trials"),
    ("tune", ["--storage", "nosuchscheme://x"], "storage"),
    ("tune", ["--overrides", "epochs=0"], "overrides"),
    ("tune", ["--overrides", "patch_size=16384"], "overrides"),
    ("tune", ["--task", "detection", "--space", "tuning/segmentation.py"], "space"),
    ("tune", ["--dataset", "nope"], "dataset"),
    ("evaluate", ["--dataset", "nope"], "dataset"),
    ("main", ["--dataset", "nope"], "dataset"),
    ("history", ["--task", "x"], "task"),
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


# ------------------------------------------------------------------------------------------ bad data folders
def _phe(tmp_path, n_patients=3):
    from ichflow.data.synthetic import PhantomSpec, write_phe

    return write_phe(tmp_path / "phe", PhantomSpec(n_patients=n_patients, n_slices=3, size=64))


def _ctich(tmp_path):
    from ichflow.data.synthetic import PhantomSpec, write_ctich

    return write_ctich(tmp_path / "ctich", PhantomSpec(n_patients=3, n_slices=3, size=64))


def _first(folder, pattern):
    return sorted(folder.rglob(pattern))[0]


def _truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _missing(tmp_path):
    return tmp_path / "no-such-folder"


def _a_file(tmp_path):
    (tmp_path / "scan.png").write_bytes(b"not a folder")
    return tmp_path / "scan.png"


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _wrong_layout(tmp_path):
    for sub in ("images", "labels"):
        (tmp_path / "mine" / sub).mkdir(parents=True)
    (tmp_path / "mine" / "images" / "a.png").write_bytes(b"x")
    return tmp_path / "mine"


def _phe_truncated_png(tmp_path):
    root = _phe(tmp_path)
    _truncate(_first(root / "set", "*.png"), 200)
    return root


def _phe_text_as_png(tmp_path):
    root = _phe(tmp_path)
    _first(root / "set", "*.png").write_text("this is not a PNG")
    return root


def _phe_mask_wrong_size(tmp_path):
    root = _phe(tmp_path)
    Image.new("L", (50, 60)).save(_first(root / "label", "*.png"))
    return root


def _phe_truncated_mask(tmp_path):
    root = _phe(tmp_path)
    mask = max((root / "label").rglob("*.png"), key=lambda f: f.stat().st_size)  # one with a lesion in it
    _truncate(mask, mask.stat().st_size // 2)
    return root


def _phe_malformed_xml(tmp_path):
    root = _phe(tmp_path)
    _first(root / "annotation", "*.xml").write_text("<annotation><object><bndbox>")
    return root


def _phe_no_slices(tmp_path):
    root = _phe(tmp_path)
    for png in (root / "set").rglob("*.png"):
        png.unlink()
    return root


def _phe_one_patient(tmp_path):
    return _phe(tmp_path, n_patients=1)


def _phe_unreadable(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: file permissions do not stop root")
    root = _phe(tmp_path)
    _first(root / "set", "*.png").chmod(0)
    return root


def _ctich_bad_header(tmp_path):
    root = _ctich(tmp_path)
    (root / "hemorrhage_diagnosis.csv").write_text("Patient,Slice,IVH\n49,1,0\n")
    return root


def _ctich_empty_csv(tmp_path):
    root = _ctich(tmp_path)
    (root / "hemorrhage_diagnosis.csv").write_text("")
    return root


def _ctich_csv_not_numbers(tmp_path):
    root = _ctich(tmp_path)
    csv = root / "hemorrhage_diagnosis.csv"
    lines = csv.read_text().splitlines()
    lines[1] = ",".join(["x"] * len(lines[1].split(",")))
    csv.write_text("\n".join(lines) + "\n")
    return root


def _ctich_truncated_jpg(tmp_path):
    root = _ctich(tmp_path)
    _truncate(_first(root, "*.jpg"), 120)
    return root


def _ctich_no_images(tmp_path):
    import shutil

    root = _ctich(tmp_path)
    shutil.rmtree(root / "Patients_CT")
    return root


def _csv_bad_header(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("file;ivh\nx.png;1\n")
    return csv


def _csv_missing_image(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("image,IVH,IPH,SAH\n" + "".join(f"/no/such/{i}.png,1,0,0\n" for i in range(6)))
    return csv


DATA_CASES = [
    ("prepare", [], _missing),
    ("prepare", [], _a_file),
    ("prepare", [], _empty),
    ("prepare", [], _wrong_layout),
    ("prepare", ["--dataset", "phe"], _empty),
    ("prepare", [], _phe_truncated_png),
    ("prepare", [], _phe_text_as_png),
    ("prepare", [], _phe_mask_wrong_size),
    ("prepare", [], _phe_truncated_mask),
    ("prepare", [], _phe_malformed_xml),
    ("prepare", [], _phe_no_slices),
    ("prepare", [], _phe_one_patient),
    ("prepare", [], _phe_unreadable),
    ("prepare", [], _ctich_bad_header),
    ("prepare", [], _ctich_empty_csv),
    ("prepare", [], _ctich_csv_not_numbers),
    ("prepare", [], _ctich_truncated_jpg),
    ("prepare", [], _ctich_no_images),
    ("segmentation", [], _ctich_bad_header),
    ("segmentation", ["--epochs", "1"], _phe_truncated_png),
    ("classification", [], _missing),
    ("multilabel", ["--dataset", "csv"], _csv_bad_header),
    ("multilabel", ["--dataset", "csv"], _csv_missing_image),
    ("main", [], _missing),
    ("predict", [], _empty),
    ("predict", [], _wrong_layout),
]


def _running_runs() -> list[str]:
    client = mlflow.MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(exps, "attributes.status = 'RUNNING'")] if exps else []


def _work_entries() -> set[str]:
    from ichflow.paths import work_dir

    root = work_dir()
    return {str(p.relative_to(root)) for p in root.rglob("*") if "optuna" not in p.parts} if root.exists() else set()


def _case_id(case) -> str:
    entry, _, make = case.values if hasattr(case, "values") else case
    return f"{entry}:{make.__name__[1:]}"


@pytest.mark.parametrize("entry,argv,make", DATA_CASES, ids=[_case_id(c) for c in DATA_CASES])
def test_bad_data_folder_is_one_line(entry, argv, make, store, monkeypatch, capsys, tmp_path):
    folder = make(tmp_path)
    flag = "--input" if entry == "predict" else "--data_dir"
    half_written_before = {p for p in _work_entries() if Path(p).name.startswith(".")}
    code = _run_entry(entry, [flag, str(folder), *argv], monkeypatch)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert _running_runs() == [], "a run was left RUNNING"
    half_written = {p for p in _work_entries() if Path(p).name.startswith(".")} - half_written_before
    assert not half_written, f"temporary files left in the work folder: {half_written}"


# ------------------------------------------------------------------------------------------------- secrets
def test_tracking_uri_credentials_move_to_the_environment():
    import subprocess

    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://alice:hunter2@127.0.0.1:5999/mlflow"}
    env.pop("MLFLOW_TRACKING_USERNAME", None)
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    code = ("import ichflow, os, mlflow; "
            "assert os.environ['MLFLOW_TRACKING_PASSWORD'] == 'hunter2'; "
            "print(os.environ['MLFLOW_TRACKING_USERNAME'], mlflow.get_tracking_uri())")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["alice", "http://127.0.0.1:5999/mlflow"]
    assert "hunter2" not in done.stdout + done.stderr


def test_storage_password_is_never_printed_nor_logged(store, monkeypatch, capsys):
    before = _all_runs()
    code = _run_entry("tune", ["--task", "classification", "--storage",
                               "postgresql+psycopg2://optuna:hunter2@127.0.0.1:1/optuna"], monkeypatch)
    captured = capsys.readouterr()
    assert code == 2 and "hunter2" not in captured.out + captured.err
    assert [line for line in captured.err.splitlines() if line.startswith("error:")][0].startswith(
        "error: Optuna storage postgresql+psycopg2://optuna:***@127.0.0.1:1/optuna: ")
    assert _all_runs() == before


def test_a_storage_password_given_to_mlflow_run_is_refused_and_named(tmp_path):
    """`mlflow run -P storage=<URL with password>` records the value verbatim before ichflow runs: say so, stop."""
    env = {**os.environ, "MLFLOW_RUN_ID": "0123456789abcdef", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "tune.py"), "--task", "classification",
                           "--storage", "postgresql+psycopg2://optuna:hunter2@127.0.0.1:1/optuna"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: parameter storage: 'postgresql+psycopg2://optuna:***@127.0.0.1:1/optuna' holds a password, which "
        "`mlflow run` has recorded in clear as a parameter of run 0123456789abcdef: change that password, and "
        "pass it as PGPASSWORD or in ~/.pgpass")
    assert "hunter2" not in done.stdout + done.stderr
