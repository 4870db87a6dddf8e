"""Entry point ``history``: print the promotion log of a registered model."""

import ichflow  # noqa: F401  (offline environment first)
from ichflow.entrypoints import run_entry_point

if __name__ == "__main__":
    run_entry_point("history")
