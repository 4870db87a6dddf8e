"""Errors a user sees: each names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """Fatal problem with input data. ``path`` is the offending file or folder."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
