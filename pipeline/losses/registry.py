"""Every training loss, registered by name: the CLI's `--loss` choices, check-params' run
groups, the training loop and the fine-tuning stage all read this table instead of
listing names.

A loss is `online` (it scores the batch only) or `offline` (it also scores the offline
negatives sampled from a candidate folder, so its runs need one). Its `build(settings,
options, passes)` returns the trainer's objective: `objective(model, batch, *, epoch) ->
(loss, logs)`, which encodes the batch through the model (`encode_batch`), scores it with
the model's own scorer and adds the model's auxiliary loss. `options` are the loss's own
settings (params.yaml's finetune.aoq for the AOQ family); an objective may carry a
`record` dict that the checkpoint's meta keeps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipeline.errors import InputError

Objective = Callable[..., tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class LossSpec:
    name: str
    offline: bool      # samples offline negatives: needs a candidate folder
    help: str
    build: Callable[..., Objective]

    def objective(self, settings, options: dict[str, Any] | None = None,
                  passes: str = "batched") -> Objective:
        """The training objective of this loss under `settings` (pipeline.training's)."""
        return self.build(settings, dict(options or {}), passes)


_LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, offline: bool, help: str, build: Callable[..., Objective]) -> LossSpec:
    if name in _LOSSES:
        raise ValueError(f"loss {name!r} is registered twice")
    _LOSSES[name] = spec = LossSpec(name, offline, help, build)
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
