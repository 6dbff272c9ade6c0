"""Exact k-nearest neighbours of both directions in one tiled pass.

The answer is the one :func:`pipeline.mining.reference.mine_reference` defines: per image
the K_i2t captions, per caption the K_t2i images, by descending canonical float64 score
(ties by lower id), positives (caption j of image j // 5) excluded, scores reported as the
canonical score rounded to float32.

The pass
--------
Images are the rows and captions the columns of one score matrix, visited in tiles (row
blocks outer, column blocks inner; rows and columns in a fixed pseudo-random order). A
tile is one GEMM ``S_hat = A[rows] @ B[cols].T`` in ``precision`` (fp32, or bf16 / fp16
inputs with float32 accumulation). Every row (an i2t query) and every column (a t2i query)
keeps a *selection* -- candidate ids with their keys -- and a *floor* F. Per tile:

1. filter: an entry survives if S_hat >= tau(F) of its row or of its column. One compare
   over the tile against min(tau_row, q) (q a low quantile of the tile's column
   thresholds; the few columns below q get their own pass), then the exact test on the
   candidates only;
2. key: every survivor gets its exact key f = fl32(canonical score) (below), once for both
   directions: a sparse float64 dot product of the float32 inputs
   (``torch.sparse.sampled_addmm``, per block of rows that stays in cache), or a dense
   float64 GEMM when most of a tile survives;
3. keep: a survivor joins the selection of its row / column if it passed that direction's
   filter and f >= F.

With fp32 GEMMs and good floors few entries beyond the answer survive (on random data
about 1.1-1.35 x the answer size, fewer for larger K), so the float64 work is a few percent
of the score matrix. On CPU the filter and the keys run as single-threaded jobs on a pool
of torch.get_num_threads() threads: an OpenMP kernel stalls at its barriers whenever
another process holds one of the cores.

The row selections of a row block are finished (exact order, written to the output) when
its sweep ends; the column selections live through the pass, at most K + slack candidates
each, and are compacted in place into the t2i output at the end. Memory: the inputs (a
read-only memmap is used in place), the outputs, N_c x slack more candidates while the pass
runs, one row block's selections, and one tile with its mask and float64 copies of its two
blocks. With ``scratch`` (a folder; the mine stage passes one) everything in that list that
grows with N -- outputs, column selections, low-precision input copies -- is a memory-mapped
file there: the process's private memory is then bounded by the tile and K alone.

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

The bound
---------
Inputs a, b (float32 rows), their low-precision roundings a^, b^; d = D.

1. Input rounding (exact identity + Cauchy-Schwarz):
   a.b - a^.b^ = a.(b - b^) + (a - a^).b^, so |a.b - a^.b^| <= ||a|| ||b - b^|| + ||a - a^|| ||b^||.
   A priori, round-to-nearest gives |x - x^| <= u|x| per component (u = 2^-8 for bf16:
   8 significand bits; 2^-11 for fp16; fp32 inputs are not rounded at all), so
   ||x - x^|| <= u ||x|| and the term is <= (2u + u^2) ||a|| ||b||; components in the
   subnormal range of the format add at most eta per component (eta = half the smallest
   subnormal: 2^-134 bf16, 2^-25 fp16), i.e. <= 2 eta sqrt(d) (1 + u) + d eta^2 for unit
   vectors.
   ``mine_torch`` uses the data-dependent form: max ||a_i||, max ||b^_j|| and the measured
   max ||a_i - a^_i||, max ||b_j - b^_j|| (float64, inflated for their own rounding) --
   about 1.0 u instead of 2u + u^2 on random unit vectors (d = 256 .. 1024), and it holds
   whatever the rounding mode. With the value-dependent output term (rho |s_hat|, not
   rho * 1) the filter band at a K-th score of ~0.5 is about half the a-priori one.
2. Accumulation in float32, any order, FMA or not: |fl(sum a^_k b^_k) - a^.b^| <= gamma_d
   sum |a^_k b^_k| <= gamma_d ||a^|| ||b^|| (gamma_d = d 2^-24 / (1 - d 2^-24)); products
   of bf16 (fp16) pairs are exact in float32 except when they underflow (<= 2^-150 each).
3. Output rounding, when the GEMM returns bf16 / fp16 (torch CPU bf16 matmul does):
   |x - fl(x)| <= u_out |fl(x)|, the rho |s_hat| term (rho = u_out), plus eta_out when the
   result is subnormal (fp16 only in practice).
4. Canonical versus real value: |c - a.b| <= gamma_d(2^-53) ||a|| ||b||.
   eps0 = 1 + 2 + 4 + eta terms, inflated by 2^-20 relative.
For unit vectors and d = 1024 the a-priori total (:func:`lowp_error_bound`) is about
1.18e-2 (bf16, bf16 output), 1.53e-3 (fp16, fp16 output), 6.1e-5 (fp32). The band decides
how many entries get a key: fp32 (~1e-4 wide) lets few more than the answer through, bf16
(~2e-2) many more, which is why ``precision="auto"`` weighs it against the GEMM rates.

Precondition for the accumulation term: the GEMM must accumulate in float32. CPU torch
does (oneDNN / MKL); on CUDA the "reduced precision reduction" flags and TF32 are switched
off for the duration of the call. A probe GEMM on the data checks the bound before the
pass and refuses to run (RuntimeError) if it fails.
"""
from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.data import CAPS_PER_IMAGE
from pipeline.device import resolve_device
from pipeline.errors import InputError
from pipeline.io import open_memmap_out
from pipeline.mining.reference import (FLOAT32_LOWEST, U64, KnnResult, canonical_dot, capped_k,
                                       gamma, rescore_delta, shared_tensor, validate_inputs)

U32 = 2.0 ** -24
_FORMATS = {
    # name: (torch dtype, unit roundoff u, eta = half the smallest subnormal)
    "bf16": (torch.bfloat16, 2.0 ** -8, 2.0 ** -134),
    "fp16": (torch.float16, 2.0 ** -11, 2.0 ** -25),
    "fp32": (torch.float32, 0.0, 0.0),
}
PRECISIONS = ("bf16", "fp16", "fp32", "auto")


def lowp_error_bound(d: int, precision: str, *, output_rounding: bool | None = None) -> float:
    """Proven bound on |S_lowp - S_exact| for unit vectors of dimension d (see module doc).

    ``output_rounding``: whether the GEMM result is rounded to the low precision (torch CPU
    bf16/fp16 matmul returns bf16/fp16; default: True for bf16/fp16). S_exact is the
    canonical float64 score (the bound includes its distance to the real inner product).
    """
    if precision not in _FORMATS:
        raise InputError(None, f"precision must be one of bf16, fp16, fp32; got {precision!r}")
    _, u, eta = _FORMATS[precision]
    if output_rounding is None:
        output_rounding = precision != "fp32"
    d = int(d)
    root = math.sqrt(d)
    e_in = (2 * u + u * u) + 2 * eta * root * (1 + u) + d * eta * eta
    p_hat = (1 + u) ** 2 + 2 * eta * root * (1 + u) + d * eta * eta     # >= sum |a^||b^|
    e_acc = gamma(d, U32) * p_hat + (d * 2.0 ** -150 if precision == "bf16" else 0.0)
    e_out = 0.0
    if output_rounding and precision != "fp32":
        e_out = u * (p_hat + e_acc) + eta
    e_can = gamma(d, U64)
    return (e_in + e_acc + e_out + e_can) * (1 + 2.0 ** -20)


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _exact_matmul_flags():
    """Float32 accumulation for the GEMMs during the call: IEEE fp32 matmul (no TF32 / bf16
    emulation of fp32, which a user may have enabled globally), no reduced-precision split-K
    for bf16 / fp16 (cuBLAS allows it by default). Every setting is restored afterwards."""
    restore = []

    def force(obj, name, value):
        try:
            old = getattr(obj, name)
            setattr(obj, name, value)
            restore.append(lambda: setattr(obj, name, old))
        except Exception:  # pragma: no cover - absent in this torch build
            pass

    cuda_mm = getattr(torch.backends.cuda, "matmul", None)
    mkldnn_mm = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    for backend in (mkldnn_mm, cuda_mm):
        if backend is not None and hasattr(backend, "fp32_precision"):
            force(backend, "fp32_precision", "ieee")
    if cuda_mm is not None:
        if not hasattr(cuda_mm, "fp32_precision"):  # pragma: no cover - older torch
            force(cuda_mm, "allow_tf32", False)
        force(cuda_mm, "allow_bf16_reduced_precision_reduction", False)
        force(cuda_mm, "allow_fp16_reduced_precision_reduction", False)
    get_cpu = getattr(torch._C, "_get_cpu_allow_fp16_reduced_precision_reduction", None)
    set_cpu = getattr(torch._C, "_set_cpu_allow_fp16_reduced_precision_reduction", None)
    if get_cpu is not None and set_cpu is not None:
        old_cpu = get_cpu()
        set_cpu(False)
        restore.append(lambda: set_cpu(old_cpu))
    try:
        yield
    finally:
        for undo in reversed(restore):
            try:
                undo()
            except Exception:  # pragma: no cover
                pass


def _max_norm(x: torch.Tensor, chunk: int = 8192) -> float:
    """An upper bound on max_i ||x_i|| (as ``reference.max_row_norm``), by chunks: the
    float64 norm kernel makes a float64 copy of what it is given."""
    if not x.shape[0]:
        return 0.0
    n = max(float(torch.linalg.vector_norm(x[s:s + chunk], dim=1, dtype=torch.float64).max())
            for s in range(0, x.shape[0], chunk))
    return n * (1.0 + 4 * x.shape[1] * U64) + 1e-300


def _pow2_scale(norm: float) -> float:
    """1, or the power of two that brings a max row norm outside [1/16, 16] into [0.5, 1)."""
    if norm == 0 or 2.0 ** -4 <= norm <= 2.0 ** 4:
        return 1.0
    return 2.0 ** -math.frexp(norm)[1]


def _lowp(x: torch.Tensor, dtype, scale: float, norm: float, chunk: int = 4096, alloc=None):
    """x * scale rounded to dtype, plus (max ||x*scale||, max ||x^||, max ||x*scale - x^||);
    norm: _max_norm(x). alloc(shape, dtype): where the copy lives (default: memory)."""
    if dtype == torch.float32 and scale == 1.0:
        return x, norm, norm, 0.0
    if alloc is not None and x.device.type == "cpu":
        out = alloc(tuple(x.shape), dtype)
    else:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
    n_x = n_h = n_e = 0.0
    for s in range(0, x.shape[0], chunk):
        x64 = x[s:s + chunk].double() * scale                     # exact
        h = x64.to(dtype)
        out[s:s + chunk] = h
        h64 = h.double()
        n_x = max(n_x, float(x64.norm(dim=1).max()))
        n_h = max(n_h, float(h64.norm(dim=1).max()))
        n_e = max(n_e, float((x64 - h64).norm(dim=1).max()))
    infl = 1.0 + 4 * x.shape[1] * U64
    return out, n_x * infl, n_h * infl, n_e * infl


def _data_bound(d: int, precision: str, na: float, na_h: float, ea: float, nb: float,
                nb_h: float, eb: float) -> tuple[float, float]:
    """(eps0, rho) with |s_hat - c| <= eps0 + rho |s_hat| for every pair (module doc).

    na, nb: max row norms of the (scaled) float32 inputs; na_h, nb_h: of their roundings;
    ea, eb: max ||x - x^|| over the rows.
    """
    _, u, eta = _FORMATS[precision]
    eps0 = na * eb + ea * nb_h                                     # 1. input rounding
    eps0 += gamma(d, U32) * na_h * nb_h                            # 2. float32 accumulation
    if precision == "bf16":
        eps0 += d * 2.0 ** -150                                    #    product underflow
    eps0 += gamma(d, U64) * na * nb                                # 4. canonical vs real
    rho = 0.0
    if precision != "fp32":                                        # 3. output rounding
        eps0 += eta
        rho = u
    return eps0 * (1 + 2.0 ** -20) + 1e-300, rho


def _tile_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    s = a @ b.T
    return s if s.dtype == torch.float32 else s.float()


_PENALTY = {"fp32": 1.0, "fp16": 1.5, "bf16": 3.0}   # see _pick_precision


def _pick_precision(d: int, device: torch.device) -> str:
    """'auto': the precision with the cheapest pass on this machine. A lower precision must
    beat fp32's GEMM by more than the extra keying its wider band costs (module doc, "The
    bound"): fp16 by 1.5x, bf16 by 3x (probe: best of 3 interleaved rounds)."""
    if device.type == "cuda":
        return "fp16"
    gen = torch.Generator(device=device).manual_seed(0)      # leave the global RNG alone
    a = torch.randn(512, d, device=device, generator=gen)
    b = torch.randn(2048, d, device=device, generator=gen)
    pairs = {name: (a.to(_FORMATS[name][0]), b.to(_FORMATS[name][0])) for name in _PENALTY}
    best = dict.fromkeys(_PENALTY, math.inf)
    for _ in range(3):
        for name, (x, y) in pairs.items():
            _tile_mm(x, y)
            t = time.perf_counter()
            _tile_mm(x, y)
            best[name] = min(best[name], time.perf_counter() - t)
    return min(_PENALTY, key=lambda name: best[name] * _PENALTY[name])


# --------------------------------------------------------------------------- tuning
# (speed only: the answer is exact whatever these are)
Z_SPEC = 3.0        # speculative floors: margin in standard deviations of the sample count
PILOT = 2048        # first-tile estimate: from this many columns (rows) of S_hat
DENSE_SHARE = 0.08  # above this share of survivors a tile is keyed by a dense float64 GEMM
KEY_ROWS = 512      # sparse keys: rows per block (their float64 rows stay in cache)


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


# --------------------------------------------------------------------------- scratch
_NP_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class _Scratch:
    """Where the arrays that grow with N live: the outputs, the t2i selections and the
    low-precision copies of the inputs. In memory by default; with a folder, in memory-mapped
    files there (page cache the kernel can write back and evict), so the process's private
    memory stays bounded by the tile and K whatever the number of queries."""

    def __init__(self, folder=None):
        self.folder = None if folder is None else Path(folder)
        self.count = 0

    def array(self, name: str, shape, dtype) -> np.ndarray:
        if self.folder is None:
            return np.empty(shape, dtype=dtype)
        self.count += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        return open_memmap_out(self.folder / f"{name}-{self.count}.npy", dtype, shape)

    def tensor(self, shape, dtype) -> torch.Tensor:
        """A CPU tensor of a torch dtype (bf16 is stored as its uint16 bits)."""
        x = torch.from_numpy(self.array("lowp", shape, _NP_STORAGE[dtype]))
        return x.view(dtype) if dtype == torch.bfloat16 else x


# --------------------------------------------------------------------------- the pass
class _Pass:
    """What the sweeps of one call share: the inputs (float32, their GEMM-precision copies),
    the bound (eps0, rho, scale; delta for the keys), tile buffers and the worker pool."""

    def __init__(self, img32, cap32, precision, dev, row_block, col_block, slack, stats,
                 cap_cache, scratch: _Scratch):
        self.img_np, self.cap_np = img32, cap32
        self.scratch = scratch
        self.dev, self.stats, self.slack = dev, stats, float(slack)
        self.row_block, self.col_block = int(row_block), int(col_block)
        d = img32.shape[1]
        dtype = _FORMATS[precision][0]
        self.a32 = shared_tensor(img32).to(dev)   # read-only memmaps: shared, never written
        self.b32 = shared_tensor(cap32).to(dev)
        # fp16 has a small range: a side whose max row norm is outside [1/16, 16] is scaled
        # by a power of two (max norm into [0.5, 1)); the tile scores then all scale by one
        # positive constant, the ordering is unchanged, and the bound is computed in the
        # scaled units (keys come from the unscaled float32 inputs).
        if cap_cache is not None:
            key = ("cap_norm", str(dev))
            if key not in cap_cache:
                cap_cache[key] = _max_norm(self.b32)
            norm_cap = cap_cache[key]
        else:
            norm_cap = _max_norm(self.b32)
        norm_img = _max_norm(self.a32)
        sa = sb = 1.0
        if precision == "fp16":
            sa, sb = _pow2_scale(norm_img), _pow2_scale(norm_cap)
        alloc = self.scratch.tensor
        self.a_lp, na, na_h, ea = _lowp(self.a32, dtype, sa, norm_img, alloc=alloc)
        if cap_cache is not None:
            key = ("lowp", precision, sb, str(dev))
            if key not in cap_cache:
                for k in [k for k in cap_cache if k[0] == "lowp"]:
                    del cap_cache[k]                      # one low-precision copy at a time
                cap_cache[key] = _lowp(self.b32, dtype, sb, norm_cap, alloc=alloc)
            self.b_lp, nb, nb_h, eb = cap_cache[key]
        else:
            self.b_lp, nb, nb_h, eb = _lowp(self.b32, dtype, sb, norm_cap, alloc=alloc)
        self.eps0, self.rho = _data_bound(d, precision, na, na_h, ea, nb, nb_h, eb)
        self.scale = sa * sb
        self.delta = rescore_delta(d, norm_img, norm_cap)
        stats.update(eps0=self.eps0, rho=self.rho, eps_apriori_unit=lowp_error_bound(d, precision),
                     score_scale=self.scale, rescore_delta=self.delta)
        stats["probe_max_excess"] = _probe(self.a_lp, self.b_lp, img32, cap32, self.scale,
                                           self.eps0, self.rho)
        # buffers reused by every tile (fresh large tensors would cost page faults each time)
        n_rows, n_cols = min(self.row_block, img32.shape[0]), min(self.col_block, cap32.shape[0])
        self.s_buf = torch.empty(n_rows * n_cols, device=dev)
        self.m_buf = torch.empty(n_rows * n_cols, dtype=torch.bool, device=dev)
        self.rows_buf = (torch.empty((n_rows, d), dtype=dtype, device=dev),
                         torch.empty((n_rows, d), dtype=torch.float64, device=dev))
        self.cols_buf = (torch.empty((n_cols, d), dtype=dtype, device=dev),
                         torch.empty((n_cols, d), dtype=torch.float64, device=dev))
        self.img_pos = np.full(img32.shape[0], -1, dtype=np.int64)
        # CPU work besides the GEMM runs as single-threaded jobs on a pool (keys, filter): a
        # multi-threaded kernel stalls at its barriers whenever another process holds a core
        self.pool, self.workers = None, max(1, torch.get_num_threads())
        if dev.type == "cpu":
            self.pool = ThreadPoolExecutor(self.workers, initializer=torch.set_num_threads,
                                           initargs=(1,))

    # -- the bound, in key units (floors) and tile units (s_hat)
    def tau(self, floor: np.ndarray) -> np.ndarray:
        """float32 s_hat threshold passing every entry whose key is >= floor."""
        with np.errstate(invalid="ignore", over="ignore"):
            low = np.nextafter(floor, np.float32(-np.inf)).astype(np.float64) * self.scale
            y = low - self.eps0
            t = np.where(y >= 0, y / (1 + self.rho), y / (1 - self.rho))
            t -= 2.0 ** -50 * (np.abs(low) + self.eps0)    # the float64 evaluation above
            t32 = t.astype(np.float32)
            t32 = np.where(t32.astype(np.float64) > t, np.nextafter(t32, np.float32(-np.inf)), t32)
        t32 = np.maximum(t32, np.float32(FLOAT32_LOWEST))  # -inf (positives) never passes
        return np.where(floor > -np.inf, t32, np.float32(FLOAT32_LOWEST))

    def floor_from_tile(self, s: np.ndarray) -> np.ndarray:
        """A (speculative) floor from tile scores: their lower bound on c, as a key."""
        x = s.astype(np.float64)
        with np.errstate(invalid="ignore"):
            low = (x - self.rho * np.abs(x) - self.eps0) / self.scale
            f = low.astype(np.float32)
            f = np.where(f.astype(np.float64) > low, np.nextafter(f, np.float32(-np.inf)), f)
        return np.where(np.isfinite(x), f, np.float32(-np.inf))

    # -- keys
    def keys(self, a64, b64, ri, ci, img_ids, cap_ids) -> np.ndarray:
        """Exact keys fl32(c) of the tile entries (ri, ci) (module doc, "Keys"); the tile's
        rows / columns are images img_ids / captions cap_ids."""
        st = self.stats
        n, n_r, n_c = ri.size, a64.shape[0], b64.shape[0]
        st["keyed"] = st.get("keyed", 0) + n
        if not n:
            return np.empty(0, dtype=np.float32)
        if n > DENSE_SHARE * n_r * n_c:
            st["keyed_dense"] = st.get("keyed_dense", 0) + n
            ri_t = torch.from_numpy(ri).to(self.dev)
            ci_t = torch.from_numpy(ci).to(self.dev)
            b = torch.empty(n, dtype=torch.float64, device=self.dev)
            step = max(1, (32 << 20) // (8 * n_c))
            bounds = np.searchsorted(ri, np.arange(0, n_r + step, step))
            for s, (lo, hi) in zip(range(0, n_r, step), zip(bounds[:-1], bounds[1:])):
                if hi > lo:
                    blk = a64[s:s + step] @ b64.T
                    b[lo:hi] = blk[ri_t[lo:hi] - s, ci_t[lo:hi]]
            b = b.cpu().numpy()
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
                b = self._sparse_dots(a64, b64, ri, ci)
        # |b - c| <= delta; the extra term covers the rounding of b -+ delta themselves
        e = self.delta + np.abs(b) * 2.0 ** -51
        f = (b - e).astype(np.float32)
        amb = np.flatnonzero(f != (b + e).astype(np.float32))
        if amb.size:
            c = canonical_dot(self.img_np[img_ids[ri[amb]]], self.cap_np[cap_ids[ci[amb]]])
            f[amb] = c.astype(np.float32)
            _count_canonical(st, "canonical_rounding", amb.size)
        return f + np.float32(0.0)                      # -0.0 -> +0.0: one key for zero

    def _sparse_dots(self, a64, b64, ri, ci) -> np.ndarray:
        """float64 dot products a64[ri] . b64[ci] (ri ascending).

        ``sampled_addmm`` reads each pair's two rows; per block of KEY_ROWS rows (which stay
        in cache) the pairs run column by column, so each column row is read once per block.
        On CPU the blocks are jobs on the pool.
        """
        n_r, n_c = a64.shape[0], b64.shape[0]
        if self.pool is None:
            crow = torch.zeros(n_r + 1, dtype=torch.int64, device=self.dev)
            crow[1:] = torch.cumsum(torch.bincount(torch.from_numpy(ri).to(self.dev),
                                                   minlength=n_r), 0)
            pattern = torch.sparse_csr_tensor(
                crow, torch.from_numpy(ci).to(self.dev),
                torch.zeros(ri.size, dtype=torch.float64, device=self.dev),
                size=(n_r, n_c), check_invariants=False)
            return torch.sparse.sampled_addmm(pattern, a64, b64.T, beta=0.0).values().cpu().numpy()
        out = np.empty(ri.size)

        def block(r0, lo, hi):
            c = ci[lo:hi]
            order = np.argsort(c.astype(np.uint16) if n_c <= 1 << 16 else c, kind="stable")
            crow = np.zeros(n_c + 1, dtype=np.int64)
            np.cumsum(np.bincount(c, minlength=n_c), out=crow[1:])
            pattern = torch.sparse_csr_tensor(
                torch.from_numpy(crow), torch.from_numpy(ri[lo:hi][order] - r0),
                torch.zeros(hi - lo, dtype=torch.float64), size=(n_c, min(KEY_ROWS, n_r - r0)),
                check_invariants=False)
            v = torch.sparse.sampled_addmm(pattern, b64, a64[r0:r0 + KEY_ROWS].T, beta=0.0)
            out[lo:hi][order] = v.values().numpy()

        starts = range(0, n_r, KEY_ROWS)
        bounds = np.searchsorted(ri, np.r_[list(starts), n_r])
        jobs = [self.pool.submit(block, r0, lo, hi)
                for r0, lo, hi in zip(starts, bounds[:-1], bounds[1:]) if hi > lo]
        for job in jobs:
            job.result()
        return out

    def finish(self, sel: "_Selection", start: int, stop: int):
        """sel.finish of rows start:stop, in parts on the pool (sorting is numpy work that
        releases the GIL)."""
        if self.pool is None or stop - start < 512:
            return sel.finish(slice(start, stop))
        cuts = np.unique(np.linspace(start, stop, self.workers + 1).astype(int))
        jobs = [self.pool.submit(sel.finish, slice(a, b)) for a, b in zip(cuts[:-1], cuts[1:])]
        return tuple(np.concatenate(part) for part in zip(*[job.result() for job in jobs]))

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()
            torch.set_num_threads(torch.get_num_threads())  # the workers' 1 is torch's default
            self.pool = None                                  # for new threads: undo it

    # -- one sweep
    def sweep(self, rows, cols, k1: int, k2: int, speculate: bool, i2t, progress, tag: str,
              floors=None):
        """rows x cols (global image / caption ids, in processing order); k1 / k2 = 0 turns
        a direction off. Row answers go to i2t = (ids, scores, row_offset). Returns the
        column selection (its queries in ascending caption id, or None) and the rows that
        failed the check with their proven floors. speculate: speculative floors (else
        proven ones only); tag: the stats key counting tiles; floors: starting floors of
        the queries (of the one active direction), in the order of rows / cols."""
        st, dev = self.stats, self.dev
        n_i = self.img_np.shape[0]
        n_r, n_c = rows.size, cols.size
        R, C = self.row_block, self.col_block
        own_caps = np.bincount(cols // CAPS_PER_IMAGE, minlength=n_i)          # own captions among cols
        cols_sel = None
        if k2:
            in_rows = np.zeros(n_i, dtype=bool)
            in_rows[rows] = True
            qcols = np.sort(cols)
            k_col = np.minimum(k2, n_r - in_rows[qcols // CAPS_PER_IMAGE])
            cap2 = _capacity(int(k_col.max()), self.slack)
            cols_sel = _Selection(qcols, k_col, cap2, self.cap_np, self.img_np, st,
                                  (self.scratch.array("t2i_ids", (n_c, cap2), np.int32),
                                   self.scratch.array("t2i_keys", (n_c, cap2), np.float32)))
            col_row = np.full(self.cap_np.shape[0], -1, dtype=np.int64)
            col_row[qcols] = np.arange(n_c)
            if floors is not None:
                cols_sel.floor[col_row[cols]] = floors
        failed_rows, failed_floors = [], []
        if k1:                     # the i2t selections of every row block share one memory
            cap1 = _capacity(k1, 2 * self.slack)
            row_memory = (np.empty((min(R, n_r), cap1), dtype=np.int32),
                          np.empty((min(R, n_r), cap1), dtype=np.float32))
        for rb, r0 in enumerate(range(0, n_r if (k1 or k2) else 0, R)):
            rr = rows[r0:r0 + R]
            nr = rr.size
            a_blk, a64 = self._gather(self.a_lp, self.a32, rr, self.rows_buf)
            self.img_pos[rr] = np.arange(nr)
            rows_sel = None
            if k1:
                k_row = np.minimum(k1, n_c - own_caps[rr])
                rows_sel = _Selection(rr, k_row, cap1, self.img_np, self.cap_np, st, row_memory)
                if floors is not None:
                    rows_sel.floor[:] = floors[r0:r0 + R]
            p_col = (r0 + nr) / n_r                   # share of the rows seen after this block
            for cb, c0 in enumerate(range(0, n_c, C)):
                cc = cols[c0:c0 + C]
                nc = cc.size
                t0 = time.perf_counter()
                b_blk, b64 = self._gather(self.b_lp, self.b32, cc, self.cols_buf)
                s = self.s_buf[:nr * nc].view(nr, nc)
                _gemm(a_blk, b_blk, s)
                own = self.img_pos[cc // CAPS_PER_IMAGE]                      # positives: caption of a row
                j = np.flatnonzero(own >= 0)
                if j.size:
                    s[torch.from_numpy(own[j]).to(dev), torch.from_numpy(j).to(dev)] = -math.inf
                t1 = time.perf_counter()
                st["seconds_gemm"] = st.get("seconds_gemm", 0.0) + t1 - t0
                ccol = col_row[cc] if cols_sel is not None else None
                if rows_sel is not None and cb == 0:
                    self._first_floor(rows_sel, slice(None), s, n_c, 1, speculate)
                if cols_sel is not None and rb == 0:
                    self._first_floor(cols_sel, ccol, s, n_r, 0, speculate)
                ri, ci, in_r, in_c = self._survivors(
                    s, self.tau(rows_sel.floor) if rows_sel is not None else None,
                    self.tau(cols_sel.floor[ccol]) if cols_sel is not None else None)
                t2 = time.perf_counter()
                st["seconds_filter"] = st.get("seconds_filter", 0.0) + t2 - t1
                f = self.keys(a64, b64, ri, ci, rr, cc)
                t3 = time.perf_counter()
                st["seconds_keys"] = st.get("seconds_keys", 0.0) + t3 - t2
                def keep_rows():
                    keep = in_r & (f >= rows_sel.floor[ri])
                    rows_sel.add(ri[keep], cc[ci[keep]], f[keep])
                    rows_sel.refine(slice(None), (c0 + nc) / n_c, speculate)
                    return "survivors_i2t", int(keep.sum())

                def keep_cols():
                    keep = in_c & (f >= cols_sel.floor[ccol[ci]])
                    q = ci[keep]                      # grouped by column (radix sort)
                    order = np.argsort(q.astype(np.uint16) if nc <= 1 << 16 else q, kind="stable")
                    cols_sel.add(ccol[q[order]], rr[ri[keep][order]], f[keep][order])
                    cols_sel.refine(ccol, p_col, speculate)
                    return "survivors_t2i", int(keep.sum())

                # the two directions' selections are independent: one job each on the pool
                jobs = [job for job, sel in ((keep_rows, rows_sel), (keep_cols, cols_sel))
                        if sel is not None]
                if self.pool is not None and len(jobs) > 1:
                    done = [j.result() for j in [self.pool.submit(job) for job in jobs]]
                else:
                    done = [job() for job in jobs]
                for name, n_kept in done:
                    st[name] = st.get(name, 0) + n_kept
                st["seconds_keep"] = st.get("seconds_keep", 0.0) + time.perf_counter() - t3
                st[tag] = st.get(tag, 0) + 1
                held = (rows_sel.cnt.sum() if rows_sel is not None else 0) + \
                    (cols_sel.cnt.sum() if cols_sel is not None else 0)
                st["peak_buffered"] = max(st.get("peak_buffered", 0), int(held))
                if progress is not None:
                    progress.update(1)
            self.img_pos[rr] = -1
            if rows_sel is not None:
                t = time.perf_counter()
                ids, fs, check = self.finish(rows_sel, 0, nr)
                out_ids, out_f, off = i2t
                out_ids[rr - off], out_f[rr - off] = ids, fs
                bad = ~np.isnan(check)
                failed_rows.append(rr[bad])
                failed_floors.append(check[bad])
                st["seconds_finish"] = st.get("seconds_finish", 0.0) + time.perf_counter() - t
        if not failed_rows:
            return cols_sel, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        return cols_sel, np.concatenate(failed_rows), np.concatenate(failed_floors)

    def _survivors(self, s, tr, tc):
        """Row and column (row-major order) of the tile entries >= their row threshold tr or
        their column threshold tc (float32 arrays; None = direction off), and which of the
        two each one passed. One compare over the tile, against min(tr, q) per row with q a
        low quantile of tc; the columns below q get their own pass on a gathered slice.
        On CPU the row ranges are single-threaded jobs on the pool (as for the keys)."""
        nr, nc = s.shape
        if tr is None or tc is None:
            t_row = tr if tc is None else None
            low, t_low = None, None
        else:
            q = np.partition(tc, nc // 50)[nc // 50]
            t_row, low = np.minimum(tr, q), np.flatnonzero(tc < q)
            t_low = tc[low]
        if self.pool is None:
            return _filter(s, self.m_buf[:nr * nc].view(nr, nc), tr, tc, t_row, low, t_low)
        s_np, m_np = s.numpy(), self.m_buf[:nr * nc].numpy().reshape(nr, nc)
        cuts = np.unique(np.linspace(0, nr, self.workers + 1).astype(int))
        jobs = [self.pool.submit(_filter, s_np[a:b], m_np[a:b], _part(tr, a, b), tc,
                                 _part(t_row, a, b), low, t_low)
                for a, b in zip(cuts[:-1], cuts[1:])]
        parts = [job.result() for job in jobs]
        ri = np.concatenate([part[0] + a for part, a in zip(parts, cuts)])
        ci = np.concatenate([part[1] for part in parts])
        in_r, in_c = (None if parts[0][i] is None else np.concatenate([p[i] for p in parts])
                      for i in (2, 3))
        return ri, ci, in_r, in_c

    def _gather(self, lowp, x32, ids, bufs):
        """Rows ``ids`` of the GEMM input and of the float32 input (as float64), in buffers."""
        n = ids.size
        ids_t = torch.from_numpy(ids).to(self.dev)
        blk = torch.index_select(lowp, 0, ids_t, out=bufs[0][:n])
        src = blk if lowp is x32 else x32.index_select(0, ids_t)
        return blk, bufs[1][:n].copy_(src)

    def _first_floor(self, sel, rows, s, n_gallery, axis, speculate):
        """Floors from S_hat where a query meets its first tile: its rank-r tile score
        (along ``axis``: 1 = per row, 0 = per column) lowered by the bound. Proven with
        r = k over the whole tile (k entries reach it); speculative over the first PILOT
        entries with r for that share of the gallery."""
        n = s.shape[axis]
        m = min(PILOT, n) if speculate else n
        r = _rank(sel.kmax, m / n_gallery, speculate)
        if r < 1 or r > m - (5 if axis == 1 else 1):  # leave room for positives (-inf)
            return
        # one contiguous copy with the sample along the last axis, partitioned in place
        part = (s[:, :m] if axis == 1 else s[:m].T).clone(
            memory_format=torch.contiguous_format).cpu().numpy()
        part.partition(m - r, axis=1)
        est = part[:, m - r]
        idx = np.arange(sel.cnt.size)[rows]
        sel.floor[idx] = np.maximum(sel.floor[idx], self.floor_from_tile(est))


def _capacity(k: int, slack: float) -> int:
    return k + max(16, math.ceil(slack * k))


def _gemm(a, b, out):
    if a.dtype == torch.float32:
        return torch.mm(a, b.T, out=out)
    return out.copy_(a @ b.T)


def _part(x, a, b):
    return None if x is None else x[a:b]


def _filter(s, mask, tr, tc, t_row, low, t_low):
    """The work of ``_Pass._survivors`` on rows of a tile (numpy on CPU, torch elsewhere):
    t_row: the per-row threshold of the one compare, None = columns only (tc); low / t_low:
    columns needing their own pass and their thresholds."""
    nr, nc = s.shape
    if isinstance(s, torch.Tensor):
        dev = s.device
        if t_row is None:
            m = torch.ge(s, torch.from_numpy(tc).to(dev)[None, :], out=mask)
        else:
            t = torch.from_numpy(t_row).to(dev)[:, None]
            m = torch.ge(s, t, out=mask)
        idx = _flatnonzero(m)
        if low is not None and low.size:
            sub = s.index_select(1, torch.from_numpy(low).to(dev))
            extra = _flatnonzero((sub >= torch.from_numpy(t_low).to(dev)[None, :]) & (sub < t))
    else:
        np.greater_equal(s, tc[None, :] if t_row is None else t_row[:, None], out=mask)
        idx = np.flatnonzero(mask)
        if low is not None and low.size:
            sub = s[:, low]
            extra = np.flatnonzero((sub >= t_low[None, :]) & (sub < t_row[:, None]))
    if low is not None and low.size:               # entries of those columns not found above
        r, c = np.divmod(extra, low.size)
        extra = r * nc + low[c]                                           # ascending
        idx = np.insert(idx, np.searchsorted(idx, extra), extra)
    ri, ci = np.divmod(idx, nc)
    if tr is None or tc is None:
        ones = np.ones(ri.size, dtype=bool)
        return ri, ci, (ones if tc is None else None), (ones if tr is None else None)
    v = _take(s, idx)
    in_r, in_c = v >= tr[ri], v >= tc[ci]
    keep = in_r | in_c
    return ri[keep], ci[keep], in_r[keep], in_c[keep]


def _flatnonzero(m: torch.Tensor) -> np.ndarray:
    return torch.nonzero(m.reshape(-1)).squeeze(1).cpu().numpy()


def _take(x, idx: np.ndarray) -> np.ndarray:
    """x.flatten()[idx] as numpy (x: numpy, or a torch tensor on the device)."""
    if isinstance(x, np.ndarray):
        return x.reshape(-1)[idx]
    return x.reshape(-1)[torch.from_numpy(idx).to(x.device)].cpu().numpy()


# --------------------------------------------------------------------------- main
def mine_torch(img, cap, k_i2t: int, k_t2i: int, *, precision: str = "auto",
               device: str = "cpu", row_block: int = 4096, col_block: int = 8192,
               progress: bool = False, buffer_slack: float = 0.4, scratch=None) -> KnnResult:
    """Exact i2t / t2i candidates (ids and scores equal to :func:`mine_reference`) in one
    tiled pass.

    precision: "bf16" | "fp16" | "fp32" for the GEMM (the answer is exact in every case;
    a lower precision widens the filter band, so more entries need a float64 key), or
    "auto" (the cheapest on this machine: :func:`_pick_precision`).
    row_block x col_block: the tile; one tile of scores (and its mask) exists at a time.
    buffer_slack: a t2i selection holds up to K + max(16, buffer_slack * K) candidates, an
    i2t one twice that slack, before it is pruned. Memory: the outputs, N_c x the t2i slack
    while the pass runs, one row block's i2t selections, one tile (module doc).
    scratch: a folder (created if missing; the caller removes it) for the arrays that grow
    with N -- the outputs, the t2i selections, low-precision input copies -- as memory-mapped
    files: the result's arrays are then memmaps into it, and private memory is bounded by
    the tile and K (pass memory-mapped inputs to keep those out of it too). CPU only.

    stats: seconds, and its parts seconds_gemm (with the block gathers), _filter, _keys,
    _keep, _finish; tiles (tiles_recheck: those of the re-mining passes); precision, device;
    eps0 / rho (the bound used, |s_hat - c| <= eps0 + rho |s_hat|, in tile units;
    score_scale = tile units per score unit), eps_apriori_unit (:func:`lowp_error_bound`),
    probe_max_excess (<= 0), rescore_delta (the keys' float64 bound); survivors_i2t /
    survivors_t2i (entries kept by each direction), keyed (entries given a key;
    keyed_dense of them by a dense float64 GEMM), canonical_refined (canonical sums:
    canonical_rounding for keys, canonical_ties for equal keys), refinements, prunes
    (selections over capacity), exact_cuts, rechecked_i2t / rechecked_t2i (queries whose
    speculative floor failed the check, mined again), peak_buffered (candidates held at
    once, at most), gemm_flop, k_i2t / k_t2i (after capping).
    """
    t_start = time.perf_counter()
    _check_options(precision, row_block, col_block)
    img32, cap32, k1, k2 = validate_inputs(img, cap, k_i2t, k_t2i)
    n_i, d = img32.shape
    dev = resolve_device(device)
    if precision == "auto":
        precision = _pick_precision(d, dev)
    stats: dict = {"backend": "torch", "precision": precision, "device": str(dev),
                   "k_i2t": k1, "k_t2i": k2, "row_block": int(row_block),
                   "col_block": int(col_block)}
    if scratch is not None and dev.type != "cpu":
        raise InputError(None, "scratch files serve the CPU pass; on a GPU leave scratch unset")
    i2t, i2t_s, t2i, t2i_s = _mine(img32, cap32, np.arange(n_i), k1, k2, precision=precision,
                                   dev=dev, row_block=row_block, col_block=col_block,
                                   progress=progress, buffer_slack=buffer_slack, stats=stats,
                                   scratch=_Scratch(scratch))
    stats.update(gemm_flop=2.0 * n_i * cap32.shape[0] * d, seconds=time.perf_counter() - t_start)
    return KnnResult(i2t, i2t_s, t2i, t2i_s, stats)


def _check_options(precision, row_block, col_block):
    if precision not in PRECISIONS:
        raise InputError(None, f"precision must be one of {', '.join(PRECISIONS)}; "
                               f"got {precision!r}")
    for name, v in (("row_block", row_block), ("col_block", col_block)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise InputError(None, f"{name} must be a positive integer, got {v!r}")


def mine_torch_block(img, cap, start: int, stop: int, k_i2t: int, k_t2i: int, *,
                     precision: str = "auto", device: str = "cpu", row_block: int = 4096,
                     col_block: int = 8192, buffer_slack: float = 0.4,
                     validate: bool = True, cap_cache: dict | None = None) -> KnnResult:
    """Image rows ``start:stop`` of ``img`` mined against the whole caption gallery.

    The building block of sharded mining (:mod:`pipeline.mining.distributed`): the same
    tiled pass as :func:`mine_torch`, restricted to one block of image queries.

    * ``i2t`` / ``i2t_scores``: (stop - start, K_i2t), exact, identical to the rows
      ``start:stop`` of :func:`mine_torch` on the whole input.
    * ``t2i`` / ``t2i_scores``: (N_c, K_b) per caption, the exact top K_b among the block's
      images only (its own image excluded), ids are *global* image ids, ordered by the tie
      rule. K_b = min(K_t2i, stop - start). When K_t2i >= stop - start every block image is
      listed (sorted); the captions of the block's own images then have one fewer candidate
      and their last column is padding (id -1, score -inf).

    K_i2t / K_t2i are capped as for the whole input (N_c - 5 and N_img - 1). The global
    top K_t2i of a caption is contained in the union of its per-block lists, so merging
    the blocks by (-canonical score, id) reproduces :func:`mine_torch` exactly.

    validate=False skips the input checks (the caller validated the whole arrays once):
    ``img`` / ``cap`` must then be float32 C-contiguous (memory maps are fine).
    cap_cache: a dict owned by the caller *for this caption array*; the low-precision copy
    of the gallery is kept in it and reused by later blocks with the same options.
    """
    t_start = time.perf_counter()
    _check_options(precision, row_block, col_block)
    if validate:
        img, cap, k1, k2 = validate_inputs(img, cap, k_i2t, k_t2i)
    else:
        k1, k2 = capped_k(k_i2t, k_t2i, img.shape[0])
    n_i, d = img.shape
    n_c = cap.shape[0]
    if not (isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer))
            and 0 <= start < stop <= n_i):
        raise InputError(None, f"image block {start}:{stop} is not a non-empty range "
                               f"within 0:{n_i}")
    start, stop = int(start), int(stop)
    dev = resolve_device(device)
    if precision == "auto":
        precision = _pick_precision(d, dev)
    stats: dict = {"backend": "torch", "precision": precision, "device": str(dev),
                   "k_i2t": k1, "k_t2i": k2, "row_block": int(row_block),
                   "col_block": int(col_block), "block": (start, stop)}
    kb = min(k2, stop - start)               # every block image when K_t2i >= its size
    i2t, i2t_s, t2i, t2i_s = _mine(img, cap, np.arange(start, stop), k1, kb,
                                   precision=precision, dev=dev, row_block=row_block,
                                   col_block=col_block, progress=False,
                                   buffer_slack=buffer_slack, stats=stats, cap_cache=cap_cache)
    stats.update(gemm_flop=2.0 * (stop - start) * n_c * d, seconds=time.perf_counter() - t_start)
    return KnnResult(i2t, i2t_s, t2i, t2i_s, stats)


def _mine(img32, cap32, rows, k1: int, k2: int, *, precision: str, dev, row_block: int,
          col_block: int, progress: bool, buffer_slack: float, stats: dict,
          cap_cache: dict | None = None, scratch: _Scratch | None = None):
    """Image rows ``rows`` (a range) x all captions: i2t of those rows, t2i among them."""
    n_c = cap32.shape[0]
    scratch = scratch if scratch is not None else _Scratch()
    i2t = scratch.array("i2t_ids", (rows.size, k1), np.int32)
    i2t_s = scratch.array("i2t_scores", (rows.size, k1), np.float32)
    with torch.no_grad(), _exact_matmul_flags(), contextlib.closing(
            _Pass(img32, cap32, precision, dev, row_block, col_block, buffer_slack, stats,
                  cap_cache, scratch)) as ps:
        # A fixed pseudo-random visiting order: every block of rows / columns is a random
        # sample, which the speculative floors assume (any order gives the same answer).
        row_order = rows[np.random.default_rng(rows.size).permutation(rows.size)]
        col_order = np.random.default_rng(n_c).permutation(n_c)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=-(-rows.size // row_block) * -(-n_c // col_block),
                       desc="mine (tiles)", leave=False)
        cols_sel, bad_rows, bad_floors = ps.sweep(row_order, col_order, k1, k2, True,
                                                  (i2t, i2t_s, rows[0]), bar, "tiles")
        if bar is not None:
            bar.close()
        if bad_rows.size:                          # speculation failed: proven floors only
            stats["rechecked_i2t"] = int(bad_rows.size)
            ps.sweep(bad_rows, col_order, k1, 0, False, (i2t, i2t_s, rows[0]), None,
                     "tiles_recheck", floors=bad_floors)
        if cols_sel is None:
            return (i2t, i2t_s, np.empty((n_c, 0), dtype=np.int32),
                    np.empty((n_c, 0), dtype=np.float32))
        t = time.perf_counter()
        t2i, t2i_s, check = cols_sel.release(finish=lambda a, b: ps.finish(cols_sel, a, b))
        stats["seconds_finish"] = stats.get("seconds_finish", 0.0) + time.perf_counter() - t
        bad_cols = np.flatnonzero(~np.isnan(check))
        if bad_cols.size:
            stats["rechecked_t2i"] = int(bad_cols.size)
            sel, _, _ = ps.sweep(row_order, bad_cols, 0, k2, False, None, None, "tiles_recheck",
                                 floors=check[bad_cols])
            t2i[bad_cols], t2i_s[bad_cols], _ = sel.finish(slice(None))
    return i2t, i2t_s, t2i, t2i_s


def _probe(a_lp, b_lp, img32, cap32, scale, eps0, rho) -> float:
    """Check the bound on a sample GEMM (signed rows and their absolute values, so that
    partial sums cannot cancel); return max(|s_hat - exact| - bound) (<= 0 when it holds)."""
    ra = min(a_lp.shape[0], 128)
    rb = min(b_lp.shape[0], 512)
    x = torch.cat([a_lp[:ra], a_lp[:ra].abs()])
    y = torch.cat([b_lp[:rb], b_lp[:rb].abs()])
    s = _tile_mm(x, y).double().cpu()
    xa = torch.from_numpy(np.array(img32[:ra], dtype=np.float64))  # a copy: memmaps are
    yb = torch.from_numpy(np.array(cap32[:rb], dtype=np.float64))  # read-only
    ex = torch.cat([xa, xa.abs()]) @ torch.cat([yb, yb.abs()]).T * scale
    excess = float(((s - ex).abs() - (eps0 + rho * s.abs())).max())
    if excess > 0:
        raise RuntimeError(
            "the low-precision matmul of this machine/build exceeds the proven error bound "
            f"(by {excess:.3g}); it does not accumulate in float32. Use precision='fp32'.")
    return excess
