"""Caption tokenisation: the tokenizer interface, token ids cached per split and tokenizer,
and the transformers tokenizer of BERT-family text encoders.

A model owns its tokenizer (`model.tokenizer`, built from the model's config by the
registry, saved inside its checkpoint folder). A tokenizer offers:

    kind, pad_id, size                 what it is, the padding id, the number of ids
    max_length                         ids per caption it lets through (markers included)
    encode(caption) -> ids             a raw caption, with its start/end markers
    from_precaps(ids) -> ids           a precaps line (SCAN word ids); check_precaps(lines, src)
    augment(ids, rng, p) -> ids        training-time token augmentation (draws from rng)
    fingerprint() -> str               identifies the id assignment (the cache key)
    model_config() -> dict             what the model's config records of it
    save_to(folder) / load_from(folder) (classmethod, None when absent)
    for_training(options, data_dir, source) (classmethod) the tokenizer of a new model

Two implement it: pipeline.data.vocab.Vocab (SCAN vocab; GRU text encoders) and
`HFTokenizer` below (a local transformers folder). Datasets never see a vocab: they ask
`caption_tokens(split, tokenizer)` for the ids of caption j.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import sys

import numpy as np

from pipeline.data import MAX_CAPTION_TOKENS
from pipeline.errors import InputError

HF_FOLDER = "tokenizer"   # an HFTokenizer's folder inside a checkpoint folder


class CaptionTokens:
    """Token ids of every caption of a split under one tokenizer, encoded once.

    Stored flat (int32 ids + offsets), so a COCO-sized split costs a few tens of MB and
    DataLoader workers share it after fork. A caption longer than the tokenizer's
    `max_length` keeps its first max_length - 1 ids and its end marker (`truncated`
    counts them; one warning per split)."""

    def __init__(self, split, tokenizer):
        if split.captions is None:
            if split.precaps is None:
                raise InputError(split.captions_path, "split has no captions")
            tokenizer.check_precaps(split.precaps, split.captions_path)
            rows = (tokenizer.from_precaps(ids) for ids in split.precaps)
        else:
            rows = (tokenizer.encode(c) for c in split.captions)
        limit = max_length(tokenizer)
        lengths, flat = [], []
        self.truncated = longest = 0
        for ids in rows:
            if len(ids) > limit:
                self.truncated += 1
                longest = max(longest, len(ids))
                ids = ids[:limit - 1] + ids[-1:]
            lengths.append(len(ids))
            flat.extend(ids)
        if self.truncated:
            print(f"warning: {split.captions_path}: {self.truncated} caption(s) longer than {limit} "
                  f"tokens truncated (longest {longest})", file=sys.stderr)
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.ids = np.asarray(flat, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __call__(self, j: int) -> list[int]:
        return self.ids[self.offsets[j]:self.offsets[j + 1]].tolist()


def max_length(tokenizer) -> int:
    return int(getattr(tokenizer, "max_length", MAX_CAPTION_TOKENS))


def caption_tokens(split, tokenizer) -> CaptionTokens:
    """The split's CaptionTokens for `tokenizer`, cached on the split object (one
    tokenisation per split and tokenizer fingerprint, whatever the number of datasets)."""
    cache = split.__dict__.setdefault("_token_cache", {})
    key = (tokenizer.kind, tokenizer.fingerprint())
    if key not in cache:
        cache[key] = CaptionTokens(split, tokenizer)
    return cache[key]


class HFTokenizer:
    """A transformers tokenizer read from a local folder (never from a hub)."""

    kind = "hf"

    def __init__(self, tokenizer, source=None):
        self.tok = tokenizer
        self.source = source
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self.mask_id = tokenizer.mask_token_id
        self.size = len(tokenizer)
        # the encoder's position limit (tokenizers without one report a huge sentinel)
        limit = tokenizer.model_max_length
        self.max_length = int(limit) if limit < 100_000 else 512

    @classmethod
    def load_folder(cls, folder) -> "HFTokenizer":
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(folder, "tokenizer folder not found")
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(folder, f"not a usable tokenizer folder ({str(e).splitlines()[0]})") from None
        return cls(tok, folder)

    def model_config(self) -> dict[str, Any]:
        return {"vocab_size": self.size}

    def fingerprint(self) -> str:
        blob = json.dumps([type(self.tok).__name__, sorted(self.tok.get_vocab().items(), key=lambda kv: kv[1]),
                           self.tok.init_kwargs.get("do_lower_case")], default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def encode(self, caption: str) -> list[int]:
        # untruncated (CaptionTokens truncates and counts); verbose=False: no length warning
        return list(self.tok(caption, verbose=False)["input_ids"])

    def from_precaps(self, ids: Sequence[int]) -> list[int]:
        raise InputError(None, "precaps hold SCAN vocab ids: a transformers tokenizer needs raw captions")

    def check_precaps(self, precaps, source) -> None:
        raise InputError(source, "precaps hold SCAN vocab ids: a transformers tokenizer needs "
                                 "raw captions ({split}_caps.txt)")

    def augment(self, tokens: Sequence[int], rng: np.random.Generator, p: float) -> list[int]:
        """BERT-style: each inner token is, with probability p, masked (50%), replaced by a
        random id (10%) or deleted (40%)."""
        from pipeline.data.vocab import augment_tokens

        mask = self.mask_id if self.mask_id is not None else self.tok.unk_token_id
        return augment_tokens(tokens, rng, p, self.size, unk=int(mask), first_word=0)

    def save_to(self, folder) -> None:
        self.tok.save_pretrained(str(Path(folder) / HF_FOLDER))

    @classmethod
    def load_from(cls, folder) -> "HFTokenizer | None":
        path = Path(folder) / HF_FOLDER
        return cls.load_folder(path) if path.is_dir() else None

    @classmethod
    def for_training(cls, options: dict[str, Any], data_dir, source=None) -> "HFTokenizer":
        folder = source or options.get("text_encoder")
        if not folder:
            raise InputError(None, "this model reads a transformers tokenizer: give its folder "
                                   "(model option text_encoder)")
        return cls.load_folder(folder)
