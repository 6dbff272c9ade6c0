"""Ensembles as the papers report them: the mean of two or more models' score matrices.

SGRAF is the mean of an SGR and an SAF model's similarities (the maintainer's issue #17),
BFAN's reported figure the mean of a focal_type equal and a prob model, SCAN's best one the
mean of a t2i and an i2t model. Any kinds mix: each member scores the same split with its
own encoders and tokenizer, blocks are averaged block by block (nothing larger than one
block per member is held), and the averaged gallery evaluates like any other
(pipeline.scoring.Gallery.evaluate). The mean is unweighted, as the papers': members whose
score ranges differ (BFAN's [-2, 2], SGR's (0, 1), a cosine's [-1, 1]) weigh by their
spread, and `weights` can correct that.

Members must share the split and the vocabulary: checkpoints whose tokenizers assign
different ids were trained on different data (a COCO and a Flickr30K vocabulary), and their
mean is not the papers' ensemble.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import InputError
from pipeline.scoring import Gallery, encode_gallery


def normalised_weights(weights, n: int) -> np.ndarray:
    """`weights` (default: equal) scaled to sum 1; InputError unless n finite, >= 0, not all 0."""
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise InputError("--weights", f"need {n} finite non-negative weights, not all zero; "
                                      f"got {list(weights)}")
    return w / w.sum()


class EnsembleGallery(Gallery):
    """The weighted mean of member galleries (pipeline.scoring.Gallery) of one split."""

    def __init__(self, members: Sequence[Gallery], weights: Sequence[float] | None = None):
        if len(members) < 2:
            raise InputError(None, "an ensemble needs at least two checkpoints")
        sizes = {(g.n_img, g.n_cap) for g in members}
        if len(sizes) != 1:
            raise InputError(None, f"ensemble members score different splits: {sorted(sizes)}")
        self.members, self.weights = list(members), normalised_weights(weights, len(members))
        self.model, self.img, self.cap, self.device = None, None, None, members[0].device

    @property
    def n_img(self) -> int:
        return self.members[0].n_img

    @property
    def n_cap(self) -> int:
        return self.members[0].n_cap

    @property
    def indexable(self) -> bool:
        return False                  # a mean of scores is no dot product of one embedding

    def block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        out = np.zeros((r1 - r0, c1 - c0), dtype=np.float64)
        for w, g in zip(self.weights, self.members):
            out += w * g.block(r0, r1, c0, c1)
        return out.astype(np.float32)

    def pair_scores(self, ii, jj, *, progress: bool = False, desc: str = "score pairs") -> np.ndarray:
        out = np.zeros(np.shape(ii), dtype=np.float64)
        for w, g in zip(self.weights, self.members):
            out += w * g.pair_scores(ii, jj, progress=progress, desc=desc)
        return out.astype(np.float32)


def load_ensemble(checkpoints: Sequence, data_dir, split: str, *, device: str = "cpu",
                  batch_size: int = 128, weights=None, progress: bool = False):
    """(EnsembleGallery of `split`, [(checkpoint, model name, kind)]) of the checkpoints."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.data.precomp import open_split

    if len(checkpoints) < 2:
        raise InputError(None, "an ensemble needs at least two checkpoints")
    normalised_weights(weights, len(checkpoints))          # before any encoding
    loaded, first = [], None
    for path in checkpoints:
        model, cfg = load_checkpoint(path, device, data_dir=data_dir)
        vocab = (model.tokenizer.kind, model.tokenizer.fingerprint())
        if first is None:
            first = (path, vocab)
        elif vocab != first[1]:
            raise InputError(path, f"was trained on another vocabulary than {first[0]} "
                                   f"(tokenizer {vocab[0]} {vocab[1]} vs {first[1][0]} {first[1][1]}): "
                                   "an ensemble's members must share their data")
        loaded.append((path, model, cfg))
    galleries, members = [], []
    for path, model, cfg in loaded:
        data = open_split(data_dir, split, expected_dim=cfg["model"].get("img_dim"))
        galleries.append(encode_gallery(model, data, batch_size=batch_size, device=device,
                                        progress=progress, source=path))
        members.append({"checkpoint": str(Path(path)), "model": model.name, "kind": model.kind})
    return EnsembleGallery(galleries, weights), members
