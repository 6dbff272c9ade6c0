"""k-nearest neighbours of both directions with FAISS (one search per direction).

index="flat" (IndexFlatIP) is exact, with the same answer as ``mine_reference``:
each direction searches k' = K + positives + margin neighbours, drops the positives,
and checks per query that the search went deep enough: with eps0 a bound on
|faiss float32 score - canonical score| (float32 accumulation, gamma_D), every entry not
returned has a faiss score <= the last returned one, f_last; if f_last < u_K - 2 eps0
(u_K = K-th largest returned non-positive score) no unreturned entry can reach or tie the
K-th canonical score. Queries that fail the check are searched again with twice k'
(up to the gallery size). The returned candidates are then re-scored in float64 and
sorted by (-canonical score, id) (``reference.rescore_topk``), so ties follow the tie rule.

index="ivf" (IndexIVFFlat; opts nlist, nprobe) and "hnsw" (IndexHNSWFlat; opts M,
efConstruction, efSearch) are approximate: the candidates they return (positives dropped)
are re-scored and sorted the same way; a query that gets fewer than K non-positive
candidates is answered by the exact flat search instead (counted in stats).

On a GPU build (faiss.get_num_gpus() > 0 and use_gpu is not False) flat and ivf run on the
GPU, where FAISS limits k to 2048: K_i2t + 5 or K_t2i + 1 above it raises InputError; a
re-search that would need more than 2048 falls back to the CPU index for those queries.
The GPU bound assumes TF32-rounded inputs (u = 2^-10), in case cuBLAS uses them.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from pipeline.data import CAPS_PER_IMAGE
from pipeline.errors import InputError, refuse_unknown
from pipeline.mining.reference import (U64, KnnResult, gamma, max_row_norm, rescore_delta,
                                       rescore_topk, shared_tensor, validate_inputs)

GPU_K_LIMIT = 2048
U32 = 2.0 ** -24
_OPTS = {"flat": {"margin"}, "ivf": {"nlist", "nprobe"},
         "hnsw": {"M", "efConstruction", "efSearch"}}


def _faiss():
    try:
        import faiss  # noqa: F401
    except ImportError as exc:  # pragma: no cover - faiss is a dependency
        raise InputError(None, f"the faiss backend needs the faiss package ({exc})") from None
    return faiss


def _num_gpus(faiss) -> int:
    fn = getattr(faiss, "get_num_gpus", None)
    try:
        return int(fn()) if fn is not None else 0
    except Exception:  # pragma: no cover
        return 0


def _build(faiss, kind: str, gallery: np.ndarray, opts: dict, gpu: bool, stats: dict, tag: str,
           keep: list):
    """The index over `gallery`; objects it needs alive (quantizer, GPU resources) go to keep."""
    n, d = gallery.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = int(opts.get("nlist", max(1, min(int(4 * math.sqrt(n)), n // 39))))
        if not 1 <= nlist <= n:
            raise InputError(None, f"ivf nlist must be in [1, {n}] for {tag}, got {nlist}")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(gallery)
        index.nprobe = int(opts.get("nprobe", max(1, nlist // 4)))
        keep.append(quantizer)
        stats[f"nlist_{tag}"], stats[f"nprobe_{tag}"] = nlist, index.nprobe
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(opts.get("M", 32)), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(opts.get("efConstruction", 80))
    else:
        raise InputError(None, f"faiss index must be flat, ivf or hnsw; got {kind!r}")
    index.add(gallery)
    if gpu:
        res = faiss.StandardGpuResources()
        gindex = faiss.index_cpu_to_gpu(res, 0, index)
        keep.extend([res, index])
        return gindex
    return index


def _search(index, queries: np.ndarray, k: int, chunk: int = 16384):
    n = queries.shape[0]
    dist = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    for s in range(0, n, chunk):
        dist[s:s + chunk], ids[s:s + chunk] = index.search(queries[s:s + chunk], k)
    return dist, ids


def _direction(faiss, kind, queries, gallery, k, positive, opts, gpu, eps0, stats, tag):
    """Candidate ids (n_q, W) int64 (-1 padding), at least k valid per row."""
    n_q, n_g = queries.shape[0], gallery.shape[0]
    npos = 5 if tag == "i2t" else 1
    t0 = time.perf_counter()
    keep: list = []
    index = _build(faiss, kind, gallery, opts, gpu, stats, tag, keep)
    stats[f"seconds_index_{tag}"] = time.perf_counter() - t0
    if kind == "hnsw":
        index.hnsw.efSearch = max(int(opts.get("efSearch", 64)), k + npos)
    margin = int(opts.get("margin", 8 + k // 16)) if kind == "flat" else 0
    kk = min(n_g, k + npos + margin)
    if gpu:
        kk = min(kk, GPU_K_LIMIT)
    rows = np.arange(n_q)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    cpu_flat = None
    searched = 0
    while rows.size:
        use = index
        if gpu and kk > GPU_K_LIMIT:
            if cpu_flat is None:
                cpu_flat = _build(faiss, "flat", gallery, {}, False, stats, tag, keep)
            use = cpu_flat
        dist, ids = _search(use, queries[rows], kk)
        searched += rows.size * kk
        bad = positive(rows[:, None], ids) | (ids < 0)
        ids = np.where(bad, -1, ids)
        n_valid = (~bad).sum(axis=1)
        if kind == "flat" or use is cpu_flat:
            dv = np.where(bad, -np.inf, dist).astype(np.float64)
            u_k = -np.partition(-dv, k - 1, axis=1)[:, k - 1] if k else np.full(rows.size, np.inf)
            tau = u_k - 2 * eps0
            tau = tau - 2.0 ** -50 * (np.abs(u_k) + 1)           # rounding of this line
            done = (kk >= n_g) | (dist[:, -1].astype(np.float64) < tau)
        else:  # approximate: accept what the index returns, unless too few
            done = n_valid >= k
            if not done.all():
                stats[f"fallback_exact_{tag}"] = stats.get(f"fallback_exact_{tag}", 0) + \
                    int((~done).sum())
                kind_fallback = rows[~done]
                parts.append((rows[done], ids[done]))
                sub = _direction(faiss, "flat", queries[kind_fallback], gallery, k,
                                 lambda r, i: positive(kind_fallback[r], i), {}, False,
                                 eps0, {}, tag)
                parts.append((kind_fallback, sub))
                break
        parts.append((rows[done], ids[done]))
        rows = rows[~done]
        if rows.size:
            stats[f"requeried_{tag}"] = stats.get(f"requeried_{tag}", 0) + int(rows.size)
            kk = min(n_g, 2 * kk)
    stats[f"k_searched_{tag}"] = kk
    stats[f"searched_{tag}"] = searched
    width = max([p[1].shape[1] for p in parts] + [k])
    cand = np.full((n_q, width), -1, dtype=np.int64)
    for r, ids in parts:
        cand[r, :ids.shape[1]] = ids
    return cand


def mine_faiss(img, cap, k_i2t: int, k_t2i: int, *, index: str = "flat",
               use_gpu: bool | None = None, **index_opts) -> KnnResult:
    """i2t / t2i candidates with FAISS: index 'flat' (exact, same ids as the reference),
    'ivf' or 'hnsw' (approximate). See the module docstring for the options."""
    t_start = time.perf_counter()
    faiss = _faiss()
    if index not in _OPTS:
        raise InputError(None, f"faiss index must be flat, ivf or hnsw; got {index!r}")
    refuse_unknown(index_opts, _OPTS[index], None, f"option(s) for faiss index {index!r}:")
    img32, cap32, k1, k2 = validate_inputs(img, cap, k_i2t, k_t2i)
    n_i, d = img32.shape
    n_gpus = _num_gpus(faiss)
    if use_gpu is None:
        gpu = n_gpus > 0 and index != "hnsw"
    elif use_gpu:
        if n_gpus == 0:
            raise InputError(None, "use_gpu=True but faiss sees no GPU (faiss-cpu build?)")
        if index == "hnsw":
            raise InputError(None, "faiss has no GPU HNSW index; use use_gpu=False")
        gpu = True
    else:
        gpu = False
    if gpu:
        for name, k, npos in (("K_i2t", k1, 5), ("K_t2i", k2, 1)):
            if k and k + npos > GPU_K_LIMIT:
                raise InputError(None, f"faiss GPU search is limited to k <= {GPU_K_LIMIT}; "
                                       f"{name}={k} needs k={k + npos} (K + {npos} positives). "
                                       f"Use use_gpu=False or the torch backend")
    stats: dict = {"backend": "faiss", "index": index, "gpu": gpu, "k_i2t": k1, "k_t2i": k2}
    a = shared_tensor(img32)
    b = shared_tensor(cap32)
    na, nb = max_row_norm(a), max_row_norm(b)
    u_in = 2.0 ** -10 if gpu else 0.0      # TF32 inputs, should the GPU GEMM use them
    eps0 = ((2 * u_in + u_in * u_in) + gamma(d, U32) * (1 + u_in) ** 2 + gamma(d, U64)) \
        * na * nb * (1 + 2.0 ** -20) + 1e-300
    stats["eps0"] = eps0
    delta = rescore_delta(d, na, nb)
    t_rescore = 0.0
    if k1:
        cand = _direction(faiss, index, img32, cap32, k1, lambda r, i: (i // CAPS_PER_IMAGE) == r,
                          index_opts, gpu, eps0, stats, "i2t")
        t = time.perf_counter()
        i2t, i2t_s = rescore_topk(a, b, img32, cap32, torch.from_numpy(cand), k1,
                                  delta=delta, stats=stats)
        t_rescore += time.perf_counter() - t
    else:
        i2t, i2t_s = np.empty((n_i, 0), np.int32), np.empty((n_i, 0), np.float32)
    if k2:
        cand = _direction(faiss, index, cap32, img32, k2, lambda r, i: i == (r // CAPS_PER_IMAGE),
                          index_opts, gpu, eps0, stats, "t2i")
        t = time.perf_counter()
        t2i, t2i_s = rescore_topk(b, a, cap32, img32, torch.from_numpy(cand), k2,
                                  delta=delta, stats=stats)
        t_rescore += time.perf_counter() - t
    else:
        t2i, t2i_s = np.empty((CAPS_PER_IMAGE * n_i, 0), np.int32), np.empty((CAPS_PER_IMAGE * n_i, 0), np.float32)
    stats.update(seconds_rescore=t_rescore, seconds=time.perf_counter() - t_start)
    return KnnResult(i2t, i2t_s, t2i, t2i_s, stats)
