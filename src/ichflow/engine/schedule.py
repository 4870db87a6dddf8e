"""The learning-rate schedule every task uses: linear warm-up, then cosine decay to zero (per optimizer step)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_fraction: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` stepped once per optimizer step: warm-up over ``warmup_fraction`` of the steps (at least 1)."""
    total = max(1, int(total_steps))
    warm = max(1, int(round(warmup_fraction * total)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
