"""Filters against false negatives among mined hard-negative candidates (all off by default).

After sentence-transformers' ``mine_hard_negatives`` and the NV-Retriever study of
positive-aware mining. Mine ``K + headroom`` candidates per row, then :func:`apply_filters`
removes suspected false negatives and trims every row to exactly K, order preserved.

Filters, applied in this fixed order (a candidate removed by several is counted by the first):

1. ``text_filter`` -- drop near-duplicate captions. Texts are compared after
   :func:`normalize_caption` (tokenize, lower-case, drop punctuation and the articles
   a/an/the, collapse whitespace); equal normalised texts are duplicates. Word ORDER is kept
   on purpose: binding / relation siblings of the embedded dataset have the same bag of words
   and are the hardest TRUE negatives. i2t: a candidate caption is dropped if it duplicates
   one of the anchor image's own captions. t2i: a candidate image is dropped if one of its
   captions duplicates the anchor caption.
2. ``relative_margin`` m -- drop a candidate scoring above ``(1 - m) * positive``
   (m = 0.05: above 95% of the anchor's positive score). As in sentence-transformers the
   threshold is ``(1 - m) * positive`` whatever the sign of the positive.
3. ``absolute_margin`` M -- drop a candidate scoring above ``positive - M``.
4. ``range_min`` R -- drop the candidates at ranks 0 .. R-1 of the MINED (unfiltered) list,
   as sentence-transformers slices its ranked list. Ranks are not recounted after the other
   filters, so R means the same thing whatever the other filters did ("the R nearest
   neighbours are never negatives").

Margins compare the candidate's stored float32 score with the float64 positive score of
:func:`positive_scores`; a score equal to the threshold is kept.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from pipeline.data import CAPS_PER_IMAGE
from pipeline.data.scene_graphs import FactIndex
from pipeline.data.vocab import tokenize
from pipeline.errors import InputError, refuse_unknown
from pipeline.mining.reference import KnnResult, canonical_dot

FILTER_ORDER = ("text_filter", "relative_margin", "absolute_margin", "range_min")
ARTICLES = frozenset({"a", "an", "the"})
_WORD = re.compile(r"\w")
BLOCK_ENTRIES = 1 << 22        # candidate entries filtered at a time (bounds the temporary masks)


@dataclass
class FilterConfig:
    relative_margin: float | None = None   # drop a candidate scoring above (1 - m) * positive
    absolute_margin: float | None = None   # drop a candidate scoring above positive - M
    range_min: int = 0                     # drop ranks 0 .. R-1 of the mined (unfiltered) list
    text_filter: bool = False              # drop near-duplicate captions (normalised text equal)

    def __post_init__(self):
        if self.relative_margin is not None and not (0.0 <= float(self.relative_margin) < 1.0):
            raise InputError(None, f"relative margin must be in [0, 1), got {self.relative_margin}")
        if self.absolute_margin is not None and not np.isfinite(float(self.absolute_margin)):
            raise InputError(None, f"absolute margin must be a finite number, got {self.absolute_margin}")
        if int(self.range_min) != self.range_min or self.range_min < 0:
            raise InputError(None, f"range_min must be a non-negative integer, got {self.range_min}")
        self.range_min = int(self.range_min)
        self.text_filter = bool(self.text_filter)

    def active(self) -> bool:
        return (self.relative_margin is not None or self.absolute_margin is not None
                or self.range_min > 0 or self.text_filter)

    def active_filters(self) -> list[str]:
        """Names of the active filters, in application order."""
        on = {"text_filter": self.text_filter, "relative_margin": self.relative_margin is not None,
              "absolute_margin": self.absolute_margin is not None, "range_min": self.range_min > 0}
        return [f for f in FILTER_ORDER if on[f]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "FilterConfig":
        d = dict(d or {})
        refuse_unknown(d, FILTER_ORDER, None, "filter setting(s)")
        return cls(**d)

    def headroom(self, k: int) -> int:
        """Extra candidates to mine per row so that K survive the filters (0 when inactive)."""
        return self.range_min + max(32, int(k) // 2) if self.active() else 0


# --------------------------------------------------------------------------- positives
def positive_scores(img, cap) -> tuple[np.ndarray, np.ndarray]:
    """Positive scores of both directions, float64, from the float32 embeddings.

    ``pos_t2i[j] = S(j // 5, j)`` (the caption's own image) and ``pos_i2t[i]`` = the MEAN of
    S(i, c) over the image's 5 captions: the anchor of an i2t row has five positives, and the
    mean is the typical positive (with the max, one unusually well-matched caption would make
    the margins lenient for the whole row; with the min, one poor caption would make them
    remove most candidates). Scores are the
    canonical float64 inner products of the float32 rows (the ones ``mine_*`` order by).
    """
    img = np.ascontiguousarray(np.asarray(img), dtype=np.float32)
    cap = np.ascontiguousarray(np.asarray(cap), dtype=np.float32)
    if img.ndim != 2 or cap.ndim != 2 or img.shape[1] != cap.shape[1]:
        raise InputError(None, f"positive scores: image embeddings {img.shape} and caption "
                               f"embeddings {cap.shape} must be 2-D with the same width")
    if cap.shape[0] != CAPS_PER_IMAGE * img.shape[0]:
        raise InputError(None, f"positive scores: {img.shape[0]} images need "
                               f"{CAPS_PER_IMAGE * img.shape[0]} captions, got {cap.shape[0]}")
    pos_t2i = np.empty(cap.shape[0], dtype=np.float64)
    step = 1 << 16
    for s in range(0, cap.shape[0], step):
        j = np.arange(s, min(s + step, cap.shape[0]))
        pos_t2i[s:s + step] = canonical_dot(img[j // CAPS_PER_IMAGE], cap[j])
    pos_i2t = pos_t2i.reshape(-1, CAPS_PER_IMAGE).mean(axis=1)
    return pos_i2t, pos_t2i


# --------------------------------------------------------------------------- text
def normalize_caption(text: str) -> str:
    """Tokens, lower-cased, without punctuation or articles, joined by single spaces."""
    return " ".join(t for t in tokenize(text) if _WORD.search(t) and t not in ARTICLES)


def normalized_ids(captions: Sequence[str]) -> np.ndarray:
    """(N_cap,) int64: equal ids <=> equal normalised texts."""
    table: dict[str, int] = {}
    return np.fromiter((table.setdefault(normalize_caption(c), len(table)) for c in captions),
                       dtype=np.int64, count=len(captions))


def _text_mask_i2t(cand: np.ndarray, rows: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """(n, W) bool: candidate caption duplicates one of the row image's own captions."""
    own = norm.reshape(-1, CAPS_PER_IMAGE)[rows]                  # (n, 5)
    return (norm[cand][:, :, None] == own[:, None, :]).any(axis=2)


def _text_mask_t2i(cand: np.ndarray, rows: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """(n, W) bool: one of the candidate image's captions duplicates the row caption."""
    per_img = norm.reshape(-1, CAPS_PER_IMAGE)
    return (per_img[cand] == norm[rows][:, None, None]).any(axis=2)


# --------------------------------------------------------------------------- apply
def _filter_direction(ids, scores, pos, cfg: FilterConfig, text_mask, k: int, direction: str,
                      block: int | None = None):
    """Apply the active filters to one direction, ``block`` entries at a time.

    Returns (ids (n, k), scores (n, k), {filter: (query_ids, cand_ids)}): a removed entry is
    attributed to the first filter (application order) that removes it.
    """
    n, w = ids.shape
    block = block or BLOCK_ENTRIES
    names = cfg.active_filters()
    out_ids = np.empty((n, k), dtype=ids.dtype)
    out_s = np.empty((n, k), dtype=np.float32)
    pairs = {name: ([], []) for name in names}
    n_short, fewest = 0, w
    step = max(1, block // max(1, w))
    for s in range(0, n, step):
        e = min(n, s + step)
        rows = np.arange(s, e)
        c_ids = np.asarray(ids[s:e])
        c_s = np.asarray(scores[s:e])
        removed = np.zeros(c_ids.shape, dtype=bool)
        for name in names:
            if name == "text_filter":
                m = text_mask(c_ids, rows)
            elif name == "relative_margin":
                m = c_s.astype(np.float64) > (1.0 - cfg.relative_margin) * pos[s:e, None]
            elif name == "absolute_margin":
                m = c_s.astype(np.float64) > pos[s:e, None] - cfg.absolute_margin
            else:  # range_min: ranks of the mined list
                m = np.zeros(c_ids.shape, dtype=bool)
                m[:, :cfg.range_min] = True
            m &= ~removed
            removed |= m
            q, r = np.nonzero(m)
            pairs[name][0].append(q.astype(np.int64) + s)
            pairs[name][1].append(c_ids[q, r].astype(np.int64))
        keep = ~removed
        kept = keep.sum(axis=1)
        n_short += int((kept < k).sum())
        fewest = min(fewest, int(kept.min()))
        if n_short:
            continue                      # only counting now, for the message
        sel = keep & (np.cumsum(keep, axis=1) <= k)
        out_ids[s:e] = c_ids[sel].reshape(e - s, k)
        out_s[s:e] = c_s[sel].reshape(e - s, k)
    if n_short:
        raise InputError(None, f"{n_short} of {n} {direction} rows keep fewer than {k} candidates "
                               f"after filtering (fewest: {fewest}); mine more headroom or relax the filters")
    done = {name: (np.concatenate(q) if q else np.zeros(0, np.int64),
                   np.concatenate(c) if c else np.zeros(0, np.int64)) for name, (q, c) in pairs.items()}
    return out_ids, out_s, done


def apply_filters(result: KnnResult, k_i2t: int, k_t2i: int, cfg: FilterConfig, *,
                  pos_i2t, pos_t2i, captions: Sequence[str] | None = None) -> tuple[KnnResult, dict]:
    """Filter ``result`` (K + headroom sorted candidates per row) and trim rows to exactly K.

    Returns the trimmed :class:`KnnResult` (order preserved; ``stats`` gains "filters") and
    a report ``{filter: {"i2t": n_removed, "t2i": n_removed}, ..., "removed": {filter:
    {"i2t": (query_ids, cand_ids), "t2i": (query_ids, cand_ids)}}}`` for the active filters
    (int64 arrays: the removed pairs, so callers can count true false negatives). Removed
    candidates beyond the K kept ones count too: the report describes everything a filter
    took out of the mined lists. Raises InputError when a row keeps fewer than K.
    """
    n_i, w1 = result.i2t.shape
    n_c, w2 = result.t2i.shape
    if n_c != CAPS_PER_IMAGE * n_i:
        raise InputError(None, f"candidates: {n_i} i2t rows need {CAPS_PER_IMAGE * n_i} t2i rows, got {n_c}")
    for k, w, d in ((k_i2t, w1, "i2t"), (k_t2i, w2, "t2i")):
        if int(k) != k or k < 1:
            raise InputError(None, f"K_{d} must be a positive integer, got {k}")
        if k > w:
            raise InputError(None, f"K_{d} = {k} but only {w} {d} candidates per row were mined")
    k_i2t, k_t2i = int(k_i2t), int(k_t2i)
    pos_i2t = np.asarray(pos_i2t, dtype=np.float64).reshape(-1)
    pos_t2i = np.asarray(pos_t2i, dtype=np.float64).reshape(-1)
    if cfg.relative_margin is not None or cfg.absolute_margin is not None:
        if pos_i2t.shape[0] != n_i or pos_t2i.shape[0] != n_c:
            raise InputError(None, f"positive scores: expected {n_i} (i2t) and {n_c} (t2i) values, "
                                   f"got {pos_i2t.shape[0]} and {pos_t2i.shape[0]}")
    norm = None
    if cfg.text_filter:
        if captions is None:
            raise InputError(None, "the text filter needs the captions (none given)")
        if len(captions) != n_c:
            raise InputError(None, f"text filter: {len(captions)} captions given, the candidates "
                                   f"have {n_c} caption rows")
        norm = normalized_ids(captions)

    i2t, i2t_s, rem_1 = _filter_direction(result.i2t, result.i2t_scores, pos_i2t, cfg,
                                          lambda c, rows: _text_mask_i2t(c, rows, norm), k_i2t, "i2t")
    t2i, t2i_s, rem_2 = _filter_direction(result.t2i, result.t2i_scores, pos_t2i, cfg,
                                          lambda c, rows: _text_mask_t2i(c, rows, norm), k_t2i, "t2i")
    report: dict = {}
    removed: dict = {}
    for name in cfg.active_filters():
        report[name] = {"i2t": int(rem_1[name][0].size), "t2i": int(rem_2[name][0].size)}
        removed[name] = {"i2t": rem_1[name], "t2i": rem_2[name]}
    report["removed"] = removed
    stats = dict(result.stats)
    stats.update({"filters": cfg.to_dict(), "k_i2t": k_i2t, "k_t2i": k_t2i,
                  "mined_i2t": int(w1), "mined_t2i": int(w2)})
    return KnnResult(i2t, i2t_s, t2i, t2i_s, stats=stats), report


def count_false_negatives(report: dict, graphs) -> dict:
    """Per filter and direction: how many removed candidates truly describe their anchor.

    i2t pair (image i, caption c): caption c describes image i. t2i pair (caption j, image
    m): the anchor caption j describes the candidate image m. ``graphs``: the scene graphs
    (``load_graphs``) or a :class:`FactIndex` built from them.
    Returns ``{filter: {"i2t": n_false_negatives, "t2i": n_false_negatives}}``.
    """
    idx = graphs if isinstance(graphs, FactIndex) else FactIndex(graphs)
    out = {}
    for name, pairs in report.get("removed", {}).items():
        q1, c1 = pairs["i2t"]
        q2, c2 = pairs["t2i"]
        out[name] = {"i2t": int(idx.describes(c1, q1).sum()), "t2i": int(idx.describes(q2, c2).sum())}
    return out
