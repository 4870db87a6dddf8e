"""The editable per-task files of the project: ``tuning/<task>.py`` (search spaces), ``registry/<task>.py`` (rules).

Looked up in the working folder first (what ``mlflow run .`` runs in), then beside this package (an editable
install), unless the user names a file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from ichflow.errors import ParameterError

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_project_file(folder: str, task: str, path: str, parameter: str, required: tuple[str, ...]) -> ModuleType:
    """Execute ``path`` (or ``<folder>/<task>.py``) as a module; ``parameter`` names the file in errors.

    The module gets ``SOURCE`` (its path); a missing file or a missing ``required`` name is a ParameterError.
    """
    candidates = [Path(path)] if path else [Path.cwd() / folder / f"{task}.py", REPO_ROOT / folder / f"{task}.py"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ParameterError(parameter, f"no {folder}/ file for task {task!r}: looked in "
                                        f"{', '.join(str(c) for c in candidates)}")
    spec = importlib.util.spec_from_file_location(f"ichflow_{folder}_{task}", found)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001  (a user's file: say which and why, not a traceback)
        raise ParameterError(parameter, f"{found}: cannot be loaded: {type(exc).__name__}: {exc}") from None
    missing = [name for name in required if not hasattr(module, name)]
    if missing:
        raise ParameterError(parameter, f"{found}: must define {', '.join(missing)}")
    module.SOURCE = str(found)
    return module
