"""Batched encoding of a split's images and captions with a model, in eval mode.

The range functions are the one encoder: evaluation and dev-split selection call them on a
whole split with the model's own outputs, the mining `embed` stage (and its dask shards)
on blocks with the rows re-normalised.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.datasets import CaptionDataset, collate_captions
from pipeline.errors import InputError
from pipeline.progress import progress as progress_bar

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


def _rows(emb: torch.Tensor) -> np.ndarray:
    return emb.detach().float().cpu().numpy()


def _unit_rows(emb: torch.Tensor) -> np.ndarray:
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


def _check_range(start: int, stop: int, n: int, what: str) -> tuple[int, int]:
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= n:
        raise IndexError(f"{what} range [{start}, {stop}) outside [0, {n})")
    return start, stop


@torch.no_grad()
def encode_image_range(model, split, start: int, stop: int, *, batch_size: int = 256,
                       device: str = "cpu", normalize: bool = True,
                       progress: bool = False) -> np.ndarray:
    """(stop - start, D) float32: unique images start .. stop-1 in row order, rows
    L2-normalised unless normalize=False (the model's own outputs).

    ``model`` must already be on ``device``; it is put in eval mode for the call and its
    previous mode restored.
    """
    start, stop = _check_range(start, stop, split.n_images, "image")
    was_training = model.training
    model.eval()
    try:
        parts = []
        for b0 in progress_bar(range(start, stop, batch_size), desc="encode images",
                               disable=not progress, leave=False):
            b1 = min(stop, b0 + batch_size)
            feats = torch.from_numpy(split.image_rows(np.arange(b0, b1)))
            lengths = torch.full((b1 - b0,), feats.shape[1], dtype=torch.long)
            emb = model.encode_image(feats.to(device), lengths.to(device))
            parts.append(_unit_rows(emb) if normalize else _rows(emb))
    finally:
        model.train(was_training)
    if not parts:
        return np.empty((0, _embed_dim(model)), dtype=np.float32)
    return np.concatenate(parts, axis=0)


@torch.no_grad()
def encode_caption_range(model, split, vocab, start: int, stop: int, *, batch_size: int = 512,
                         device: str = "cpu", normalize: bool = True,
                         progress: bool = False) -> np.ndarray:
    """(stop - start, D) float32: captions start .. stop-1 in file order, rows
    L2-normalised unless normalize=False."""
    start, stop = _check_range(start, stop, split.n_captions, "caption")
    dataset = CaptionDataset(split, vocab)
    was_training = model.training
    model.eval()
    out = None
    try:
        for b0 in progress_bar(range(start, stop, batch_size), desc="encode captions",
                               disable=not progress, leave=False):
            b1 = min(stop, b0 + batch_size)
            batch = collate_captions([dataset[j] for j in range(b0, b1)])
            emb = model.encode_text(batch["tokens"].to(device), batch["lengths"].to(device))
            emb = _unit_rows(emb) if normalize else _rows(emb)
            if out is None:
                out = np.empty((stop - start, emb.shape[1]), dtype=np.float32)
            out[batch["index"].numpy() - start] = emb  # collate sorts by length: put rows back
    finally:
        model.train(was_training)
    if out is None:
        return np.empty((0, _embed_dim(model)), dtype=np.float32)
    return out


def _embed_dim(model) -> int:
    cfg = getattr(model, "config", {}) or {}
    return int(cfg.get("embed_size", 0))


def encode_split(model, split, vocab, *, batch_size: int = 128, device: str = "cpu",
                 progress: bool = False, source=None) -> tuple[np.ndarray, np.ndarray]:
    """(N_img, D) and (N_cap, D) float32: the model's own outputs for every unique image and
    caption of the split, in file order.

    A non-finite or all-zero row raises InputError(source) (e.g. the checkpoint path): every
    caller scores or mines these rows, and such a model must give no number at all."""
    img = encode_image_range(model, split, 0, split.n_images, batch_size=batch_size,
                             device=device, normalize=False, progress=progress)
    check_embedding_rows(img, source, "image", lead="the model gives")
    cap = encode_caption_range(model, split, vocab, 0, split.n_captions,
                               batch_size=2 * batch_size, device=device, normalize=False,
                               progress=progress)
    check_embedding_rows(cap, source, "caption", lead="the model gives")
    return img, cap
