"""Entry points of the exact torch k-NN: the whole problem, or one block of image rows
(the dask shards).
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from pipeline.device import resolve_device
from pipeline.errors import InputError
from pipeline.mining.knn_torch.bound import PRECISIONS, _exact_matmul_flags, _pick_precision
from pipeline.mining.knn_torch.tiled_pass import _Pass, _Scratch
from pipeline.mining.reference import KnnResult, capped_k, validate_inputs

# --------------------------------------------------------------------------- main
def mine_torch(img, cap, k_i2t: int, k_t2i: int, *, precision: str = "auto",
               device: str = "cpu", row_block: int = 4096, col_block: int = 8192,
               progress: bool = False, buffer_slack: float = 0.4, scratch=None) -> KnnResult:
    """Exact i2t / t2i candidates (ids and scores equal to :func:`mine_reference`) in one
    tiled pass.

    precision: "bf16" | "fp16" | "fp32" for the GEMM (the answer is exact in every case;
    a lower precision widens the filter band, so more entries need a float64 key), or
    "auto": the lowest predicted pass cost from this machine's measured rates and the band
    shares of a sample of this data (:func:`~pipeline.mining.knn_torch.bound._pick_precision`).
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
    once, at most), gemm_flop, k_i2t / k_t2i (after capping). With precision="auto",
    precision_choice: why -- chosen, reason (one line), rates (``bound.measure_rates``: GFLOP/s
    per precision, f64_gflops, key_ns / extract_ns per keyed entry, scan_ns, copy_ns,
    probe_seconds), shares / band per precision (``bound.band_shares``), shares_source,
    predicted_seconds per precision (gemm, keys, fixed, total).
    """
    t_start = time.perf_counter()
    _check_options(precision, row_block, col_block)
    img32, cap32, k1, k2 = validate_inputs(img, cap, k_i2t, k_t2i)
    n_i, d = img32.shape
    dev = resolve_device(device)
    choice = None
    if precision == "auto":
        precision, choice = _pick_precision(d, dev, img=img32, cap=cap32, k_i2t=k1, k_t2i=k2,
                                            row_block=row_block, col_block=col_block)
    stats: dict = {"backend": "torch", "precision": precision, "device": str(dev),
                   "k_i2t": k1, "k_t2i": k2, "row_block": int(row_block),
                   "col_block": int(col_block)}
    if choice is not None:
        stats["precision_choice"] = choice
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
    kb = min(k2, stop - start)               # every block image when K_t2i >= its size
    choice = None
    if precision == "auto":
        precision, choice = _pick_precision(d, dev, img=img, cap=cap, k_i2t=k1, k_t2i=kb,
                                            rows=(start, stop), row_block=row_block,
                                            col_block=col_block)
    stats: dict = {"backend": "torch", "precision": precision, "device": str(dev),
                   "k_i2t": k1, "k_t2i": k2, "row_block": int(row_block),
                   "col_block": int(col_block), "block": (start, stop)}
    if choice is not None:
        stats["precision_choice"] = choice
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
