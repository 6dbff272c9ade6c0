"""The proven bound on low-precision scores, and the low-precision helpers of the pass.

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
import time

import numpy as np
import torch

from pipeline.errors import InputError
from pipeline.mining.reference import U64, gamma, rescore_delta

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


# --------------------------------------------------------------------------- precision="auto"
# Which precision gives the cheapest pass: a model of the pass's cost per precision, fed by
# rates measured on this machine (``measure_rates``, once per (device, d) in the process)
# and by the band shares of the data (``band_shares``, from a sample of the call's inputs).
#
#   cost(p) = 2 N_r N_c d / gemm_rate(p)                          the tile GEMMs
#           + (N_r + N_c) d * convert(p)                          rounding the inputs to p
#           + keyed(p) * (key + extract + keep)                   float64 keys of survivors
#             (or, when a tile's survivors exceed DENSE_SHARE, a dense float64 GEMM of it)
#             and their insertion into the running selections
#           + N_r N_c * scan + gathers                            the same for every p
#   keyed(p) = N_r N_c * EARLY_FLOORS * share(p),  share(p) = P[c >= F_row - W w_p or
#             c >= F_col - W w_p]: the entries at or above a query's K-th score F, plus
#             those within W x the band w_p = eps0 + rho |F| below it (the bound of p: what
#             its filter must let through), W = 1 + FLOOR_LAG.
# FLOOR_LAG: a query's first floor is its speculative K-th tile score lowered by the band
# (``_Pass.floor_from_tile``), and the filter lowers it by the band again, so until the
# selection's own keys raise it the wide band counts about twice; over the pass about 1.5x.
# Both constants were fitted on one run (Intel Xeon with AMX, 10,000 x 50,000 x 1024,
# K 2000 / 400): survivors / share 1.14 for fp32, fp16 and bf16 alike once the band is
# widened 1.5x (1.14 / 1.16 / 1.30 with the plain band). Before the keep term and the lag,
# the model chose bf16 there (predicted 6.8 s vs fp32 8.0 s) and fp32 was faster (11.7 s
# vs 14.6 s measured): bf16's 4.7x GEMM saved 2.0 s, its 46% more survivors cost 3.8 s
# and rounding the 60,000 input rows about 1 s (20 ns per element).
EARLY_FLOORS = 1.14  # survivors / share at the widened band (see above)
FLOOR_LAG = 0.5      # the extra share of the band that early floors add (see above)
PROBE_COLS = 4096    # GEMM probe: rows x PROBE_COLS x d (the pass's tile width class), rows
PROBE_ROWS = (128, 256, 512, 1024)  # from a rough 128 up to 1024 while ...
PROBE_BUDGET = 0.15  # ... one GEMM of that size takes at most this long (seconds)
SAMPLE = (512, 2048)  # band shares: sampled images x captions of the call's data
MIN_RANK = 4         # a sampled query's K-th score from at least this rank (smaller K:
                     # the share is overestimated, which only favours the narrower band)
AUTO_MIN_FLOP = 2e10  # below this pass size (~0.2-0.4 s of fp32 GEMM on 2 cores, about the
                     # probe's own time) 'auto' takes fp32 unprobed: it cannot lose more
_NARROWER = {"fp32": (), "fp16": ("fp32",), "bf16": ("fp32", "fp16")}   # by band width
_RATES: dict = {}    # (device, d) -> measure_rates(): a process-wide cache


def measure_rates(d: int, device: torch.device) -> dict:
    """This machine's rates for the cost model (cached per (device, d) for the process).

    gemm_gflops: the tile GEMM per precision as the pass runs it (low-precision inputs,
    float32 result in a buffer). Each precision is timed once at 128 x 4096 x d; one whose
    GEMM is over 2x slower than that of a narrower-band precision keeps that rough rate (it
    cannot win: a slower GEMM and more keys), the others are timed again at the largest of
    256 .. 1024 rows that fits PROBE_BUDGET (best of 2, interleaved); gemm_rows: the rows
    of each rate. convert_ns: per input element, its rounding to the precision with the
    bound's error norms (``_lowp``; 0 for fp32). f64_gflops: the dense-keys GEMM. key_ns / extract_ns / keep_ns: per
    survivor, its float64 key (``_Pass.keys``: sparse dot products on the pass's pool), its
    extraction from the tile (``_Pass._survivors`` minus the scan) and its insertion into
    the running selections (``_time_keep``); scan_ns: the filter's compare per
    tile entry; copy_ns: the float64 gather per input element (CPU only). About 0.4 s at
    d = 1024 on 2 cores (more on a busy machine).
    """
    key = (str(device), int(d))
    if key in _RATES:
        return _RATES[key]
    from pipeline.mining.knn_torch.tiled_pass import _gemm      # tiled_pass imports this module

    t_start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)        # leave the global RNG alone
    rows_max = PROBE_ROWS[-1]
    a = torch.randn(rows_max, d, device=device, generator=gen)
    b = torch.randn(PROBE_COLS, d, device=device, generator=gen)
    out = torch.empty(rows_max * PROBE_COLS, device=device)
    inputs = {p: (a.to(_FORMATS[p][0]), b.to(_FORMATS[p][0])) for p in _NARROWER}

    def timed(p, rows):
        x, y = inputs[p]
        _sync(device)
        t = time.perf_counter()
        _gemm(x[:rows], y, out[:rows * PROBE_COLS].view(rows, PROBE_COLS))
        _sync(device)
        return time.perf_counter() - t

    with torch.no_grad(), _exact_matmul_flags():
        for p, (x, y) in inputs.items():                        # kernel set-up, not timed
            _gemm(x[:16], y[:256], out[:16 * 256].view(16, 256))
        rows = dict.fromkeys(_NARROWER, PROBE_ROWS[0])
        best = {p: timed(p, PROBE_ROWS[0]) for p in _NARROWER}
        rough = dict(best)
        contenders = [p for p in _NARROWER if not any(rough[p] > 2 * rough[q] for q in _NARROWER[p])]
        for p in contenders:
            rows[p] = max(r for r in PROBE_ROWS
                          if r == PROBE_ROWS[0] or rough[p] * r / PROBE_ROWS[0] <= PROBE_BUDGET)
            if rows[p] != PROBE_ROWS[0]:
                best[p] = math.inf
        for _ in range(2):
            for p in contenders:
                best[p] = min(best[p], timed(p, rows[p]))
        gemm = {p: 2.0 * rows[p] * PROBE_COLS * d / best[p] / 1e9 for p in _NARROWER}
        # the pass's rounding of its inputs (+ error norms), one 4096-row chunk as it runs
        # it: into fresh memory (page faults included: warm, small buffers take a tenth)
        convert = {"fp32": 0.0}
        x = torch.randn(4096, d, device=device, generator=gen)
        norm = _max_norm(x)
        for p in ("fp16", "bf16"):
            _sync(device)
            t0 = time.perf_counter()
            _lowp(x, _FORMATS[p][0], 1.0, norm)
            _sync(device)
            convert[p] = (time.perf_counter() - t0) / x.numel() * 1e9
        del x
        per_entry = _measure_entry_costs(d, device) if device.type == "cpu" else {}
    rates = {"gemm_gflops": gemm, "gemm_rows": rows, "gemm_cols": PROBE_COLS,
             "convert_ns": convert, **per_entry,
             "probe_seconds": time.perf_counter() - t_start}
    _RATES[key] = rates
    return rates


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_entry_costs(d: int, device: torch.device) -> dict:
    """The per-entry rates of the pass's CPU work, by the pass's own code on a 1024 x 2048
    tile of random unit vectors with 5% survivors (sparse keys, as most tiles have). The
    tile's scores are random numbers: where the survivors are does not change the cost."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.mining.knn_torch.tiled_pass import _Pass

    gen = torch.Generator().manual_seed(0)
    n_r, n_c = 1024, 2048                  # 2 key blocks of 512 rows: both pool workers busy
    a32 = torch.nn.functional.normalize(torch.randn(n_r, d, generator=gen), dim=1)
    b32 = torch.nn.functional.normalize(torch.randn(n_c, d, generator=gen), dim=1)
    # what keys / _survivors / _gather read of a _Pass, without its set-up (copies, the
    # bound's probe: a third of a second on its own)
    ps = _Pass.__new__(_Pass)
    ps.dev, ps.stats, ps.img_np, ps.cap_np = device, {}, a32.numpy(), b32.numpy()
    ps.delta = rescore_delta(d, 1.0 + 1e-6, 1.0 + 1e-6)
    ps.m_buf = torch.empty(n_r * n_c, dtype=torch.bool)
    ps.workers = max(1, torch.get_num_threads())
    ps.pool = ThreadPoolExecutor(ps.workers, initializer=torch.set_num_threads, initargs=(1,))
    cols_buf = (torch.empty(n_c, d), torch.empty(n_c, d, dtype=torch.float64))
    try:
        s = torch.rand(n_r, n_c, generator=gen)
        tr, tc = np.full(n_r, np.float32(0.95)), np.full(n_c, np.float32(0.95))
        none = np.full(n_r, np.float32(2.0)), np.full(n_c, np.float32(2.0))

        def best_of(fn, reps=2):
            t = math.inf
            for _ in range(reps):                  # the first also starts the pool threads
                t0 = time.perf_counter()
                fn()
                t = min(t, time.perf_counter() - t0)
            return t

        t_scan = best_of(lambda: ps._survivors(s, *none))
        ri, ci, _, _ = ps._survivors(s, tr, tc)
        t_filter = best_of(lambda: ps._survivors(s, tr, tc))
        ids_r, ids_c = np.arange(n_r), np.arange(n_c)
        t_copy = best_of(lambda: ps._gather(b32, b32, ids_c, cols_buf))
        a64, b64 = a32.double(), cols_buf[1]
        t_keys = best_of(lambda: ps.keys(a64, b64, ri, ci, ids_r, ids_c))
        f = ps.keys(a64, b64, ri, ci, ids_r, ids_c)
        t_keep = best_of(lambda: _time_keep(ri, ci, f, n_r, n_c, a32.numpy(), b32.numpy(),
                                            ps.workers))
        t_f64 = best_of(lambda: a64[:128] @ b64.T)
    finally:
        ps.close()
    n = max(1, ri.size)
    return {"f64_gflops": 2.0 * 128 * n_c * d / t_f64 / 1e9,
            "key_ns": t_keys / n * 1e9, "extract_ns": max(0.0, t_filter - t_scan) / n * 1e9,
            "scan_ns": t_scan / (n_r * n_c) * 1e9, "copy_ns": t_copy / (n_c * d) * 1e9,
            "keep_ns": t_keep / n * 1e9}


def _time_keep(ri, ci, f, n_r, n_c, q_np, g_np, workers: int) -> float:
    """Seconds the pass's ``keep_rows`` / ``keep_cols`` take for these survivors (one tile
    of a query's life: K at a quarter of the survivors, so that selections refine): the two
    directions run side by side on the pool, hence the max of the two with 2+ workers."""
    from pipeline.mining.knn_torch.selection import _Selection
    from pipeline.mining.knn_torch.tiled_pass import _capacity

    times = []
    for q, cand, n_q, g in ((ri, ci, n_r, n_c), (None, None, n_c, n_r)):
        if q is None:                               # by column, grouped (radix order)
            order = np.argsort(ci.astype(np.uint16), kind="stable")
            q, cand, fq = ci[order], ri[order], f[order]
        else:
            fq = f
        k = max(1, int(q.size / n_q / 4))
        t0 = time.perf_counter()
        sel = _Selection(np.arange(n_q), np.full(n_q, k), _capacity(k, 0.4), q_np, g_np, {})
        keep = fq >= sel.floor[q]
        sel.add(q[keep], cand[keep], fq[keep])
        sel.refine(slice(None), 0.5, True)
        times.append(time.perf_counter() - t0)
    return max(times) if workers > 1 else sum(times)


def band_shares(img, cap, k_i2t: int, k_t2i: int, rows=None, *, sample=SAMPLE) -> dict:
    """Per precision, the share of score-matrix entries the pass's filter must let through
    once the floors are final (module section "precision='auto'"), from a sample of the data:
    ``sample`` images (of ``rows``, a (start, stop) image range; default all) x captions,
    their float32 scores (positives excluded), each sampled query's K-th score F at its
    share of the gallery, the band of each precision from the data-dependent bound of the
    sample (fp16 scaling included). Returns {"shares": {p: share}, "band": {p: width at the
    median F}, "sample": [images, captions], "source": "data"}."""
    n_i, d = img.shape
    n_c = cap.shape[0]
    lo, hi = rows if rows is not None else (0, n_i)
    rng = np.random.default_rng(0)
    ii = np.sort(rng.choice(np.arange(lo, hi), size=min(sample[0], hi - lo), replace=False))
    cc = np.sort(rng.choice(n_c, size=min(sample[1], n_c), replace=False))
    a = torch.from_numpy(np.array(img[ii], dtype=np.float32))
    b = torch.from_numpy(np.array(cap[cc], dtype=np.float32))
    with torch.no_grad(), _exact_matmul_flags():
        s = (a @ b.T).numpy()
    s[(cc[None, :] // 5) == ii[:, None]] = -np.inf                 # positives
    m_r, m_c = s.shape

    def kth(x, share, axis):                  # each query's K-th score along `axis`
        m = x.shape[axis]
        r = min(m, max(MIN_RANK, math.ceil(share * m)))
        return np.partition(x, m - r, axis=axis).take(m - r, axis=axis)

    # K among the gallery less the positives (5 captions, 1 image), as validate_inputs caps
    f_r = kth(s, k_i2t / max(1, n_c - 5), 1) if k_i2t else None
    f_c = kth(s, k_t2i / max(1, hi - lo - 1), 0) if k_t2i else None
    a_b, b_b = a[:128], b[:128]              # the bound's norms: 128 rows of each side do
    na, nb = _max_norm(a_b), _max_norm(b_b)
    shares, band = {}, {}
    for p in _NARROWER:
        dtype = _FORMATS[p][0]
        sa, sb = (_pow2_scale(na), _pow2_scale(nb)) if p == "fp16" else (1.0, 1.0)
        _, na_s, na_h, ea = _lowp(a_b, dtype, sa, na)
        _, nb_s, nb_h, eb = _lowp(b_b, dtype, sb, nb)
        eps0, rho = _data_bound(d, p, na_s, na_h, ea, nb_s, nb_h, eb)
        scale = sa * sb

        def width(f):
            return (1.0 + FLOOR_LAG) * (eps0 + rho * np.abs(f) * scale) / scale

        passed = np.zeros(s.shape, dtype=bool)
        for f, axis in ((f_r, 1), (f_c, 0)):
            if f is not None:
                np.logical_or(passed, s >= np.expand_dims(f - width(f), axis), out=passed)
        shares[p] = float(passed.mean())
        some = f_r if f_r is not None else f_c
        band[p] = float(np.median(width(some))) / (1.0 + FLOOR_LAG) if some is not None else 0.0
    return {"shares": shares, "band": band, "sample": [m_r, m_c], "source": "data"}


def default_shares(d: int, share_i2t: float = 0.01, share_t2i: float = 0.01) -> dict:
    """``band_shares`` without data: scores of random unit vectors, ~ N(0, 1/d), K-th score at
    the upper ``share`` quantile of each direction (the thresholds of the two directions
    then coincide, so the union is the larger), band from :func:`lowp_error_bound`."""
    sd = 1.0 / math.sqrt(d)
    shares, band = {}, {}
    for p in _NARROWER:
        w = lowp_error_bound(d, p)
        tails = [0.5 * math.erfc((_upper_quantile(q) * sd - (1.0 + FLOOR_LAG) * w) / sd / math.sqrt(2))
                 for q in (share_i2t, share_t2i) if q > 0]
        shares[p], band[p] = (max(tails) if tails else 0.0), w
    return {"shares": shares, "band": band, "source": "default (random unit vectors)"}


def _upper_quantile(q: float) -> float:
    """z with P[N(0,1) >= z] = q (bisection on erfc: no scipy needed)."""
    if q >= 1:
        return -math.inf
    lo, hi = -40.0, 40.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if 0.5 * math.erfc(mid / math.sqrt(2)) > q else (lo, mid)
    return hi


def predict_pass_seconds(rates: dict, shares: dict, n_r: int, n_c: int, d: int,
                         row_block: int, col_block: int) -> dict:
    """Predicted seconds of the pass per precision (module section "precision='auto'"):
    {p: {"gemm", "keys", "fixed", "total"}}; rates as :func:`measure_rates`, shares as
    :func:`band_shares` ["shares"]."""
    from pipeline.mining.knn_torch.tiled_pass import DENSE_SHARE

    R, C = min(row_block, n_r), min(col_block, n_c)
    tiles = -(-n_r // R) * -(-n_c // C)
    pairs = float(n_r) * n_c
    ns = 1e-9
    fixed = pairs * rates.get("scan_ns", 0.0) * ns \
        + (tiles * C + n_r) * d * rates.get("copy_ns", 0.0) * ns
    out = {}
    for p, share in shares.items():
        rate = rates["gemm_gflops"].get(p)
        if not rate:
            continue
        gemm = 2.0 * pairs * d / (rate * 1e9) \
            + (n_r + n_c) * d * rates.get("convert_ns", {}).get(p, 0.0) * ns
        keyed = pairs * min(1.0, EARLY_FLOORS * share)
        extract = keyed * (rates.get("extract_ns", 0.0) + rates.get("keep_ns", 0.0)) * ns
        if keyed > DENSE_SHARE * pairs and rates.get("f64_gflops"):
            keys = tiles * 2.0 * R * C * d / (rates["f64_gflops"] * 1e9) + extract
        else:
            keys = keyed * rates.get("key_ns", 0.0) * ns + extract
        out[p] = {"gemm": gemm, "keys": keys, "fixed": fixed, "total": gemm + keys + fixed}
    return out


def _pick_precision(d: int, device: torch.device, *, img=None, cap=None, k_i2t: int = 0,
                    k_t2i: int = 0, rows=None, row_block: int = 4096, col_block: int = 8192,
                    rates: dict | None = None) -> tuple[str, dict]:
    """'auto': the precision with the lowest predicted pass cost, and why.

    rates: as :func:`measure_rates` (default: measured here, cached); img / cap: the call's
    inputs (band shares from a sample of them; without them :func:`default_shares` at
    K / N = 1%); rows: the image range mined (a block). Returns (precision, record) with
    record = {"chosen", "reason", "rates", "shares", "band", "predicted_seconds",
    "shares_source"}. Not probed (record: chosen and reason): on CUDA, fp16 (tensor cores
    outrun fp32 GEMMs by far more than the band costs); a pass under AUTO_MIN_FLOP, fp32
    (unless rates are given or already measured in this process).
    """
    if device.type == "cuda":
        return "fp16", {"chosen": "fp16", "reason": "cuda: fp16 tensor cores (not probed)"}
    if img is not None and cap is not None:
        n_r = (rows[1] - rows[0]) if rows is not None else img.shape[0]
        n_c = cap.shape[0]
    else:
        n_r, n_c = row_block, col_block
    flop = 2.0 * n_r * n_c * d
    if rates is None and (str(device), int(d)) not in _RATES and flop < AUTO_MIN_FLOP:
        return "fp32", {"chosen": "fp32", "reason": f"fp32: a {flop:.3g} FLOP pass cannot save "
                        "the probe's time (AUTO_MIN_FLOP); not probed"}
    rates = rates if rates is not None else measure_rates(d, device)
    if img is not None and cap is not None:
        sh = band_shares(img, cap, k_i2t, k_t2i, rows)
    else:
        sh = default_shares(d)
    pred = predict_pass_seconds(rates, sh["shares"], n_r, n_c, d, row_block, col_block)
    chosen = min(pred, key=lambda p: (pred[p]["total"], -_FORMATS[p][1]))  # tie: narrower band
    others = sorted((p for p in pred if p != chosen), key=lambda p: pred[p]["total"])
    why = f"{chosen}: predicted {pred[chosen]['total']:.3g} s (GEMM " \
          f"{pred[chosen]['gemm']:.3g} s at {rates['gemm_gflops'][chosen]:.0f} GFLOP/s, keys " \
          f"{pred[chosen]['keys']:.3g} s for share {sh['shares'][chosen]:.3g})"
    if others:
        why += "; " + ", ".join(f"{p} {pred[p]['total']:.3g} s" for p in others)
    copied = {k: dict(v) if isinstance(v, dict) else v for k, v in rates.items()}  # not the cache
    return chosen, {"chosen": chosen, "reason": why, "rates": copied,
                    "shares": sh["shares"], "band": sh["band"],
                    "shares_source": sh["source"], "predicted_seconds": pred}


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
