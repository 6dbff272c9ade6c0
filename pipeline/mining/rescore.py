"""Re-score mined candidates with a second model (`mine-candidates --rescore CKPT`).

A cross-attention model cannot be indexed: its score needs the image and the caption
together, so it cannot mine a split on its own (25,000 x 5,000 pairs of BFAN take an hour
on 2 cores; a COCO train split, months). The independent pass shortlists K' candidates
per query, exactly; the re-scorer scores those pairs (Gallery.pair_scores: blocks grouped by image)
and re-orders them by its own score, ties to the lower id, keeping the first K. The
candidate files then carry the re-scorer's scores and order, in the same AOQ / Parquet
formats; the metadata records the re-scorer and K'.

Shortlist sizes: K' per image (i2t); each caption's shortlist is K' x K_t2i / K_i2t
(rounded up), the ratio of the two directions' K, both capped at the gallery size less
the positives.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.data import CAPS_PER_IMAGE
from pipeline.errors import InputError
from pipeline.mining.reference import KnnResult
from pipeline.scoring import checked_pair_scores


def shortlist_sizes(rescore_k: int | None, k_i2t: int, k_t2i: int) -> tuple[int, int]:
    """(K'_i2t, K'_t2i) before capping: K' (default 2 K_i2t) and K' K_t2i / K_i2t."""
    kp = 2 * k_i2t if rescore_k is None else int(rescore_k)
    if kp < k_i2t:
        raise InputError("--rescore-k", f"{kp} is below K i2t = {k_i2t}: the shortlist must "
                                        "hold at least the K candidates kept")
    return kp, max(k_t2i, math.ceil(kp * k_t2i / k_i2t))


def _reorder(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first k by descending score, ties to the lower id."""
    order = np.lexsort((ids, -scores.astype(np.float64)), axis=1)[:, :k]
    return (np.take_along_axis(ids, order, 1).astype(np.int32),
            np.take_along_axis(scores, order, 1).astype(np.float32))


def rescore_knn(knn: KnnResult, gallery, k_i2t: int, k_t2i: int, *, source=None,
                progress: bool = False) -> KnnResult:
    """The shortlists of `knn` re-scored by `gallery`'s model (pipeline.scoring.Gallery of
    the same split), re-ordered, cut to k_i2t / k_t2i per query."""
    n_img, n_cap = knn.i2t.shape[0], knn.t2i.shape[0]
    if (gallery.n_img, gallery.n_cap) != (n_img, n_cap):
        raise InputError(source, f"the re-scorer's split has {gallery.n_img} images x "
                                 f"{gallery.n_cap} captions, the embeddings {n_img} x {n_cap}")
    stats = dict(knn.stats)
    out = {}
    for name, ids, k, queries in (("i2t", knn.i2t, k_i2t, n_img), ("t2i", knn.t2i, k_t2i, n_cap)):
        kp = ids.shape[1]
        q = np.repeat(np.arange(queries), kp)
        flat = ids.reshape(-1).astype(np.int64)
        img_ids, cap_ids = (q, flat) if name == "i2t" else (flat, q)
        s = checked_pair_scores(gallery, img_ids, cap_ids, source=source, who="the re-scorer",
                                progress=progress, desc=f"re-score {name}")
        out[name] = _reorder(ids, s.reshape(queries, kp), k)
        stats[f"rescored_pairs_{name}"] = int(s.size)
    return KnnResult(out["i2t"][0], out["i2t"][1], out["t2i"][0], out["t2i"][1], stats)


def positive_scores(gallery) -> tuple[np.ndarray, np.ndarray]:
    """(pos_i2t, pos_t2i) float64 under the re-scorer, as pipeline.mining.filters defines
    them (a caption's own image; an image's mean over its 5 captions)."""
    pos_t2i = gallery.positives().astype(np.float64)
    return pos_t2i.reshape(-1, CAPS_PER_IMAGE).mean(axis=1), pos_t2i
