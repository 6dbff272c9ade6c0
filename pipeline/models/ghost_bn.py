"""BatchNorm that can normalise consecutive segments of a batch on their own ("ghost" BN).

Why: the AOQ reference runs three forward passes per step (anchors, (i~, t~), (i', t')),
so every BatchNorm sees three batches of B items, normalises each with its own statistics
and updates its running statistics three times. One forward of 3B items is equivalent only
if BN does the same per B-sized segment. `bn_segments([B, B, B])` declares the segments of
the current forward (in samples along dim 0); every `SegmentBatchNorm1d` inside the model
then normalises each segment separately, in order, like separate passes.

Row-wise modules applied to a flattened (B·L, F) view (e.g. `layers.apply_to_valid`) turn
image segments into row segments with `row_segments`.

Outside the context, or in eval mode, the layers behave exactly like nn.BatchNorm1d (same
parameters and state-dict keys, so checkpoints are interchangeable).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import torch
from torch import nn

_SEGMENTS: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar(
    "bn_segments", default=None)


@contextlib.contextmanager
def bn_segments(sizes: Sequence[int] | None) -> Iterator[None]:
    """Within the block, segment-aware BN layers split their batch into `sizes`."""
    token = _SEGMENTS.set(tuple(int(s) for s in sizes) if sizes is not None else None)
    try:
        yield
    finally:
        _SEGMENTS.reset(token)


def current_segments() -> tuple[int, ...] | None:
    return _SEGMENTS.get()


def row_segments(mask: torch.Tensor) -> tuple[int, ...] | None:
    """Translate the active sample segments into segments of the valid rows of a
    (N, L) mask (rows taken in row-major order), or None when none are active."""
    seg = current_segments()
    if seg is None:
        return None
    if sum(seg) != mask.size(0):
        raise ValueError(f"BN segments {seg} do not cover the batch of {mask.size(0)}")
    per_sample = mask.reshape(mask.size(0), -1).sum(dim=1)
    return tuple(int(c) for c in torch.split(per_sample, list(seg)) for c in [c.sum()])


class SegmentBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d that honours `bn_segments` in training mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seg = current_segments()
        if seg is None or not self.training or len(seg) == 1:
            return super().forward(x)
        if sum(seg) != x.size(0):
            raise ValueError(f"BN segments {seg} do not cover the batch of {x.size(0)}")
        return torch.cat([super(SegmentBatchNorm1d, self).forward(part)
                          for part in torch.split(x, list(seg))], dim=0)
