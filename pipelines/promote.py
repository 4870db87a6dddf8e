"""Entry point ``promote``: compare a candidate with @champion and move the aliases (audit on the version)."""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.entrypoints import run_entry_point

if __name__ == "__main__":
    run_entry_point("promote")
