"""Logging a trained model as an MLflow pyfunc (signature, input example) and registering a version.

Write, verify, then register: the model is logged, its files are read back from the artifact store and checked
(the weights and config against the local files they came from, the pickle complete, the MLmodel readable),
and only then registered. The version records the SHA-256 of every file of the model (tags ``ichflow.sha256``
and ``ichflow.sha256_files``, kept in the tracking database, not in the artifact store);
:func:`verified_download` checks them before a registered model is unpickled, since a pickle runs code when
it is loaded. A store failure while logging (disk full, read-only folder) is one :class:`DataError` line naming
the store, with the run tagged ``ichflow.failure`` and the local checkpoint named; nothing is registered.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import logging
import pickletools
import re
import shutil
import tempfile
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException

import ichflow
from ichflow.data import windows
from ichflow.errors import DataError, mask_text
from ichflow.paths import FAILURE_TAG

log = logging.getLogger(__name__)

SHA256_TAG = "ichflow.sha256"              # digest of the sorted per-file digests
SHA256_FILES_TAG = "ichflow.sha256_files"  # JSON {relative path: sha256} of every file of the model
# written on the client by MLflow when it downloads a registered model: not a file of the model
_CLIENT_SIDE_FILES = {"registered_model_meta"}

# What a served model needs (pinned to what trained it); listing them avoids MLflow's slow inference.
_SERVING_PACKAGES = ("torch", "torchvision", "timm", "segmentation-models-pytorch", "albumentations", "numpy",
                     "pandas", "pillow", "scikit-learn", "mlflow", "ultralytics")


def pip_requirements(packages=_SERVING_PACKAGES) -> list[str]:
    reqs = []
    for pkg in packages:
        try:
            reqs.append(f"{pkg}=={md.version(pkg)}")
        except md.PackageNotFoundError:
            continue
    return reqs


class ModelFilesError(Exception):
    """The files of a logged model read back from the store are not what was written."""


class _DropKnownLogNotes(logging.Filter):
    """MLflow's notes on every ``log_model``: that a pyfunc is a pickle (we know: it is digest-checked before it
    is loaded, see the README's Security section) and that it validates the input example (it does, silently)."""

    KNOWN = ("Passing a Python object as `python_model`", "Validating input example against model signature")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.KNOWN)


@contextlib.contextmanager
def _known_log_notes_muted():
    logger, drop = logging.getLogger("mlflow.pyfunc"), _DropKnownLogNotes()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def log_pyfunc(python_model, artifacts: dict[str, str], signature, input_example, registered_model_name: str | None,
               name: str = "model", metadata: dict | None = None):
    """Log ``python_model`` with the ichflow code bundled (the model loads where ichflow is not installed).

    Returns MLflow's ModelInfo; ``registered_model_version`` is set when a name was given (only after the
    logged files were verified).
    """
    before = _last_logged_model_id()
    # every model says which HU window its 8-bit input was made with: ``predict`` windows DICOM/NIfTI scans with it
    metadata = {"window": windows.PRESETS[windows.DEFAULT].as_dict(), **(metadata or {})}
    try:
        with _known_log_notes_muted():
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=python_model,
                artifacts=artifacts,
                signature=signature,
                input_example=input_example,
                code_paths=[str(Path(ichflow.__file__).parent)],
                pip_requirements=pip_requirements(),
                metadata=metadata,
            )
        with tempfile.TemporaryDirectory(prefix="ichflow-verify-") as tmp:
            local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=tmp)
            check_logged_files(local, artifacts)
            digests = file_digests(local)
    except (OSError, ModelFilesError, MlflowException) as exc:
        if isinstance(exc, MlflowException) and not _os_error_text(exc):
            raise  # not a write fault (the tracking layer names a failing server)
        raise _store_failure(exc, artifacts, before) from exc
    if registered_model_name:
        version = register_with_digests(info.model_uri, registered_model_name, digests)
        info.registered_model_version = version.version
    return info


def register_verified(model_uri: str, name: str):
    """Register ``model_uri`` (e.g. ``runs:/<id>/model``) with the SHA-256 of its files; the ModelVersion."""
    with tempfile.TemporaryDirectory(prefix="ichflow-verify-") as tmp:
        local = mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp)
        check_logged_files(local, {})
        digests = file_digests(local)
    return register_with_digests(model_uri, name, digests)


def register_with_digests(model_uri: str, name: str, digests: dict[str, str]):
    return mlflow.register_model(model_uri, name, tags={SHA256_TAG: manifest_digest(digests),
                                                        SHA256_FILES_TAG: json.dumps(digests, sort_keys=True)})


# ------------------------------------------------------------------------------------------------ digests
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: str | Path) -> dict[str, str]:
    """{path relative to ``folder`` (posix): SHA-256} of every file of a model folder, sorted by path."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix()
                   not in _CLIENT_SIDE_FILES)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def manifest_digest(digests: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{d}  {p}\n" for p, d in sorted(digests.items())).encode()).hexdigest()


def check_logged_files(local: str | Path, artifacts: dict[str, str]) -> None:
    """The model read back from the store is complete: MLmodel readable, pickle whole, artifacts identical."""
    local = Path(local)
    try:
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelFilesError(f"MLmodel unreadable in the store ({exc})") from None
    flavor = (mlmodel or {}).get("flavors", {}).get("python_function", {})
    pickled = flavor.get("python_model")
    if pickled:
        _check_pickle_complete(local / pickled)
    stored = flavor.get("artifacts", {})
    for key, source in artifacts.items():
        rel = (stored.get(key) or {}).get("path")
        if not rel or not (local / rel).is_file():
            raise ModelFilesError(f"artifact {key!r} missing in the store")
        if sha256_file(local / rel) != sha256_file(source):
            raise ModelFilesError(f"{rel} in the store differs from the written {source}")


def _check_pickle_complete(path: Path) -> None:
    """Walk the pickle's opcodes without executing them: a truncated file never reaches STOP."""
    try:
        with open(path, "rb") as fh:
            for _ in pickletools.genops(fh):
                pass
    except (OSError, ValueError, EOFError) as exc:
        raise ModelFilesError(f"{path.name} in the store is incomplete ({exc})") from None


# -------------------------------------------------------------------------------------- load-side check
def verified_download(model_uri: str, name: str, version: str) -> str | None:
    """Download version ``version`` of ``name`` and check every file against the SHA-256 recorded at
    registration; the local folder to load from, or None when the version has no record (registered before
    these records existed: loaded unchecked, with a warning).

    Raises :class:`DataError` ``model <uri>: file <name> does not match ...`` on any difference.
    """
    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    if SHA256_FILES_TAG not in tags:
        log.warning("%s (version %s) has no SHA-256 record from its registration: loaded without an integrity "
                    "check", model_uri, version)
        return None
    recorded = json.loads(tags[SHA256_FILES_TAG])
    if manifest_digest(recorded) != tags.get(SHA256_TAG):
        raise DataError(f"model {model_uri}", "the SHA-256 record of its registration is inconsistent "
                                              f"({SHA256_TAG} != digest of {SHA256_FILES_TAG}); not loaded")
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}",
                                                dst_path=tempfile.mkdtemp(prefix="ichflow-model-"))
    found = file_digests(local)
    for rel in sorted(set(recorded) | set(found)):
        if rel not in found:
            problem = "recorded at registration is missing"
        elif rel not in recorded:
            problem = "was not part of the model at registration"
        elif found[rel] != recorded[rel]:
            problem = "does not match the SHA-256 recorded at registration"
        else:
            continue
        shutil.rmtree(local, ignore_errors=True)
        raise DataError(f"model {model_uri}", f"file {rel} {problem} (tampered or corrupted); not loaded")
    return local


# ------------------------------------------------------------------------------------------- store faults
def _last_logged_model_id() -> str | None:
    from mlflow.models.model import _last_logged_model_id as current

    return current.get()


def _store_failure(exc: BaseException, artifacts: dict[str, str], before: str | None) -> DataError:
    """Clean up a model that could not be written whole, tag the run, and describe it in one line."""
    run = mlflow.active_run()
    store = (run.info.artifact_uri if run else "") or mlflow.get_tracking_uri()
    logged = mlflow.last_logged_model() if _last_logged_model_id() != before else None  # this call's model only
    if logged is not None:
        store = logged.artifact_location or store
        _discard_partial_model(logged)
    problem = _os_error_text(exc) or " ".join(str(exc).split()) or type(exc).__name__
    kept = sorted({str(Path(p).parent) for p in artifacts.values()})
    reason = f"model not written to the artifact store: {problem}"
    if run is not None:
        with contextlib.suppress(Exception):  # the tracking store may be on the same full disk
            mlflow.set_tag(FAILURE_TAG, reason[:5000])
    return DataError(f"artifact store {mask_text(store)}",
                     f"{reason}; nothing registered; checkpoint kept locally: {', '.join(kept) or '(none)'}")


def _os_error_text(exc: BaseException) -> str:
    """The ``[Errno N] ...`` line of an OS error, also when MLflow wrapped it in one of its exceptions."""
    found = re.search(r"\[Errno \d+\][^\n]*", str(exc))
    return found.group(0).strip() if found else ""


def _discard_partial_model(logged) -> None:
    """Remove what was written of a failed model and mark it FAILED, so no half model is left to load."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with contextlib.suppress(Exception):
        get_artifact_repository(logged.artifact_location).delete_artifacts()
    with contextlib.suppress(Exception):
        mlflow.MlflowClient().finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)

