"""`evaluate-sims`: retrieval metrics of a saved (N_img, 5*N_img) similarity matrix."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.data import CAPS_PER_IMAGE
from pipeline.evaluation.protocols import PROTOCOLS, evaluate_sims as _evaluate_sims, load_sims
from pipeline.evaluation.table import format_metrics_table
from pipeline.io import refuse_overlap, write_json


@click.command("evaluate-sims")
@click.option("--sims", "sims_path", required=True, type=click.Path(path_type=Path),
              help="Similarity matrix .npy, shape (N_img, 5*N_img), row = image; memory-mapped.")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="full", show_default=True,
              help="full: whole matrix; f30k_1k: 1,000 images; coco5k: 5,000 images as one matrix; "
                   "coco1k_5fold: 5,000 images as five 1K folds, metrics averaged.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the metrics as JSON (atomically).")
@click.option("--chunk", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Image rows scored per block (memory ~ chunk x 5*N_img scores).")
def evaluate_sims(sims_path: Path, protocol: str, json_path: Path | None, chunk: int) -> None:
    """Recall@K, median/mean rank and rsum of a saved similarity matrix.

    Ranks are exact, with ties broken in favour of the lower index (stable sort).
    """
    if json_path is not None:
        refuse_overlap(json_path, [sims_path])
    sims = load_sims(sims_path)  # InputError (exit 2) for missing/corrupt/misshapen/non-finite
    metrics = _evaluate_sims(sims, protocol, chunk=chunk, source=str(sims_path))
    n_img = int(sims.shape[0])
    title = f"{sims_path} ({n_img} images x {CAPS_PER_IMAGE * n_img} captions, protocol {protocol})"
    click.echo(format_metrics_table({protocol: metrics}, title=title), nl=False)
    click.echo(
        f"medr i2t {metrics['i2t_medr']:g}  t2i {metrics['t2i_medr']:g}   "
        f"meanr i2t {metrics['i2t_meanr']:.1f}  t2i {metrics['t2i_meanr']:.1f}"
    )
    if json_path is not None:
        write_json(json_path, {**metrics, "sims": str(sims_path), "n_img": n_img})
