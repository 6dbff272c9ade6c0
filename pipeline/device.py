"""One place that turns a --device string into a torch.device (training, embedding, mining)."""
from __future__ import annotations

import torch

from pipeline.errors import InputError


SUPPORTED = "cpu, cuda or cuda:N"


def resolve_device(device) -> torch.device:
    """torch.device(device) for what the tool can run on (cpu, cuda, cuda:N), or a one-line
    InputError: an unknown name, another device type (mps, meta, xpu ...), a CUDA device on
    a machine without one or without that index."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError("--device", f"unknown device {device!r} ({SUPPORTED}): {exc}") from None
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise InputError("--device", f"device {device!r} is not supported (use {SUPPORTED})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device", f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError("--device", f"device {device!r}: this machine has "
                                         f"{torch.cuda.device_count()} CUDA device(s)")
    return dev
