"""The time budget of a training: stop after the epoch when one more epoch would overrun the limit.

One formula for every engine (the smp/timm Trainer, Ultralytics, Faster R-CNN): elapsed time plus the mean
epoch time so far must stay within the budget. The last allowed epoch always runs; a budget of 0 means none.
"""

from __future__ import annotations

import time


class TimeBudget:
    def __init__(self, minutes: float, max_epochs: int):
        self.limit_s = 60.0 * float(minutes or 0.0)
        self.max_epochs = int(max_epochs)
        self.t0 = time.perf_counter()
        self.reached = False

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def should_stop(self, epoch: int) -> bool:
        """After epoch ``epoch`` (0-based) ended: would the next one overrun? Sets ``reached`` when so."""
        if self.limit_s <= 0 or epoch >= self.max_epochs - 1:
            return False
        elapsed = time.perf_counter() - self.t0
        if elapsed + elapsed / (epoch + 1) > self.limit_s:
            self.reached = True
        return self.reached
