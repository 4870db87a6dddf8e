"""Will a training configuration fit in memory? Checked with the parameters, before any data is read.

The estimate is a lower bound on purpose (a refusal must never be wrong): per input pixel of one sample a CNN
trained with backpropagation keeps at least its first feature maps and their gradients, taken here as
``BYTES_PER_PIXEL``. A configuration whose lower bound already exceeds the memory available is certain to be
killed by the kernel's out-of-memory killer partway through, so it is refused with one line instead.
"""

from __future__ import annotations

import psutil

from ichflow.errors import ParameterError

BYTES_PER_PIXEL = 256   # >= 16 float32 feature maps at full resolution, forward + gradient, per sample


def available_bytes(device: str = "auto") -> int:
    """Memory a training can use: free RAM, or the free memory of the GPU when training would run on one."""
    ram = int(psutil.virtual_memory().available)
    if device.startswith(("auto", "cuda")):
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return max(ram, int(free))
    return ram


def training_bytes(batch_size: int, side: int, channels: int) -> int:
    """Lower bound of the memory one training step needs for ``batch_size`` images of ``side`` x ``side``."""
    return int(batch_size) * int(side) ** 2 * (BYTES_PER_PIXEL + 4 * max(1, int(channels)))


def check_training_memory(size_name: str, side: int, batch_size: int, channels: int, device: str = "auto") -> None:
    """ParameterError naming the size parameter when one training step cannot fit in the memory available."""
    need, have = training_bytes(batch_size, side, channels), available_bytes(device)
    if need > have:
        raise ParameterError(size_name, f"{size_name}={side} with batch_size={batch_size} needs at least "
                                        f"{need / 2**30:.1f} GiB per training step, {have / 2**30:.1f} GiB are "
                                        "available; use a smaller size or batch")
