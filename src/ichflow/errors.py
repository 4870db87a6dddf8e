"""Errors a user sees: one line each, naming the file or parameter and the problem (exit code 2).

``UserError`` is the root; ``cli.main_guard`` prints ``error: <message>`` for any of them and exits 2.
``DataError`` names a file or folder, ``ParameterError`` a parameter (``error: parameter <name>: ...``).
"""

from __future__ import annotations

import re
from pathlib import Path


class UserError(Exception):
    """Something the user can fix; never a bug of ours (those stay tracebacks)."""


class DataError(UserError):
    """Fatal problem with input data. ``path`` is the offending file or folder."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ParameterError(DataError):
    """A bad parameter value: ``parameter <name>: <problem, valid values>``."""

    def __init__(self, name: str, problem: str):
        self.name = name
        super().__init__(f"parameter {name}", problem)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ParameterError(name, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_range(name: str, value, low=None, high=None, low_open: bool = False, high_open: bool = False) -> None:
    """``value`` within [low, high] (``*_open``: the bound itself excluded); None = unbounded."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        where = f"in {lo}, {hi}" if low is not None and high is not None else \
            (f"{'>' if low_open else '>='} {low}" if low is not None else f"{'<' if high_open else '<='} {high}")
        raise ParameterError(name, f"must be {where}; got {value!r}")


def mask_text(text: str) -> str:
    """Mask credentials of any URL inside a message (e.g. a driver error quoting the URL)."""
    return re.sub(r"([a-zA-Z][\w+.-]*://[^:/@\s]+:)[^@\s]+@", r"\1***@", str(text))
