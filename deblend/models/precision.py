"""Half-precision (float16) inference on CUDA GPUs.

With ``half=True`` the networks run under `torch.autocast` with float16:
convolutions and matrix products in float16, reductions such as GroupNorm
and the geometry (box decoding, mask pasting) in float32. GPUs do float16
arithmetic several times faster than float32; CPUs without float16 units
(the usual x86 case) emulate it and are much slower, so half precision is
offered on CUDA devices only.
"""

from __future__ import annotations

import torch

__all__ = ["check_half", "autocast"]


def check_half(half, device):
    """Validate the ``half`` option for ``device``; returns it as a bool.

    Raises
    ------
    ValueError
        If ``half`` is not a bool, or is True for a device other than CUDA.
    """
    if not isinstance(half, bool):
        raise ValueError(f"half must be True or False, got {half!r}")
    if half and torch.device(device).type != "cuda":
        raise ValueError(f"half=True needs a CUDA device, got device={str(device)!r}; CPUs emulate float16 "
                         "and run it far slower than float32: use half=False on a CPU")
    return half


def autocast(device, half):
    """Context in which the networks run: float16 autocast when ``half``, float32 otherwise."""
    return torch.autocast(torch.device(device).type, dtype=torch.float16, enabled=bool(half))
