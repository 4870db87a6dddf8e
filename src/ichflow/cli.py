"""Entry points: every dataclass config becomes ``--field value`` flags; errors and signals end in one line."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import logging
import os
import re
import signal
import sys
import typing

from ichflow.errors import UserError


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def _parse_int(text: str) -> int:
    # MLproject has no int parameter type: integers arrive as floats ("5.0") when passed as float params
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}")
    return int(value)


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):  # nan/inf pass float() but no range check
        raise argparse.ArgumentTypeError(f"expected a finite number; got {text!r}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error: parameter <name>: <problem>`` line and exit 2 (no usage block)."""

    def error(self, message: str):
        print(f"error: {self._one_line(message)}", file=sys.stderr)
        sys.exit(2)

    def _one_line(self, message: str) -> str:
        known = sorted(a.dest for a in self._actions if a.dest != "help")
        bad_value = re.match(r"argument (--[\w-]+)(?:/--[\w-]+)*: (.*)", message)
        if bad_value:
            name = bad_value.group(1).lstrip("-").replace("-", "_")
            problem = bad_value.group(2)
            if problem == "expected one argument":
                problem = "needs a value"
            return f"parameter {name}: {problem}"
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            flags = [t for t in unknown.group(1).split() if t.startswith("-")]
            if not flags:
                return f"{self.prog}: unexpected argument {unknown.group(1)!r}: parameters are given as --name value"
            name = flags[0].lstrip("-").replace("-", "_")
            return f"parameter {name}: not a parameter of {self.prog}; valid: {', '.join(known)}"
        return f"{self.prog}: {message}"


def build_parser(config_cls, description: str = "") -> argparse.ArgumentParser:
    parser = OneLineParser(description=description or config_cls.__doc__)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        typ = hints[f.name]
        conv = {bool: _parse_bool, int: _parse_int, float: _parse_float}.get(typ, str)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])  # no duplicate for one-word names
        parser.add_argument(*flags, dest=f.name, type=conv, default=default, help=f"(default: {default!r})")
    return parser


def parse_config(config_cls, argv=None):
    args = build_parser(config_cls).parse_args(argv)
    return config_cls(**vars(args))


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread: every ``finally`` and run context unwinds as for Ctrl-C.

    A ``KeyboardInterrupt`` on purpose: ``tracking.task_run`` ends its run KILLED on any of them, Optuna fails
    the trial and re-raises, and ``except Exception`` in library code lets it through.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def install_signal_handlers() -> None:
    """Turn SIGINT and SIGTERM (``timeout``, systemd, Slurm, Kubernetes) into :class:`Interrupted`."""
    def interrupt(signum, frame):
        # the runs are being closed now: a second signal (Ctrl-C twice, mlflow run's own SIGTERM after the
        # terminal's SIGINT) must not cut that short; SIGKILL still ends the process
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)


def die_with_parent() -> None:
    """Linux: get SIGTERM when the parent process dies (PR_SET_PDEATHSIG), so no orphan trains on.

    Without it ``mlflow run`` killed by SIGTERM leaves its training process running, which later marks the
    run FINISHED. With it the training closes the run KILLED through :class:`Interrupted`.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def interrupted_exit(exc: KeyboardInterrupt) -> typing.NoReturn:
    """One line (the runs closed, the checkpoint kept: notes ``task_run`` added) and exit 128 + signal."""
    signum = getattr(exc, "signum", signal.SIGINT)
    notes = "; ".join(getattr(exc, "__notes__", []))
    print(f"interrupted by {signal.Signals(signum).name}" + (f": {notes}" if notes else ""), file=sys.stderr)
    sys.exit(128 + signum)


def main_guard(fn, config_cls, argv=None):
    """Run ``fn(cfg)``; turn any :class:`~ichflow.errors.UserError` into one line on stderr and exit code 2.

    SIGINT / SIGTERM end the open runs KILLED and exit 130 / 143. Started by ``mlflow run`` (it exports
    ``MLFLOW_RUN_ID``), the process also dies with it.
    """
    install_signal_handlers()
    if os.environ.get("MLFLOW_RUN_ID"):
        die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(config_cls, argv)
    try:
        return fn(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        interrupted_exit(exc)
