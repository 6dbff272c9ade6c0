"""`itm-pipeline import-candidates`: convert published AOQ candidate files to our format."""
from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.data import CAPS_PER_IMAGE
from pipeline.errors import InputError
from pipeline.mining.candidates import import_candidates as _import_candidates


def _name_from_files(i2t_file: Path, t2i_file: Path) -> str:
    """`coco` from i2t_coco.npy / t2i_coco.npy; InputError when the names are missing or differ."""
    names = {}
    for prefix, p in (("i2t_", i2t_file), ("t2i_", t2i_file)):
        stem = p.name[:-4] if p.name.endswith(".npy") else p.stem
        if not stem.startswith(prefix) or len(stem) == len(prefix):
            raise InputError(p, f"cannot infer the set name from the file name (expected {prefix}<name>.npy): "
                                "pass --name")
        names[prefix] = stem[len(prefix):]
    if names["i2t_"] != names["t2i_"]:
        raise InputError(t2i_file, f"name {names['t2i_']!r} differs from the i2t file's {names['i2t_']!r}: "
                                   "pass --name")
    return names["i2t_"]


def _count_lines(path: Path) -> int:
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def train_image_count(data_dir: Path) -> int:
    """Images in the train split of a precomp folder, from the feature file's header (never read whole).

    When the caption file is present its line count decides whether rows repeat 5x per image.
    """
    from pipeline.data.precomp import _open_features, features_candidates

    if not data_dir.is_dir():
        raise InputError(data_dir, "data folder not found" if not data_dir.exists() else "not a folder")
    cands = features_candidates(data_dir, "train")
    path = next((p for p in cands if p.is_file()), None)
    if path is None:
        raise InputError(cands[0], "train features not found (looked for "
                                   + ", ".join(str(p) for p in cands) + ")")
    feat, h5file = _open_features(path)
    try:
        if len(feat.shape) < 1 or feat.shape[0] == 0:
            raise InputError(path, f"empty feature array, shape {tuple(feat.shape)}")
        n_rows = int(feat.shape[0])
    finally:
        if h5file is not None:
            h5file.close()
    caps = next((p for p in (data_dir / "train_caps.txt", data_dir / "train_precaps.txt") if p.is_file()), None)
    if caps is not None and n_rows % CAPS_PER_IMAGE == 0 and _count_lines(caps) == n_rows:
        return n_rows // CAPS_PER_IMAGE
    return n_rows


@click.command("import-candidates")
@click.option("--i2t", "i2t_file", required=True, type=click.Path(path_type=Path),
              help="Published i2t_<name>.npy: (N_img, K_i2t) caption ids, any integer dtype.")
@click.option("--t2i", "t2i_file", required=True, type=click.Path(path_type=Path),
              help="Published t2i_<name>.npy: (5*N_img, K_t2i) image ids, any integer dtype.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder for the candidate set (int32 .npy pair, Parquet, summary JSON).")
@click.option("--name", default=None,
              help="Candidate-set name.  [default: <name> of the input files i2t_<name>.npy]")
@click.option("--n-images", type=click.IntRange(min=1), default=None,
              help="Check the files against this many training images.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Precomp folder: check against its train split's image count (from the feature header).")
def import_candidates(i2t_file: Path, t2i_file: Path, out_dir: Path, name: str | None,
                      n_images: int | None, data_dir: Path | None) -> None:
    """Validate published AOQ candidate files, convert them to int32 and write our format.

    Ids are range-checked before the conversion; positives, duplicates and K are validated
    on every row. The imported set has no scores (the Parquet score column is null).
    """
    if n_images is not None and data_dir is not None:
        raise InputError("--data", "give --n-images or --data, not both")
    if name is None:
        name = _name_from_files(i2t_file, t2i_file)
    if data_dir is not None:
        n_images = train_image_count(data_dir)
    meta = {"n_images_checked_against": n_images}
    if data_dir is not None:
        meta["data_dir"] = str(data_dir)
    paths = _import_candidates(i2t_file, t2i_file, out_dir, name, n_images=n_images, meta=meta)

    summary = json.loads(paths["summary"].read_text())
    src = summary["meta"].get("imported_from", {})
    click.echo(f"imported {name!r}: {summary['n_images']} images, {summary['n_captions']} captions")
    click.echo(f"  i2t: K = {summary['i2t']['k']} ({src.get('i2t_dtype', '?')} -> int32)  from {i2t_file}")
    click.echo(f"  t2i: K = {summary['t2i']['k']} ({src.get('t2i_dtype', '?')} -> int32)  from {t2i_file}")
    if n_images is not None:
        click.echo(f"  checked against {n_images} training images")
    for key, p in paths.items():
        click.echo(f"  wrote {p}")
