"""Progress bars drawn on a terminal only: in a log file (stderr not a TTY) a bar is only noise."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, shown only when stderr is a terminal (and ``disable`` is false)."""
    return tqdm(iterable, disable=True if disable else None, **kwargs)  # tqdm: None = off unless a TTY
