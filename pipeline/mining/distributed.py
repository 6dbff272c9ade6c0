"""Scale-out with dask.distributed: sharded mining and sharded embedding, same answers.

* :func:`get_client` -- a ``dask.distributed.Client``: connect to a running scheduler, or
  start a local cluster of worker processes (one machine, several processes).
* :func:`mine_distributed` -- :func:`pipeline.mining.knn_torch.mine_torch` split over the
  image queries. Each task mines one block of image rows against the whole caption gallery
  (:func:`~pipeline.mining.knn_torch.mine_torch_block`): i2t is exact for the block's
  images; t2i gives every caption its exact top K among the block's images. Per-caption
  lists are merged pairwise on the workers (a tree reduction) by (-canonical score, id):
  the global top K of a caption is contained in the union of its per-block top Ks, and
  float32 score ties between blocks are broken by the canonical float64 score, so the
  result is identical, ids and scores bit for bit, to ``mine_torch`` on the whole input.
* :func:`embed_distributed` -- the embed stage split by row ranges; each task loads the
  checkpoint and the split on its worker (once per worker process, then cached) and
  encodes whole blocks of ``block_rows`` exactly as :func:`pipeline.mining.embed.embed_split`
  does, so the assembled files are identical to the single-process ones.

Inside every task the worker's torch thread count is set to its dask thread count and
faiss's OpenMP pool to 1 thread (forked workers + threads can deadlock; dask starts its
worker processes with spawn by default).

Running on a real cluster
-------------------------
Embeddings (and, for the embed stage, the data folder and the checkpoint) must sit on a
filesystem every node sees under the same path. Give the ``.npy`` paths, not arrays, to
``mine_distributed``: each worker then memory-maps the files (``mmap_mode='r'``; worker
processes of one node share the page cache) instead of receiving a copy from the client.

Plain dask (any set of machines)::

    # on the scheduler node
    dask scheduler --port 8786
    # on each compute node (N worker processes of 1 thread each; memory per process must
    # hold the caption gallery's low-precision copy + the t2i buffers, see below)
    dask worker tcp://SCHEDULER_HOST:8786 --nthreads 1 --nworkers N --memory-limit 16GB
    # from any node
    itm-pipeline mine-candidates ... --scheduler tcp://SCHEDULER_HOST:8786

SLURM via dask-jobqueue (``pip install dask-jobqueue``), from a login node::

    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(cores=8, processes=8, memory="128GB", walltime="02:00:00",
                           queue="cpu", job_extra_directives=["--exclusive"])
    cluster.scale(jobs=4)             # 4 SLURM jobs x 8 one-thread worker processes
    print(cluster.scheduler_address)  # pass it: --scheduler tcp://...:PORT
    # or, in Python: client = get_client(cluster.scheduler_address)

Local (one machine, no scheduler): ``--workers N`` starts N one-thread processes.

Memory per worker for mining: the block's caption gallery (N_c x D x 4 bytes in fp32,
half in bf16/fp16) plus its t2i selections (about 1.4 x N_c x K_t2i x 8 bytes while the
pass runs) plus one tile; the t2i lists of a finished block (N_c x K_t2i x 8 bytes)
travel to the worker that merges them. The client holds the final result only.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path

import numpy as np

from pipeline.device import resolve_device
from pipeline.errors import InputError, refuse_unknown
from pipeline.io import open_memmap_out
from pipeline.mining.reference import KnnResult, canonical_dot, validate_inputs

CONNECT_TIMEOUT_S = 10
_MINE_OPTIONS = ("precision", "device", "row_block", "col_block", "buffer_slack")


# --------------------------------------------------------------------------- client
def get_client(scheduler: str | None = None, workers: int | None = None,
               threads_per_worker: int = 1, *, connect_timeout: float = CONNECT_TIMEOUT_S):
    """A ``dask.distributed.Client`` (usable as a context manager; the caller closes it).

    scheduler: address of a running scheduler (``tcp://host:8786``); else a LocalCluster of
    ``workers`` processes (default: dask's choice for this machine) with
    ``threads_per_worker`` threads each is started, and closed with the client.
    An unreachable or malformed address raises InputError within ``connect_timeout`` s.
    """
    from distributed import Client

    for name, v in (("workers", workers), ("threads_per_worker", threads_per_worker)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))
                              or v < 1):
            raise InputError(None, f"{name} must be a positive integer, got {v!r}")
    if scheduler is not None:
        if workers is not None:
            raise InputError(None, "give either a scheduler address or a number of local "
                                   "workers, not both")
        try:
            return Client(str(scheduler), timeout=f"{connect_timeout}s")
        except (OSError, TimeoutError, ValueError, TypeError) as exc:
            raise InputError(None, f"cannot reach dask scheduler {scheduler!r}: {exc}") from None
    kw = {} if workers is None else {"n_workers": int(workers)}
    return Client(processes=True, threads_per_worker=int(threads_per_worker),
                  dashboard_address=None, **kw)


def _n_workers(client) -> int:
    n = len(client.scheduler_info().get("workers", {}))
    if n == 0:                         # e.g. SLURM jobs still queued: wait for the first
        client.wait_for_workers(1)
        n = len(client.scheduler_info().get("workers", {}))
    return max(1, n)


# --------------------------------------------------------------------------- worker side
_WORKER: dict = {}                     # per worker process: opened files, caches, models


def _worker_setup():
    """Thread settings for the task (SPEC §8): torch = the worker's threads, faiss = 1."""
    import torch

    n = 1
    try:
        from distributed import get_worker
        w = get_worker()
        n = int(getattr(w, "nthreads", None) or getattr(w.state, "nthreads", 1))
    except Exception:                  # not inside a worker (direct call): leave torch be
        n = None
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if "faiss_threads" not in _WORKER:
        try:
            import faiss
            faiss.omp_set_num_threads(1)
        except Exception:              # faiss not installed: nothing to set
            pass
        _WORKER["faiss_threads"] = 1


def _open_npy(path: str) -> np.ndarray:
    """The .npy file memory-mapped (float32 C-contiguous; converted in memory otherwise,
    the same conversion the client's validation applies). Cached per worker."""
    st = os.stat(path)
    key = ("npy", os.path.abspath(path), st.st_mtime_ns, st.st_size)
    arr = _WORKER.get(key)
    if arr is None:
        arr = np.load(path, mmap_mode="r")
        if arr.dtype != np.float32 or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        for k in [k for k in _WORKER if isinstance(k, tuple) and k[0] == "npy"
                  and k[1] == key[1]]:
            del _WORKER[k]             # an older version of the same file
        _WORKER[key] = arr
    return arr


def _resolve(src) -> np.ndarray:
    return _open_npy(src) if isinstance(src, str) else src


def _cap_cache(cap: np.ndarray) -> dict:
    """The low-precision copy of the gallery, reused by the blocks a worker runs (one
    gallery at a time, keyed by the array object, which stays alive in the entry)."""
    entry = _WORKER.get("cap_cache")
    if entry is None or entry[0] is not cap:
        entry = (cap, {})
        _WORKER["cap_cache"] = entry
    return entry[1]


def _mine_block_task(img_src, cap_src, start, stop, k1, k2, options):
    from pipeline.mining.knn_torch import mine_torch_block

    _worker_setup()
    img, cap = _resolve(img_src), _resolve(cap_src)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        r = mine_torch_block(img, cap, start, stop, k1, k2, validate=False,
                             cap_cache=_cap_cache(cap), **options)
    return {"start": start, "i2t": r.i2t, "i2t_s": r.i2t_scores, "t2i": r.t2i,
            "t2i_s": r.t2i_scores, "stats": r.stats}


def _take_i2t(part):
    return {k: part[k] for k in ("start", "i2t", "i2t_s", "stats")}


def _merge_task(a, b, img_src, cap_src, k):
    _worker_setup()
    ids, sc = merge_t2i(a["t2i"], a["t2i_s"], b["t2i"], b["t2i_s"], k,
                        _resolve(img_src), _resolve(cap_src))
    return {"t2i": ids, "t2i_s": sc}


# --------------------------------------------------------------------------- merging
def merge_t2i(ids_a, sc_a, ids_b, sc_b, k: int, img: np.ndarray, cap: np.ndarray, *,
              chunk_bytes: int = 64 << 20):
    """Per caption (row): the first k of the union of two candidate lists by the tie rule.

    Both inputs are ordered by (-canonical score, id), hold disjoint image ids, -1 / -inf
    as padding at the end. Sorting by (-float32 score, id) is the tie rule except for
    equal float32 scores (their float64 canonical scores may differ): those runs get the
    canonical score (:func:`~pipeline.mining.reference.canonical_dot`) as the second key.
    Returns (ids int32, scores float32), width min(k, width_a + width_b).
    """
    n, wa = ids_a.shape
    wb = ids_b.shape[1]
    w = min(int(k), wa + wb)
    out_ids = np.empty((n, w), dtype=np.int32)
    out_sc = np.empty((n, w), dtype=np.float32)
    step = max(1, chunk_bytes // (40 * max(1, wa + wb)))
    for s in range(0, n, step):
        e = min(n, s + step)
        ids = np.concatenate([ids_a[s:e], ids_b[s:e]], axis=1)
        sc = np.concatenate([sc_a[s:e], sc_b[s:e]], axis=1)
        order = np.lexsort((ids, -sc), axis=-1)
        ids = np.take_along_axis(ids, order, axis=1)
        sc = np.take_along_axis(sc, order, axis=1)
        eq = (sc[:, 1:] == sc[:, :-1]) & np.isfinite(sc[:, 1:]) & (ids[:, 1:] >= 0)
        if eq.any():
            tied = np.zeros(sc.shape, dtype=bool)
            tied[:, 1:] |= eq
            tied[:, :-1] |= eq
            r, c = np.nonzero(tied)
            canon = np.zeros(sc.shape, dtype=np.float64)
            canon[r, c] = canonical_dot(cap[r + s], img[ids[r, c]])
            order = np.lexsort((ids, -canon, -sc), axis=-1)
            ids = np.take_along_axis(ids, order, axis=1)
            sc = np.take_along_axis(sc, order, axis=1)
        out_ids[s:e] = ids[:, :w]
        out_sc[s:e] = sc[:, :w]
    return out_ids, out_sc


# --------------------------------------------------------------------------- mining
def _progress_bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def mine_distributed(img, cap, k_i2t: int, k_t2i: int, client, *,
                     shard_rows: int | None = None, progress: bool = False,
                     **mine_kwargs) -> KnnResult:
    """Exact candidates of both directions, sharded over the image queries on ``client``.

    img / cap: arrays, or paths (str / Path) of .npy files that every worker can read at
    the same path (memory-mapped there; the client reads them once to validate). Arrays
    are scattered once to every worker (broadcast). shard_rows: image rows per task
    (default ceil(N_img / (2 * n_workers))). mine_kwargs: precision, device, row_block,
    col_block, buffer_slack, as for :func:`~pipeline.mining.knn_torch.mine_torch`.
    Result: identical ids and scores to ``mine_torch`` on the whole input.
    """
    from distributed import as_completed

    t0 = time.perf_counter()
    refuse_unknown(mine_kwargs, _MINE_OPTIONS, None, "mining option(s) for the distributed run:")
    from pipeline.mining.knn_torch import _check_options
    _check_options(mine_kwargs.get("precision", "bf16"), mine_kwargs.get("row_block", 4096),
                   mine_kwargs.get("col_block", 8192))
    resolve_device(mine_kwargs.get("device", "cpu"))

    paths = {}
    arrays = []
    for name, x in (("image", img), ("caption", cap)):
        if isinstance(x, (str, Path)):
            p = Path(x)
            if not p.is_file():
                raise InputError(p, f"{name} embeddings file not found")
            try:
                x = np.load(p, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise InputError(p, f"unreadable .npy file ({exc})") from None
            paths[name] = str(p.resolve())
        arrays.append(x)
    img32, cap32, k1, k2 = validate_inputs(arrays[0], arrays[1], k_i2t, k_t2i)
    n_i, d = img32.shape
    n_c = cap32.shape[0]

    n_workers = _n_workers(client)
    if shard_rows is None:
        shard_rows = math.ceil(n_i / (2 * n_workers))
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, (int, np.integer)) \
            or shard_rows < 1:
        raise InputError(None, f"shard_rows must be a positive integer, got {shard_rows!r}")
    shard_rows = int(shard_rows)
    plan = [(s, min(n_i, s + shard_rows)) for s in range(0, n_i, shard_rows)]

    if "image" in paths and "caption" in paths:
        img_src, cap_src = paths["image"], paths["caption"]
    else:
        img_src = paths.get("image") or client.scatter(img32, broadcast=True, hash=False)
        cap_src = paths.get("caption") or client.scatter(cap32, broadcast=True, hash=False)

    options = dict(mine_kwargs)
    blocks = [client.submit(_mine_block_task, img_src, cap_src, s, e, k1, k2, options,
                            pure=False, key=f"mine-block-{s}-{e}-{os.urandom(4).hex()}")
              for s, e in plan]
    block_keys = {f.key for f in blocks}
    i2t_futs = []
    stack = []
    bar = _progress_bar(len(plan), "mine (shards)", progress)
    try:
        ac = as_completed(blocks)
        for fut in ac:
            if fut.status == "error":
                fut.result()           # raises the task's exception here
            if fut.key in block_keys:
                bar.update(1)
                i2t_futs.append(client.submit(_take_i2t, fut, pure=False))
            if k2 == 0:
                continue
            stack.append(fut)
            if len(stack) >= 2:
                a, b = stack.pop(), stack.pop()
                ac.add(client.submit(_merge_task, a, b, img_src, cap_src, k2, pure=False))
        del blocks
        parts = client.gather(i2t_futs)
        final = client.gather(stack[0]) if k2 else None
    finally:
        bar.close()
    i2t = np.empty((n_i, k1), dtype=np.int32)
    i2t_s = np.empty((n_i, k1), dtype=np.float32)
    seconds_tasks = 0.0
    precisions = set()
    for p in parts:
        s = p["start"]
        i2t[s:s + p["i2t"].shape[0]] = p["i2t"]
        i2t_s[s:s + p["i2t"].shape[0]] = p["i2t_s"]
        seconds_tasks += p["stats"].get("seconds", 0.0)
        precisions.add(p["stats"].get("precision"))
    if k2:
        t2i, t2i_s = final["t2i"], final["t2i_s"]
        if t2i.shape != (n_c, k2) or bool((t2i < 0).any()):   # pragma: no cover
            raise RuntimeError("distributed t2i merge left padding: a shard result is missing")
    else:
        t2i = np.empty((n_c, 0), dtype=np.int32)
        t2i_s = np.empty((n_c, 0), dtype=np.float32)
    stats = {"backend": "torch-distributed", "k_i2t": k1, "k_t2i": k2,
             "precision": sorted(precisions)[0] if len(precisions) == 1 else sorted(precisions),
             "workers": n_workers, "shards": len(plan), "shard_rows": shard_rows,
             "inputs": "paths" if paths else "scattered", "seconds_tasks": seconds_tasks,
             "gemm_flop": 2.0 * n_i * n_c * d, "seconds": time.perf_counter() - t0}
    return KnnResult(i2t, i2t_s, t2i, t2i_s, stats)


# --------------------------------------------------------------------------- embedding
def _embed_task(checkpoint, data_dir, split, kind, ranges, batch_size, device):
    """Encode the ranges (whole embed blocks) of images or captions on this worker."""
    from pipeline.mining import embed

    _worker_setup()
    key = ("embed", str(checkpoint), str(data_dir), split, str(device))
    state = _WORKER.get(key)
    if state is None:
        from pipeline.checkpoint import load_checkpoint
        from pipeline.data.precomp import open_split

        for k in [k for k in _WORKER if isinstance(k, tuple) and k[0] == "embed"]:
            _WORKER.pop(k)[1].close()  # one model / split per worker at a time
        model, cfg = load_checkpoint(checkpoint, device, data_dir=data_dir)
        data = open_split(data_dir, split, expected_dim=cfg["model"].get("img_dim"))
        state = _WORKER[key] = (model, data)
    model, data = state
    out = []
    for s, e in ranges:
        if kind == "img":
            out.append(embed.encode_image_range(model, data, s, e, batch_size=batch_size,
                                                device=device))
        else:
            out.append(embed.encode_caption_range(model, data, s, e,
                                                  batch_size=2 * batch_size, device=device))
    return kind, ranges[0][0], np.concatenate(out, axis=0)


def embed_distributed(checkpoint, data_dir, split: str, out_dir, client, *,
                      shard_size: int = 4096, batch_size: int = 256, device: str = "cpu",
                      block_rows: int | None = None, progress: bool = False) -> dict:
    """:func:`pipeline.mining.embed.embed_split`, sharded by row ranges over ``client``.

    Each task encodes ``shard_size`` rows (rounded up to whole blocks of ``block_rows``,
    default embed's DEFAULT_BLOCK_ROWS), calling the encoder on exactly the same ranges and
    batches as ``embed_split`` with the same ``block_rows`` / ``batch_size``, so the files
    are identical to the single-process output (given the same torch build and threads).
    The checkpoint and data folder must be readable by the workers at the same paths.
    The client writes img_embs.npy / cap_embs.npy into temp files as shards arrive and
    renames them into place at the end, then writes embeddings.json. Returns its dict.
    """
    from distributed import as_completed

    from pipeline.checkpoint import load_checkpoint
    from pipeline.data.precomp import open_split
    from pipeline.mining import embed
    from pipeline.scoring import require_indexable

    if block_rows is None:
        block_rows = embed.DEFAULT_BLOCK_ROWS
    for name, v in (("shard_size", shard_size), ("batch_size", batch_size),
                    ("block_rows", block_rows)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InputError(None, f"{name} must be a positive integer, got {v!r}")
    t0 = time.perf_counter()
    resolve_device(device)
    # Validate here (fast, clear errors) before any worker starts on it.
    model, cfg = load_checkpoint(checkpoint, "cpu", data_dir=data_dir)
    require_indexable(model, checkpoint)
    model_name = cfg["model"].get("name", getattr(model, "name", ""))
    del model
    data = open_split(data_dir, split, expected_dim=cfg["model"].get("img_dim"))
    n_img, n_cap = data.n_images, data.n_captions
    data.close()
    checkpoint_s, data_dir_s = str(Path(checkpoint).resolve()), str(Path(data_dir).resolve())

    per_shard = max(1, -(-int(shard_size) // int(block_rows)))     # whole blocks per task
    tasks = []
    for kind, n in (("img", n_img), ("cap", n_cap)):
        blocks = embed.block_plan(n, int(block_rows))
        for i in range(0, len(blocks), per_shard):
            tasks.append(client.submit(_embed_task, checkpoint_s, data_dir_s, split, kind,
                                       blocks[i:i + per_shard], int(batch_size), device,
                                       pure=False))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    temps: list[Path] = []
    mm = {}
    bar = _progress_bar(len(tasks), f"embed {split} (shards)", progress)
    done = False
    try:
        for fut in as_completed(tasks):
            kind, start, rows = fut.result()
            fut.release()
            if not mm:
                dim = int(rows.shape[1])
                for k, name, n in (("img", embed.IMG_FILE, n_img), ("cap", embed.CAP_FILE, n_cap)):
                    tmp = embed._temp_npy(out_dir, name)
                    temps.append(tmp)
                    mm[k] = open_memmap_out(tmp, np.float32, (n, dim))
            embed.check_embedding_rows(rows, checkpoint, "image" if kind == "img" else "caption",
                                       lead="the model gives", start=start,
                                       total=n_img if kind == "img" else n_cap)
            mm[kind][start:start + rows.shape[0]] = rows
            bar.update(1)
        for a in mm.values():
            a.flush()
        mm.clear()
        meta = embed.publish_embeddings(out_dir, temps[0], temps[1], checkpoint=checkpoint,
                                        model_name=model_name, data_dir=data_dir, split=split,
                                        n_img=n_img, n_cap=n_cap, dim=dim, device=device,
                                        batch_size=batch_size, block_rows=block_rows, t0=t0)
        done = True
        return meta
    finally:
        bar.close()
        mm.clear()
        if not done:
            client.cancel(tasks)
        for t in temps:
            t.unlink(missing_ok=True)
