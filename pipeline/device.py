"""One place that turns a --device string into a torch.device (training, embedding, mining)."""
from __future__ import annotations

import torch

from pipeline.errors import InputError


def resolve_device(device) -> torch.device:
    """torch.device(device), or a one-line InputError for an unknown name or a CUDA device
    on a machine without one."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(None, f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, f"device {device!r} requested but CUDA is not available")
    return dev
