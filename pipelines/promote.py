"""Entry point ``promote``: compare a candidate with @champion and move the aliases (audit on the version)."""

import ichflow  # noqa: F401
from ichflow.cli import main_guard
from ichflow.registry import PromoteConfig, run_promote

if __name__ == "__main__":
    main_guard(run_promote, PromoteConfig)
