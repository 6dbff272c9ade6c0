"""Every training loss, registered by name: the CLI's `--loss` choices, check-params' run
groups and the fine-tuning stage all read this table instead of listing names.

A loss is `online` (it scores the batch only) or `offline` (it also scores the offline
negatives sampled from a candidate folder, so its runs need one).
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import InputError


@dataclass(frozen=True)
class LossSpec:
    name: str
    offline: bool      # samples offline negatives: needs a candidate folder
    help: str


_LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, offline: bool, help: str) -> LossSpec:
    if name in _LOSSES:
        raise ValueError(f"loss {name!r} is registered twice")
    _LOSSES[name] = spec = LossSpec(name, offline, help)
    return spec


def loss_names(*, offline: bool | None = None) -> tuple[str, ...]:
    """Registered names in registration order (only the online or offline ones if asked)."""
    _load()
    return tuple(n for n, s in _LOSSES.items() if offline is None or s.offline == offline)


def get_loss(name, source=None) -> LossSpec:
    _load()
    if not isinstance(name, str) or name not in _LOSSES:
        raise InputError(source, f"unknown loss {name!r} (known: {', '.join(_LOSSES)})")
    return _LOSSES[name]


def losses_help() -> str:
    _load()
    return "; ".join(f"{s.name}: {s.help}" for s in _LOSSES.values())


def _load() -> None:
    # the loss modules register themselves on import
    import pipeline.losses.aoq  # noqa: F401
    import pipeline.losses.triplet  # noqa: F401
