"""Batched encoding of a split's images and captions with a model, in eval mode.

The range functions are the one encoder: evaluation and dev-split selection call them on a
whole split with the model's own outputs, the mining `embed` stage (and its dask shards)
on blocks with the rows re-normalised.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.datasets import CaptionDataset, collate_captions
from pipeline.progress import progress as progress_bar


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
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(N_img, D) and (N_cap, D) float32: the model's own outputs for every unique image and
    caption of the split, in file order."""
    img = encode_image_range(model, split, 0, split.n_images, batch_size=batch_size,
                             device=device, normalize=False, progress=progress)
    cap = encode_caption_range(model, split, vocab, 0, split.n_captions,
                               batch_size=2 * batch_size, device=device, normalize=False,
                               progress=progress)
    return img, cap
