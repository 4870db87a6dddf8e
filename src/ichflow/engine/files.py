"""Write-then-rename: a crash or a bad input never leaves a half-written folder or file behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a fresh temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    On an exception the temporary folder is removed and ``target`` is left as it was. When another process
    finished the same ``target`` first, its copy is kept (both wrote the same content).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_output(target: str | Path):
    """Yield a temporary folder beside ``target``; on success each of its entries replaces the one of the same
    name in ``target`` (other files there are kept), on an exception it is removed and ``target`` is untouched:
    a run that fails partway never leaves old and new results mixed."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-new-"))
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-old-"))
    try:
        yield tmp
        for entry in sorted(tmp.iterdir()):
            dest = target / entry.name
            if dest.exists() or dest.is_symlink():
                os.replace(dest, old / entry.name)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
