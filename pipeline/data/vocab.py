"""Word tokenizer and vocabulary in SCAN's JSON format: the tokenizer of the GRU models.

`Vocab` implements the tokenizer interface of pipeline.data.tokens (encode, precaps,
augmentation, save/load inside a checkpoint folder); `find_vocab` locates a SCAN vocab
beside a data folder.

nltk's punkt models cannot be downloaded here, so tokenisation is a regex that follows
the Penn-Treebank conventions nltk's `word_tokenize` applies to captions: lower-case,
punctuation split off, clitics ("n't", "'s", "'re", ...) split from their word,
"cannot" split, hyphenated words, ordinals and decimal numbers kept whole, letters of
any script.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.data import MAX_CAPTION_TOKENS
from pipeline.errors import InputError
from pipeline.io import read_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
FIRST_WORD_ID = len(SPECIALS)  # ids 0..3 are <pad> <start> <end> <unk>
FILE = "vocab.json"            # its name inside a checkpoint folder (and a prepared data folder)

_TOKEN_RE = re.compile(
    r"""
    \w+(?=n't\b)                    # "do" of "don't", "ca" of "can't"
    | n't\b                         # the negation clitic
    | '(?:s|re|ve|ll|d|m)\b         # other clitics
    | \bcan(?=not\b)                # "cannot" -> "can" "not"
    | \d+(?:[.,:]\d+)+              # numbers with separators: 3.5  1,000  10:30
    | \w+(?:-\w+)*                  # words in any script, 12th, hyphenated (2-year-old)
    | \.\.\.                        # ellipsis
    | [^\s\w]                       # any other single symbol
    """,
    re.VERBOSE,
)


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens of a caption; double quotes become `` and '' as in nltk."""
    text = text.lower()
    tokens = []
    for m in _TOKEN_RE.finditer(text):
        tok = m.group()
        if tok == '"':
            before = text[m.start() - 1] if m.start() else " "
            tok = "``" if before.isspace() or before in "([{<" else "''"
        tokens.append(tok)
    return tokens


class Vocab:
    """Word <-> id map; ids 0..3 are <pad> <start> <end> <unk>."""

    def __init__(self, words: Iterable[str] = ()):
        self.word2idx: dict[str, int] = {}
        self.idx2word: dict[int, str] = {}
        for w in SPECIALS:
            self.add_word(w)
        for w in words:
            self.add_word(w)

    def add_word(self, word: str) -> int:
        if word not in self.word2idx:
            idx = len(self.word2idx)
            self.word2idx[word] = idx
            self.idx2word[idx] = word
        return self.word2idx[word]

    def __len__(self) -> int:
        return len(self.word2idx)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.word2idx[UNK])

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    def encode(self, caption: str) -> list[int]:
        """<start> + token ids + <end>."""
        return [self.word2idx[START], *(self(t) for t in tokenize(caption)), self.word2idx[END]]

    def decode(self, ids: Sequence[int]) -> str:
        words = [self.idx2word.get(int(i), UNK) for i in ids]
        return " ".join(w for w in words if w not in (PAD, START, END))

    # SCAN JSON: {"word2idx": {...}, "idx2word": {"0": "<pad>", ...}, "idx": N}
    def to_json(self) -> dict:
        return {
            "word2idx": self.word2idx,
            "idx2word": {str(i): w for i, w in self.idx2word.items()},
            "idx": len(self),
        }

    def save(self, path: str | Path) -> None:
        from pipeline.io import write_json

        write_json(path, self.to_json(), indent=None)

    @classmethod
    def from_json(cls, obj: dict, source: str | Path = "vocab") -> "Vocab":
        try:
            w2i = {str(w): int(i) for w, i in obj["word2idx"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InputError(source, "not a SCAN vocab JSON (needs a 'word2idx' mapping)") from None
        for i, w in enumerate(SPECIALS):
            if w2i.get(w) != i:
                raise InputError(source, f"vocab must map {w} to id {i}")
        if sorted(w2i.values()) != list(range(len(w2i))):
            raise InputError(source, "vocab ids are not contiguous from 0")
        v = cls.__new__(cls)
        v.word2idx = w2i
        v.idx2word = {i: w for w, i in w2i.items()}
        return v

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        path = Path(path)
        obj = read_json(path, missing="vocab file not found", unreadable="unreadable vocab JSON")
        return cls.from_json(obj, path)

    # --- the tokenizer interface (pipeline.data.tokens) -----------------------------
    kind = "scan_vocab"
    pad_id = 0
    max_length = MAX_CAPTION_TOKENS

    @property
    def size(self) -> int:
        return len(self)

    def model_config(self) -> dict[str, Any]:
        """What a model's config records of its tokenizer (it sizes the word embedding)."""
        return {"vocab_size": len(self)}

    def fingerprint(self) -> str:
        """Identifies the id assignment (the token-id cache is keyed by it)."""
        blob = json.dumps(sorted(self.word2idx.items(), key=lambda kv: kv[1]))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def from_precaps(self, ids: Sequence[int]) -> list[int]:
        """Word ids of a precaps line with <start>/<end> added where missing (BFAN's files
        may already carry them)."""
        ids = list(ids)
        start, end = self.word2idx[START], self.word2idx[END]
        if not ids or ids[0] != start:
            ids.insert(0, start)
        if len(ids) < 2 or ids[-1] != end:
            ids.append(end)
        return ids

    def check_precaps(self, precaps: Sequence[Sequence[int]], source) -> None:
        bad = next((k for k, ids in enumerate(precaps) if ids and max(ids) >= len(self)), None)
        if bad is not None:
            raise InputError(source, f"line {bad + 1} has word id {max(precaps[bad])}, "
                                     f"but the vocab has {len(self)} words")

    def caption_stats(self, split) -> dict[str, int]:
        """validate-data's summary of a split's captions under this vocab: <unk> and word
        tokens, captions over `max_length` ids (markers included) and the longest."""
        if split.captions is not None:
            words = [tokenize(c) for c in split.captions]
            unk = sum(1 for ws in words for t in ws if t not in self.word2idx)
            lengths = [len(ws) + 2 for ws in words]
        else:
            self.check_precaps(split.precaps, split.captions_path)
            unk_id = self.word2idx[UNK]
            words = split.precaps
            unk = sum(1 for ids in words for i in ids if i == unk_id)
            lengths = [len(self.from_precaps(ids)) for ids in words]
        return {"unk": unk, "tokens": sum(len(ws) for ws in words),
                "too_long": sum(1 for n in lengths if n > self.max_length),
                "longest": max(lengths, default=0)}

    def augment(self, tokens: Sequence[int], rng: np.random.Generator, p: float) -> list[int]:
        """VSE∞ caption augmentation (see augment_tokens)."""
        return augment_tokens(tokens, rng, p, len(self), unk=self.word2idx[UNK])

    def save_to(self, folder: str | Path) -> None:
        self.save(Path(folder) / FILE)

    @classmethod
    def load_from(cls, folder: str | Path) -> "Vocab | None":
        """The vocab saved in a checkpoint folder, None when it has none."""
        path = Path(folder) / FILE
        return cls.load(path) if path.exists() else None

    @classmethod
    def for_training(cls, options: dict[str, Any], data_dir, source=None) -> "Vocab":
        """The vocab a new model trains with: `source` (an explicit file) or the data's."""
        return cls.load(find_vocab(data_dir, source))


def build_vocab(captions: Iterable[str], threshold: int = 4) -> Vocab:
    """Vocabulary of words seen at least `threshold` times, most frequent first (ties alphabetical)."""
    counts = Counter(t for c in captions for t in tokenize(c))
    words = sorted((w for w, n in counts.items() if n >= threshold and w not in SPECIALS),
                   key=lambda w: (-counts[w], w))
    return Vocab(words)


def augment_tokens(tokens: Sequence[int], rng: np.random.Generator, p: float, vocab_size: int,
                   *, unk: int = 3, first_word: int = FIRST_WORD_ID) -> list[int]:
    """VSE∞ caption augmentation: each word (not the first/last token, <start>/<end>) is,
    with probability p, replaced by `unk` (50%), by a random word id in
    [first_word, vocab_size) (10%), or deleted (40%)."""
    FIRST_WORD_ID = first_word
    tokens = list(tokens)
    if len(tokens) <= 2:
        return tokens
    words = tokens[1:-1]
    n = len(words)
    hit = rng.random(n) < p
    kind = rng.random(n)
    rand_ids = rng.integers(FIRST_WORD_ID, max(FIRST_WORD_ID + 1, vocab_size), size=n)
    out = [tokens[0]]
    for w, h, k, r in zip(words, hit, kind, rand_ids):
        if not h:
            out.append(w)
        elif k < 0.5:
            out.append(unk)
        elif k < 0.6 and vocab_size > FIRST_WORD_ID:
            out.append(int(r))
        elif k < 0.6:
            out.append(unk)  # no ordinary words to draw from
        # else: deleted
    out.append(tokens[-1])
    return out


def find_vocab(data_dir: str | Path, vocab_path: str | Path | None = None) -> Path:
    """Explicit path; else data_dir/vocab.json; else {name}_vocab.json or a single *_vocab.json
    in data_dir or data_dir/../vocab (SCAN keeps vocab/coco_precomp_vocab.json beside data/)."""
    if vocab_path is not None:
        p = Path(vocab_path)
        if not p.is_file():
            raise InputError(p, "vocab file not found")
        return p
    data_dir = Path(data_dir)
    name = data_dir.resolve().name if data_dir.exists() else data_dir.name
    folders = [data_dir, data_dir / ".." / "vocab"]
    exact = [data_dir / "vocab.json"] + [d / f"{name}_vocab.json" for d in folders]
    for p in exact:
        if p.is_file():
            return p
    looked = [str(p) for p in exact]
    for d in folders:
        found = sorted(d.glob("*_vocab.json")) if d.is_dir() else []
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InputError(d, "several vocab files (" + ", ".join(p.name for p in found)
                                + "): pass the one to use explicitly")
        looked.append(str(d / "*_vocab.json"))
    raise InputError(data_dir, "no vocab found (looked for " + ", ".join(looked) + ")")
