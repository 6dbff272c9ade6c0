"""`itm-pipeline validate-data`: check a SCAN precomp folder and summarise it."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.data.precomp import CHECK_FINITE_MODES, SPLITS, features_candidates, open_split, split_present
from pipeline.data.vocab import Vocab, find_vocab
from pipeline.errors import InputError


@click.command("validate-data")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--split", "splits", multiple=True,
              help="Split to check (repeatable); default: every split present among "
                   + "/".join(SPLITS) + ".")
@click.option("--check-finite", type=click.Choice(CHECK_FINITE_MODES), default="auto", show_default=True,
              help="NaN/inf scan of the features: full, sample (~1000 rows), none; "
                   "auto = full below 2 GiB, else sample.")
@click.option("--vocab", "vocab_file", type=click.Path(path_type=Path), default=None,
              help="SCAN vocab JSON (default: looked up beside the data).")
def validate_data(data_dir: Path, splits: tuple[str, ...], check_finite: str, vocab_file: Path | None):
    """Validate the SCAN precomp folder DATA_DIR and print one summary line per split."""
    if not data_dir.is_dir():
        raise InputError(data_dir, "data folder not found" if not data_dir.exists() else "not a folder")
    if not splits:
        splits = tuple(s for s in SPLITS if split_present(data_dir, s))
        if not splits:
            looked = ", ".join(p.name for s in SPLITS for p in features_candidates(data_dir, s))
            raise InputError(data_dir, f"no split found (looked for {looked})")

    opened = []
    for s in dict.fromkeys(splits):
        sp = open_split(data_dir, s, check_finite=check_finite)
        opened.append(sp)
        ids = f", ids {len(sp.ids)}" if sp.ids is not None else ""
        click.echo(f"{s}: {sp.n_images} images, {sp.n_captions} captions, {sp.n_regions} regions x "
                   f"{sp.feature_dim} features ({sp.features.dtype}), rows per image {sp.rows_per_image}, "
                   f"storage {sp.storage} ({sp.features_path.name}), captions from {sp.caption_source}{ids}")

    try:
        vpath = find_vocab(data_dir, vocab_file)
    except InputError as e:
        if vocab_file is not None:
            raise
        click.echo(f"vocab: none ({e.problem}); GRU text encoders need one, BERT ones do not")
        return
    words = Vocab.load(vpath)
    click.echo(f"vocab: {len(words)} words ({vpath})")
    for sp in opened:
        n_unk, n_tok = words.unk_share(sp)
        share = 100.0 * n_unk / n_tok if n_tok else 0.0
        click.echo(f"{sp.split}: <unk> {share:.2f}% of {n_tok} word tokens")
