"""Evaluation restricted to groups of images, and pairwise accuracies.

Used for diagnostics such as the synthetic data set's families: rank each image only
among the captions of its own family (within-family negatives only) and compare with
random groups of the same size.

Ranks follow :mod:`pipeline.evaluation.ranks` (0-based, stable sort by descending score,
ties broken by lower index); within a group, candidates keep their global order, so
"lower index" means the lower global index.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from pipeline.data import CAPS_PER_IMAGE
from pipeline.evaluation.ranks import metrics_from_ranks, ranks_from_matrix


def _n_img(sims) -> int:
    if len(sims.shape) != 2 or sims.shape[1] != CAPS_PER_IMAGE * sims.shape[0] or sims.shape[0] < 1:
        raise ValueError(f"sims must have shape (N_img, 5*N_img), got {tuple(sims.shape)}")
    return int(sims.shape[0])


def _group_members(groups: np.ndarray, n_img: int) -> list[np.ndarray]:
    groups = np.asarray(groups)
    if groups.shape != (n_img,):
        raise ValueError(f"groups must have shape ({n_img},), got {groups.shape}")
    if groups.dtype.kind not in "iu":
        raise ValueError(f"groups must be integers, got dtype {groups.dtype}")
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # members of each group in ascending index
    return np.split(order, np.cumsum(counts)[:-1])


def _caption_ids(images: np.ndarray) -> np.ndarray:
    return (CAPS_PER_IMAGE * images[:, None] + np.arange(CAPS_PER_IMAGE)[None, :]).reshape(-1)


def group_ranks(sims, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranks when every image competes only within its group.

    ``groups`` (N_img,) int: each image is ranked only against the captions of the images
    in its own group, and each caption only against the images of its caption's group.
    Returns ``(i2t (N_img,), t2i (5*N_img,))`` int64 in global order.
    """
    n = _n_img(sims)
    i2t = np.empty(n, dtype=np.int64)
    t2i = np.empty(CAPS_PER_IMAGE * n, dtype=np.int64)
    for images in _group_members(groups, n):
        caps = _caption_ids(images)
        sub = np.asarray(sims[np.ix_(images, caps)])  # (g, 5g), image k owns captions 5k..5k+4
        r_i, r_t = ranks_from_matrix(sub, chunk=len(images))
        i2t[images] = r_i
        t2i[caps] = r_t
    return i2t, t2i


def group_metrics(sims, groups: np.ndarray) -> dict:
    """metrics_from_ranks of the pooled group ranks, plus "n_groups" and "group_size" (mean)."""
    n = _n_img(sims)
    members = _group_members(groups, n)
    out = metrics_from_ranks(*group_ranks(sims, groups))
    out["n_groups"] = len(members)
    out["group_size"] = float(np.mean([len(m) for m in members]))
    return out


def random_groups(n_img: int, group_size: int, seed: int = 0) -> np.ndarray:
    """A random partition of range(n_img) into groups of ``group_size`` (the last may be smaller)."""
    n_img, group_size = int(n_img), int(group_size)
    if n_img < 0 or group_size < 1:
        raise ValueError(f"need n_img >= 0 and group_size >= 1, got {n_img}, {group_size}")
    perm = np.random.default_rng(seed).permutation(n_img)
    groups = np.empty(n_img, dtype=np.int64)
    groups[perm] = np.arange(n_img) // group_size
    return groups


def pairwise_accuracy(sims, pairs) -> dict:
    """How often image i's own captions beat image j's, for labelled pairs (i, j, label).

    * i2t: mean over captions c of i and c' of j of [S[i, c] > S[i, c']] (25 comparisons);
    * t2i: mean over captions c of i of [S[i, c] > S[j, c]] (5 comparisons).

    Strict ">" (a tie counts as a failure). Returns ``{label: {"i2t": %, "t2i": %, "n": pairs}}``
    for every label, in first-seen order, plus ``"all"`` over every pair ("i2t"/"t2i" are
    None when there are no pairs). The label "all" is reserved.
    """
    n = _n_img(sims)
    pairs = list(pairs)
    labels = [p[2] for p in pairs]
    if "all" in labels:
        raise ValueError('the pair label "all" is reserved')
    ii = np.array([int(p[0]) for p in pairs], dtype=np.int64)
    jj = np.array([int(p[1]) for p in pairs], dtype=np.int64)
    if ii.size and (min(ii.min(), jj.min()) < 0 or max(ii.max(), jj.max()) >= n):
        raise ValueError(f"pair image index out of range [0, {n})")

    i2t_acc = np.empty(len(pairs))
    t2i_acc = np.empty(len(pairs))
    five = np.arange(CAPS_PER_IMAGE)
    step = 65536
    for s0 in range(0, len(pairs), step):
        i, j = ii[s0:s0 + step], jj[s0:s0 + step]
        caps_i = CAPS_PER_IMAGE * i[:, None] + five[None, :]  # (P, 5)
        caps_j = CAPS_PER_IMAGE * j[:, None] + five[None, :]
        own = np.asarray(sims[i[:, None], caps_i])  # S[i, c]
        other = np.asarray(sims[i[:, None], caps_j])  # S[i, c']
        rival = np.asarray(sims[j[:, None], caps_i])  # S[j, c]
        i2t_acc[s0:s0 + step] = (own[:, :, None] > other[:, None, :]).mean(axis=(1, 2))
        t2i_acc[s0:s0 + step] = (own > rival).mean(axis=1)

    def summary(mask: np.ndarray) -> dict:
        k = int(mask.sum())
        if k == 0:
            return {"i2t": None, "t2i": None, "n": 0}
        return {"i2t": float(100.0 * i2t_acc[mask].mean()), "t2i": float(100.0 * t2i_acc[mask].mean()), "n": k}

    label_arr = np.empty(len(labels), dtype=object)
    label_arr[:] = labels
    out: dict = OrderedDict()
    for lab in dict.fromkeys(labels):
        out[lab] = summary(label_arr == lab)
    out["all"] = summary(np.ones(len(pairs), dtype=bool))
    return dict(out)


def group_entries(n_img: int, groupings=(), pairs=()) -> tuple[np.ndarray, np.ndarray]:
    """(ii, jj): the distinct entries of the score matrix that group_ranks reads for each
    grouping in `groupings` and pairwise_accuracy for `pairs`, sorted by image then caption.
    A model whose full matrix is costly (a cross model) scores only these (a partial
    matrix, the rest NaN; tested to hold every entry those readers use)."""
    keys = []
    n_cap = CAPS_PER_IMAGE * n_img
    for groups in groupings:
        for images in _group_members(groups, n_img):
            caps = _caption_ids(images)
            keys.append((images[:, None] * n_cap + caps[None, :]).reshape(-1))
    for i, j, *_ in pairs:
        ci, cj = _caption_ids(np.array([i])), _caption_ids(np.array([j]))
        keys += [i * n_cap + ci, i * n_cap + cj, j * n_cap + ci]
    if not keys:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    keys = np.unique(np.concatenate(keys).astype(np.int64))
    return keys // n_cap, keys % n_cap
