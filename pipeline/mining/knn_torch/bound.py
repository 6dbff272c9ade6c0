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
from pipeline.mining.reference import U64, gamma

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
