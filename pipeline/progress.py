"""Progress bars that stay readable in logs: on a terminal they refresh twice a second;
in DVC/CI logs (no terminal) a line every 30 s instead of one per step."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs):
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.5 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
