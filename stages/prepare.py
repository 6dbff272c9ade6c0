"""DVC stage `prepare`: the data folder every later stage reads.

- dataset: synthetic -> generate the embedded default dataset (SCAN precomp layout).
- dataset: precomp   -> validate a real SCAN precomp folder and expose it under the output
  folder as symlinks (no 31 GiB copy), with a vocab (the folder's own, or built from
  train+dev captions).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from pipeline.errors import InputError, refuse_unknown
from pipeline.io import atomic_dir

SECTION = "prepare"
SPLITS = ("train", "dev", "test", "testall")


def run(params: dict, out_dir: str | Path, progress: bool = True) -> dict:
    dataset = params.get("dataset", "synthetic")
    if dataset == "synthetic":
        return prepare_synthetic(params, out_dir, progress)
    if dataset == "precomp":
        if not params.get("source"):
            raise InputError("params", "prepare.source must name a SCAN precomp folder when dataset is precomp")
        return prepare_precomp(params["source"], out_dir)
    raise InputError("params", f"prepare.dataset must be synthetic or precomp, got {dataset!r}")


def prepare_synthetic(params: dict, out_dir, progress: bool = True) -> dict:
    from pipeline.data.synthetic import SyntheticConfig, generate

    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    knobs = {k: v for k, v in params.items() if k not in ("dataset", "source")}
    refuse_unknown(knobs, fields, "params", "synthetic dataset option(s)")
    return generate(out_dir, SyntheticConfig(**knobs), progress=progress)


def prepare_precomp(source, out_dir) -> dict:
    from pipeline.data.folder_check import check_folder
    from pipeline.data.vocab import build_vocab
    from pipeline.io import write_json

    source = Path(source).resolve()
    if not source.is_dir():
        raise InputError(source, "SCAN precomp folder not found")
    folder = check_folder(source, check_finite="sample")    # what validate-data checks
    found = folder.splits
    with atomic_dir(out_dir, "prepare-data", inputs=[source]) as tmp:
        for split, sp in found.items():
            for name in (f"{split}_ims.npy", f"{split}.h5", f"{split}_caps.txt",
                         f"{split}_precaps.txt", f"{split}_ids.txt"):
                if (source / name).exists():
                    os.symlink(source / name, tmp / name)
        if folder.vocab_path is not None:
            os.symlink(folder.vocab_path.resolve(), tmp / "vocab.json")
            vocab_size = None
        else:   # raw captions only (check_folder refuses precaps without their vocab)
            caps = (found["train"].captions or []) + (found["dev"].captions or [])
            vocab = build_vocab(caps, threshold=4)
            vocab.save(tmp / "vocab.json")
            vocab_size = len(vocab)
        summary = {"dataset": "precomp", "source": str(source),
                   "splits": {s: {"images": sp.n_images, "captions": sp.n_captions,
                                  "regions": sp.n_regions, "feature_dim": sp.feature_dim}
                              for s, sp in found.items()},
                   "vocab_built": vocab_size,
                   "captions_truncated": {s: st["too_long"] for s, st in folder.caption_stats.items()}}
        write_json(tmp / "dataset.json", summary)
    return summary
