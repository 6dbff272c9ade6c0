"""Per-query selections of the tiled pass: exact keys, floors, and why the result is
exact rather than probably exact.

Keys
----
For a pair with canonical score c the key is f = fl32(c), the score the answer reports.
Rounding is monotone, so f1 > f2 implies c1 > c2: the answer's order (-c, id) is the order
(-f, -c, id). A float64 dot product b of the float32 inputs (exact products, any summation
order) is within Delta of c (:func:`~pipeline.mining.reference.rescore_delta`); when
fl32(b - Delta') == fl32(b + Delta') (Delta' adds the rounding of b -+ Delta itself) that
value is f, otherwise c is computed (:func:`~pipeline.mining.reference.canonical_dot`).
Candidates with equal keys are ordered by c, then id, wherever their order matters (inside
the first k or tied with the k-th): c is computed for them.

Why the result is exact, not probably exact
-------------------------------------------
Per query, with F its floor (float32, nondecreasing, -inf at first):

(I) every entry of the query seen so far with f >= F is in the selection, except entries
    removed by an exact cut.

* The filter passes it: f >= F implies c > pred(F) (the float32 below F; rounding is
  monotone). Section "The bound" gives |s_hat - c| <= eps0 + rho |s_hat| (tile units), so
  hi(s_hat) = s_hat + rho |s_hat| + eps0 >= c > pred(F) and s_hat > hi^-1(pred(F)) >= tau(F)
  (hi is increasing; tau is evaluated in float64 and rounded down to float32).
* Survivors with f < F are not kept, and selections are only ever pruned to f >= F. Raising
  F keeps (I): entries dropped earlier had f < old F <= new F.
* An exact cut (a selection over capacity whose floor cannot shrink it) keeps the first k
  by (-c, id). Every entry cut away has k better entries of the same query: it is not in
  the answer.

The check. At the end let f_k be the k-th largest key in the selection. If the selection
holds >= k candidates and F <= f_k, every entry dropped by a floor has f < F <= f_k <= f*_k,
the k-th largest key over all the query's entries (the selection is a subset of them),
hence c < c*_k: it is not in the answer. So the selection contains the answer, and its
first k by (-c, id) are the answer.

Setting F. Any F gives the exact answer or fails the check; the choice is only about speed.
A *proven* floor is the k-th largest key of k real entries (of the selection, or the k-th
largest S_hat of a tile lowered by the bound), so the check holds. A *speculative* floor
estimates f*_k from below: after a query has seen a share p of its gallery (a pseudo-random
sample, by the processing order), the r-th largest key kept, r = kp + z sqrt(kp(1 - p)) + 1
(z = Z_SPEC standard deviations above the expected number of true top-k entries seen;
raised after every tile); in its first tile, before any key exists, the same rank among the
first PILOT columns (rows) of S_hat, lowered by the bound. A query whose check fails (on
random-order data a few times Phi(-z): ~0.1-0.4%) is mined again by a pass with proven
floors only, starting from the failed selection's k-th key; that pass cannot fail.
"""
from __future__ import annotations

import math
import sys
import threading

import numpy as np

from pipeline.mining.reference import canonical_dot

# --------------------------------------------------------------------------- tuning
# (speed only: the answer is exact whatever these are)
Z_SPEC = 3.0        # speculative floors: margin in standard deviations of the sample count


# --------------------------------------------------------------------------- keys
_LO, _HI = (0, 1) if sys.byteorder == "little" else (1, 0)   # uint32 halves of a uint64


def _desc32(bits: np.ndarray) -> np.ndarray:
    """float32 bits (as int32) -> uint32 codes in descending float order, and back (the
    map is its own inverse)."""
    return (bits ^ (~(bits >> 31) & np.int32(0x7FFFFFFF))).view(np.uint32)


def _pack(f: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """uint64 sort keys: ascending key = descending f, then ascending id. Unused slots
    (f = -inf) sort after every candidate."""
    keys = np.empty(f.shape, dtype=np.uint64)
    half = keys.view(np.uint32).reshape(*f.shape, 2)
    half[..., _LO] = ids.astype(np.int32, copy=False).view(np.uint32)
    half[..., _HI] = _desc32(np.ascontiguousarray(f, dtype=np.float32).view(np.int32))
    return keys


def _unpack(keys: np.ndarray):
    half = keys.view(np.uint32).reshape(*keys.shape, 2)
    f = _desc32(np.ascontiguousarray(half[..., _HI]).view(np.int32)).view(np.float32)
    return f, np.ascontiguousarray(half[..., _LO]).view(np.int32)


def _rank(k: int, p: float, speculate: bool) -> int:
    """Rank whose key among the entries seen (share p of the gallery) serves as the floor:
    k when proven, else the upper end of the expected number of true top-k entries seen."""
    if not speculate or p >= 1:
        return k
    lam = k * p
    return min(k, math.ceil(lam + Z_SPEC * math.sqrt(lam * (1 - p)) + 1))


class _Selection:
    """Candidates kept for n queries of one direction (module doc, "Why the result is exact").

    ids / f: (n, cap) candidate ids and keys, slots past cnt hold f = -inf (their ids are
    undefined); floor: F per query; k: answer size per query. q_np / g_np: the float32
    query / gallery rows (canonical scores of equal keys), qids: each query's row in q_np.
    """

    def __init__(self, qids, k, cap, q_np, g_np, stats, memory=None):
        n = len(qids)
        self.qids, self.k, self.cap = qids, k, cap
        self.kmax = int(k.max()) if n else 0
        self.q_np, self.g_np, self.stats = q_np, g_np, stats
        if memory is None:                      # else (ids, f) arrays of >= n rows to reuse
            memory = (np.empty((n, cap), dtype=np.int32), np.empty((n, cap), dtype=np.float32))
        self.ids, self.f = memory[0][:n], memory[1][:n]
        self.f.fill(-np.inf)                   # unused slots; their ids are never read
        self.cnt = np.zeros(n, dtype=np.int64)
        self.floor = np.full(n, -np.inf, dtype=np.float32)

    def add(self, q, cand, f):
        """Append candidates; q: query rows, equal ones adjacent (a group per query)."""
        m = q.size
        if not m:
            return
        starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
        lens = np.diff(np.r_[starts, m])
        uq = q[starts]
        rank = np.arange(m) - np.repeat(starts, lens)
        over = self.cnt[uq] + lens > self.cap
        if over.any():
            sel = np.repeat(over, lens)
            self._overflow(uq[over], lens[over], cand[sel], f[sel])
            q, cand, f, rank = q[~sel], cand[~sel], f[~sel], rank[~sel]
            uq, lens = uq[~over], lens[~over]
        pos = self.cnt[q] + rank
        self.ids[q, pos] = cand
        self.f[q, pos] = f
        self.cnt[uq] += lens

    def _overflow(self, rows, lens, cand, f):
        """Rows whose new candidates do not fit: shrink selection + new candidates."""
        w = self.cap + int(lens.max())
        ids = np.full((rows.size, w), -1, dtype=np.int32)
        fs = np.full((rows.size, w), -np.inf, dtype=np.float32)
        ids[:, :self.cap] = self.ids[rows]
        fs[:, :self.cap] = self.f[rows]
        r = np.repeat(np.arange(rows.size), lens)
        pos = np.repeat(self.cnt[rows] - np.r_[0, np.cumsum(lens)[:-1]], lens) + np.arange(r.size)
        ids[r, pos] = cand
        fs[r, pos] = f
        self._shrink(rows, ids, fs)

    def _shrink(self, rows, ids, fs):
        """Rows given as full candidate lists: proven floor (their k-th largest key), pruned
        to it -- or cut to exactly the first k where ties keep more than the capacity."""
        _count(self.stats, "prunes", rows.size)
        k = self.k[rows]
        r = int(k.max())
        ids, fs = self._order(rows, ids, fs)              # exact order: keeps are a prefix
        valid = fs > -np.inf
        floor = self.floor[rows]
        ok = (valid.sum(axis=1) >= r) & (r > 0)
        floor[ok] = np.maximum(floor[ok], fs[ok, r - 1])
        self.floor[rows] = floor
        n_keep = (valid & (fs >= floor[:, None])).sum(axis=1)
        cut = n_keep > self.cap
        _count(self.stats, "exact_cuts", int(cut.sum()))
        n_keep = np.where(cut, k, n_keep)
        w = min(self.cap, fs.shape[1])
        unused = np.arange(w)[None, :] >= n_keep[:, None]
        fs = fs[:, :w]
        fs[unused] = -np.inf
        self.ids[rows, :w], self.f[rows, :w], self.cnt[rows] = ids[:, :w], fs, n_keep
        self.f[rows, w:] = -np.inf

    def refine(self, rows, p: float, speculate: bool):
        """Raise the floors of `rows` (an index array or slice) after a share p of the
        gallery was seen: the r-th largest key kept (module doc, "Setting F")."""
        r = _rank(self.kmax, p, speculate)
        if r < 1:
            return
        rows = np.arange(self.cnt.size)[rows]
        rows = rows[self.cnt[rows] >= r]
        if not rows.size:
            return
        w = int(self.cnt[rows].max())
        f = self.f[rows, :w]                              # a copy: partitioned in place
        f.partition(w - r, axis=1)
        self.floor[rows] = np.maximum(self.floor[rows], f[:, w - r])
        _count(self.stats, "refinements", 1)

    def _order(self, rows, ids, fs):
        """Candidates of `rows` sorted by (-c, id): by key, then equal-key runs that reach
        the first k ordered by their canonical scores."""
        f_s, id_s = _unpack(np.sort(_pack(fs, ids), axis=1))
        same = (f_s[:, 1:] == f_s[:, :-1]) & (f_s[:, 1:] > -np.inf)
        if same.any():
            run = np.zeros(f_s.shape, dtype=bool)
            run[:, 1:] |= same
            run[:, :-1] |= same
            r, p = np.nonzero(run)
            start = np.ones(r.size, dtype=bool)
            start[p > 0] = ~same[r[p > 0], p[p > 0] - 1]
            run_id = np.cumsum(start) - 1
            first = p[start][run_id]
            reach = first < self.k[rows][r]                  # the run starts inside the top k
            r, p, run_id = r[reach], p[reach], run_id[reach]
            if r.size:
                cand = id_s[r, p]
                c = canonical_dot(self.q_np[self.qids[rows[r]]], self.g_np[cand])
                _count_canonical(self.stats, "canonical_ties", r.size)
                id_s[r, p] = cand[np.lexsort((cand, -c, run_id))]
        return id_s, f_s

    def finish(self, rows):
        """The answer of `rows` (slice): ids / keys (n, kmax) in exact order, padding past a
        query's own k; and per query NaN if it passed the check (module doc), else a proven
        floor to mine it again with (-inf if none)."""
        cnt = self.cnt[rows]
        n = cnt.size
        w = max(int(cnt.max()) if n else 0, self.kmax, 1)
        idx = np.arange(self.cnt.size)[rows]
        ids, fs = self._order(idx, self.ids[rows, :w], self.f[rows, :w])
        ids, fs = ids[:, :self.kmax], fs[:, :self.kmax]
        k = self.k[rows]
        pad = (np.arange(self.kmax)[None, :] >= k[:, None]) | (fs == -np.inf)
        ids[pad] = -1
        fs[pad] = -np.inf
        has = k > 0
        fk = np.full(n, np.inf, dtype=np.float32)
        fk[has] = fs[np.flatnonzero(has), k[has] - 1]
        failed = (cnt < k) | (self.floor[rows] > fk)
        # a failed query's k-th key is still a proven floor (k real entries reach it)
        proven = np.where(cnt >= k, fk, np.float32(-np.inf))
        return ids, fs, np.where(failed, proven, np.float32(np.nan))

    def release(self, chunk: int = 4096, finish=None):
        """Finish every query, compacted in place into (n, kmax) arrays that reuse the
        selection's memory; returns ids, keys and the check result as :meth:`finish`.
        finish(start, stop): :meth:`finish` of those rows, e.g. split over threads."""
        n, kmax = self.cnt.size, self.kmax
        finish = finish or (lambda a, b: self.finish(slice(a, b)))
        flat_ids, flat_f = self.ids.reshape(-1), self.f.reshape(-1)
        failed = np.empty(n, dtype=np.float32)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            ids, fs, failed[s:e] = finish(s, e)       # every row of the chunk read first
            # destination ends at e * kmax <= e * cap: rows >= e are still intact
            flat_ids[s * kmax:e * kmax] = ids.reshape(-1)
            flat_f[s * kmax:e * kmax] = fs.reshape(-1)
        self.ids = self.f = None
        return _shrunk(flat_ids, n, kmax), _shrunk(flat_f, n, kmax), failed


_STATS_LOCK = threading.Lock()     # selections are filled and finished on the pool's threads


def _count(stats: dict, name: str, n: int):
    with _STATS_LOCK:
        stats[name] = stats.get(name, 0) + n


def _count_canonical(stats: dict, why: str, n: int):
    _count(stats, why, n)
    _count(stats, "canonical_refined", n)


def _shrunk(flat: np.ndarray, n: int, k: int) -> np.ndarray:
    """The first n * k elements of `flat` as an (n, k) array, the rest of its memory given
    back (in place when the buffer is its own; a copy otherwise). A scratch file's memmap
    is returned as a view: its pages are the kernel's to evict, and a copy would be private."""
    if isinstance(flat, np.memmap):
        return flat[:n * k].reshape(n, k)
    base = flat.base if flat.base is not None else flat
    try:
        base.resize(n * k, refcheck=False)
        return base.reshape(n, k)
    except (ValueError, AttributeError):  # pragma: no cover - buffer not owned
        return flat[:n * k].reshape(n, k).copy()
