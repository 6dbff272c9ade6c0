"""`itm-pipeline validate-data`: check a SCAN precomp folder and summarise it."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.data import MAX_CAPTION_TOKENS
from pipeline.data.folder_check import check_folder
from pipeline.data.precomp import CHECK_FINITE_MODES, SPLITS


@click.command("validate-data")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--split", "splits", multiple=True,
              help="Split to check (repeatable); default: every split present among "
                   + "/".join(SPLITS) + " (train and dev required).")
@click.option("--check-finite", type=click.Choice(CHECK_FINITE_MODES), default="auto", show_default=True,
              help="NaN/inf scan of the features: full, sample (~1000 rows), none; "
                   "auto = full below 2 GiB, else sample.")
@click.option("--vocab", "vocab_file", type=click.Path(path_type=Path), default=None,
              help="SCAN vocab JSON (default: looked up beside the data).")
def validate_data(data_dir: Path, splits: tuple[str, ...], check_finite: str, vocab_file: Path | None):
    """Validate the SCAN precomp folder DATA_DIR and print one summary line per split.

    Checks each split (shapes, dtypes, NaN/inf, 5 captions per image, ids) and the folder
    as a whole (train and dev present, one feature width, scene graphs, precaps ids within
    the vocab); exit 0 means every stage can read it. Captions longer than
    MAX_CAPTION_TOKENS token ids are counted: tokenisation truncates them."""
    folder = check_folder(data_dir, splits, vocab_file=vocab_file, check_finite=check_finite)
    for s, sp in folder.splits.items():
        ids = f", ids {len(sp.ids)}" if sp.ids is not None else ""
        click.echo(f"{s}: {sp.n_images} images, {sp.n_captions} captions, {sp.n_regions} regions x "
                   f"{sp.feature_dim} features ({sp.features.dtype}), rows per image {sp.rows_per_image}, "
                   f"storage {sp.storage} ({sp.features_path.name}), captions from {sp.caption_source}{ids}")
    if folder.vocab is None:
        click.echo(f"vocab: none ({folder.vocab_problem}); prepare-data builds one from train+dev "
                   "captions for GRU text encoders, BERT ones do not need it")
    else:
        click.echo(f"vocab: {len(folder.vocab)} words ({folder.vocab_path})")
    for s, st in folder.caption_stats.items():
        parts = []
        if folder.vocab is not None:
            share = 100.0 * st["unk"] / st["tokens"] if st["tokens"] else 0.0
            parts.append(f"<unk> {share:.2f}% of {st['tokens']} word tokens")
        parts.append(f"longest caption {st['longest']} tokens")
        if st["too_long"]:
            parts.append(f"{st['too_long']} caption(s) over {MAX_CAPTION_TOKENS} tokens "
                         "(truncated when tokenised)")
        click.echo(f"{s}: " + ", ".join(parts))
