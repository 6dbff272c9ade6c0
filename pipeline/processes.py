"""Child processes that never outlive the command that started them."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent (pid `parent`, taken
    in the parent before the fork) dies (Linux), so that a DataLoader worker of a killed run
    does not linger holding memory. True if armed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:   # the parent died before the request was armed
        os.kill(os.getpid(), sig)
    return True
