"""Read the synthetic dataset's scene graphs (``{split}_graphs.jsonl``) back.

One JSON object per image, in row order (see docs/synthetic.md). Tools use them to tell
siblings (same family, one edit) from false negatives (a caption whose facts all hold for
another image): caption ``c`` truly describes image ``i`` iff
``set(caption_facts[c]) <= set(facts[i])``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.data import CAPS_PER_IMAGE
from pipeline.errors import InputError

REQUIRED_KEYS = ("image", "family", "edit", "facts", "caption_facts")


def graphs_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}_graphs.jsonl"


def load_graphs(data_dir: str | Path, split: str, n_images: int | None = None) -> list[dict]:
    """The split's scene graphs, one dict per image in row order (validated; `n_images`:
    the split's image count they must match)."""
    path = graphs_path(data_dir, split)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise InputError(path, "scene graph file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"unreadable scene graph file ({e.__class__.__name__})") from None
    graphs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(path, f"line {n}: empty line")
        try:
            g = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(path, f"line {n}: not valid JSON") from None
        if not isinstance(g, dict):
            raise InputError(path, f"line {n}: not a JSON object")
        missing = [k for k in REQUIRED_KEYS if k not in g]
        if missing:
            raise InputError(path, f"line {n}: missing key(s) {missing}")
        if g["image"] != n - 1:
            raise InputError(path, f"line {n}: image index {g['image']!r}, expected {n - 1} (rows must be in order)")
        if not isinstance(g["family"], int) or isinstance(g["family"], bool):
            raise InputError(path, f"line {n}: family must be an integer")
        cf = g["caption_facts"]
        if not isinstance(cf, list) or len(cf) != CAPS_PER_IMAGE or not all(isinstance(c, list) for c in cf):
            raise InputError(path, f"line {n}: caption_facts must be {CAPS_PER_IMAGE} lists of facts")
        if not isinstance(g["facts"], list):
            raise InputError(path, f"line {n}: facts must be a list")
        graphs.append(g)
    if not graphs:
        raise InputError(path, "scene graph file is empty")
    if n_images is not None and len(graphs) != n_images:
        raise InputError(path, f"{len(graphs)} scene graphs for {n_images} images of split {split!r}")
    return graphs


def family_ids(graphs: Sequence[dict]) -> np.ndarray:
    """(N_img,) int64 family id of each image."""
    return np.array([g["family"] for g in graphs], dtype=np.int64)


def edit_types(graphs: Sequence[dict]) -> list[str]:
    """The edit of each image: "base" or the edit that made it from its family's base."""
    return [g["edit"] for g in graphs]


def sibling_pairs(graphs: Sequence[dict]) -> list[tuple[int, int, str]]:
    """(base image, edited image, edit type) for every non-base image whose family has a base."""
    base = {}
    for g in graphs:
        if g["edit"] == "base":
            base[g["family"]] = g["image"]
    return [(base[g["family"]], g["image"], g["edit"])
            for g in graphs if g["edit"] != "base" and g["family"] in base]


def describes(caption_facts: Iterable[str], image_facts: Iterable[str]) -> bool:
    """True iff every fact the caption states holds for the image."""
    img = image_facts if isinstance(image_facts, (set, frozenset)) else set(image_facts)
    return all(f in img for f in caption_facts)


def caption_describes_image(graphs: Sequence[dict], caption_idx: int, image_idx: int) -> bool:
    """Does caption `caption_idx` (of image caption_idx // 5) truly describe image `image_idx`?"""
    cap = graphs[caption_idx // CAPS_PER_IMAGE]["caption_facts"][caption_idx % CAPS_PER_IMAGE]
    return describes(cap, graphs[image_idx]["facts"])


def image_fact_sets(graphs: Sequence[dict]) -> list[frozenset]:
    """Facts of each image as frozensets (for fast repeated `describes` checks)."""
    return [frozenset(g["facts"]) for g in graphs]


def caption_fact_sets(graphs: Sequence[dict]) -> list[frozenset]:
    """Facts stated by each caption, in caption order (N_img * 5)."""
    return [frozenset(cf) for g in graphs for cf in g["caption_facts"]]


def false_negative_mask(graphs: Sequence[dict], image_idx: int, caption_idx: Sequence[int]) -> np.ndarray:
    """Bool mask over `caption_idx`: captions of OTHER images that truly describe `image_idx`."""
    facts = set(graphs[image_idx]["facts"])
    return np.array([c // CAPS_PER_IMAGE != image_idx and _caption_holds(graphs, c, facts)
                     for c in caption_idx], dtype=bool)


def _caption_holds(graphs: Sequence[dict], caption_idx: int, facts: set) -> bool:
    return describes(graphs[caption_idx // CAPS_PER_IMAGE]["caption_facts"][caption_idx % CAPS_PER_IMAGE], facts)


class FactIndex:
    """Scene-graph facts, indexed for vectorised "caption c truly describes image i" checks.

    Images hold their facts as bitsets; captions as fact-id lists sorted rarest first, so a
    check of a random pair usually fails on the first fact and is dropped from the work.
    """

    def __init__(self, graphs: Sequence[dict]):
        fact_id: dict[str, int] = {}
        img_sets = [[fact_id.setdefault(f, len(fact_id)) for f in g["facts"]] for g in graphs]
        cap_sets = [[fact_id.setdefault(f, len(fact_id)) for f in cf]
                    for g in graphs for cf in g["caption_facts"]]
        words = max(1, (len(fact_id) + 63) // 64)
        self.n_images = len(graphs)
        self.n_captions = len(cap_sets)
        self.img_bits = np.zeros((len(img_sets), words), dtype=np.uint64)
        for r, s in enumerate(img_sets):
            for f in s:
                self.img_bits[r, f >> 6] |= np.uint64(1) << np.uint64(f & 63)
        freq = np.zeros(max(1, len(fact_id)), dtype=np.int64)
        for s in img_sets:
            freq[s] += 1
        width = max((len(s) for s in cap_sets), default=0)
        self.cap_facts = np.full((len(cap_sets), max(1, width)), -1, dtype=np.int64)  # -1: padding
        for r, s in enumerate(cap_sets):
            s = sorted(set(s), key=lambda f: (freq[f], f))
            self.cap_facts[r, :len(s)] = s
        self.family = np.array([g["family"] for g in graphs], dtype=np.int64)

    def describes(self, caption_ids, image_ids, chunk: int = 1 << 20) -> np.ndarray:
        """Bool array: caption ``caption_ids[n]`` truly describes image ``image_ids[n]``
        (its facts are a subset of the image's). Broadcasts the two id arrays."""
        c, i = np.broadcast_arrays(np.asarray(caption_ids, dtype=np.int64),
                                   np.asarray(image_ids, dtype=np.int64))
        shape = c.shape
        c, i = c.reshape(-1), i.reshape(-1)
        if c.size and (c.min() < 0 or c.max() >= self.n_captions
                       or i.min() < 0 or i.max() >= self.n_images):
            raise InputError(None, f"candidate ids out of range for the scene graphs "
                                   f"({self.n_images} images, {self.n_captions} captions)")
        out = np.zeros(c.shape, dtype=bool)
        for s in range(0, c.size, chunk):
            alive = np.arange(s, min(c.size, s + chunk))
            for slot in range(self.cap_facts.shape[1]):
                if alive.size == 0:
                    break
                f = self.cap_facts[c[alive], slot]
                fz = np.maximum(f, 0)
                bit = (self.img_bits[i[alive], fz >> 6] >> (fz & 63).astype(np.uint64)) & np.uint64(1)
                alive = alive[(f < 0) | (bit != 0)]
            out[alive] = True
        return out.reshape(shape)
