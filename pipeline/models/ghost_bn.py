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


class _SegmentedBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm of consecutive row segments, each with its own statistics,
    written straight into one output and one input gradient: the same kernels as one
    nn.BatchNorm1d call per segment, without the split/cat copies (two passes over the
    activations per layer and step, a tenth of VSRN's Rs_GCN time)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momenta, eps, sizes):
        x = x.contiguous()
        y = torch.empty_like(x)
        stats = x.new_empty(2, len(sizes), x.size(1))   # saved mean, saved 1/std
        start = 0
        for k, (n, momentum) in enumerate(zip(sizes, momenta)):
            torch.ops.aten.native_batch_norm.out(
                x[start:start + n], weight, bias, running_mean, running_var, True, momentum,
                eps, out=y[start:start + n], save_mean=stats[0, k], save_invstd=stats[1, k])
            start += n
        ctx.save_for_backward(x, weight, stats)
        ctx.eps, ctx.sizes = eps, sizes
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, stats = ctx.saved_tensors
        grad = grad.contiguous()
        gx = torch.empty_like(x)
        gw, gb = torch.zeros_like(weight), torch.zeros_like(weight)
        part_w, part_b = torch.empty_like(weight), torch.empty_like(weight)
        start = 0
        for k, n in enumerate(ctx.sizes):
            torch.ops.aten.native_batch_norm_backward.out(
                grad[start:start + n], x[start:start + n], weight, None, None, stats[0, k],
                stats[1, k], True, ctx.eps, [True, True, True],
                out0=gx[start:start + n], out1=part_w, out2=part_b)
            gw += part_w
            gb += part_b
            start += n
        return gx, gw, gb, None, None, None, None, None


class SegmentBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d that honours `bn_segments` in training mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seg = current_segments()
        if seg is None or not self.training or len(seg) == 1:
            return super().forward(x)
        if sum(seg) != x.size(0):
            raise ValueError(f"BN segments {seg} do not cover the batch of {x.size(0)}")
        if not (self.affine and self.track_running_stats) or min(seg) < 2:
            # the general path (and nn.BatchNorm1d's own error for a 1-row segment)
            return torch.cat([super(SegmentBatchNorm1d, self).forward(part)
                              for part in torch.split(x, list(seg))], dim=0)
        momenta = []
        for _ in seg:   # what one forward per segment would do to the counter and momentum
            self.num_batches_tracked.add_(1)
            momenta.append(1.0 / float(self.num_batches_tracked) if self.momentum is None
                           else self.momentum)
        return _SegmentedBatchNorm.apply(x, self.weight, self.bias, self.running_mean,
                                         self.running_var, momenta, self.eps, tuple(seg))
