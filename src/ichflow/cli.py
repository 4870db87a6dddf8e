"""Entry-point argument parsing: every dataclass config becomes ``--field value`` flags."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from ichflow.errors import UserError


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_int(text: str) -> int:
    # MLproject has no int parameter type: integers arrive as floats ("5.0") when passed as float params
    value = float(text)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


def build_parser(config_cls, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or config_cls.__doc__)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        typ = hints[f.name]
        conv = {bool: _parse_bool, int: _parse_int, float: float}.get(typ, str)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name}", f"--{f.name.replace('_', '-')}", dest=f.name, type=conv,
                            default=default, help=f"(default: {default!r})")
    return parser


def parse_config(config_cls, argv=None):
    args = build_parser(config_cls).parse_args(argv)
    return config_cls(**vars(args))


def main_guard(fn, config_cls, argv=None):
    """Run ``fn(cfg)``; turn any :class:`~ichflow.errors.UserError` into one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(config_cls, argv)
    try:
        return fn(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
