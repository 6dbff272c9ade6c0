"""Embedding rows: the finite/non-zero check every scorer and miner applies, and the unit
rows mining indexes. (Encoding a split with a model is pipeline.scoring's.)
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import InputError

# Elements per chunk when scanning rows: a memory-mapped file is never read whole.
_CHECK_CHUNK_ELEMS = 1 << 22


def check_embedding_rows(rows, source, what: str, *, lead: str = "has", start: int = 0,
                         total: int | None = None, zero_ok: bool = False) -> None:
    """Refuse rows with a NaN/inf value or (unless zero_ok) an all-zero row, with one
    InputError naming `source`.

    Either scores NaN or ties every candidate at 0, and ranking or mining would then turn
    them into numbers. `what` ("image" / "caption") words the message; `start` / `total`
    place a block of rows within the whole set (row ids are global).
    """
    n = int(rows.shape[0])
    if n == 0:
        return
    step = max(1, _CHECK_CHUNK_ELEMS // max(1, int(np.prod(rows.shape[1:]))))
    n_bad_val = n_zero = 0
    first = None
    for s in range(0, n, step):
        blk = rows[s:s + step]
        if isinstance(blk, torch.Tensor):
            blk = blk.detach().float().cpu().numpy()
        blk = np.asarray(blk).reshape(min(step, n - s), -1)
        bad_val = ~np.isfinite(blk).all(axis=1)
        zero = np.zeros_like(bad_val) if zero_ok else ~bad_val & ~(blk != 0).any(axis=1)
        n_bad_val += int(bad_val.sum())
        n_zero += int(zero.sum())
        if first is None and (bad_val.any() or zero.any()):
            first = start + s + int(np.argmax(bad_val | zero))
    if first is None:
        return
    parts = [f"{k} {kind}" for k, kind in ((n_bad_val, "non-finite"), (n_zero, "zero-norm")) if k]
    plural = "s" if n_bad_val + n_zero > 1 else ""
    scope = ""
    if total is not None and n < total:
        scope = f" in {what}s {start}..{start + n - 1} of {total}"
    raise InputError(source, f"{lead} {' and '.join(parts)} {what} embedding{plural}{scope} "
                             f"(first: {what} {first})")


def unit_rows(emb: torch.Tensor) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows stay zero).

    The indep models already normalise their outputs, but mining's exactness bound and the
    candidate scores assume unit rows in float32: a model built with no_imgnorm /
    no_txtnorm, or a bf16/fp16 forward pass, would otherwise hand over rows that are not.
    Re-normalising an already unit row changes it by at most a few float32 ulps.
    """
    x = emb.detach().float().cpu()
    norm = x.norm(dim=1, keepdim=True)
    x = x / norm.clamp_min(torch.finfo(torch.float32).tiny)
    return x.numpy()
