"""``prepare``: read a data folder into a validated manifest and a patient-level split.

Every task calls :func:`prepare_data` first; the ``prepare`` entry point also logs the result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import hashlib
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from ichflow.data import ctich, phe, phe_nifti
from ichflow.data.manifest import save_manifest
from ichflow.data.report import ValidationReport
from ichflow.data.splits import split_patients
from ichflow.data.synthetic import PhantomSpec, ensure_synthetic
from ichflow.configs import DataConfig
from ichflow.engine.files import atomic_dir
from ichflow.errors import DataError, ParameterError, check_choice, check_range
from ichflow.metric_names import log_metrics
from ichflow.paths import default_data_dir, prepared_dir
from ichflow.tracking import frame_digest, log_dataset_inputs, log_params_once, task_run

log = logging.getLogger(__name__)

DATASETS = ("auto", "phe", "phe_nifti", "ctich", "synthetic", "synthetic-ctich")
READERS = {"phe": phe.read_phe, "phe_nifti": phe_nifti.read_phe_nifti, "ctich": ctich.read_ctich}


@dataclass
class Prepared:
    dataset: str              # reader used: phe | ctich
    source: str               # 'synthetic' or 'real'
    data_root: Path
    manifest: pd.DataFrame
    split: pd.DataFrame
    report: ValidationReport
    out_dir: Path

    @property
    def split_digest(self) -> str:
        return split_digest(self.split)


def split_digest(split: pd.DataFrame) -> str:
    """The ``ichflow.split_digest`` tag of a split table (as logged in ``data/split.csv``, patient_id as text)."""
    return frame_digest(split[["patient_id", "split", "fold"]])


def validate_data_config(cfg: DataConfig, datasets: tuple[str, ...] = DATASETS) -> None:
    """The data parameters of every entry point, checked before anything is read or a run is opened."""
    check_choice("dataset", cfg.dataset, datasets)
    if cfg.data_dir and cfg.dataset.startswith("synthetic"):  # the folder would be ignored without a word
        raise ParameterError("dataset", f"{cfg.dataset} generates a phantom, but data_dir={cfg.data_dir} was "
                                        "given; use dataset=auto (the folder's layout decides), phe or ctich, "
                                        "or leave data_dir empty for the phantom")
    check_range("val_fraction", cfg.val_fraction, 0.0, 1.0, high_open=True)
    check_range("test_fraction", cfg.test_fraction, 0.0, 1.0, high_open=True)
    if cfg.val_fraction + cfg.test_fraction >= 1.0:
        raise ParameterError("val_fraction/test_fraction", f"together {cfg.val_fraction + cfg.test_fraction:g}: "
                                                           "must leave patients for training (sum < 1)")
    check_range("n_folds", cfg.n_folds, 1)
    check_range("synthetic_patients", cfg.synthetic_patients, 3)
    check_range("synthetic_slices", cfg.synthetic_slices, 1)


def resolve_source(cfg: DataConfig) -> tuple[str, str, Path]:
    """(reader, 'synthetic'|'real', folder) for a config; generates the phantom when needed."""
    validate_data_config(cfg)
    data_dir = cfg.data_dir or (default_data_dir() if not cfg.dataset.startswith("synthetic") else "")
    if cfg.dataset.startswith("synthetic") or not data_dir:
        if cfg.dataset in ("phe", "phe_nifti", "ctich"):
            raise DataError("data_dir", f"dataset={cfg.dataset} needs a data folder: pass data_dir or set "
                                        "ICHFLOW_DATA_DIR")
        variant = "ctich" if cfg.dataset == "synthetic-ctich" else "phe"
        spec = PhantomSpec(n_patients=cfg.synthetic_patients, n_slices=cfg.synthetic_slices)
        folder = ensure_synthetic(variant, spec)
        return variant, "synthetic", folder
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(folder, "is a file, not a data folder" if folder.exists() else "data folder does not exist")
    if cfg.dataset == "auto":
        if phe_nifti.detect(folder) is not None:  # before phe: its find_root also matches NIFIT/set/
            return "phe_nifti", "real", folder
        if phe.find_root(folder) is not None:
            return "phe", "real", folder
        if ctich.find_root(folder) is not None:
            return "ctich", "real", folder
        raise DataError(folder, "neither a PHE-SICH-CT-IDS layout (set/ label/ annotation/, or SubdatasetC_PNG/) "
                                f"nor a CT-ICH layout ({ctich.CSV_NAME}) found")
    return cfg.dataset, "real", folder


def prepared_folder(reader: str, source: str, manifest: pd.DataFrame, split: pd.DataFrame) -> Path:
    """``work/prepared/<reader>-<source>-<key>``: the manifest AND the split name the folder, so a run with
    another split_seed, fractions or n_folds never logs an earlier run's split.csv."""
    key = hashlib.sha256((frame_digest(manifest) + frame_digest(split)).encode()).hexdigest()[:12]
    return prepared_dir() / f"{reader}-{source}-{key}"


def split_folds(cfg: DataConfig) -> int:
    """The split's fold column: ``n_folds``, or the default when a task runs without folds (segmentation's
    ``n_folds=1``: one model), so that task's split, and its digest, is every other task's split."""
    return cfg.n_folds if cfg.n_folds >= 2 else DataConfig.n_folds


def prepare_data(cfg: DataConfig) -> Prepared:
    """Read, validate and split. Writes ``work/prepared/<dataset>-<digest>/`` atomically."""
    reader, source, folder = resolve_source(cfg)
    manifest, report = READERS[reader](folder)
    test_f, val_f = cfg.test_fraction, cfg.val_fraction
    try:
        split = split_patients(manifest, (1.0 - val_f - test_f, val_f, test_f), seed=cfg.split_seed,
                               n_folds=split_folds(cfg))
    except ValueError as exc:  # too few patients for the requested splits
        raise DataError(folder, f"{exc}; lower val_fraction/test_fraction or add patients") from None
    out_dir = prepared_folder(reader, source, manifest, split)
    if not (out_dir / "manifest.csv").exists():
        with atomic_dir(out_dir) as tmp:  # a concurrent writer (tuning worker) of the same content may win
            save_manifest(manifest, tmp / "manifest.csv")
            split.to_csv(tmp / "split.csv", index=False)
            (tmp / "validation_report.md").write_text(report.to_markdown())
            (tmp / "validation_report.json").write_text(report.to_json())
            (tmp / "config.json").write_text(json.dumps(
                {**dataclasses.asdict(cfg), "reader": reader, "source": source, "data_root": str(folder)}, indent=2))
    return Prepared(reader, source, Path(folder).resolve(), manifest, split, report, out_dir)


def log_prepared(prep: Prepared, target: str = "has_lesion", artifacts: bool = True) -> dict[str, str]:
    """Log data provenance into the active run: params, split digest, dataset inputs, (files)."""
    log_params_once({"reader": prep.dataset, "data_source": prep.source, "data_root": str(prep.data_root),
                       "split_digest": prep.split_digest})
    mlflow.set_tag("ichflow.split_digest", prep.split_digest)
    sizes = prep.split["split"].value_counts()
    log_metrics({f"patients_{k}": int(sizes.get(k, 0)) for k in ("train", "val", "test")})
    if artifacts:
        for name in ("manifest.csv", "split.csv", "validation_report.md", "validation_report.json"):
            mlflow.log_artifact(str(prep.out_dir / name), artifact_path="data")
    return log_dataset_inputs(prep.manifest, prep.split, prep.data_root, prep.dataset, target=target)


def run_prepare(cfg: DataConfig) -> Prepared:
    """Entry point body: prepare, print the validation report summary, log everything to MLflow."""
    validate_data_config(cfg)
    with task_run("prepare", run_name="prepare"):
        prep = prepare_data(cfg)
        log_params_once({k: v for k, v in dataclasses.asdict(cfg).items() if k != "dataset"})
        log_params_once({"dataset_requested": cfg.dataset})
        log_metrics({k: float(v) for k, v in prep.report.counts.items() if isinstance(v, (int, float))})
        log_prepared(prep)
    _print_summary(prep)
    return prep


def _print_summary(prep: Prepared) -> None:
    c = prep.report.counts
    print(f"[prepare] {prep.dataset} ({prep.source}) at {prep.data_root}")
    print(f"  patients {c['patients']}, slices {c['slices']}, lesion slices {c['lesion_slices']}, "
          f"mask slices {c['mask_slices']}")
    subs = {k: v for k, v in c.items() if k.endswith("_slices") and k[:3] in ("IVH", "IPH", "SAH", "EDH", "SDH")}
    if subs:
        print("  subtypes: " + ", ".join(f"{k[:3]} {v} ({c[k[:3] + '_patients']} pt)" for k, v in subs.items()))
    sizes = prep.split["split"].value_counts().to_dict()
    print(f"  split by patient: {sizes} (digest {prep.split_digest})")
    for kind, n in c["anomalies"].items():
        print(f"  anomaly {kind}: {n}")
    print(f"  written to {prep.out_dir}")
