"""The tiled single pass over the score matrix (both directions at once).

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
"""
from __future__ import annotations

import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.data import CAPS_PER_IMAGE
from pipeline.io import open_memmap_out
from pipeline.mining.knn_torch.bound import (_FORMATS, _data_bound, _lowp, _max_norm, _pow2_scale,
                                             _probe, lowp_error_bound)
from pipeline.mining.knn_torch.selection import _count_canonical, _rank, _Selection
from pipeline.mining.reference import FLOAT32_LOWEST, canonical_dot, rescore_delta, shared_tensor


# --------------------------------------------------------------------------- tuning
# (speed only: the answer is exact whatever these are; Z_SPEC is in selection)
PILOT = 2048        # first-tile estimate: from this many columns (rows) of S_hat
DENSE_SHARE = 0.08  # above this share of survivors a tile is keyed by a dense float64 GEMM
KEY_ROWS = 512      # sparse keys: rows per block (their float64 rows stay in cache)


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
