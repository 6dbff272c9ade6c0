"""What validate-data and prepare-data check of a whole precomp folder.

`open_split` validates one split on its own; this adds what only the folder as a whole
shows, so that exit 0 from validate-data means every later stage can read the folder:
train and dev present (training selects on dev), one feature width across splits, the
scene graphs (embedded data) matching their split, precaps ids inside the vocab, and a
count of captions that tokenisation will truncate (pipeline.data.MAX_CAPTION_TOKENS).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.precomp import SPLITS, PrecompSplit, features_candidates, open_split, split_present
from pipeline.errors import InputError

REQUIRED_SPLITS = ("train", "dev")


@dataclass
class FolderCheck:
    data_dir: Path
    splits: dict[str, PrecompSplit]
    vocab_path: Path | None = None
    vocab: object | None = None
    vocab_problem: str | None = None          # why no vocab was found
    caption_stats: dict[str, dict[str, int]] = field(default_factory=dict)


def check_folder(data_dir: str | Path, splits=(), *, vocab_file=None,
                 check_finite: str = "auto") -> FolderCheck:
    """Open and cross-check the folder's splits (all present by default, and then train and
    dev are required; explicit `splits` are checked alone). InputError naming the file."""
    from pipeline.data.scene_graphs import graphs_path, load_graphs
    from pipeline.data.vocab import Vocab, find_vocab

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(data_dir, "data folder not found" if not data_dir.exists() else "not a folder")
    if not splits:
        splits = tuple(s for s in SPLITS if split_present(data_dir, s))
        if not splits:
            looked = ", ".join(p.name for s in SPLITS for p in features_candidates(data_dir, s))
            raise InputError(data_dir, f"no split found (looked for {looked})")
        for need in REQUIRED_SPLITS:
            if need not in splits:
                names = " or ".join(p.name for p in features_candidates(data_dir, need))
                raise InputError(data_dir, f"no {need} split ({names}): training needs train and dev")

    opened: dict[str, PrecompSplit] = {}
    for s in dict.fromkeys(splits):
        opened[s] = sp = open_split(data_dir, s, check_finite=check_finite)
        first = next(iter(opened.values()))
        if sp.feature_dim != first.feature_dim:
            raise InputError(sp.features_path, f"feature width {sp.feature_dim}, but {first.split}'s "
                                               f"({first.features_path.name}) is {first.feature_dim}: "
                                               "every split must have the same width")
        if graphs_path(data_dir, s).is_file():
            load_graphs(data_dir, s, n_images=sp.n_images)

    out = FolderCheck(data_dir, opened)
    try:
        out.vocab_path = find_vocab(data_dir, vocab_file)
    except InputError as e:
        if vocab_file is not None:
            raise
        out.vocab_problem = e.problem
        precaps = next((sp for sp in opened.values() if sp.precaps is not None), None)
        if precaps is not None:
            raise InputError(precaps.captions_path, "precaps hold word ids, but the folder has no "
                                                    f"vocab to read them with ({e.problem})") from None
    else:
        out.vocab = Vocab.load(out.vocab_path)
    # lengths need only the word tokenizer: a specials-only vocab counts them without one
    counter = out.vocab if out.vocab is not None else Vocab()
    out.caption_stats = {s: counter.caption_stats(sp) for s, sp in opened.items()}
    return out
