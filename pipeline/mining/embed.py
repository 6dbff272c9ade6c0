"""Embed a split for mining: L2-normalised float32 image and caption rows, streamed to disk.

Two layers:

* :func:`encode_image_range` / :func:`encode_caption_range` (pipeline.scoring's) -- pure
  functions (no file IO): encode a contiguous range of unique images / captions with a
  loaded indep model and return the unit rows in order. They are the unit of work of any
  scale-out (a dask module maps them over shards, each worker holding its own model).
* :func:`embed_split` -- the single-process driver: loads a checkpoint, opens a split and
  fills ``img_embs.npy`` (N_img, D) and ``cap_embs.npy`` (5 N_img, D) block by block through
  ``np.lib.format.open_memmap`` temp files in the output folder, then renames them into
  place and writes ``embeddings.json``. Memory stays at one block of rows (plus the model)
  whatever the size of the split; the region features are read through their memmap.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from pipeline.embeddings import check_embedding_rows
from pipeline.scoring import encode_caption_range, encode_image_range, require_indexable
from pipeline.errors import InputError
from pipeline.io import open_memmap_out, temp_beside

IMG_FILE, CAP_FILE, META_FILE = "img_embs.npy", "cap_embs.npy", "embeddings.json"
FORMAT = "itm-pipeline/embeddings-v1"
DEFAULT_BLOCK_ROWS = 4096


def block_plan(n: int, block_rows: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most block_rows covering 0 .. n (the unit of streaming)."""
    return [(s, min(n, s + block_rows)) for s in range(0, n, block_rows)]


def _temp_npy(out_dir: Path, name: str) -> Path:
    return temp_beside(Path(out_dir) / name)


def embed_split(checkpoint, data_dir, split: str, out_dir, *, batch_size: int = 256,
                device: str = "cpu", progress: bool = True,
                block_rows: int = DEFAULT_BLOCK_ROWS) -> dict:
    """Embed one split with a checkpoint into ``out_dir`` (img_embs.npy, cap_embs.npy,
    embeddings.json). Files appear whole or not at all. Returns the embeddings.json dict."""
    from tqdm.auto import tqdm

    from pipeline.checkpoint import load_checkpoint
    from pipeline.data.precomp import open_split

    for name, v in (("batch_size", batch_size), ("block_rows", block_rows)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InputError(None, f"{name} must be a positive integer, got {v!r}")
    t0 = time.perf_counter()
    model, cfg = load_checkpoint(checkpoint, device, data_dir=data_dir)   # resolves the device first
    require_indexable(model, checkpoint)
    data = open_split(data_dir, split, expected_dim=cfg["model"].get("img_dim"))
    n_img, n_cap = data.n_images, data.n_captions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    img_plan, cap_plan = block_plan(n_img, block_rows), block_plan(n_cap, block_rows)
    temps: list[Path] = []
    img_mm = cap_mm = None
    try:
        bar = tqdm(total=n_img + n_cap, desc=f"embed {split}", unit="row",
                   disable=not progress, leave=False)
        # The first block tells the embedding width D; then the memmaps are sized.
        first = encode_image_range(model, data, *img_plan[0], batch_size=batch_size,
                                   device=device)
        check_embedding_rows(first, checkpoint, "image", lead="the model gives",
                             start=img_plan[0][0], total=n_img)
        dim = int(first.shape[1])
        temps += [_temp_npy(out_dir, IMG_FILE), _temp_npy(out_dir, CAP_FILE)]
        img_mm = open_memmap_out(temps[0], np.float32, (n_img, dim))
        cap_mm = open_memmap_out(temps[1], np.float32, (n_cap, dim))
        img_mm[img_plan[0][0]:img_plan[0][1]] = first
        bar.update(len(first))
        del first
        for s, e in img_plan[1:]:
            rows = encode_image_range(model, data, s, e, batch_size=batch_size, device=device)
            check_embedding_rows(rows, checkpoint, "image", lead="the model gives", start=s,
                                 total=n_img)
            img_mm[s:e] = rows
            bar.update(e - s)
        for s, e in cap_plan:
            rows = encode_caption_range(model, data, s, e, batch_size=2 * batch_size,
                                        device=device)
            check_embedding_rows(rows, checkpoint, "caption", lead="the model gives", start=s,
                                 total=n_cap)
            cap_mm[s:e] = rows
            bar.update(e - s)
        bar.close()
        img_mm.flush()
        cap_mm.flush()
        del img_mm, cap_mm
        img_mm = cap_mm = None
        meta = publish_embeddings(out_dir, temps[0], temps[1], checkpoint=checkpoint,
                                  model_name=cfg["model"].get("name", getattr(model, "name", "")),
                                  data_dir=data_dir, split=split, n_img=n_img, n_cap=n_cap,
                                  dim=dim, device=device, batch_size=batch_size,
                                  block_rows=block_rows, t0=t0)
        return meta
    finally:
        del img_mm, cap_mm
        for t in temps:
            t.unlink(missing_ok=True)
        data.close()


def publish_embeddings(out_dir: Path, img_tmp: Path, cap_tmp: Path, *, checkpoint, model_name: str,
                       data_dir, split: str, n_img: int, n_cap: int, dim: int, device,
                       batch_size: int, block_rows: int, t0: float) -> dict:
    """Move two complete temp arrays into place and write embeddings.json describing them
    (shared by the single-process and the dask-sharded embed)."""
    from pipeline.checkpoint import checkpoint_hash
    from pipeline.io import write_json

    meta = {
        "format": FORMAT,
        "checkpoint": str(checkpoint),
        "checkpoint_hash": checkpoint_hash(checkpoint),
        "model": model_name,
        "data": str(data_dir),
        "split": split,
        "n_img": n_img,
        "n_cap": n_cap,
        "dim": dim,
        "dtype": "float32",
        "l2_normalised": True,
        "files": {"img": IMG_FILE, "cap": CAP_FILE},
        "device": str(device),
        "batch_size": int(batch_size),
        "block_rows": int(block_rows),
    }
    # A stale embeddings.json must never describe the new arrays: drop it first, move
    # both arrays into place, then write the new one (readers key on embeddings.json).
    (out_dir / META_FILE).unlink(missing_ok=True)
    os.replace(img_tmp, out_dir / IMG_FILE)
    os.replace(cap_tmp, out_dir / CAP_FILE)
    write_json(out_dir / META_FILE, meta)
    # the wall time is returned, not written: embeddings.json is DVC-tracked and must be the
    # same bytes for the same inputs (stages.embed puts it in a timings file)
    return {**meta, "seconds": round(time.perf_counter() - t0, 3)}


