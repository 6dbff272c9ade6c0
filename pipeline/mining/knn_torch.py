"""Exact k-nearest neighbours of both directions in one tiled, low-precision pass.

The loop runs over image row blocks (outer) and caption column blocks (inner). Each tile
is one GEMM ``S_hat = A[rows] @ B[cols].T`` in ``precision`` (bf16 / fp16 inputs, or fp32)
and feeds two running selections: per image row (i2t; state for the current row block)
and per caption column (t2i; state for all captions, kept across row blocks). The
positives of the tile (j // 5 == i) are set to -inf. Each query keeps a threshold tau and
a buffer of candidates (id, low-precision score); only tile entries ``>= tau`` survive
(one compare and one ``nonzero`` per direction and tile, no k-selection over the tile),
are appended to the buffers, and a buffer that grows past K + slack is pruned (sorted,
its tau raised from its K-th score). A query's first tile sets its tau from the K-th
largest of group maxima of the tile (a cheap lower bound of the tile's K-th score). At
the end every buffered candidate is re-scored in float64 from the float32 inputs and the
top K is taken by (-canonical score, id) (:func:`pipeline.mining.reference.rescore_topk`).

Why the result is exact, not probably exact
-------------------------------------------
Let c be the canonical float64 score of a pair (see ``reference``) and s_hat the
low-precision tile score. Section "The bound" below gives ``|s_hat - c| <= eps0 + rho |s_hat|``
for every pair, so c lies in [lo(s_hat), hi(s_hat)] with lo(x) = x - rho|x| - eps0 and
hi(x) = x + rho|x| + eps0, both increasing in x.

For one query let c_K be the K-th largest canonical score (over non-positives) and u a
value with at least K seen entries having s_hat >= u (the K-th largest buffered score,
or any lower bound of it). Those K entries have c >= lo(s_hat) >= lo(u), so
c_K >= L := lo(u). Every entry of the true top K, and every entry tied with its K-th
(c >= c_K), has hi(s_hat) >= c >= c_K >= L, i.e. s_hat >= tau := hi^-1(L) (computed in
float64 and rounded down to float32). tau only uses entries seen so far, so it is at most
its final value: filtering each tile with the running tau, and pruning buffers with it,
never drops an entry with c >= c_K. With rho = 0 this is the classic rule
"s_hat >= u_K - 2 eps". The buffers therefore hold every true top-K member and every
tie of the K-th; exact re-scoring and sorting by (-c, id) gives the reference answer.

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
1.18e-2 (bf16, bf16 output), 1.53e-3 (fp16, fp16 output), 6.1e-5 (fp32).

Precondition for the accumulation term: the GEMM must accumulate in float32. CPU torch
does (oneDNN / MKL); on CUDA the "reduced precision reduction" flags and TF32 are switched
off for the duration of the call. A probe GEMM on the data checks the bound before the
pass and refuses to run (RuntimeError) if it fails.
"""
from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch

from pipeline.errors import InputError
from pipeline.mining.reference import (FLOAT32_LOWEST, U64, KnnResult, gamma, max_row_norm,
                                       rescore_delta, rescore_topk, validate_inputs)

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


def _pow2_scale(norm: float) -> float:
    """1, or the power of two that brings a max row norm outside [1/16, 16] into [0.5, 1)."""
    if norm == 0 or 2.0 ** -4 <= norm <= 2.0 ** 4:
        return 1.0
    return 2.0 ** -math.frexp(norm)[1]


def _lowp(x: torch.Tensor, dtype, scale: float, chunk: int = 1 << 16):
    """x * scale rounded to dtype, plus (max ||x*scale||, max ||x^||, max ||x*scale - x^||)."""
    if dtype == torch.float32 and scale == 1.0:
        n = max_row_norm(x)
        return x, n, n, 0.0
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


def _pick_precision(d: int, device: torch.device) -> str:
    """'auto': the fastest GEMM of the three on a probe (ties go to the higher precision)."""
    if device.type == "cuda":
        return "fp16"
    gen = torch.Generator(device=device).manual_seed(0)      # leave the global RNG alone
    a = torch.randn(512, d, device=device, generator=gen)
    b = torch.randn(2048, d, device=device, generator=gen)
    best, best_t = "fp32", math.inf
    for name in ("fp32", "fp16", "bf16"):
        dt = _FORMATS[name][0]
        x, y = a.to(dt), b.to(dt)
        _tile_mm(x, y)
        t = time.perf_counter()
        for _ in range(2):
            _tile_mm(x, y)
        t = time.perf_counter() - t
        if t < best_t * 0.9:
            best, best_t = name, t
    return best


def _kth_lower_bound(s: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Per row (dim=1) or column (dim=0) of s: a value <= its k-th largest entry.

    The k-th largest of the maxima of disjoint groups: k groups have a maximum >= it, so
    k distinct entries are >= it. Groups of n // (2k) entries keep it close to the true
    k-th while the selection runs on >= 2k group maxima instead of n entries.
    """
    n = s.shape[dim]
    gs = max(1, n // (2 * k))
    g = n // gs
    if dim == 1:
        x = s[:, :g * gs]
        x = x if gs == 1 else x.reshape(s.shape[0], g, gs).amax(dim=2)
    else:
        x = s[:g * gs]
        x = x.T if gs == 1 else x.reshape(g, gs, s.shape[1]).amax(dim=1).T
        x = x.contiguous()
    return x.topk(k, dim=1, sorted=False).values.amin(dim=1)


class _Buffers:
    """Running candidate selection for n queries: threshold tau, buffer of (id, score)."""

    def __init__(self, n: int, k: int, slack: int, device, tau_fn, stats: dict, tag: str):
        self.n, self.k, self.slack = n, k, slack
        self.cap = k + slack
        self.vals = torch.full((n, self.cap), -math.inf, device=device)
        self.ids = torch.full((n, self.cap), -1, dtype=torch.int32, device=device)
        self.cnt = torch.zeros(n, dtype=torch.int64, device=device)
        self.tau = torch.full((n,), FLOAT32_LOWEST, device=device)
        self.fresh = torch.ones(n, dtype=torch.bool, device=device)
        self.tau_fn = tau_fn
        self.stats = stats
        self.tag = tag

    def buffered(self) -> int:
        return int(self.cnt.sum())

    def update(self, s: torch.Tensor, q_off: int, cand_off: int, dim: int):
        """Feed a tile. dim=1: queries are the rows of s; dim=0: its columns."""
        nq = s.shape[0] if dim == 1 else s.shape[1]
        sl = slice(q_off, q_off + nq)
        fresh = self.fresh[sl]
        if s.shape[dim] >= self.k and bool(fresh.any()):
            kth = _kth_lower_bound(s, self.k, dim)
            ok = fresh & (kth > -math.inf)
            self.tau[sl] = torch.where(ok, torch.maximum(self.tau[sl], self.tau_fn(kth)),
                                       self.tau[sl])
            self.fresh[sl] = fresh & ~ok
        tau = self.tau[sl]
        if dim == 1:
            q, j = (s >= tau[:, None]).nonzero(as_tuple=True)
            v = s[q, j]
        else:
            r, q = (s >= tau[None, :]).nonzero(as_tuple=True)
            v = s[r, q]
            q, order = q.sort(stable=True)
            j, v = r[order], v[order]
        self._append(q, j + cand_off, v, q_off, nq)

    def _append(self, q, cand, v, q_off, nq):
        m = q.numel()
        if m == 0:
            return
        st = self.stats
        st[f"survivors_{self.tag}"] = st.get(f"survivors_{self.tag}", 0) + m
        new = torch.bincount(q, minlength=nq)
        rank = torch.arange(m, device=q.device) - (torch.cumsum(new, 0) - new)[q]
        cnt = self.cnt[q_off:q_off + nq]
        over = (cnt + new) > self.cap
        if bool(over.any()):
            qi = over.nonzero().squeeze(1)
            qmap = torch.full((nq,), -1, dtype=torch.int64, device=q.device)
            qmap[qi] = torch.arange(qi.numel(), device=q.device)
            sel = over[q]
            width = self.cap + int(new[qi].max())
            tv = torch.full((qi.numel(), width), -math.inf, device=q.device)
            ti = torch.full((qi.numel(), width), -1, dtype=torch.int32, device=q.device)
            qg = qi + q_off
            tv[:, :self.cap] = self.vals[qg]
            ti[:, :self.cap] = self.ids[qg]
            rows, pos = qmap[q[sel]], self.cap + rank[sel]
            tv[rows, pos] = v[sel]
            ti[rows, pos] = cand[sel].to(torch.int32)
            self._compact(qg, tv, ti)
            keep = ~sel
            q, cand, v, rank = q[keep], cand[keep], v[keep], rank[keep]
        if q.numel():
            qg = q + q_off
            pos = self.cnt[qg] + rank
            self.vals[qg, pos] = v
            self.ids[qg, pos] = cand.to(torch.int32)
            self.cnt[q_off:q_off + nq] += torch.where(over, 0, new)

    def _compact(self, qg, tv, ti):
        """Rows qg, given as full candidate lists tv/ti: raise tau from their K-th score,
        drop the entries below it, store the rest (in arrival order) in the buffer."""
        self.stats["prunes"] = self.stats.get("prunes", 0) + 1
        w_in = tv.shape[1]
        if w_in >= self.k:
            kth = tv.kthvalue(w_in - self.k + 1, dim=1).values      # K-th largest
            tau = torch.maximum(self.tau[qg], self.tau_fn(kth))
            self.tau[qg] = tau
            self.fresh[qg] = self.fresh[qg] & ~(kth > -math.inf)
        else:
            tau = self.tau[qg]
        keep = (tv >= tau[:, None]) & (tv > -math.inf)
        kc = keep.sum(dim=1)
        need = int(kc.max()) if kc.numel() else 0
        if need > self.cap:
            self._grow(need + self.slack)
        rows, cols = keep.nonzero(as_tuple=True)
        pos = (keep.cumsum(dim=1) - 1)[rows, cols]
        vals = torch.full((qg.numel(), self.cap), -math.inf, device=tv.device)
        ids = torch.full((qg.numel(), self.cap), -1, dtype=torch.int32, device=tv.device)
        vals[rows, pos] = tv[rows, cols]
        ids[rows, pos] = ti[rows, cols]
        self.vals[qg] = vals
        self.ids[qg] = ids
        self.cnt[qg] = kc

    def _grow(self, cap: int):
        self.stats["buffer_growths"] = self.stats.get("buffer_growths", 0) + 1
        extra = cap - self.cap
        self.vals = torch.cat([self.vals, torch.full((self.n, extra), -math.inf,
                                                     device=self.vals.device)], dim=1)
        self.ids = torch.cat([self.ids, torch.full((self.n, extra), -1, dtype=torch.int32,
                                                   device=self.ids.device)], dim=1)
        self.cap = cap

    def final_candidates(self) -> torch.Tensor:
        """Prune every query with its final threshold; (n, W) int64 ids, -1 = padding."""
        if self.n == 0:
            return torch.empty((0, 0), dtype=torch.int64)
        self._compact(torch.arange(self.n, device=self.vals.device), self.vals, self.ids)
        self.stats["prunes"] -= 1
        w = max(int(self.cnt.max()), self.k)
        return self.ids[:, :w].to(torch.int64)


def _mask_positives(s: torch.Tensor, r0: int, r1: int, c0: int, c1: int):
    lo, hi = max(c0, 5 * r0), min(c1, 5 * r1)
    if lo < hi:
        j = torch.arange(lo, hi, device=s.device)
        s[j // 5 - r0, j - c0] = -math.inf


# --------------------------------------------------------------------------- main
def mine_torch(img, cap, k_i2t: int, k_t2i: int, *, precision: str = "bf16",
               device: str = "cpu", row_block: int = 4096, col_block: int = 8192,
               progress: bool = False, buffer_slack: float = 1.0) -> KnnResult:
    """Exact i2t / t2i candidates (ids equal to :func:`mine_reference`) in one tiled pass.

    precision: "bf16" | "fp16" | "fp32" for the GEMM (the answer is exact in every case;
    lower precision only widens the filter band), or "auto" (fastest GEMM on a probe).
    row_block x col_block: the tile; at most one tile of scores exists at a time.
    buffer_slack: per-query buffer capacity is K + max(64, buffer_slack * K) candidates
    (a buffer that fills is pruned; one that cannot be pruned below it grows). Memory:
    N_c x capacity(K_t2i) + row_block x capacity(K_i2t) entries of 8 bytes, plus one tile.

    stats: seconds, seconds_rescore, tiles, precision, device, eps0 / rho (the bound used,
    |s_hat - c| <= eps0 + rho |s_hat|, in tile units; score_scale = tile units per score
    unit), eps_apriori_unit (:func:`lowp_error_bound`), probe_max_excess (<= 0),
    survivors_i2t / survivors_t2i (tile entries that passed the filter), prunes,
    buffer_growths, peak_buffered (max candidates held at once), rescored_i2t /
    rescored_t2i (pairs re-scored in float64), canonical_refined (pairs that needed the
    canonical sum), rescore_delta, gemm_flop, k_i2t / k_t2i (after capping).
    """
    t_start = time.perf_counter()
    _check_options(precision, row_block, col_block)
    img32, cap32, k1, k2 = validate_inputs(img, cap, k_i2t, k_t2i)
    n_i, d = img32.shape
    n_c = cap32.shape[0]
    dev = _as_device(device)
    if precision == "auto":
        precision = _pick_precision(d, dev)
    stats: dict = {"backend": "torch", "precision": precision, "device": str(dev),
                   "k_i2t": k1, "k_t2i": k2, "row_block": int(row_block),
                   "col_block": int(col_block)}
    i2t, i2t_s, t2i, t2i_s = _tiled_pass(
        img32, cap32, k1, k2, row_offset=0, precision=precision, dev=dev,
        row_block=row_block, col_block=col_block, progress=progress,
        buffer_slack=buffer_slack, stats=stats)
    stats.update(gemm_flop=2.0 * n_i * n_c * d, seconds=time.perf_counter() - t_start)
    return KnnResult(i2t, i2t_s, t2i, t2i_s, stats)


def _check_options(precision, row_block, col_block):
    if precision not in PRECISIONS:
        raise InputError(None, f"precision must be one of {', '.join(PRECISIONS)}; "
                               f"got {precision!r}")
    for name, v in (("row_block", row_block), ("col_block", col_block)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise InputError(None, f"{name} must be a positive integer, got {v!r}")


def _as_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(None, f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, f"device {device!r} requested but CUDA is not available")
    return dev


def mine_torch_block(img, cap, start: int, stop: int, k_i2t: int, k_t2i: int, *,
                     precision: str = "bf16", device: str = "cpu", row_block: int = 4096,
                     col_block: int = 8192, buffer_slack: float = 1.0,
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
        n_all = img.shape[0]
        k1, k2 = min(int(k_i2t), cap.shape[0] - 5), min(int(k_t2i), n_all - 1)
    n_i, d = img.shape
    n_c = cap.shape[0]
    if not (isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer))
            and 0 <= start < stop <= n_i):
        raise InputError(None, f"image block {start}:{stop} is not a non-empty range "
                               f"within 0:{n_i}")
    start, stop = int(start), int(stop)
    nb = stop - start
    dev = _as_device(device)
    if precision == "auto":
        precision = _pick_precision(d, dev)
    stats: dict = {"backend": "torch", "precision": precision, "device": str(dev),
                   "k_i2t": k1, "k_t2i": k2, "row_block": int(row_block),
                   "col_block": int(col_block), "block": (start, stop)}
    dense = k2 >= nb                   # every block image is wanted by every caption
    kb = nb if dense else k2
    i2t, i2t_s, t2i, t2i_s = _tiled_pass(
        img[start:stop], cap, k1, kb, row_offset=start, precision=precision, dev=dev,
        row_block=row_block, col_block=col_block, progress=False,
        buffer_slack=buffer_slack, stats=stats, t2i_all=dense, cap_cache=cap_cache)
    if kb:
        pad = t2i < 0
        t2i = t2i + np.int32(start)
        t2i[pad] = -1
    stats.update(gemm_flop=2.0 * nb * n_c * d, seconds=time.perf_counter() - t_start)
    return KnnResult(i2t, i2t_s, t2i, t2i_s, stats)


def _tiled_pass(img32, cap32, k1: int, k2: int, *, row_offset: int, precision: str, dev,
                row_block: int, col_block: int, progress: bool, buffer_slack: float,
                stats: dict, t2i_all: bool = False, cap_cache: dict | None = None):
    """The single pass over ``img32`` (image rows ``row_offset ..`` of the whole input,
    which fixes the positives) x ``cap32``. Returns i2t, i2t_s, t2i, t2i_s; t2i ids are
    local (row of ``img32``). t2i_all: no t2i selection, every caption lists every row
    of ``img32`` (own image as padding -1 / -inf at the end), k2 must be len(img32)."""
    n_i, d = img32.shape
    n_c = cap32.shape[0]
    dtype = _FORMATS[precision][0]
    with torch.no_grad(), _exact_matmul_flags():
        # read-only memmaps: torch needs writable memory, so they are copied once
        a32 = torch.from_numpy(img32 if img32.flags.writeable else np.array(img32)).to(dev)
        b32 = torch.from_numpy(cap32 if cap32.flags.writeable else np.array(cap32)).to(dev)
        # fp16 has a small range: a side whose max row norm is outside [1/16, 16] is scaled
        # by a power of two (max norm into [0.5, 1)); the tile scores then all scale by one
        # positive constant, the ordering is unchanged, and the bound is computed in the
        # scaled units (final scores come from the unscaled float32 inputs).
        sa = sb = 1.0
        key = None
        if cap_cache is not None:
            key = ("cap_norm", str(dev))
            if key not in cap_cache:
                cap_cache[key] = max_row_norm(b32)
            g_norm_cap = cap_cache[key]
        else:
            g_norm_cap = None
        if precision == "fp16":
            sa = _pow2_scale(max_row_norm(a32))
            sb = _pow2_scale(g_norm_cap if g_norm_cap is not None else max_row_norm(b32))
        a_lp, na, na_h, ea = _lowp(a32, dtype, sa)
        if cap_cache is not None:
            key = ("lowp", precision, sb, str(dev))
            if key not in cap_cache:
                for k in [k for k in cap_cache if k[0] == "lowp"]:
                    del cap_cache[k]                  # one low-precision copy at a time
                cap_cache[key] = _lowp(b32, dtype, sb)
            b_lp, nb, nb_h, eb = cap_cache[key]
        else:
            b_lp, nb, nb_h, eb = _lowp(b32, dtype, sb)
        eps0, rho = _data_bound(d, precision, na, na_h, ea, nb, nb_h, eb)
        stats.update(eps0=eps0, rho=rho, eps_apriori_unit=lowp_error_bound(d, precision),
                     score_scale=sa * sb)
        stats["probe_max_excess"] = _probe(a_lp, b_lp, img32, cap32, sa * sb, eps0, rho)

        def tau_fn(kth: torch.Tensor) -> torch.Tensor:
            x = kth.double()
            lo = x - rho * x.abs() - eps0
            y = lo - eps0
            t = torch.where(y >= 0, y / (1 + rho), y / (1 - rho))
            t = t - 2.0 ** -50 * (x.abs() + 1.0)
            t32 = t.float()
            t32 = torch.where(t32.double() > t,
                              torch.nextafter(t32, torch.full_like(t32, -math.inf)), t32)
            t32 = torch.where(torch.isfinite(x), t32, torch.full_like(t32, FLOAT32_LOWEST))
            return t32.clamp(min=FLOAT32_LOWEST)

        slack1 = max(64, int(buffer_slack * k1))
        slack2 = max(64, int(buffer_slack * k2))
        i2t = np.empty((n_i, k1), dtype=np.int32)
        i2t_s = np.empty((n_i, k1), dtype=np.float32)
        q_norm_img = max_row_norm(a32)
        if g_norm_cap is None:
            g_norm_cap = max_row_norm(b32)
        delta = rescore_delta(d, q_norm_img, g_norm_cap)
        stats["rescore_delta"] = delta
        cols = None
        if k2 and not t2i_all:
            cols = _Buffers(n_c, k2, slack2, dev, tau_fn, stats, "t2i")
        tiles, peak, t_rescore = 0, 0, 0.0
        n_rb = -(-n_i // row_block)
        n_cb = -(-n_c // col_block)
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_rb * n_cb, desc="mine (tiles)", leave=False)
        for r0 in range(0, n_i if (k1 or cols is not None) else 0, row_block):
            r1 = min(n_i, r0 + row_block)
            rows = _Buffers(r1 - r0, k1, slack1, dev, tau_fn, stats, "i2t") if k1 else None
            for c0 in range(0, n_c, col_block):
                c1 = min(n_c, c0 + col_block)
                s = _tile_mm(a_lp[r0:r1], b_lp[c0:c1])
                _mask_positives(s, row_offset + r0, row_offset + r1, c0, c1)
                if rows is not None:
                    rows.update(s, 0, c0, dim=1)
                if cols is not None:
                    cols.update(s, c0, r0, dim=0)
                del s
                tiles += 1
                buffered = (rows.buffered() if rows else 0) + (cols.buffered() if cols else 0)
                peak = max(peak, buffered)
                if bar is not None:
                    bar.update(1)
            if rows is not None:
                t = time.perf_counter()
                cand = rows.final_candidates()
                i2t[r0:r1], i2t_s[r0:r1] = rescore_topk(
                    a32[r0:r1], b32, img32, cap32, cand, k1, q_offset=r0, delta=delta,
                    stats=stats)
                stats["rescored_i2t"] = stats.get("rescored_i2t", 0) + int((cand >= 0).sum())
                t_rescore += time.perf_counter() - t
        if bar is not None:
            bar.close()
        if cols is not None or (t2i_all and k2):
            t = time.perf_counter()
            if cols is not None:
                cand = cols.final_candidates()
            else:
                cand = torch.arange(n_i, device=dev).expand(n_c, n_i).clone()
                own = torch.arange(n_c, device=dev) // 5 - row_offset
                inside = ((own >= 0) & (own < n_i)).nonzero().squeeze(1)
                cand[inside, own[inside]] = -1
            stats["rescored_t2i"] = int((cand >= 0).sum())
            t2i, t2i_s = rescore_topk(b32, a32, cap32, img32, cand, k2, delta=delta,
                                      stats=stats)
            t_rescore += time.perf_counter() - t
        else:
            t2i = np.empty((n_c, 0), dtype=np.int32)
            t2i_s = np.empty((n_c, 0), dtype=np.float32)
    stats.update(tiles=tiles, peak_buffered=peak, seconds_rescore=t_rescore)
    return i2t, i2t_s, t2i, t2i_s


def _probe(a_lp, b_lp, img32, cap32, scale, eps0, rho) -> float:
    """Check the bound on a sample GEMM (signed rows and their absolute values, so that
    partial sums cannot cancel); return max(|s_hat - exact| - bound) (<= 0 when it holds)."""
    ra = min(a_lp.shape[0], 128)
    rb = min(b_lp.shape[0], 512)
    x = torch.cat([a_lp[:ra], a_lp[:ra].abs()])
    y = torch.cat([b_lp[:rb], b_lp[:rb].abs()])
    s = _tile_mm(x, y).double().cpu()
    xa = torch.from_numpy(img32[:ra]).double()
    yb = torch.from_numpy(cap32[:rb]).double()
    ex = torch.cat([xa, xa.abs()]) @ torch.cat([yb, yb.abs()]).T * scale
    excess = float(((s - ex).abs() - (eps0 + rho * s.abs())).max())
    if excess > 0:
        raise RuntimeError(
            "the low-precision matmul of this machine/build exceeds the proven error bound "
            f"(by {excess:.3g}); it does not accumulate in float32. Use precision='fp32'.")
    return excess
