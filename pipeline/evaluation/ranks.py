"""Exact retrieval ranks and recall metrics from an image-text similarity matrix.

Conventions
-----------
The similarity matrix ``S`` has shape ``(N_img, 5 * N_img)``: row ``i`` is image ``i``,
column ``j`` is caption ``j`` and caption ``j`` belongs to image ``j // 5``.

* i2t rank of image ``i``: the best (smallest) 0-based rank, in row ``i``, among its own
  captions ``5i .. 5i+4``.
* t2i rank of caption ``j``: the 0-based rank, in column ``j``, of its image ``j // 5``.

Tie rule
--------
A rank is the position in a *stable* sort by descending score, so ties are broken in
favour of the lower index. Written as a count, the rank of candidate ``p`` in a row
(or column) ``s`` is::

    rank(p) = #{k : s[k] > s[p]} + #{k < p : s[k] == s[p]}

This is what ``np.argsort(-s, kind="stable")`` gives, and it is deterministic: a model
that outputs a constant score gets rank 0 for the first candidate, not an optimistic
rank for every candidate.

NaN scores
----------
A NaN score ranks worst: a NaN positive ranks last (N - 1, N the candidates in the row or
column; an image ranks last when all five of its captions score NaN), and a NaN negative
never beats or ties a positive. So a NaN model scores recall 0, never a perfect rsum.

Memory
------
Nothing here materialises more than one row block of ``chunk x N_cap`` scores (plus
boolean comparison masks of the same shape). i2t ranks come from each block's rows;
t2i ranks are accumulated as per-column counts of images that beat the caption's own
image, so one pass over the row blocks gives both directions.

Metrics: R@K = 100 * mean(rank < K); medr = floor(median(rank)) + 1;
meanr = mean(rank) + 1; rsum = i2t R@1 + R@5 + R@10 + t2i R@1 + R@5 + R@10.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from pipeline.data import CAPS_PER_IMAGE


METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr",
    "rsum",
)
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def _check_chunk(chunk: int) -> int:
    chunk = int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return chunk


def ranks_from_blocks(
    block_fn: Callable[[int, int], np.ndarray],
    n_img: int,
    pos_scores: np.ndarray,
    chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact i2t and t2i ranks from row blocks of the similarity matrix.

    ``block_fn(r0, r1)`` returns ``S[r0:r1]`` as an array of shape ``(r1 - r0, 5 * n_img)``;
    ``pos_scores[j] = S[j // 5, j]`` (shape ``(5 * n_img,)``).

    Returns ``(i2t_ranks (n_img,), t2i_ranks (5 * n_img,))``, int64, 0-based, with the tie
    rule of the module docstring. The i2t ranks use the block's own values. The t2i ranks
    compare every other image's score with ``pos_scores``; the caption's own image is
    never counted against itself, so a ``pos_scores`` that differs from the block's value
    by rounding (e.g. a separately computed dot product) cannot push a rank up by one.
    """
    n_img = int(n_img)
    if n_img < 1:
        raise ValueError(f"n_img must be >= 1, got {n_img}")
    chunk = _check_chunk(chunk)
    n_cap = CAPS_PER_IMAGE * n_img
    pos = np.asarray(pos_scores).reshape(-1)
    if pos.shape[0] != n_cap:
        raise ValueError(f"pos_scores has {pos.shape[0]} entries, expected {n_cap} (5 * n_img)")

    i2t = np.empty(n_img, dtype=np.int64)
    t2i = np.zeros(n_cap, dtype=np.int64)
    cols = np.arange(n_cap)
    five = np.arange(CAPS_PER_IMAGE)

    for r0 in range(0, n_img, chunk):
        r1 = min(r0 + chunk, n_img)
        b = r1 - r0
        blk = np.asarray(block_fn(r0, r1))
        if blk.shape != (b, n_cap):
            raise ValueError(f"block_fn({r0}, {r1}) returned shape {blk.shape}, expected {(b, n_cap)}")
        rows = np.arange(b)
        c0, c1 = CAPS_PER_IMAGE * r0, CAPS_PER_IMAGE * r1

        # ---- i2t: the best positive is the first (lowest index) maximum among the five;
        # its rank is the minimum over the five ranks under the tie rule.
        pos_cols = c0 + CAPS_PER_IMAGE * rows[:, None] + five[None, :]  # (b, 5)
        own = blk[rows[:, None], pos_cols]
        own_nan = np.isnan(own)
        if own_nan.any():
            # argmax would pick a NaN: take the first maximum among the non-NaN positives
            best = np.argmax(np.where(own_nan, -np.inf, own), axis=1)
            fix = own_nan[rows, best]  # every non-NaN positive is -inf (or there is none)
            best[fix] = np.argmax(~own_nan[fix], axis=1)
        else:
            best = np.argmax(own, axis=1)
        p = pos_cols[rows, best]
        v = own[rows, best][:, None]
        # comparisons with NaN are False, so a NaN negative never beats a positive
        ranks = np.count_nonzero(blk > v, axis=1).astype(np.int64)
        eq = blk == v
        tied_rows = np.flatnonzero(np.count_nonzero(eq, axis=1) > 1)
        if tied_rows.size:
            ranks[tied_rows] += np.count_nonzero(
                eq[tied_rows] & (cols[None, :] < p[tied_rows, None]), axis=1
            )
        # ... and would give a NaN positive rank 0: it ranks last instead
        ranks[own_nan.all(axis=1)] = n_cap - 1
        i2t[r0:r1] = ranks
        del eq

        # ---- t2i: per column, count the images of this block that beat the caption's image.
        t2i += np.count_nonzero(blk > pos[None, :], axis=0)
        # columns whose image comes after this block: every tie here has a lower index
        if c1 < n_cap:
            t2i[c1:] += np.count_nonzero(blk[:, c1:] == pos[None, c1:], axis=0)
        # columns whose image is in this block: ties count only for rows above the image
        band = blk[:, c0:c1]
        band_pos = pos[c0:c1]
        g_local = np.arange(c1 - c0) // CAPS_PER_IMAGE
        t2i[c0:c1] += np.count_nonzero(
            (band == band_pos[None, :]) & (rows[:, None] < g_local[None, :]), axis=0
        )
        # never count the caption's own image against itself
        t2i[c0:c1] -= band[g_local, np.arange(c1 - c0)] > band_pos
        # columns whose image comes before this block: ties have a higher index, not counted

    # a NaN positive beats nothing and ties nothing (count 0): it ranks last instead
    t2i[np.isnan(pos)] = n_img - 1
    return i2t, t2i


def _check_square5(shape: tuple, what: str = "sims") -> int:
    if len(shape) != 2:
        raise ValueError(f"{what} must be 2-D (N_img, 5*N_img), got shape {tuple(shape)}")
    n, m = shape
    if n < 1 or m != CAPS_PER_IMAGE * n:
        raise ValueError(f"{what} must have shape (N_img, 5*N_img), got {tuple(shape)}")
    return int(n)


def positive_scores(sims) -> np.ndarray:
    """``S[j // 5, j]`` for every caption ``j`` (works on np.memmap without loading it)."""
    n = _check_square5(sims.shape)
    j = np.arange(CAPS_PER_IMAGE * n)
    return np.asarray(sims[j // CAPS_PER_IMAGE, j])


def ranks_from_matrix(sims, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Ranks from a full (N, 5N) matrix (np.ndarray or np.memmap), read one row block at a time."""
    n = _check_square5(sims.shape)
    pos = positive_scores(sims)
    return ranks_from_blocks(lambda r0, r1: sims[r0:r1], n, pos, chunk=chunk)


def _as_f32_tensor(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float32)
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if not a.flags.writeable or isinstance(a, np.memmap):  # read-only memmap: copy the slice
        a = np.array(a, dtype=np.float32)
    return torch.from_numpy(a)


def ranks_from_embeddings(img_embs, cap_embs, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Ranks for ``S = img_embs @ cap_embs.T`` computed block by block in float32 (torch).

    ``img_embs`` (N, d) and ``cap_embs`` (5N, d): numpy arrays, memmaps or torch tensors.
    """
    import torch

    chunk = _check_chunk(chunk)
    if len(img_embs.shape) != 2 or len(cap_embs.shape) != 2:
        raise ValueError(f"embeddings must be 2-D, got {tuple(img_embs.shape)} and {tuple(cap_embs.shape)}")
    n, d = img_embs.shape
    if n < 1 or cap_embs.shape != (CAPS_PER_IMAGE * n, d):
        raise ValueError(
            f"cap_embs must have shape (5*N_img, d) = {(CAPS_PER_IMAGE * n, d)}, got {tuple(cap_embs.shape)}"
        )
    cap_t = _as_f32_tensor(cap_embs)

    # positive scores: row-wise dot products, computed in caption chunks
    pos = np.empty(CAPS_PER_IMAGE * n, dtype=np.float32)
    step = max(1, chunk) * CAPS_PER_IMAGE
    with torch.no_grad():
        for c0 in range(0, CAPS_PER_IMAGE * n, step):
            c1 = min(c0 + step, CAPS_PER_IMAGE * n)
            img_rep = _as_f32_tensor(img_embs[c0 // CAPS_PER_IMAGE: (c1 - 1) // CAPS_PER_IMAGE + 1])
            img_rep = img_rep.repeat_interleave(CAPS_PER_IMAGE, dim=0)
            pos[c0:c1] = (img_rep * cap_t[c0:c1]).sum(dim=1).numpy()

    def block_fn(r0: int, r1: int) -> np.ndarray:
        with torch.no_grad():
            return (_as_f32_tensor(img_embs[r0:r1]) @ cap_t.T).numpy()

    return ranks_from_blocks(block_fn, n, pos, chunk=chunk)


def metrics_from_ranks(i2t_ranks, t2i_ranks) -> dict:
    """The 11 metrics (floats) of the module docstring from 0-based rank arrays."""
    out: dict = {}
    for name, r in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        r = np.asarray(r)
        if r.size == 0:
            raise ValueError(f"no {name} ranks")
        out[f"{name}_r1"] = float(100.0 * np.mean(r < 1))
        out[f"{name}_r5"] = float(100.0 * np.mean(r < 5))
        out[f"{name}_r10"] = float(100.0 * np.mean(r < 10))
        out[f"{name}_medr"] = float(np.floor(np.median(r)) + 1)
        out[f"{name}_meanr"] = float(np.mean(r) + 1)
    out["rsum"] = float(sum(out[k] for k in RECALL_KEYS))
    return {k: out[k] for k in METRIC_KEYS}
