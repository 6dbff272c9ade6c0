"""DVC stage `embed`: the base model's embeddings of the training split, for mining.

Writes ``img_embs.npy`` (N_img, D) and ``cap_embs.npy`` (5 N_img, D), float32 with unit
rows, and ``embeddings.json`` (checkpoint hash, split, shapes) into ``out_dir``; the wall
time is only returned (``seconds``): the `embed` command writes it beside the folder.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.io import atomic_dir
from pipeline.mining.embed import DEFAULT_BLOCK_ROWS, embed_split

SECTION = "embed"


def run(*, checkpoint, data_dir, out_dir, split: str = "train", batch_size: int = 256,
        device: str = "cpu", block_rows: int = DEFAULT_BLOCK_ROWS, scheduler: str | None = None,
        workers: int | None = None, progress: bool = True) -> dict:
    # built beside out_dir and renamed into place whole: an earlier `embed` output is
    # replaced, any other folder refused before any work
    with atomic_dir(out_dir, "embed", inputs=[checkpoint, data_dir]) as tmp:
        if scheduler or workers:  # shards over a dask cluster; the files are identical
            from pipeline.mining.distributed import embed_distributed, get_client

            with get_client(scheduler, workers) as client:
                return embed_distributed(Path(checkpoint), Path(data_dir), split, tmp, client,
                                         batch_size=batch_size, device=device,
                                         block_rows=block_rows, progress=progress)
        return embed_split(Path(checkpoint), Path(data_dir), split, tmp, batch_size=batch_size,
                           device=device, block_rows=block_rows, progress=progress)
