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
from pipeline.data.tokens import caption_tokens
from pipeline.errors import InputError

class PairDataset(Dataset):
    """One item per caption: its image's regions and its token ids under `tokenizer` (the
    model's; pipeline.data.tokens), with the tokenizer's augmentation when training."""

    def __init__(self, split: PrecompSplit, tokenizer, *, train: bool = False, region_drop: float = 0.0,
                 token_aug: float = 0.0, seed: int = 0):
        if not 0.0 <= region_drop < 1.0:
            raise InputError("region_drop", f"must be in [0, 1), got {region_drop}")
        if not 0.0 <= token_aug <= 1.0:
            raise InputError("token_aug", f"must be in [0, 1], got {token_aug}")
        self.split = split
        self.tokenizer = tokenizer
        self.tokens = caption_tokens(split, tokenizer)
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
            tokens = self.tokenizer.augment(tokens, rng, self.token_aug)
        return torch.tensor(tokens, dtype=torch.long)


def drop_regions(image: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """Keep regions whose uniform draw exceeds p (VSE∞); at least one region survives."""
    draws = rng.random(image.shape[0])
    keep = draws > p
    if not keep.any():
        keep[int(np.argmax(draws))] = True
    return np.ascontiguousarray(image[keep])


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

    def __init__(self, split: PrecompSplit, tokenizer):
        self.split = split
        self.tokenizer = tokenizer
        self.tokens = caption_tokens(split, tokenizer)

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
