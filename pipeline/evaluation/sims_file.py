"""A resumable, memory-mapped similarity file: `evaluate --sims PATH`.

The full (n_img, n_cap) float32 score matrix of a split is written row block by row block
(``block_rows`` images at a time, all captions) into a hidden ``.NAME.partial`` .npy beside
PATH, opened as a memmap; after each block the data is flushed and the sidecar
``PATH.json`` records it as done. A killed evaluation resumes where it stopped (only the
blocks the sidecar does not list are computed); when the last block is in, the partial
file is renamed to PATH and the sidecar says ``"status": "complete"``. PATH therefore only
ever holds a whole matrix: a normal .npy that ``evaluate-sims --sims PATH`` reads.

The sidecar (format ``itm-pipeline/sims-v1``) records the shape, dtype, the checkpoint and
its hash (pipeline.checkpoint.checkpoint_hash), the model, the split, the data folder, the
block size and the done blocks. An existing file is reused or resumed only when all of
these match; anything else is one InputError (exit 2), never an overwrite:

* PATH (or the partial) exists without a sidecar: not written by this tool, refused;
* a sidecar of another format, shape, checkpoint, split or data folder: refused;
* another process is writing the same file (a lock on the partial): refused.

A non-finite score is one InputError naming the checkpoint (no metrics); the partial file
and its sidecar are removed then (they could only be resumed into the same error).

States of (sidecar, partial, PATH) and what a run does with them:
    none, none, none                 -> start: sidecar first, then the partial file
    partial, partial?, none          -> resume the missing blocks (a fresh partial if it is gone)
    partial (all done), none, PATH   -> killed between the rename and the sidecar: mark complete
    complete, -, PATH                -> nothing to compute: the matrix is reused
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.io import open_memmap_out, short_error, write_json
from pipeline.progress import progress as progress_bar

FORMAT = "itm-pipeline/sims-v1"
DEFAULT_BLOCK_ROWS = 64
# the keys a resumed (or reused) file must agree on
IDENTITY_KEYS = ("shape", "dtype", "checkpoint_hash", "split", "data")


def sidecar_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def partial_path(path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def block_plan(n: int, block_rows: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + block_rows)) for s in range(0, n, block_rows)]


def identity(*, checkpoint, data_dir, split: str, n_img: int, n_cap: int, model: str = "") -> dict:
    """What a similarity file is of: the keys a resume compares (and a few for the record)."""
    from pipeline.checkpoint import checkpoint_hash

    return {"shape": [int(n_img), int(n_cap)], "dtype": "float32",
            "checkpoint": str(checkpoint), "checkpoint_hash": checkpoint_hash(checkpoint),
            "model": model, "split": split, "data": str(Path(data_dir).resolve())}


def _read_sidecar(side: Path, path: Path) -> dict | None:
    if not side.exists() and not side.is_symlink():
        return None
    try:
        doc = json.loads(side.read_text()) if side.is_file() and not side.is_symlink() else None
    except (OSError, ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(side, f"is not a sidecar written by `itm-pipeline evaluate --sims`: refusing "
                               f"to overwrite it or {path.name} (choose another --sims path)")
    return doc


def _mismatch(doc: dict, want: dict) -> str | None:
    for key in IDENTITY_KEYS:
        if doc.get(key) != want[key]:
            what = {"shape": "shape", "dtype": "dtype", "checkpoint_hash": "checkpoint",
                    "split": "split", "data": "data folder"}[key]
            have = doc.get("checkpoint") if key == "checkpoint_hash" else doc.get(key)
            need = want["checkpoint"] if key == "checkpoint_hash" else want[key]
            if key == "checkpoint_hash":
                return f"was written for another checkpoint ({have}, sha256 " \
                       f"{str(doc.get(key))[:12]}), not {need} (sha256 {want[key][:12]})"
            return f"was written for {what} {have!r}, not {need!r}"
    return None


def _check_matrix(path: Path, shape) -> None:
    """PATH is a float32 .npy of `shape` (what a complete sidecar promises)."""
    from pipeline.io import open_npy

    arr = open_npy(path, what="similarity matrix")
    if arr.dtype != np.float32 or list(arr.shape) != list(shape):
        raise InputError(path, f"holds a {arr.dtype} array of shape {tuple(arr.shape)}, its sidecar "
                               f"{sidecar_path(path).name} says float32 {tuple(shape)}: refusing to "
                               f"overwrite it (delete both files, or choose another --sims path)")


def _open_partial(part: Path, shape) -> np.memmap:
    try:
        mm = np.lib.format.open_memmap(part, mode="r+")
    except (ValueError, OSError, EOFError, TypeError) as e:
        raise InputError(part, f"unreadable partial similarity file ({short_error(e)}): delete it "
                               f"and {sidecar_path(final_of(part)).name} to start over") from None
    if mm.dtype != np.float32 or tuple(mm.shape) != tuple(shape):
        raise InputError(part, f"holds {mm.dtype} {tuple(mm.shape)}, expected float32 {tuple(shape)}")
    return mm


def final_of(part: Path) -> Path:
    return part.with_name(part.name[1:-len(".partial")])


def _lock(part: Path):
    """An exclusive lock on the partial file (released when the returned file closes)."""
    f = open(part, "rb")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise InputError(final_of(part), "is being written by another process (its partial file "
                                         "is locked)") from None
    return f


def write_sims(block_fn, path, ident: dict, *, block_rows: int = DEFAULT_BLOCK_ROWS,
               source=None, progress: bool = False, kill_after_blocks: int | None = None) -> dict:
    """Fill (or resume, or reuse) the similarity file at `path` from ``block_fn(r0, r1, c0, c1)``
    (e.g. ``Gallery.block``). Returns the final sidecar dict plus ``blocks_computed`` (this
    run). `source` names the model in a non-finite error. `kill_after_blocks`: SIGKILL this
    process after that many blocks of this run (resume tests)."""
    path = Path(path)
    side, part = sidecar_path(path), partial_path(path)
    if path.is_dir():
        raise InputError(path, "is a folder: give a .npy file path for --sims")
    if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
        raise InputError(None, f"sims block_rows must be a positive integer, got {block_rows!r}")
    n_img, n_cap = ident["shape"]
    doc = _read_sidecar(side, path)
    if doc is None:
        for p in (path, part):
            if p.exists() or p.is_symlink():
                raise InputError(p, f"exists and has no sidecar {side.name}: it was not written by "
                                    f"`itm-pipeline evaluate --sims`; refusing to overwrite it "
                                    f"(choose another --sims path)")
    else:
        bad = _mismatch(doc, ident)
        if bad:
            raise InputError(path, f"{bad}: refusing to overwrite it (delete it and {side.name}, "
                                   f"or choose another --sims path)")
        if doc.get("status") == "complete":
            if path.exists():
                _check_matrix(path, ident["shape"])
                return {**doc, "blocks_computed": 0}
            doc = None                                   # the matrix is gone: start over
        else:
            block_rows = int(doc.get("block_rows", block_rows))
    plan = block_plan(n_img, int(block_rows))
    done = set() if doc is None else {int(b) for b in doc.get("done_blocks", [])
                                      if 0 <= int(b) < len(plan)}
    meta = {"format": FORMAT, **ident, "status": "partial", "block_rows": int(block_rows),
            "n_blocks": len(plan), "done_blocks": sorted(done)}

    if doc is not None and path.exists() and not part.exists():
        # killed between the rename and the complete sidecar
        if len(done) == len(plan):
            _check_matrix(path, ident["shape"])
            write_json(side, {**meta, "status": "complete"})
            return {**meta, "status": "complete", "blocks_computed": 0}
        raise InputError(path, f"exists but its sidecar {side.name} lists {len(done)} of "
                               f"{len(plan)} blocks: refusing to overwrite it")

    path.parent.mkdir(parents=True, exist_ok=True)
    if not part.exists():
        done = set()
        meta["done_blocks"] = []
        write_json(side, meta)                  # the sidecar first: the partial is then ours
        mm = open_memmap_out(part, np.float32, (n_img, n_cap))
        del mm
    lock = _lock(part)
    try:
        mm = _open_partial(part, (n_img, n_cap))
        write_json(side, meta)
        todo = [b for b in range(len(plan)) if b not in done]
        computed = 0
        for b in progress_bar(todo, desc="similarity file", unit="block", disable=not progress,
                              leave=False):
            r0, r1 = plan[b]
            s = np.asarray(block_fn(r0, r1, 0, n_cap), dtype=np.float32)
            ok = np.isfinite(s)
            if not ok.all():
                r, c = np.argwhere(~ok)[0]
                del mm
                part.unlink(missing_ok=True)
                side.unlink(missing_ok=True)
                raise InputError(source, f"the model gives a non-finite score ({s[r, c]}) for "
                                         f"image {r0 + r}, caption {c}: no metrics")
            mm[r0:r1] = s
            mm.flush()                          # the data is on disk before the sidecar says so
            done.add(b)
            computed += 1
            meta["done_blocks"] = sorted(done)
            write_json(side, meta)
            if kill_after_blocks is not None and computed >= kill_after_blocks:
                os.kill(os.getpid(), signal.SIGKILL)
        mm.flush()
        del mm
        os.replace(part, path)
        meta["status"] = "complete"
        write_json(side, meta)
        return {**meta, "blocks_computed": computed}
    finally:
        lock.close()
