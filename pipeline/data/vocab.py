"""Word tokenizer and vocabulary in SCAN's JSON format.

nltk's punkt models cannot be downloaded here, so tokenisation is a regex that follows
the Penn-Treebank conventions nltk's `word_tokenize` applies to captions: lower-case,
punctuation split off, clitics ("n't", "'s", "'re", ...) split from their word,
"cannot" split, hyphenated words, ordinals and decimal numbers kept whole, letters of
any script.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.errors import InputError
from pipeline.io import read_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

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


def build_vocab(captions: Iterable[str], threshold: int = 4) -> Vocab:
    """Vocabulary of words seen at least `threshold` times, most frequent first (ties alphabetical)."""
    counts = Counter(t for c in captions for t in tokenize(c))
    words = sorted((w for w, n in counts.items() if n >= threshold and w not in SPECIALS),
                   key=lambda w: (-counts[w], w))
    return Vocab(words)
