"""Entry points: every dataclass config becomes ``--field value`` flags; errors and signals end in one line.

A field's ``--help`` is its ``# comment`` in the config's source (a trailing comment, continued on the comment
lines below it; or, for a field without one, the comment lines directly above it), the choices declared with
:func:`choice`, and its default. An empty value (``--epochs ''``, what ``mlflow run`` passes for an MLproject
default of ``""``) means "not given": the field keeps its default, or gets its preset's value.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import dataclasses
import importlib
import inspect
import io
import logging
import os
import re
import signal
import sys
import textwrap
import tokenize
import typing

from ichflow.errors import UserError

NOT_GIVEN = object()             # what an empty value parses to
_GIVEN_ATTR = "_ichflow_given"   # the instance attribute mark_given sets


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
        known = sorted({a.dest for a in self._actions if a.dest != "help"})
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


def choice(default, options):
    """A config field whose valid values ``--help`` lists (the task's own checks still validate them)."""
    return dataclasses.field(default=default, metadata={"choices": tuple(options)})


def field_comments(config_cls) -> dict[str, str]:
    """``{field: comment}`` from the source of ``config_cls`` and its dataclass bases (a subclass's comment wins)."""
    comments: dict[str, str] = {}
    for cls in reversed(config_cls.__mro__):
        if dataclasses.is_dataclass(cls):
            comments.update({k: v for k, v in _class_comments(cls).items() if v})
    return comments


class _Comment(typing.NamedTuple):
    token: str      # '#   text' as written
    column: int     # of the '#'

    @property
    def text(self) -> str:
        return self.token.lstrip("#").strip()

    @property
    def text_column(self) -> int:
        return self.column + len(self.token) - len(self.token.lstrip("#").lstrip())


def _class_comments(cls) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):   # defined in a string or the interpreter: no source, no comments
        return {}
    lines = source.splitlines()
    comments = {tok.start[0]: _Comment(tok.string, tok.start[1])
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}

    def alone(n: int) -> bool:
        return n in comments and not lines[n - 1][:comments[n].column].strip()

    found, claimed = {}, set()
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = [n for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        if own:   # a trailing comment, continued by comment lines whose text starts at or right of its '#'
            n = node.end_lineno + 1
            while alone(n) and comments[n].text_column >= comments[own[0]].column:
                own.append(n)
                n += 1
        else:     # the comment lines directly above, unless they continue the field before
            n = node.lineno - 1
            while alone(n) and n not in claimed:
                own.insert(0, n)
                n -= 1
        claimed.update(own)
        found[node.target.id] = " ".join(comments[n].text for n in own if comments[n].text)
    return found


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if value == "" else str(value)


def _help(f: dataclasses.Field, comment: str) -> str:
    notes = [f"one of {', '.join(map(str, f.metadata['choices']))}"] if f.metadata.get("choices") else []
    notes.append(f"default: {_shown(_default(f))}")
    return f"{comment} ({'; '.join(notes)})".strip().replace("%", "%%")


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _or_not_given(conv):
    def convert(text: str):
        return NOT_GIVEN if text == "" else conv(text)
    convert.__name__ = getattr(conv, "__name__", "value")
    return convert


_CONVERTERS = {bool: _parse_bool, int: _parse_int, float: _parse_float}
_METAVARS = {bool: "BOOL", int: "INT", float: "NUMBER"}


def build_parser(config_cls, description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """One ``--name`` flag per field (``--name-with-dashes`` is accepted too). A flag not given is absent from
    the parsed namespace (``argparse.SUPPRESS``), so :func:`parse_config` knows which fields were given."""
    parser = OneLineParser(prog=prog, description=description or config_cls.__doc__,
                           epilog="An empty value ('') means the default, or the preset's value.")
    hints = typing.get_type_hints(config_cls)
    comments = field_comments(config_cls)
    for f in dataclasses.fields(config_cls):
        typ = hints[f.name]
        common = dict(dest=f.name, type=_or_not_given(_CONVERTERS.get(typ, str)), default=argparse.SUPPRESS)
        parser.add_argument(f"--{f.name}", metavar=_METAVARS.get(typ, "TEXT"),
                            help=_help(f, comments.get(f.name, "")), **common)
        if "_" in f.name:
            parser.add_argument(f"--{f.name.replace('_', '-')}", help=argparse.SUPPRESS, **common)
    return parser


def parse_config(config_cls, argv=None, description: str = "", prog: str | None = None):
    """The config of a command line; which fields it gave is recorded (:func:`given_fields`)."""
    args = vars(build_parser(config_cls, description, prog).parse_args(argv))
    given = {name: value for name, value in args.items() if value is not NOT_GIVEN}
    return mark_given(config_cls(**given), given)


def mark_given(cfg, names):
    """Record on ``cfg`` the fields its caller set on purpose: a preset fills only the others."""
    object.__setattr__(cfg, _GIVEN_ATTR, frozenset(names))
    return cfg


def given_fields(cfg) -> frozenset[str]:
    """The fields set on purpose: as :func:`mark_given` recorded them, else those not at their default."""
    recorded = getattr(cfg, _GIVEN_ATTR, None)
    if recorded is not None:
        return recorded
    return frozenset(f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != _default(f))


def lazy_attributes(modules: dict[str, str]):
    """A module ``__getattr__`` (PEP 562): ``name`` is imported from ``modules[name]`` when first used."""
    def __getattr__(name: str):
        if name not in modules:
            raise AttributeError(f"no attribute {name!r}")
        return getattr(importlib.import_module(modules[name]), name)
    return __getattr__


def load(dotted: str):
    """The object ``"package.module:name"`` names."""
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


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


def main_guard(fn, config_cls, argv=None, description: str = "", prog: str | None = None):
    """Run ``fn(cfg)``; turn any :class:`~ichflow.errors.UserError` into one line on stderr and exit code 2.

    ``fn`` may be a ``"module:function"`` name, imported only after the command line parsed (``--help`` and a
    bad flag never import the libraries it needs). SIGINT / SIGTERM end the open runs KILLED and exit
    130 / 143. Started by ``mlflow run`` (it exports ``MLFLOW_RUN_ID``), the process also dies with it.
    """
    install_signal_handlers()
    if os.environ.get("MLFLOW_RUN_ID"):
        die_with_parent()
    cfg = parse_config(config_cls, argv, description, prog)
    try:
        run = load(fn) if isinstance(fn, str) else fn
        # after the imports: what libraries log at INFO while being imported stays quiet
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        from ichflow.engine.progress import quiet_library_output

        quiet_library_output()
        return run(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        interrupted_exit(exc)
