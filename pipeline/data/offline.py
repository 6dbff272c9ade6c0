"""Offline hard negatives for AOQ fine-tuning (SPEC §4).

On every fetch of training caption j (image i = j // 5) one rank n is drawn uniformly from
[0, offcandisize) and gives four extra items:

    t~ = i2t[i][n]        offline negative caption of the anchor image
    i~ = t2i[j][n // 5]   offline negative image of the anchor caption (rank coupled to n)
    i' = t~ // 5          the ground-truth image of t~
    t' = 5 i~ + m         a ground-truth caption of i~, m uniform in [0, 5)

so a step sees the pairs (i, t), (i~, t~) and (i', t'). Draws come from a generator seeded
with (seed, epoch, j), like the anchor's augmentation, so a resumed run sees the same
negatives. When i~ == t~ // 5 both offline pairs are true pairs (`accidental`); the loss
masks them unless asked for reference parity.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data import CAPS_PER_IMAGE
from pipeline.data.datasets import PairDataset, _pad_images, _pad_tokens
from pipeline.errors import InputError

_OFFLINE_STREAM = 0x0FF  # separates the offline draws from the anchor's augmentation draws


def default_offcandisize(n_captions: int) -> int:
    """The reference's 300 ranks of COCO's 566,435 captions, scaled to the gallery (SPEC §9),
    floor 10."""
    return max(10, min(300, round(300 * n_captions / 566_435)))


def check_offcandisize(offcandisize: int, k_i2t: int, k_t2i: int, source) -> None:
    if offcandisize < 1:
        raise InputError(source, f"offcandisize must be >= 1, got {offcandisize}")
    if offcandisize > k_i2t:
        raise InputError(source, f"offcandisize {offcandisize} exceeds the i2t candidates per "
                                 f"image ({k_i2t})")
    need = (offcandisize - 1) // CAPS_PER_IMAGE + 1
    if need > k_t2i:
        raise InputError(source, f"offcandisize {offcandisize} needs {need} t2i candidates per "
                                 f"caption, the file has {k_t2i}")


class OfflineNegativeDataset(Dataset):
    """Wraps a training `PairDataset`: each item also carries (i~, t~) and (i', t').

    i2t (N_img, K_i2t) and t2i (5 N_img, K_t2i) are candidate id arrays (memory-mapped is
    fine) already validated against the split."""

    def __init__(self, pairs: PairDataset, i2t: np.ndarray, t2i: np.ndarray, offcandisize: int,
                 *, source="candidates"):
        n_img, n_cap = pairs.split.n_images, pairs.split.n_captions
        if i2t.shape[0] != n_img or t2i.shape[0] != n_cap:
            raise InputError(source, f"candidates have {i2t.shape[0]} images / {t2i.shape[0]} "
                                     f"captions, the training split {n_img} / {n_cap}")
        check_offcandisize(offcandisize, i2t.shape[1], t2i.shape[1], source)
        self.pairs = pairs
        self.i2t = i2t
        self.t2i = t2i
        self.offcandisize = int(offcandisize)

    def set_epoch(self, epoch: int) -> None:
        self.pairs.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def draw(self, j: int) -> tuple[int, int, int, int, int]:
        """(n, t~, i~, i', t') for caption j at the current epoch."""
        p = self.pairs
        rng = np.random.default_rng([p.seed, p.epoch, int(j), _OFFLINE_STREAM])
        n = int(rng.integers(self.offcandisize))
        t_neg = int(self.i2t[j // CAPS_PER_IMAGE, n])
        i_neg = int(self.t2i[j, n // CAPS_PER_IMAGE])
        t_prime = i_neg * CAPS_PER_IMAGE + int(rng.integers(CAPS_PER_IMAGE))
        return n, t_neg, i_neg, t_neg // CAPS_PER_IMAGE, t_prime

    def __getitem__(self, j: int) -> dict:
        j = int(j)
        item = self.pairs[j]
        n, t_neg, i_neg, i_prime, t_prime = self.draw(j)
        p = self.pairs
        # the offline items get their own augmentation draws (independent of the anchor's)
        rng = np.random.default_rng([p.seed, p.epoch, j, _OFFLINE_STREAM + 1]) if p.augments else None
        item["offline"] = {
            "rank": n, "t_neg": t_neg, "i_neg": i_neg, "i_prime": i_prime, "t_prime": t_prime,
            "image_neg": p.image(i_neg, rng), "tokens_neg": p.caption(t_neg, rng),
            "image_prime": p.image(i_prime, rng), "tokens_prime": p.caption(t_prime, rng),
        }
        return item


def collate_offline(items: list[dict]) -> dict:
    """3B stacked pairs for one forward pass: rows [0, B) the anchors (i, t), [B, 2B) the
    offline negatives (i~, t~), [2B, 3B) their partners (i', t'). Slots are sorted by the
    anchor caption's length (descending), the offline rows follow their anchor's slot.
    `img_index`/`index` hold the image/caption ids of every row; `accidental` (B,) marks
    slots where i~ == t~ // 5 (both offline pairs are then true pairs)."""
    items = sorted(items, key=lambda it: len(it["tokens"]), reverse=True)
    off = [it["offline"] for it in items]
    images = ([it["image"] for it in items] + [o["image_neg"] for o in off]
              + [o["image_prime"] for o in off])
    tokens = ([it["tokens"] for it in items] + [o["tokens_neg"] for o in off]
              + [o["tokens_prime"] for o in off])
    img_index = ([int(it["img_index"]) for it in items] + [o["i_neg"] for o in off]
                 + [o["i_prime"] for o in off])
    cap_index = ([int(it["index"]) for it in items] + [o["t_neg"] for o in off]
                 + [o["t_prime"] for o in off])
    padded_images, img_lengths = _pad_images(images)
    padded_tokens, lengths = _pad_tokens(tokens)
    return {
        "images": padded_images,
        "img_lengths": img_lengths,
        "tokens": padded_tokens,
        "lengths": lengths,
        "index": torch.tensor(cap_index, dtype=torch.long),
        "img_index": torch.tensor(img_index, dtype=torch.long),
        "n_anchor": len(items),
        "rank": torch.tensor([o["rank"] for o in off], dtype=torch.long),
        "accidental": torch.tensor([o["i_neg"] == o["t_neg"] // CAPS_PER_IMAGE for o in off]),
    }


def split_segments(batch: dict, n_parts: int = 3) -> list[dict]:
    """The stacked batch as `n_parts` separate B-sized batches (the reference's passes),
    each trimmed to its own padding."""
    b = batch["n_anchor"]
    parts = []
    for k in range(n_parts):
        sl = slice(k * b, (k + 1) * b)
        img_lengths, lengths = batch["img_lengths"][sl], batch["lengths"][sl]
        parts.append({
            "images": batch["images"][sl, : int(img_lengths.max())],
            "img_lengths": img_lengths,
            "tokens": batch["tokens"][sl, : int(lengths.max())],
            "lengths": lengths,
            "index": batch["index"][sl],
            "img_index": batch["img_index"][sl],
        })
    return parts
