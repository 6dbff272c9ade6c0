"""Offline hard-negative candidate files (SPEC §3): AOQ's .npy pair plus our Parquet/JSON.

One candidate set ``<name>`` in a folder is five files:

* ``i2t_<name>.npy``  int32 (N_img, K_i2t) caption ids per image, by descending score, the
  image's own five captions excluded. Byte-compatible with AOQ (plain ``np.save``, C order).
* ``t2i_<name>.npy``  int32 (5 N_img, K_t2i) image ids per caption, the caption's own image
  (j // 5) excluded.
* ``i2t_<name>.parquet`` / ``t2i_<name>.parquet``  the same lists in long form: columns
  ``query`` int32, ``rank`` int32, ``candidate`` int32, ``score`` float32 (null when the scores
  are unknown, e.g. for imported AOQ files), in row groups of at most ~``ROW_GROUP_ROWS`` rows;
  the file key-value metadata ``itm_pipeline`` holds the JSON of the caller's meta plus
  ``direction``, ``k``, ``n_queries`` and ``format_version``.
* ``candidates_<name>.json``  a summary: meta, shapes, score statistics, file names.

A set is written all-or-nothing and validated on every load (shapes, dtype, id ranges,
absent positives, no duplicates, K within the gallery, scores finite and non-increasing,
Parquet column types, and the split and model the metadata says it was mined with).
Every problem is an :class:`InputError` naming the offending file and, for row-level
problems, the first bad row. Large .npy files are memory-mapped and checked in chunks.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import CAPS_PER_IMAGE
from pipeline.errors import InputError
from pipeline.io import atomic_dir, disk_full, open_npy, short_error, temp_beside

FORMAT_VERSION = 1
METADATA_KEY = b"itm_pipeline"
ROW_GROUP_ROWS = 1 << 20            # Parquet rows per row group (whole queries; >= one query)
CHECK_MODES = ("full", "sample", "none")
SAMPLE_ROWS = 1000                  # rows checked by check="sample", evenly spaced
_CHUNK_BYTES = 32 << 20             # full checks read this much of an array at a time
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

_ID_COLUMNS = ("query", "rank", "candidate")
_PARQUET_SCHEMA = pa.schema([
    pa.field("query", pa.int32(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("candidate", pa.int32(), nullable=False),
    pa.field("score", pa.float32(), nullable=True),
])


# --------------------------------------------------------------------------- names
def dataset_name(data_dir) -> str:
    """The candidate-set name AOQ derives from a data folder: its name, minus ``_precomp``.

    ``coco_precomp`` -> ``coco``, ``f30k_precomp`` -> ``f30k``. A folder written by
    `prepare-data` says what it holds in its dataset.json: ``synthetic``, or the real
    source folder's name (``artifacts/data`` linking ``coco_precomp`` -> ``coco``).
    """
    p = Path(data_dir)
    try:
        info = json.loads((p / "dataset.json").read_text())
    except (OSError, ValueError):
        info = None
    if isinstance(info, dict):
        if info.get("dataset") == "synthetic":
            return "synthetic"
        if info.get("dataset") == "precomp" and info.get("source"):
            return dataset_name(info["source"])
    name = p.name
    if name in ("", ".", ".."):
        name = p.resolve().name
    if name.endswith("_precomp") and len(name) > len("_precomp"):
        name = name[: -len("_precomp")]
    return name


def _check_name(name) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError("name", f"invalid candidate-set name {name!r}: use letters, digits, '.', '_' "
                                 "or '-', starting with a letter or digit")
    return name


def candidate_paths(out_dir, name: str) -> dict[str, Path]:
    """The five files of candidate set `name` in `out_dir`, keyed as write_candidates returns them."""
    d = Path(out_dir)
    return {
        "i2t_npy": d / f"i2t_{name}.npy",
        "t2i_npy": d / f"t2i_{name}.npy",
        "i2t_parquet": d / f"i2t_{name}.parquet",
        "t2i_parquet": d / f"t2i_{name}.parquet",
        "summary": d / f"candidates_{name}.json",
    }


# --------------------------------------------------------------------------- the set
@dataclass
class Candidates:
    """Hard-negative candidates of both directions (ids int32; scores float32 or None)."""

    i2t: np.ndarray                          # (N_img, K_i2t) caption ids
    t2i: np.ndarray                          # (5 N_img, K_t2i) image ids
    i2t_scores: np.ndarray | None = None     # same shape, non-increasing along each row
    t2i_scores: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return int(self.i2t.shape[0])

    @property
    def n_captions(self) -> int:
        return int(self.t2i.shape[0])

    @property
    def k_i2t(self) -> int:
        return int(self.i2t.shape[1])

    @property
    def k_t2i(self) -> int:
        return int(self.t2i.shape[1])

    @classmethod
    def from_knn(cls, knn, meta: dict | None = None) -> "Candidates":
        """From a :class:`pipeline.mining.reference.KnnResult`."""
        return cls(i2t=knn.i2t, t2i=knn.t2i, i2t_scores=knn.i2t_scores,
                   t2i_scores=knn.t2i_scores, meta=dict(meta or {}))


# --------------------------------------------------------------------------- validation
def _row_blocks(n_rows: int, row_bytes: int, check: str):
    """Yield row selections (slices for "full", index arrays for "sample") to check."""
    if n_rows == 0 or check == "none":
        return
    if check == "sample" and n_rows > SAMPLE_ROWS:
        yield np.unique(np.linspace(0, n_rows - 1, SAMPLE_ROWS).round().astype(np.int64))
        return
    step = max(1, _CHUNK_BYTES // max(1, row_bytes))
    for s in range(0, n_rows, step):
        yield slice(s, min(n_rows, s + step))


def _row_ids(sel, n: int) -> np.ndarray:
    if isinstance(sel, slice):
        return np.arange(sel.start, sel.stop, dtype=np.int64)
    return np.asarray(sel, dtype=np.int64)[:n]


def _first(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else None


def _check_ids_block(block: np.ndarray, rows: np.ndarray, direction: str, n_images: int, source) -> None:
    """Range, positives and duplicates of one block of rows (rows = their global row ids)."""
    if block.shape[1] == 0:
        return
    if direction == "i2t":
        hi, what = CAPS_PER_IMAGE * n_images, "caption"
    else:
        hi, what = n_images, "image"
    bad = (block < 0) | (block >= hi)
    r = _first(bad.any(axis=1))
    if r is not None:
        c = _first(bad[r])
        raise InputError(source, f"row {rows[r]} has {what} id {block[r, c]} (rank {c}) out of range "
                                 f"[0, {hi}): the ids must index the {hi} {what}s of the training split")
    if direction == "i2t":
        pos = (block // CAPS_PER_IMAGE) == rows[:, None]
    else:
        pos = block == (rows // CAPS_PER_IMAGE)[:, None]
    r = _first(pos.any(axis=1))
    if r is not None:
        c = _first(pos[r])
        if direction == "i2t":
            why = f"caption {block[r, c]} (rank {c}) is one of the image's own captions"
        else:
            why = f"image {block[r, c]} (rank {c}) is the caption's own image"
        raise InputError(source, f"row {rows[r]} contains a positive: {why}; positives must be excluded")
    srt = np.sort(block, axis=1)
    dup = srt[:, 1:] == srt[:, :-1]
    r = _first(dup.any(axis=1))
    if r is not None:
        v = srt[r, 1:][dup[r]][0]
        raise InputError(source, f"row {rows[r]} lists {what} id {v} more than once")


def _check_scores_block(block: np.ndarray, rows: np.ndarray, source) -> None:
    if block.shape[1] == 0:
        return
    fin = np.isfinite(block)
    r = _first(~fin.all(axis=1))
    if r is not None:
        c = _first(~fin[r])
        raise InputError(source, f"row {rows[r]} has a non-finite score ({block[r, c]}) at rank {c}")
    if block.shape[1] > 1:
        inc = block[:, 1:] > block[:, :-1]
        r = _first(inc.any(axis=1))
        if r is not None:
            c = _first(inc[r]) + 1
            raise InputError(source, f"row {rows[r]} is not sorted by descending score "
                                     f"(rank {c} scores {block[r, c]} > rank {c - 1} {block[r, c - 1]})")


def _check_matrix(x, source, what: str) -> None:
    if not isinstance(x, np.ndarray):
        raise InputError(source, f"{what}: expected a numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise InputError(source, f"{what}: expected a 2-D array, got shape {tuple(x.shape)}")


def validate_candidates(c: Candidates, *, n_images: int | None = None, source_i2t="i2t", source_t2i="t2i",
                        check: str = "full", source_i2t_scores=None, source_t2i_scores=None) -> None:
    """Raise InputError(<file>, <problem>) for the first problem found; return None when valid.

    check: "full" scans every row in chunks (memory-maps stay on disk), "sample" ~1000
    evenly spaced rows per array, "none" shapes and dtypes only. Scores problems name
    `source_*_scores` (default: the ids' source).
    """
    _validate(c, n_images, source_i2t, source_t2i, source_i2t_scores, source_t2i_scores, check, check)


def _validate(c: Candidates, n_images, source_i2t, source_t2i, source_i2t_scores, source_t2i_scores,
              check_ids: str, check_scores: str) -> None:
    for check in (check_ids, check_scores):
        if check not in CHECK_MODES:
            raise InputError("check", f"must be one of {', '.join(CHECK_MODES)}, got {check!r}")
    src_s = {"i2t": source_i2t_scores or source_i2t, "t2i": source_t2i_scores or source_t2i}
    src = {"i2t": source_i2t, "t2i": source_t2i}
    ids = {"i2t": c.i2t, "t2i": c.t2i}
    scores = {"i2t": c.i2t_scores, "t2i": c.t2i_scores}

    for d in ("i2t", "t2i"):
        x = ids[d]
        _check_matrix(x, src[d], f"{d} candidate ids")
        if x.dtype != np.int32:
            if np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating):
                raise InputError(src[d], f"ids must be int32, got {x.dtype}: convert it with "
                                         "itm-pipeline import-candidates")
            raise InputError(src[d], f"dtype {x.dtype}: expected int32 candidate ids")
    n_img, n_cap = c.i2t.shape[0], c.t2i.shape[0]
    if n_img == 0:
        raise InputError(source_i2t, "has no rows (no images)")
    if n_cap != CAPS_PER_IMAGE * n_img:
        raise InputError(source_t2i, f"has {n_cap} rows but the i2t file has {n_img} rows: expected "
                                     f"{CAPS_PER_IMAGE} x {n_img} = {CAPS_PER_IMAGE * n_img} "
                                     f"(one row per caption)")
    if n_images is not None:
        n_images = int(n_images)
        if n_img != n_images:
            raise InputError(source_i2t, f"has {n_img} rows but the training split has {n_images} images")
    limits = {"i2t": (CAPS_PER_IMAGE * n_img - CAPS_PER_IMAGE, "captions", "its own 5"),
              "t2i": (n_img - 1, "images", "its own image")}
    for d in ("i2t", "t2i"):
        k = ids[d].shape[1]
        lim, what, pos = limits[d]
        if k > lim:
            raise InputError(src[d], f"K = {k} candidates per row, but only {lim} {what} remain once "
                                     f"{pos} are excluded")
    for d in ("i2t", "t2i"):
        s = scores[d]
        if s is None:
            continue
        _check_matrix(s, src_s[d], f"{d} scores")
        if s.shape != ids[d].shape:
            raise InputError(src_s[d], f"{d} scores have shape {tuple(s.shape)}, the ids "
                                       f"{tuple(ids[d].shape)}: they must match")
        if not np.issubdtype(s.dtype, np.floating):
            raise InputError(src_s[d], f"{d} scores: dtype {s.dtype}, expected float32")

    for d in ("i2t", "t2i"):
        x = ids[d]
        for sel in _row_blocks(x.shape[0], x.shape[1] * x.itemsize, check_ids):
            block = np.asarray(x[sel])
            _check_ids_block(block, _row_ids(sel, block.shape[0]), d, n_img, src[d])
        s = scores[d]
        if s is not None:
            for sel in _row_blocks(s.shape[0], s.shape[1] * s.itemsize, check_scores):
                block = np.asarray(s[sel])
                _check_scores_block(block, _row_ids(sel, block.shape[0]), src_s[d])


# --------------------------------------------------------------------------- writing
def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"meta value of type {type(o).__name__} is not JSON-serialisable")


def _dumps(obj, **kw) -> str:
    return json.dumps(obj, default=_json_default, **kw)


def _score_stats(s: np.ndarray | None) -> dict | None:
    if s is None or s.shape[1] == 0 or s.shape[0] == 0:
        return None

    def col(v):
        v = np.asarray(v, dtype=np.float64)
        return {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())}

    return {"rank_0": col(s[:, 0]), f"rank_{s.shape[1] - 1}": col(s[:, -1]), "last_rank": s.shape[1] - 1}


def _write_npy(path: Path, x: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(x, dtype=np.int32) if not (
            x.dtype == np.int32 and x.flags.c_contiguous) else x)


def _write_parquet(path: Path, ids: np.ndarray, scores: np.ndarray | None, file_meta: dict) -> None:
    n, k = ids.shape
    schema = _PARQUET_SCHEMA.with_metadata({METADATA_KEY: _dumps(file_meta).encode()})
    per_group = max(1, ROW_GROUP_ROWS // max(1, k))
    rank = np.arange(k, dtype=np.int32)
    # dictionary encoding only where it pays (query, rank repeat); 2x faster writes on big sets
    with pq.ParquetWriter(str(path), schema, use_dictionary=["query", "rank"]) as w:
        if n * k == 0:
            w.write_table(schema.empty_table())
        for q0 in range(0, n if k else 0, per_group):
            q1 = min(n, q0 + per_group)
            m = (q1 - q0) * k
            cols = [
                pa.array(np.repeat(np.arange(q0, q1, dtype=np.int32), k), pa.int32()),
                pa.array(np.tile(rank, q1 - q0), pa.int32()),
                pa.array(np.ascontiguousarray(ids[q0:q1], dtype=np.int32).reshape(-1), pa.int32()),
                (pa.nulls(m, pa.float32()) if scores is None else
                 pa.array(np.ascontiguousarray(scores[q0:q1], dtype=np.float32).reshape(-1), pa.float32())),
            ]
            w.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=m)


def write_candidates(out_dir, name: str, cands: Candidates, meta: dict | None = None) -> dict[str, Path]:
    """Validate `cands` and write the five files of set `name` into `out_dir`, all or nothing.

    Every file is written to a hidden temporary name in `out_dir` first; they are renamed
    into place (summary JSON last) only after all were written. On an error no temporary
    file remains and a previous set of the same name is left as it was.
    `meta` (default: ``cands.meta``) is stored verbatim in the Parquet metadata and the summary.
    Returns {"i2t_npy", "t2i_npy", "i2t_parquet", "t2i_parquet", "summary"} -> final paths.
    """
    name = _check_name(name)
    meta = dict(cands.meta if meta is None else meta)
    _dumps(meta)  # fail early (TypeError) on a value JSON cannot hold
    out_dir = Path(out_dir)
    paths = candidate_paths(out_dir, name)
    validate_candidates(cands, source_i2t=paths["i2t_npy"], source_t2i=paths["t2i_npy"], check="full")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "output path exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    data = {"i2t": (cands.i2t, cands.i2t_scores), "t2i": (cands.t2i, cands.t2i_scores)}
    summary = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "meta": meta,
        "n_images": cands.n_images,
        "n_captions": cands.n_captions,
        "files": {k: p.name for k, p in paths.items()},
    }
    for d, (ids, s) in data.items():
        summary[d] = {"shape": [int(ids.shape[0]), int(ids.shape[1])], "k": int(ids.shape[1]),
                      "has_scores": s is not None, "scores": _score_stats(s)}

    tmps: dict[str, Path] = {}
    try:
        for key, final in paths.items():
            tmps[key] = temp_beside(final)
        for d, (ids, s) in data.items():
            _write_npy(tmps[f"{d}_npy"], ids)
            file_meta = {**meta, "direction": d, "k": int(ids.shape[1]), "n_queries": int(ids.shape[0]),
                         "format_version": FORMAT_VERSION}
            _write_parquet(tmps[f"{d}_parquet"], ids, s, file_meta)
        tmps["summary"].write_text(_dumps(summary, indent=2) + "\n")
        for key in ("i2t_npy", "t2i_npy", "i2t_parquet", "t2i_parquet", "summary"):
            os.replace(tmps[key], paths[key])
    except OSError as e:
        if disk_full(e):
            raise InputError(out_dir, f"no space left on the device for the candidate files "
                                      f"({short_error(e)})") from None
        raise
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()
    return paths


# --------------------------------------------------------------------------- reading
def _infer_name(folder: Path) -> str:
    i2t = {p.name[4:-4] for p in folder.glob("i2t_*.npy") if p.is_file()}
    t2i = {p.name[4:-4] for p in folder.glob("t2i_*.npy") if p.is_file()}
    both = sorted(i2t & t2i)
    if len(both) == 1:
        return both[0]
    if not both:
        extra = ""
        if i2t or t2i:
            extra = (" (found only " + ", ".join(sorted([f"i2t_{n}.npy" for n in i2t] +
                                                        [f"t2i_{n}.npy" for n in t2i])) + ")")
        raise InputError(folder, "no candidate set found: expected a pair i2t_<name>.npy and "
                                 f"t2i_<name>.npy{extra}")
    raise InputError(folder, f"several candidate sets ({', '.join(both)}): pass the name of the one to use")


def _check_parquet_types(pf: pq.ParquetFile, path: Path) -> None:
    """Ids integer (any width: compared with the .npy ids), scores floating (or all-null):
    numpy would otherwise read "0.5" strings as scores and 3.0 floats as ids. Nulls in an id
    column are refused from the row groups' statistics (the full check also counts them)."""
    schema = pf.schema_arrow
    for name in (*_ID_COLUMNS, "score"):
        if schema.names.count(name) > 1:
            raise InputError(path, f"column {name!r} appears {schema.names.count(name)} times")
        t = schema.field(name).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if name == "score":
            if not (pa.types.is_floating(t) or pa.types.is_null(t)):
                raise InputError(path, f"column 'score' has type {t}, expected a floating-point "
                                       "type (float32)")
        elif not pa.types.is_integer(t):
            raise InputError(path, f"column {name!r} has type {t}, expected an integer type (int32)")
    md = pf.metadata
    leaf = {md.schema.column(i).path: i for i in range(md.num_columns)}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for name in _ID_COLUMNS:
            st = rg.column(leaf[name]).statistics
            if st is not None and st.has_null_count and st.null_count:
                raise InputError(path, f"column {name!r} is null in {st.null_count} rows of row "
                                       f"group {g}: candidate ids may not be null")


def _read_parquet(path: Path, ids: np.ndarray, direction: str, check: str) -> np.ndarray | None:
    """Scores (N, K) float32 from a Parquet candidate file, or None when its score column is null.

    Checks its metadata against the .npy ids; check="full" also compares every candidate id.
    """
    n, k = ids.shape
    try:
        pf = pq.ParquetFile(str(path))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(path, f"unreadable Parquet file ({e.__class__.__name__}: "
                               f"{' '.join(str(e).split())[:160]})") from None
    with pf:
        names = pf.schema_arrow.names
        missing = [c for c in ("query", "rank", "candidate", "score") if c not in names]
        if missing:
            raise InputError(path, f"missing column(s) {', '.join(missing)}")
        _check_parquet_types(pf, path)
        kv = pf.metadata.metadata or {}
        try:
            fmeta = json.loads(kv[METADATA_KEY]) if METADATA_KEY in kv else {}
        except ValueError:
            raise InputError(path, f"metadata {METADATA_KEY.decode()!r} is not valid JSON") from None
        if not isinstance(fmeta, dict):
            raise InputError(path, f"metadata {METADATA_KEY.decode()!r} is a {type(fmeta).__name__}, "
                                   "expected an object")
        if fmeta.get("direction", direction) != direction:
            raise InputError(path, f"holds {fmeta['direction']} candidates, expected {direction}")
        if pf.metadata.num_rows != n * k or fmeta.get("k", k) != k or fmeta.get("n_queries", n) != n:
            raise InputError(path, f"holds {fmeta.get('n_queries', '?')} x {fmeta.get('k', '?')} candidates "
                                   f"({pf.metadata.num_rows} rows) but the .npy file is {n} x {k}: the files "
                                   "are not from the same run")
        if n * k == 0:
            return None
        out = np.empty(n * k, dtype=np.float32)
        cols = ["candidate", "score"] if check == "full" else ["score"]
        flat_ids = ids.reshape(-1) if ids.flags.c_contiguous else None
        pos, n_null = 0, 0
        try:
            for batch in pf.iter_batches(batch_size=max(1, ROW_GROUP_ROWS), columns=cols):
                m = batch.num_rows
                sc = batch.column(batch.schema.get_field_index("score"))
                n_null += sc.null_count
                if sc.null_count == 0:
                    out[pos:pos + m] = sc.to_numpy(zero_copy_only=False)
                if check == "full":
                    cand = batch.column(batch.schema.get_field_index("candidate"))
                    if cand.null_count:       # where the file's statistics did not say so
                        raise InputError(path, f"column 'candidate' is null in {cand.null_count} "
                                               "rows: candidate ids may not be null")
                    cand = cand.to_numpy(zero_copy_only=False)
                    want = (flat_ids[pos:pos + m] if flat_ids is not None
                            else np.asarray(ids).reshape(-1)[pos:pos + m])
                    diff = _first(cand != want)
                    if diff is not None:
                        r = (pos + diff) // k
                        raise InputError(path, f"row {r} differs from the .npy file (query {r}, rank "
                                               f"{(pos + diff) % k}): the files are not from the same run")
                pos += m
        except (pa.ArrowException, OSError) as e:
            raise InputError(path, f"unreadable Parquet file ({e.__class__.__name__}: "
                                   f"{' '.join(str(e).split())[:160]})") from None
    if n_null == n * k:
        return None
    if n_null:
        raise InputError(path, f"the score column is null in {n_null} of {n * k} rows: expected all or none")
    return out.reshape(n, k)


def check_provenance(meta: dict, source, *, split: str | None = None,
                     checkpoint_hash: str | None = None) -> None:
    """Refuse candidates whose metadata says they were mined on another split, or from the
    embeddings of another model, than the reader expects; one line naming `source` (the file
    holding the metadata), the recorded value and the expected one.

    What `mine-candidates` records: ``source.split`` (the embeddings' split) and
    ``checkpoint_hash``, the sha256 of the checkpoint's weights file
    (:func:`pipeline.checkpoint.checkpoint_hash`, copied from embeddings.json). The hash is
    compared, not ``source.checkpoint``: a path moves with a copy or a DVC checkout, the
    weights' digest does not. A value not recorded (files imported from AOQ's release, a
    candidate refresh, embeddings without embeddings.json) is not checked.
    """
    src = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    got = src.get("split")
    if split is not None and got is not None and got != split:
        raise InputError(source, f"the candidates were mined on split {got!r}, expected {split!r}: "
                                 f"mine them on the {split!r} split")
    got = meta.get("checkpoint_hash")
    if checkpoint_hash is not None and got is not None and got != checkpoint_hash:
        where = f" ({src['checkpoint']})" if src.get("checkpoint") else ""
        raise InputError(source, f"the candidates were mined with the checkpoint of weights sha256 "
                                 f"{got}{where}, expected {checkpoint_hash}")


def _summary_meta(path: Path):
    try:
        summary = json.loads(path.read_text())
    except (ValueError, OSError):
        raise InputError(path, "not a valid JSON summary") from None
    return summary.get("meta", {}) if isinstance(summary, dict) else {}


def _checked_meta(meta, source, split, checkpoint_hash) -> dict:
    if not isinstance(meta, dict):
        raise InputError(source, f"the candidates' metadata is a {type(meta).__name__}, expected an object")
    check_provenance(meta, source, split=split, checkpoint_hash=checkpoint_hash)
    return meta


def load_candidates(path, name: str | None = None, *, n_images: int | None = None, mmap: bool = True,
                    check: str = "full", split: str | None = None,
                    checkpoint_hash: str | None = None) -> Candidates:
    """Load and validate candidate set `name` (inferred when the folder holds exactly one) from a folder.

    The ids come from the AOQ .npy pair (memory-mapped unless mmap=False); scores from the
    Parquet files when present and non-null, else None; meta from the summary JSON (else
    the Parquet metadata, else {}). `n_images`: the training split's image count to check;
    `split` / `checkpoint_hash`: what the metadata must record, when it records them
    (:func:`check_provenance`).
    """
    if check not in CHECK_MODES:
        raise InputError("check", f"must be one of {', '.join(CHECK_MODES)}, got {check!r}")
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(folder, "candidate folder not found" if not folder.exists() else
                         "expected a folder holding i2t_<name>.npy and t2i_<name>.npy, got a file")
    name = _infer_name(folder) if name is None else _check_name(name)
    paths = candidate_paths(folder, name)
    i2t = open_npy(paths["i2t_npy"], mmap=mmap)
    t2i = open_npy(paths["t2i_npy"], mmap=mmap)
    meta = None
    if paths["summary"].is_file():      # checked before the scans: a wrong split fails at once
        meta = _checked_meta(_summary_meta(paths["summary"]), paths["summary"], split, checkpoint_hash)
    # the ids first, so that a Parquet file is not blamed for a bad .npy file
    validate_candidates(Candidates(i2t, t2i), n_images=n_images, source_i2t=paths["i2t_npy"],
                        source_t2i=paths["t2i_npy"], check=check)
    scores = {}
    for d, ids in (("i2t", i2t), ("t2i", t2i)):
        p = paths[f"{d}_parquet"]
        scores[d] = _read_parquet(p, ids, d, check) if p.is_file() else None
    if meta is None and paths["i2t_parquet"].is_file():     # read (and checked) by _read_parquet
        kv = pq.read_metadata(str(paths["i2t_parquet"])).metadata or {}
        meta = json.loads(kv[METADATA_KEY]) if METADATA_KEY in kv else {}
        for key in ("direction", "k", "n_queries", "format_version"):
            meta.pop(key, None)
        meta = _checked_meta(meta, paths["i2t_parquet"], split, checkpoint_hash)

    c = Candidates(i2t=i2t, t2i=t2i, i2t_scores=scores["i2t"], t2i_scores=scores["t2i"],
                   meta=meta or {})
    _validate(c, n_images, paths["i2t_npy"], paths["t2i_npy"], paths["i2t_parquet"], paths["t2i_parquet"],
              check_ids="none", check_scores=check)
    return c


# --------------------------------------------------------------------------- import
def _to_int32_ids(x: np.ndarray, path: Path, direction: str, n_images: int) -> np.ndarray:
    """Published ids (any integer dtype, or floats holding integers) -> int32, range-checked first."""
    _check_matrix(x, path, f"{direction} candidate ids")
    hi = CAPS_PER_IMAGE * n_images if direction == "i2t" else n_images
    what = "caption" if direction == "i2t" else "image"
    if x.dtype == np.int32:
        return x
    is_int = np.issubdtype(x.dtype, np.integer)
    if not (is_int or np.issubdtype(x.dtype, np.floating)) or x.dtype == np.bool_:
        raise InputError(path, f"dtype {x.dtype}: expected integer candidate ids")
    out = np.empty(x.shape, dtype=np.int32)
    for sel in _row_blocks(x.shape[0], x.shape[1] * x.itemsize, "full"):
        block = np.asarray(x[sel])
        rows = _row_ids(sel, block.shape[0])
        if not is_int:
            bad = ~np.isfinite(block)
            bad[~bad] = block[~bad] != np.floor(block[~bad])
            r = _first(bad.any(axis=1))
            if r is not None:
                c = _first(bad[r])
                raise InputError(path, f"row {rows[r]} has a non-integer id {block[r, c]} (rank {c})")
        bad = (block < 0) | (block >= hi)
        r = _first(bad.any(axis=1))
        if r is not None:
            c = _first(bad[r])
            raise InputError(path, f"row {rows[r]} has {what} id {block[r, c]} (rank {c}) out of range "
                                   f"[0, {hi}): the ids must index the {hi} {what}s of the training split")
        out[sel] = block
    return out


def import_candidates(i2t_file, t2i_file, out_dir, name: str, *, n_images: int | None = None,
                      meta: dict | None = None) -> dict[str, Path]:
    """Convert a published AOQ pair (.npy, possibly int64 or float) to our format in a new
    `out_dir` (or one this command wrote before), never the folder of the input files.

    Ids are range-checked before the cast to int32, then the set is validated in full
    (no scores: the Parquet score column is null). Returns write_candidates' paths.
    """
    name = _check_name(name)
    i2t_file, t2i_file = Path(i2t_file), Path(t2i_file)
    i2t_raw = open_npy(i2t_file, mmap=True)
    t2i_raw = open_npy(t2i_file, mmap=True)
    _check_matrix(i2t_raw, i2t_file, "i2t candidate ids")
    _check_matrix(t2i_raw, t2i_file, "t2i candidate ids")
    n_img, n_cap = int(i2t_raw.shape[0]), int(t2i_raw.shape[0])
    if n_img == 0:
        raise InputError(i2t_file, "has no rows (no images)")
    if n_cap != CAPS_PER_IMAGE * n_img:
        raise InputError(t2i_file, f"has {n_cap} rows but the i2t file has {n_img} rows: expected "
                                   f"{CAPS_PER_IMAGE} x {n_img} = {CAPS_PER_IMAGE * n_img} "
                                   f"(one row per caption)")
    if n_images is not None and n_img != int(n_images):
        raise InputError(i2t_file, f"has {n_img} rows but the training split has {int(n_images)} images")
    i2t = _to_int32_ids(i2t_raw, i2t_file, "i2t", n_img)
    t2i = _to_int32_ids(t2i_raw, t2i_file, "t2i", n_img)
    cands = Candidates(i2t=i2t, t2i=t2i)
    validate_candidates(cands, n_images=n_images, source_i2t=i2t_file, source_t2i=t2i_file, check="full")
    full_meta = {
        "imported_from": {
            "i2t": str(i2t_file.resolve()), "t2i": str(t2i_file.resolve()),
            "i2t_dtype": str(i2t_raw.dtype), "t2i_dtype": str(t2i_raw.dtype),
        },
        "k_i2t": cands.k_i2t,
        "k_t2i": cands.k_t2i,
        "scores": None,
        **(meta or {}),
    }
    # built beside out_dir and renamed whole; never into the folder of the files it reads
    with atomic_dir(out_dir, "import-candidates", inputs=[i2t_file, t2i_file]) as tmp:
        written = write_candidates(tmp, name, cands, full_meta)
    return {k: Path(out_dir) / p.name for k, p in written.items()}
