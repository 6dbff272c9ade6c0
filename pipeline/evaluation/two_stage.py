"""Two-stage (shortlist-then-rerank) evaluation of a cross-attention model.

Every query ranks its gallery with a first-stage, independent model's scores (dot products
of embedding rows: an `itm-pipeline embed` folder or an indep checkpoint); the top K of
that ranking (the *shortlist*) are re-scored by the cross model and re-ordered by the cross
score; the rest of the gallery keeps the first-stage order after them. A query's rank is
the ground truth's position in that composite list:

* i2t (an image against the captions of its gallery): the best position among its five
  captions; t2i (a caption against the images): the position of its image.
* Ties, in both stages, go to the lower index (pipeline.evaluation.ranks' rule): the
  shortlist is the first K of a stable sort by descending first-stage score, and within it
  equal cross scores keep index order.
* So a ground truth inside the shortlist gets its cross-model rank *among the shortlist*;
  one outside it keeps its first-stage rank (>= K).

Exactness. The rank of a ground truth p in the shortlist is its full cross-model rank
minus the number of items outside the shortlist that the cross model puts above p. Hence
R@1, R@5 and R@10 of a query equal those of the full cross-model evaluation whenever its
shortlist holds the cross model's own top 10 for that query and K >= 10 (then every item
that beats a ground truth of full rank < 10 is in the shortlist, and a ground truth of full
rank >= 10 is beaten by those 10 in the shortlist or sits at a first-stage rank >= K).
"The ground truth is in the shortlist" alone is not quite enough: an item outside the
shortlist that the cross model would rank above the ground truth is ranked below it here,
so a two-stage recall can only be >= the full one on such a query. The median and mean
ranks are not exact (ranks beyond K are the first stage's). With K >= the gallery size
(K = n_cap: every caption and every image shortlisted) the result is the full cross
evaluation's, metric for metric.

Folds (coco1k_5fold) are cut as in pipeline.evaluation.protocols: each fold's queries rank
that fold's gallery only, and the shortlist is computed within the fold.

Cost: (n_img * K_i2t + n_cap * K_t2i) cross scores per fold at most (the union of both
directions' pairs is scored once), against n_img * n_cap for the full matrix: on COCO-5K
with K = 100, 3.0M pairs instead of 125M. The pairs are scored by Gallery.pair_scores
(pipeline.scoring: grouped by image, as small blocks of the model's own shard path; an
ensemble averages its members'). The first stage is a tiled float32 GEMM, one row block
at a time.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.data import CAPS_PER_IMAGE
from pipeline.embeddings import check_embedding_rows
from pipeline.errors import InputError
from pipeline.evaluation.protocols import _check_protocol, _finish, _folds
from pipeline.evaluation.ranks import metrics_from_ranks
from pipeline.progress import progress as progress_bar

DEFAULT_K = 100
QUERY_CHUNK = 256              # first-stage queries per GEMM block


# --------------------------------------------------------------------------- first stage
def shortlist_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """(rows, n) bool: the first k of each row in a stable sort by descending score (ties to
    the lower index), i.e. the items whose first-stage rank is < k."""
    rows, n = scores.shape
    if k >= n:
        return np.ones_like(scores, dtype=bool)
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]       # the k-th largest value
    above = scores > kth
    tied = scores == kth
    need = k - above.sum(axis=1, keepdims=True)
    return above | (tied & (np.cumsum(tied, axis=1) <= need))


def _first_ranks(scores: np.ndarray, pos: np.ndarray, pos_idx: np.ndarray) -> np.ndarray:
    """0-based stable ranks of items pos_idx (rows, m) whose scores are pos (rows, m)."""
    n = scores.shape[1]
    cols = np.arange(n)
    out = np.empty(pos.shape, dtype=np.int64)
    for t in range(pos.shape[1]):
        v = pos[:, t:t + 1]
        out[:, t] = (np.count_nonzero(scores > v, axis=1)
                     + np.count_nonzero((scores == v) & (cols[None, :] < pos_idx[:, t:t + 1]), axis=1))
    return out


def _stage_one(q_rows: np.ndarray, g_rows: np.ndarray, gt_of, k: int, progress: bool, desc: str):
    """For every query row: its shortlist (rows, k) of gallery ids (ascending) and its
    ground truths' first-stage ranks (rows, m). gt_of(q0, q1) -> (q1-q0, m) gallery ids."""
    g = torch.from_numpy(np.array(g_rows, dtype=np.float32))   # a copy: memmaps are read-only
    nq, ng = q_rows.shape[0], g_rows.shape[0]
    k = min(k, ng)
    sl = np.empty((nq, k), dtype=np.int64)
    ranks = None
    for q0 in progress_bar(range(0, nq, QUERY_CHUNK), desc=desc, disable=not progress, leave=False):
        q1 = min(nq, q0 + QUERY_CHUNK)
        q = torch.from_numpy(np.array(q_rows[q0:q1], dtype=np.float32))
        s = (q @ g.T).numpy()
        if not np.isfinite(s).all():
            r, c = np.argwhere(~np.isfinite(s))[0]
            raise InputError("shortlist", f"non-finite first-stage score for query {q0 + r}, item {c}")
        mask = shortlist_mask(s, k)
        sl[q0:q1] = np.nonzero(mask)[1].reshape(q1 - q0, k)
        gt = gt_of(q0, q1)
        r1 = _first_ranks(s, np.take_along_axis(s, gt, axis=1), gt)
        if ranks is None:
            ranks = np.empty((nq, gt.shape[1]), dtype=np.int64)
        ranks[q0:q1] = r1
    return sl, ranks


# --------------------------------------------------------------------------- cross scores
def pair_scores(gallery, ii: np.ndarray, jj: np.ndarray, *, source=None,
                progress: bool = False) -> np.ndarray:
    """float32 cross scores S[ii[p], jj[p]] (global ids); a non-finite one is an InputError."""
    from pipeline.scoring import checked_pair_scores

    return checked_pair_scores(gallery, ii, jj, source=source, tail=": no metrics",
                               progress=progress, desc="cross re-score")


# --------------------------------------------------------------------------- ranks
def _rerank(sl: np.ndarray, s2: np.ndarray, gt: np.ndarray, r1: np.ndarray) -> np.ndarray:
    """Composite ranks (rows, m) of ground truths gt (rows, m) with first-stage ranks r1:
    inside the shortlist sl (rows, k; cross scores s2) the stable cross rank among it,
    outside it the first-stage rank."""
    k = sl.shape[1]
    out = r1.copy()
    for t in range(gt.shape[1]):
        hit = sl == gt[:, t:t + 1]                          # at most one per row
        inside = hit.any(axis=1)
        v = np.where(hit, s2, -np.inf).max(axis=1, keepdims=True)
        rank = (np.count_nonzero(s2 > v, axis=1)
                + np.count_nonzero((s2 == v) & (sl < gt[:, t:t + 1]), axis=1))
        out[inside, t] = rank[inside]
        assert (r1[inside, t] < k).all() and (r1[~inside, t] >= k).all()
    return out


def two_stage_ranks(gallery, first_img: np.ndarray, first_cap: np.ndarray, f0: int, f1: int,
                    k_i2t: int, k_t2i: int, *, source=None, progress: bool = False) -> dict:
    """Ranks of the images f0..f1-1 and their captions against each other (one fold)."""
    c0, c1 = CAPS_PER_IMAGE * f0, CAPS_PER_IMAGE * f1
    nf, nc = f1 - f0, c1 - c0
    img, cap = first_img[f0:f1], first_cap[c0:c1]
    five = np.arange(CAPS_PER_IMAGE)
    sl_i, r1_i = _stage_one(img, cap, lambda a, b: CAPS_PER_IMAGE * np.arange(a, b)[:, None] + five,
                            k_i2t, progress, "shortlist i2t")
    sl_t, r1_t = _stage_one(cap, img, lambda a, b: (np.arange(a, b) // CAPS_PER_IMAGE)[:, None],
                            k_t2i, progress, "shortlist t2i")
    # the union of both directions' pairs (fold-local ids), scored once, grouped by image
    key_i = np.repeat(np.arange(nf), sl_i.shape[1]) * nc + sl_i.reshape(-1)
    key_t = sl_t.reshape(-1) * nc + np.repeat(np.arange(nc), sl_t.shape[1])
    keys = np.unique(np.concatenate([key_i, key_t]))
    scores = pair_scores(gallery, f0 + keys // nc, c0 + keys % nc, source=source, progress=progress)
    s2_i = scores[np.searchsorted(keys, key_i)].reshape(sl_i.shape)
    s2_t = scores[np.searchsorted(keys, key_t)].reshape(sl_t.shape)
    gt_i = CAPS_PER_IMAGE * np.arange(nf)[:, None] + five
    ranks_i = _rerank(sl_i, s2_i, gt_i, r1_i).min(axis=1)
    ranks_t = _rerank(sl_t, s2_t, (np.arange(nc) // CAPS_PER_IMAGE)[:, None], r1_t)[:, 0]
    return {"i2t": ranks_i, "t2i": ranks_t,
            "in_i2t": (r1_i < sl_i.shape[1]).any(axis=1), "in_t2i": r1_t[:, 0] < sl_t.shape[1],
            "pairs": int(len(keys))}


def evaluate_two_stage(gallery, first_img, first_cap, protocol: str, k: int = DEFAULT_K, *,
                       k_t2i: int | None = None, source=None, progress: bool = False) -> dict:
    """Metrics (the full evaluation's keys + "protocol") of the composite ranking, plus
    shortlist_k (and shortlist_k_t2i when different), gt_in_shortlist_i2t / _t2i (% of
    queries whose ground truth is in the shortlist) and pairs_scored (cross scores)."""
    n = gallery.n_img
    k, k_t2i = int(k), int(k if k_t2i is None else k_t2i)
    if k < 1 or k_t2i < 1:
        raise InputError(None, f"shortlist_k must be >= 1, got {min(k, k_t2i)}")
    if gallery.indexable:
        raise InputError(source, "a two-stage evaluation re-scores with a cross-attention model; "
                                 "this one is independent (evaluate it directly)")
    _check_protocol(protocol, n, source)
    if first_img.shape[0] != n or first_cap.shape[0] != gallery.n_cap:
        raise InputError("shortlist", f"first-stage embeddings have {first_img.shape[0]} image and "
                                      f"{first_cap.shape[0]} caption rows, the split {n} and "
                                      f"{gallery.n_cap}")
    folds, hits_i, hits_t, pairs = [], 0, 0, 0
    for f0, f1 in _folds(protocol, n):
        r = two_stage_ranks(gallery, first_img, first_cap, f0, f1, k, k_t2i, source=source,
                            progress=progress)
        folds.append(metrics_from_ranks(r["i2t"], r["t2i"]))
        hits_i += int(r["in_i2t"].sum())
        hits_t += int(r["in_t2i"].sum())
        pairs += r["pairs"]
    out = _finish(folds, protocol)
    out["shortlist_k"] = k
    if k_t2i != k:
        out["shortlist_k_t2i"] = k_t2i
    out["gt_in_shortlist_i2t"] = 100.0 * hits_i / n
    out["gt_in_shortlist_t2i"] = 100.0 * hits_t / gallery.n_cap
    out["pairs_scored"] = pairs
    return out


# --------------------------------------------------------------------------- the source
def load_shortlist_rows(src, *, split: str, data_dir, n_img: int, n_cap: int, device: str = "cpu",
                        batch_size: int = 128, progress: bool = False, data=None):
    """(img_rows, cap_rows, info) of the first stage for `split`: from an `embed` folder
    (embeddings.json + img_embs.npy / cap_embs.npy, checked against the split) or an indep
    checkpoint folder (the split embedded with it). Anything else is one InputError."""
    from pipeline.io import open_npy
    from pipeline.mining.embed import CAP_FILE, FORMAT, IMG_FILE, META_FILE

    src = Path(src)
    if not src.is_dir():
        raise InputError(src, "shortlist source not found: give an `itm-pipeline embed` folder "
                              "or an independent-model checkpoint folder")
    meta_file = src / META_FILE
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise InputError(meta_file, f"unreadable embeddings metadata ({e.__class__.__name__})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InputError(meta_file, f"not an `itm-pipeline embed` metadata file (format {FORMAT})")
        if meta.get("split") != split:
            raise InputError(src, f"embeddings of split {meta.get('split')!r}, evaluating split "
                                  f"{split!r}: embed the {split} split for the shortlist")
        rec = meta.get("data")
        if rec is not None and Path(rec).resolve() != Path(data_dir).resolve():
            raise InputError(src, f"embeddings of the data folder {rec}, evaluating {data_dir}")
        files = meta.get("files") or {}
        img = open_npy(src / files.get("img", IMG_FILE), what="image embeddings")
        cap = open_npy(src / files.get("cap", CAP_FILE), what="caption embeddings")
        for arr, name, want in ((img, files.get("img", IMG_FILE), n_img),
                                (cap, files.get("cap", CAP_FILE), n_cap)):
            if arr.ndim != 2 or arr.shape[0] != want or arr.dtype.kind != "f":
                raise InputError(src / name, f"shape {tuple(arr.shape)} {arr.dtype}: the split "
                                             f"{split!r} needs ({want}, D) float rows")
        if img.shape[1] != cap.shape[1]:
            raise InputError(src, f"image rows are {img.shape[1]}-d, caption rows {cap.shape[1]}-d")
        check_embedding_rows(img, src / files.get("img", IMG_FILE), "image", zero_ok=True)
        check_embedding_rows(cap, src / files.get("cap", CAP_FILE), "caption", zero_ok=True)
        return img, cap, {"shortlist": str(src), "shortlist_checkpoint_hash": meta.get("checkpoint_hash")}
    if (src / "config.json").is_file():
        from pipeline.checkpoint import checkpoint_hash, load_checkpoint
        from pipeline.data.precomp import open_split
        from pipeline.scoring import encode_gallery, indexable

        model, cfg = load_checkpoint(src, device, data_dir=data_dir)
        if not indexable(model):
            raise InputError(src, f"model {getattr(model, 'name', '?')!r} is a cross-attention "
                                  f"checkpoint: the shortlist needs an independent model (kind indep)")
        own = data is None
        split_data = open_split(data_dir, split, expected_dim=cfg["model"].get("img_dim")) if own else data
        try:
            g = encode_gallery(model, split_data, batch_size=batch_size, device=device,
                               progress=progress, source=src)
        finally:
            if own:
                split_data.close()
        img, cap = g.rows()
        return img, cap, {"shortlist": str(src), "shortlist_checkpoint_hash": checkpoint_hash(src)}
    raise InputError(src, "neither an `itm-pipeline embed` folder (embeddings.json) nor a "
                          "checkpoint folder (config.json)")
