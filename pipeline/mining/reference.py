"""What the exact answer is, and the brute-force reference that computes it.

Problem. ``img`` (N_i, D) and ``cap`` (N_c = 5 * N_i, D); caption j belongs to image j // 5.
The score of (image i, caption j) is the inner product of the two float32 rows.

* ``i2t`` (N_i, K_i2t) int32: per image, caption ids by descending score, the image's own
  five captions (5i .. 5i+4) excluded.
* ``t2i`` (N_c, K_t2i) int32: per caption, image ids by descending score, its own image
  (j // 5) excluded.
* ``i2t_scores`` / ``t2i_scores``: the matching scores, computed in float64, cast to float32.

K is capped at the gallery size minus the positives (N_c - 5 and N_i - 1).

The canonical float64 score. "The score in float64" must be one well-defined number, or
two correct programs can order near-ties differently (a BLAS dgemm sums in an order that
depends on the matrix shape, the position of the element and the thread count). The
canonical score is defined by :func:`canonical_dot`: the D products are formed in float64
(a product of two float32 numbers is exact in float64) and summed by a fixed pairwise tree
(element k is added to element k + h, h = n // 2, the odd last element carried; repeat).
Every step is one IEEE float64 operation on the same operands whatever the array layout,
SIMD width or thread count, so the value depends only on the two rows. It is within
gamma_ceil(log2 D) * sum|a_k b_k| of the real inner product (gamma_n = n u / (1 - n u),
u = 2^-53).

Tie rule. Candidates are ordered by descending canonical score; equal canonical scores go
by the lower id first. Both backends reproduce this ordering exactly, ids and scores.

Re-scoring (shared by the backends): :func:`rescore_topk` computes a fast float64 score b
(batched dgemv) for every candidate, with a proven bound Delta >= |b - canonical|; only
candidates that b cannot order with certainty (a neighbour within 2 Delta in b, near the
cut at K) or whose float32 rounding b cannot decide get the canonical score computed. The
result equals sorting all candidates by (-canonical, id), bit for bit.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.data import CAPS_PER_IMAGE
from pipeline.errors import InputError

U64 = 2.0 ** -53
FLOAT32_LOWEST = float(np.finfo(np.float32).min)


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float sum."""
    nu = n * u
    if nu >= 1:
        raise ValueError(f"gamma_{n} undefined for u={u}")
    return nu / (1.0 - nu)


@dataclass
class KnnResult:
    """Exact (or, for faiss ivf/hnsw, approximate) hard-negative candidates of both directions."""

    i2t: np.ndarray          # (N_i, K_i2t) int32 caption ids
    i2t_scores: np.ndarray   # (N_i, K_i2t) float32
    t2i: np.ndarray          # (N_c, K_t2i) int32 image ids
    t2i_scores: np.ndarray   # (N_c, K_t2i) float32
    stats: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs
def _as_matrix(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(None, f"{name} embeddings: expected a 2-D array, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InputError(None, f"{name} embeddings: expected floats, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    step = max(1, (16 << 20) // max(1, x.shape[1]))
    for s in range(0, x.shape[0], step):
        finite = np.isfinite(x[s:s + step]).all(axis=1)
        if not finite.all():
            bad = s + int(np.flatnonzero(~finite)[0])
            raise InputError(None, f"{name} embeddings: row {bad} has a NaN or infinite value")
    return x


def _as_k(k, name: str, limit: int) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise InputError(None, f"{name} must be an integer, got {k!r}")
    k = int(k)
    if k < 0:
        raise InputError(None, f"{name} must be >= 0, got {k}")
    return min(k, limit)


def k_limits(n_img: int) -> tuple[int, int]:
    """The most candidates a gallery of n_img images allows: every caption but the image's
    own (i2t), every image but the caption's own (t2i)."""
    return CAPS_PER_IMAGE * n_img - CAPS_PER_IMAGE, n_img - 1


def capped_k(k_i2t, k_t2i, n_img: int) -> tuple[int, int]:
    """Requested K values capped at the gallery's limits (the one capping rule)."""
    l1, l2 = k_limits(n_img)
    return min(int(k_i2t), l1), min(int(k_t2i), l2)


def validate_inputs(img, cap, k_i2t, k_t2i):
    """Check shapes and values; return float32 C-contiguous arrays and the capped K values."""
    img = _as_matrix(img, "image")
    cap = _as_matrix(cap, "caption")
    n_i, d = img.shape
    if cap.shape[1] != d:
        raise InputError(None, f"caption embeddings have dimension {cap.shape[1]}, "
                               f"image embeddings {d}: they must match")
    if n_i < 2:
        raise InputError(None, f"need at least 2 images to mine negatives, got {n_i}")
    if cap.shape[0] != CAPS_PER_IMAGE * n_i:
        raise InputError(None, f"expected {CAPS_PER_IMAGE} captions per image: {n_i} images need "
                               f"{CAPS_PER_IMAGE * n_i} caption rows, got {cap.shape[0]}")
    if d < 1:
        raise InputError(None, "embeddings have dimension 0")
    l1, l2 = k_limits(n_i)
    k1, k2 = _as_k(k_i2t, "K_i2t", l1), _as_k(k_t2i, "K_t2i", l2)
    return img, cap, k1, k2


# --------------------------------------------------------------------------- canonical
def _tree_sum(p: np.ndarray) -> np.ndarray:
    """Sum float64 `p` over its last axis by the fixed pairwise tree of the module docstring."""
    while p.shape[-1] > 1:
        n = p.shape[-1]
        h = n // 2
        s = p[..., :h] + p[..., h:2 * h]
        if n % 2:
            s = np.concatenate([s, p[..., 2 * h:]], axis=-1)
        p = s
    return p[..., 0]


def canonical_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Canonical float64 scores of row pairs: a (n, D) and b (n, D) float32 -> (n,) float64."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    out = np.empty(a.shape[0], dtype=np.float64)
    step = max(1, (32 << 20) // (8 * max(1, a.shape[1])))
    for s in range(0, a.shape[0], step):
        p = a[s:s + step].astype(np.float64) * b[s:s + step].astype(np.float64)
        out[s:s + step] = _tree_sum(p)
    return out


def canonical_matrix(a: np.ndarray, b: np.ndarray, *, budget_bytes: int = 64 << 20) -> np.ndarray:
    """All canonical scores a @ b.T, (n_a, n_b) float64. Brute force: small inputs only."""
    a = np.asarray(a, dtype=np.float32)
    b64 = np.asarray(b, dtype=np.float64)
    n_a, d = a.shape
    out = np.empty((n_a, b64.shape[0]), dtype=np.float64)
    step = max(1, budget_bytes // (8 * d * max(1, b64.shape[0])))
    for s in range(0, n_a, step):
        p = a[s:s + step, None, :].astype(np.float64) * b64[None, :, :]
        out[s:s + step] = _tree_sum(p)
    return out


def _sort_rows(scores: np.ndarray, k: int):
    """Per row: the first k columns by (-score, column id); returns (ids int32, scores f32)."""
    ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    return order.astype(np.int32), top.astype(np.float32)


def mine_reference(img, cap, k_i2t: int, k_t2i: int) -> KnnResult:
    """Brute force: the full canonical float64 score matrix, positives set to -inf, lexsort."""
    import time

    t0 = time.perf_counter()
    img, cap, k1, k2 = validate_inputs(img, cap, k_i2t, k_t2i)
    n_i = img.shape[0]
    s = canonical_matrix(img, cap)
    rows = np.repeat(np.arange(n_i), 5)
    cols = np.arange(CAPS_PER_IMAGE * n_i)
    s[rows, cols] = -np.inf                       # the positives: caption j of image j // 5
    i2t, i2t_s = _sort_rows(s, k1)
    t2i, t2i_s = _sort_rows(np.ascontiguousarray(s.T), k2)
    return KnnResult(i2t, i2t_s, t2i, t2i_s,
                     stats={"backend": "reference", "seconds": time.perf_counter() - t0,
                            "k_i2t": k1, "k_t2i": k2})


def recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx row ∩ exact row| / K (1.0 = the exact candidate sets)."""
    approx_ids = np.asarray(approx_ids, dtype=np.int64)
    exact_ids = np.asarray(exact_ids, dtype=np.int64)
    if approx_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError("recall: the two id arrays have different numbers of rows")
    if exact_ids.size == 0:
        return 1.0
    span = int(max(approx_ids.max(initial=0), exact_ids.max(initial=0))) + 1
    row = np.arange(exact_ids.shape[0], dtype=np.int64)[:, None] * span
    hits = np.isin(np.unique(row + approx_ids), row + exact_ids).sum()
    return float(hits) / exact_ids.size


# --------------------------------------------------------------------------- re-scoring
def max_row_norm(x: torch.Tensor, chunk: int = 1 << 16) -> float:
    """An upper bound on max_i ||x_i|| (computed in float64, inflated for its own rounding)."""
    if x.shape[0] == 0:
        return 0.0
    m = 0.0
    for s in range(0, x.shape[0], chunk):
        m = max(m, float(x[s:s + chunk].double().norm(dim=1).max()))
    return m * (1.0 + 4 * x.shape[1] * U64) + 1e-300


def rescore_delta(d: int, q_norm: float, g_norm: float) -> float:
    """Bound on |fast float64 score - canonical score|: both are float64 sums of d exact
    products, each within gamma_d * sum|p| <= gamma_d ||q|| ||g|| of the real inner product."""
    return 2.0 * gamma(d + 1, U64) * q_norm * g_norm * (1 + 2.0 ** -20) + 1e-300


def rescore_topk(q: torch.Tensor, g: torch.Tensor, q_np: np.ndarray, g_np: np.ndarray,
                 cand: torch.Tensor, k: int, *, q_offset: int = 0, delta: float,
                 budget_bytes: int = 128 << 20, stats: dict | None = None):
    """Exact top-k of every query among its candidates.

    q: (n_q, D) float32 queries (rows ``q_offset .. q_offset + n_q`` of ``q_np``), g: the
    gallery, both torch on one device; q_np/g_np: the same float32 rows in numpy (for the
    canonical scores). cand: (n_q, W) int64 gallery ids, -1 = padding; every row must hold
    at least k valid ids and no id twice. delta: a bound on |fast float64 - canonical|
    (:func:`rescore_delta`). Returns (ids int32 (n_q, k), scores float32 (n_q, k)) numpy,
    ordered by (-canonical score, id).
    """
    n_q, w = cand.shape
    d = q.shape[1]
    ids_out = np.empty((n_q, k), dtype=np.int32)
    sc_out = np.empty((n_q, k), dtype=np.float32)
    if n_q == 0 or k == 0:
        return ids_out, sc_out
    dev = q.device
    # Outer chunks for the sort / tie logic; inner chunks (a few MiB, buffers reused) for the
    # gather + float64 GEMV, which is memory-bound: fresh large gathers cost page faults.
    step = max(1, min(n_q, budget_bytes // max(1, 40 * w)))
    rows_buf = max(1, min(step, (2 << 20) // max(1, 12 * w * d))) * w
    buf32 = torch.empty((rows_buf, d), dtype=g.dtype, device=dev)
    buf64 = torch.empty((rows_buf, d), dtype=torch.float64, device=dev)
    refined = rescored = 0
    two_delta = 2.0 * delta
    for s in range(0, n_q, step):
        e = min(n_q, s + step)
        c = cand[s:e].to(dev)
        used = (c >= 0).any(dim=0).nonzero()
        c = c[:, :int(used.max()) + 1] if used.numel() else c[:, :1]
        w = c.shape[1]                         # this chunk's width: padding columns dropped
        valid = c >= 0
        cz = c.clamp(min=0)
        q64 = q[s:e].double()
        b = torch.empty((e - s, w), dtype=torch.float64, device=dev)
        inner = max(1, rows_buf // w)
        for t in range(0, e - s, inner):
            u = min(e - s, t + inner)
            m = (u - t) * w
            torch.index_select(g, 0, cz[t:u].reshape(-1), out=buf32[:m])
            buf64[:m].copy_(buf32[:m])
            torch.bmm(buf64[:m].view(u - t, w, d), q64[t:u].unsqueeze(2),
                      out=b[t:u].unsqueeze(2))
        b = b.masked_fill(~valid, -math.inf)
        rescored += int(valid.sum())
        bs, order = b.sort(dim=1, descending=True)
        ids = c.gather(1, order)
        # Which sorted positions can still reach the top k: the first k, and those joined
        # to position k-1 by a chain of neighbours within 2 delta (they might swap across).
        close = (bs[:, :-1] - bs[:, 1:]) <= two_delta             # NaN (-inf - -inf) -> False
        if w > k:
            chain = close[:, k - 1:].to(torch.int8).cumprod(dim=1).bool()
            reach = torch.cat([torch.ones_like(bs[:, :k], dtype=torch.bool), chain], dim=1)
            width = k + int(chain.sum(dim=1).max()) if chain.numel() else k
        else:
            reach = torch.ones_like(bs, dtype=torch.bool)
            width = w
        amb = torch.zeros_like(reach)
        amb[:, :-1] |= close
        amb[:, 1:] |= close
        # float32 rounding of the score decided by b? (rounding is monotone)
        amb |= (bs - delta).float() != (bs + delta).float()
        need = reach & amb & (bs > -math.inf)
        key = bs[:, :width].clone()
        ids = ids[:, :width]
        key[~reach[:, :width]] = -math.inf
        need = need[:, :width]
        if bool(need.any()):
            qi, pj = need.nonzero(as_tuple=True)
            gi = ids[qi, pj]
            qi_np = (qi + s + q_offset).cpu().numpy()
            cv = canonical_dot(q_np[qi_np], g_np[gi.cpu().numpy()])
            key[qi, pj] = torch.from_numpy(cv).to(key.device)
            refined += int(qi.numel())
        # order by (-key, id): stable sort by id, then stable sort by descending key
        o1 = ids.argsort(dim=1, stable=True)
        key = key.gather(1, o1)
        ids = ids.gather(1, o1)
        o2 = key.argsort(dim=1, descending=True, stable=True)[:, :k]
        ids_out[s:e] = ids.gather(1, o2).cpu().numpy().astype(np.int32)
        sc_out[s:e] = key.gather(1, o2).float().cpu().numpy()
    if stats is not None:
        stats["rescored"] = stats.get("rescored", 0) + rescored
        stats["canonical_refined"] = stats.get("canonical_refined", 0) + refined
    return ids_out, sc_out


def shared_tensor(x: np.ndarray) -> torch.Tensor:
    """torch view of a float array that may be read-only (a memmap): shared and never
    written, so torch's warning about non-writable arrays does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(x)
