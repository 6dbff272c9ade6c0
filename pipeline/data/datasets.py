"""torch Datasets and collate functions over a `PrecompSplit`.

Randomness (region drop, caption augmentation) comes only from a per-item generator
`np.random.default_rng([seed, epoch, j])`, so an item is the same whatever the number of
DataLoader workers or the point a run resumed from.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data import CAPS_PER_IMAGE
from pipeline.data.precomp import PrecompSplit
from pipeline.data.vocab import END, PAD, START, UNK
from pipeline.errors import InputError

FIRST_WORD_ID = 4  # ids 0..3 are <pad> <start> <end> <unk>


def _special_ids(vocab) -> tuple[int, int, int, int]:
    w2i = getattr(vocab, "word2idx", None) or {}
    return (w2i.get(PAD, 0), w2i.get(START, 1), w2i.get(END, 2), w2i.get(UNK, 3))


class _CaptionTokens:
    """Token ids of caption j: vocab.encode(text), or <start> + precaps ids + <end>."""

    def __init__(self, split: PrecompSplit, vocab):
        self.split = split
        self.vocab = vocab
        _, self.start, self.end, self.unk = _special_ids(vocab)
        if split.captions is None:
            if split.precaps is None:
                raise InputError(split.captions_path, "split has no captions")
            top = max(max(ids) for ids in split.precaps)
            if vocab is not None and top >= len(vocab):
                bad = next(k for k, ids in enumerate(split.precaps) if max(ids) >= len(vocab))
                raise InputError(split.captions_path,
                                 f"line {bad + 1} has word id {max(split.precaps[bad])}, "
                                 f"but the vocab has {len(vocab)} words")
        elif vocab is None:
            raise InputError(split.captions_path, "raw captions need a vocab")

    def __call__(self, j: int) -> list[int]:
        if self.split.captions is not None:
            return list(self.vocab.encode(self.split.captions[j]))
        ids = list(self.split.precaps[j])
        # BFAN's files may already carry <start>/<end>: add them only where missing
        if not ids or ids[0] != self.start:
            ids.insert(0, self.start)
        if len(ids) < 2 or ids[-1] != self.end:
            ids.append(self.end)
        return ids


class PairDataset(Dataset):
    """One item per caption: its image's regions and its token ids (training)."""

    def __init__(self, split: PrecompSplit, vocab, *, train: bool = False, region_drop: float = 0.0,
                 token_aug: float = 0.0, seed: int = 0):
        if not 0.0 <= region_drop < 1.0:
            raise InputError("region_drop", f"must be in [0, 1), got {region_drop}")
        if not 0.0 <= token_aug <= 1.0:
            raise InputError("token_aug", f"must be in [0, 1], got {token_aug}")
        self.split = split
        self.vocab = vocab
        self.tokens = _CaptionTokens(split, vocab)
        self.train = bool(train)
        self.region_drop = float(region_drop)
        self.token_aug = float(token_aug)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.split.n_captions

    def rng(self, j: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(j)])

    def __getitem__(self, j: int) -> dict:
        j = int(j)
        if not 0 <= j < len(self):
            raise IndexError(f"caption index {j} out of range [0, {len(self)})")
        rng = self.rng(j) if self.augments else None
        img_index = j // CAPS_PER_IMAGE
        return {
            "image": self.image(img_index, rng),
            "tokens": self.caption(j, rng),
            "index": j,
            "img_index": img_index,
        }

    @property
    def augments(self) -> bool:
        return self.train and (self.region_drop > 0 or self.token_aug > 0)

    def image(self, i: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Regions of image i, with region drop when training (draws from rng)."""
        image = self.split.image_features(int(i))
        if rng is not None and self.train and self.region_drop > 0:
            image = drop_regions(image, rng, self.region_drop)
        return torch.from_numpy(image)

    def caption(self, j: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Token ids of caption j, with token augmentation when training (draws from rng)."""
        tokens = self.tokens(int(j))
        if rng is not None and self.train and self.token_aug > 0:
            tokens = augment_tokens(tokens, rng, self.token_aug, len(self.vocab), unk=self.tokens.unk)
        return torch.tensor(tokens, dtype=torch.long)


def drop_regions(image: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """Keep regions whose uniform draw exceeds p (VSE∞); at least one region survives."""
    draws = rng.random(image.shape[0])
    keep = draws > p
    if not keep.any():
        keep[int(np.argmax(draws))] = True
    return np.ascontiguousarray(image[keep])


def augment_tokens(tokens: Sequence[int], rng: np.random.Generator, p: float, vocab_size: int,
                   *, unk: int = 3) -> list[int]:
    """VSE∞ caption augmentation: each word (not the first/last token, <start>/<end>) is,
    with probability p, replaced by <unk> (50%), by a random word id in [4, vocab_size) (10%),
    or deleted (40%)."""
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


def _pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([im.shape[0] for im in images], dtype=torch.long)
    rmax = int(lengths.max()) if len(images) else 0
    dim = images[0].shape[1] if len(images) else 0
    out = torch.zeros(len(images), rmax, dim, dtype=torch.float32)
    for b, im in enumerate(images):
        out[b, : im.shape[0]] = im
    return out, lengths


def _pad_tokens(tokens: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(t) for t in tokens], dtype=torch.long)
    lmax = int(lengths.max()) if len(tokens) else 0
    out = torch.zeros(len(tokens), lmax, dtype=torch.long)
    for b, t in enumerate(tokens):
        out[b, : len(t)] = t
    return out, lengths


def _by_length_desc(items: list[dict]) -> list[dict]:
    return sorted(items, key=lambda it: len(it["tokens"]), reverse=True)  # stable


def collate_pairs(items: list[dict]) -> dict:
    """Batch of PairDataset items, sorted by caption length descending (GRU packing)."""
    items = _by_length_desc(items)
    images, img_lengths = _pad_images([it["image"] for it in items])
    tokens, lengths = _pad_tokens([it["tokens"] for it in items])
    return {
        "images": images,
        "img_lengths": img_lengths,
        "tokens": tokens,
        "lengths": lengths,
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
        "img_index": torch.tensor([int(it["img_index"]) for it in items], dtype=torch.long),
    }


class ImageDataset(Dataset):
    """Unique images of a split (evaluation; no augmentation)."""

    def __init__(self, split: PrecompSplit):
        self.split = split

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"image index {i} out of range [0, {len(self)})")
        return {"image": torch.from_numpy(self.split.image_features(i)), "img_index": i}


def collate_images(items: list[dict]) -> dict:
    images, img_lengths = _pad_images([it["image"] for it in items])
    return {
        "images": images,
        "img_lengths": img_lengths,
        "img_index": torch.tensor([int(it["img_index"]) for it in items], dtype=torch.long),
    }


class CaptionDataset(Dataset):
    """Captions of a split (evaluation; no augmentation)."""

    def __init__(self, split: PrecompSplit, vocab):
        self.split = split
        self.vocab = vocab
        self.tokens = _CaptionTokens(split, vocab)

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, j: int) -> dict:
        j = int(j)
        if not 0 <= j < len(self):
            raise IndexError(f"caption index {j} out of range [0, {len(self)})")
        return {"tokens": torch.tensor(self.tokens(j), dtype=torch.long), "index": j}


def collate_captions(items: list[dict]) -> dict:
    """Sorted by length descending; `index` says which caption each row is."""
    items = _by_length_desc(items)
    tokens, lengths = _pad_tokens([it["tokens"] for it in items])
    return {
        "tokens": tokens,
        "lengths": lengths,
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
    }
