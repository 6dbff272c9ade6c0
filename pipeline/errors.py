"""User-facing errors: one line naming the file and the problem, exit code 2."""
from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input (file, option or parameter). The CLI prints it on one line and exits 2."""

    exit_code = 2

    def __init__(self, source: str | Path | None, problem: str):
        self.source = str(source) if source is not None else None
        self.problem = " ".join(str(problem).split())  # keep it on one line
        super().__init__(f"{self.source}: {self.problem}" if self.source else self.problem)


def refuse_unknown(given, known, source, what: str) -> None:
    """One line naming the unknown keys of a settings mapping (a params section, options)
    and the known ones, instead of the TypeError a dataclass would raise."""
    unknown = sorted(str(k) for k in set(given) - set(known))
    if unknown:
        raise InputError(source, f"unknown {what} {unknown} (known: {sorted(known) or 'none'})")
