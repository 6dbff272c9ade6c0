"""DVC stage `embed`: the base model's embeddings of the training split, for mining.

Writes ``img_embs.npy`` (N_img, D) and ``cap_embs.npy`` (5 N_img, D), float32 with unit
rows, and ``embeddings.json`` (checkpoint hash, split, shapes, seconds) into ``out_dir``.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.mining.embed import DEFAULT_BLOCK_ROWS, embed_split

SECTION = "embed"


def run(*, checkpoint, data_dir, out_dir, split: str = "train", batch_size: int = 256,
        device: str = "cpu", block_rows: int = DEFAULT_BLOCK_ROWS, scheduler: str | None = None,
        workers: int | None = None, progress: bool = True) -> dict:
    if scheduler or workers:  # shards over a dask cluster; the files are identical
        from pipeline.mining.distributed import embed_distributed, get_client

        with get_client(scheduler, workers) as client:
            return embed_distributed(Path(checkpoint), Path(data_dir), split, Path(out_dir), client,
                                     batch_size=batch_size, device=device, block_rows=block_rows,
                                     progress=progress)
    return embed_split(Path(checkpoint), Path(data_dir), split, Path(out_dir),
                       batch_size=batch_size, device=device, block_rows=block_rows,
                       progress=progress)
