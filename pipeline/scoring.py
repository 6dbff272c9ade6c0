"""How a model scores a split: the one module every caller scores through.

The trainer's dev evaluation, `evaluate` (and its family/group metrics), `embed`, the
candidate refresh and mining's entry point all come here, whatever the model's kind:

* **indep** models take the fast exact path: their pooled embeddings as float32 rows,
  scored by the tiled GEMM of pipeline.evaluation (the ranks) or pipeline.mining (top-K).
  Only they can be indexed (`require_indexable`).
* **cross** models keep their encoders' outputs (regions and words with their lengths)
  and score memory-bounded blocks of (images x captions) through `model.similarity`
  (`model.score_block` of them per call), and any set of pairs (the positives, a
  two-stage shortlist, re-scored candidates) as small blocks of the same shard path.

A `Gallery` is one split encoded once; `block(r0, r1, c0, c1)` scores a rectangle,
`pair_scores(ii, jj)` a list of (image, caption) pairs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data import CAPS_PER_IMAGE
from pipeline.data.datasets import CaptionDataset, collate_captions
from pipeline.embeddings import check_embedding_rows, unit_rows
from pipeline.errors import InputError
from pipeline.models.features import Encoded
from pipeline.progress import progress as progress_bar


def indexable(model) -> bool:
    """Whether the model's scores are dot products of pooled rows (an index can serve them)."""
    return getattr(model, "kind", "indep") == "indep"


EMBED_HINT = ("it cannot be embedded (its score needs the image and the caption together); "
              "mine with an independent model and re-rank with `mine-candidates --rescore "
              "CHECKPOINT`")


def require_indexable(model, source, why: str = EMBED_HINT) -> None:
    if not indexable(model):
        raise InputError(source, f"model {getattr(model, 'name', '?')!r} is a cross-attention "
                                 f"model: {why}")


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode, no autograd; its previous mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _check_range(start: int, stop: int, n: int, what: str) -> tuple[int, int]:
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= n:
        raise IndexError(f"{what} range [{start}, {stop}) outside [0, {n})")
    return start, stop


def encode_images(model, split, start: int = 0, stop: int | None = None, *,
                  batch_size: int = 256, device: str = "cpu", progress: bool = False) -> Encoded:
    """The model's encoding of unique images start .. stop-1 (on the CPU, in row order).
    `model` must already be on `device`."""
    stop = split.n_images if stop is None else stop
    start, stop = _check_range(start, stop, split.n_images, "image")
    parts = []
    with eval_mode(model):
        for b0 in progress_bar(range(start, stop, batch_size), desc="encode images",
                               disable=not progress, leave=False):
            b1 = min(stop, b0 + batch_size)
            feats = torch.from_numpy(split.image_rows(np.arange(b0, b1)))
            lengths = torch.full((b1 - b0,), feats.shape[1], dtype=torch.long)
            parts.append(model.encode_image(feats.to(device), lengths.to(device)).to("cpu"))
    return Encoded.cat(parts) if parts else _empty(model)


def encode_captions(model, split, start: int = 0, stop: int | None = None, *,
                    batch_size: int = 512, device: str = "cpu", progress: bool = False) -> Encoded:
    """The model's encoding of captions start .. stop-1 (on the CPU, in file order), read
    with the model's own tokenizer."""
    stop = split.n_captions if stop is None else stop
    start, stop = _check_range(start, stop, split.n_captions, "caption")
    dataset = CaptionDataset(split, model.tokenizer)
    parts, order = [], []
    with eval_mode(model):
        for b0 in progress_bar(range(start, stop, batch_size), desc="encode captions",
                               disable=not progress, leave=False):
            b1 = min(stop, b0 + batch_size)
            batch = collate_captions([dataset[j] for j in range(b0, b1)])
            parts.append(model.encode_text(batch["tokens"].to(device),
                                           batch["lengths"].to(device)).to("cpu"))
            order.append(batch["index"] - start)
    if not parts:
        return _empty(model)
    # collate sorts a batch by length: put the rows back in file order
    return Encoded.cat(parts)[torch.argsort(torch.cat(order))]


def _empty(model) -> Encoded:
    cfg = getattr(model, "config", {}) or {}
    return Encoded(torch.empty((0, int(cfg.get("embed_size", 0)))))


def _pooled_rows(enc: Encoded, model) -> np.ndarray:
    require_indexable(model, None, "it has no pooled embedding rows")
    return enc.data.detach().float().cpu().numpy()


def encode_image_range(model, split, start: int, stop: int, *, batch_size: int = 256,
                       device: str = "cpu", normalize: bool = True,
                       progress: bool = False) -> np.ndarray:
    """(stop - start, D) float32 embedding rows of images start .. stop-1 (indep models),
    L2-normalised for indexing unless normalize=False (the model's own outputs)."""
    require_indexable(model, None, "it has no pooled embedding rows")
    enc = encode_images(model, split, start, stop, batch_size=batch_size, device=device,
                        progress=progress)
    return unit_rows(enc.data) if normalize else enc.data.float().numpy()


def encode_caption_range(model, split, start: int, stop: int, *, batch_size: int = 512,
                         device: str = "cpu", normalize: bool = True,
                         progress: bool = False) -> np.ndarray:
    """(stop - start, D) float32 embedding rows of captions start .. stop-1 (indep models)."""
    require_indexable(model, None, "it has no pooled embedding rows")
    enc = encode_captions(model, split, start, stop, batch_size=batch_size, device=device,
                          progress=progress)
    return unit_rows(enc.data) if normalize else enc.data.float().numpy()


PAIR_SLACK = 1.25          # a pair block may score this many times the pairs it is for
PAIR_BLOCK_CELLS = 1 << 16  # images x captions of one pair block (at most)
PAIR_MIN_CELLS = 1 << 10    # ... and any block this small may (a call costs more than its waste)


def pair_blocks(ii: np.ndarray, jj: np.ndarray, *, max_cells: int = PAIR_BLOCK_CELLS,
                slack: float = PAIR_SLACK, min_cells: int = PAIR_MIN_CELLS
                ) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Blocks (p0, p1, rows, cols) covering the distinct pairs (ii, jj), sorted by image
    then caption: pairs p0..p1-1 are those of the images `rows` (consecutive in the pair
    order), every caption they pair with is in the sorted `cols`. A block grows by the next
    image while rows x cols stays <= max_cells and <= slack x its pairs or min_cells (one
    image alone may exceed max_cells; `similarity` bounds its own memory)."""
    starts = np.flatnonzero(np.r_[True, ii[1:] != ii[:-1]])
    ends = np.r_[starts[1:], ii.size]
    blocks, b = [], 0
    while b < starts.size:
        p0, cols, e = starts[b], jj[starts[b]:ends[b]], b + 1
        while e < starts.size:
            grown = np.union1d(cols, jj[starts[e]:ends[e]])
            cells = (e + 1 - b) * grown.size
            if cells > max_cells or cells > max(min_cells, slack * (ends[e] - p0)):
                break
            cols, e = grown, e + 1
        blocks.append((int(p0), int(ends[e - 1]), ii[starts[b:e]], cols))
        b = e
    return blocks


@dataclass
class Gallery:
    """A split encoded once by a model, scored on demand."""

    model: object
    img: Encoded
    cap: Encoded
    device: str = "cpu"

    @property
    def n_img(self) -> int:
        return len(self.img)

    @property
    def n_cap(self) -> int:
        return len(self.cap)

    @property
    def indexable(self) -> bool:
        return indexable(self.model)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(img, cap) float32 embedding rows (indep models)."""
        return _pooled_rows(self.img, self.model), _pooled_rows(self.cap, self.model)

    def block(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """float32 scores S[r0:r1, c0:c1] (images x captions, global ids)."""
        if self.indexable:
            img, cap = self.rows()
            return img[r0:r1] @ cap[c0:c1].T
        out = np.empty((r1 - r0, c1 - c0), dtype=np.float32)
        bi, bc = self.model.score_block
        with eval_mode(self.model):
            for a in range(r0, r1, bi):
                a1 = min(r1, a + bi)
                img = self.img[a:a1].to(self.device)
                for c in range(c0, c1, bc):
                    c_end = min(c1, c + bc)
                    s = self.model.similarity(img, self.cap[c:c_end].to(self.device))
                    out[a - r0:a1 - r0, c - c0:c_end - c0] = s.float().cpu().numpy()
        return out

    def positives(self) -> np.ndarray:
        """(n_cap,) S[j // 5, j]: each caption's score with its own image."""
        j = np.arange(self.n_cap)
        return self.pair_scores(j // CAPS_PER_IMAGE, j)

    def pair_scores(self, ii, jj, *, progress: bool = False, desc: str = "score pairs") -> np.ndarray:
        """float32 S[ii[p], jj[p]] of any (image, caption) pairs (global ids), in any order,
        repeats allowed. A cross model scores them as blocks of `model.similarity` (its fast
        shard path): the pairs are grouped by image, and consecutive images whose caption
        sets overlap share one block (image rows x the union of their captions) as long as
        it computes at most PAIR_SLACK x the pairs asked for."""
        ii, jj = np.asarray(ii, dtype=np.int64), np.asarray(jj, dtype=np.int64)
        out = np.empty(ii.shape, dtype=np.float32)
        if ii.size == 0:
            return out
        if self.indexable:
            img, cap = self.rows()
            for a in range(0, ii.size, 1 << 16):
                b = a + (1 << 16)
                out[a:b] = np.einsum("pd,pd->p", img[ii[a:b]], cap[jj[a:b]])
            return out
        keys, inverse = np.unique(ii * self.n_cap + jj, return_inverse=True)
        ki, kj = keys // self.n_cap, keys % self.n_cap
        flat = np.empty(keys.size, dtype=np.float32)
        blocks = pair_blocks(ki, kj, max_cells=PAIR_BLOCK_CELLS)
        with eval_mode(self.model):
            for p0, p1, rows, cols in progress_bar(blocks, desc=desc, disable=not progress,
                                                   leave=False):
                s = self.model.similarity(self.img[torch.from_numpy(rows)].to(self.device),
                                          self.cap[torch.from_numpy(cols)].to(self.device))
                s = s.float().cpu().numpy()
                flat[p0:p1] = s[np.searchsorted(rows, ki[p0:p1]), np.searchsorted(cols, kj[p0:p1])]
        out[...] = flat[inverse.reshape(ii.shape)]
        return out

    def matrix(self) -> np.ndarray:
        """The whole (n_img, n_cap) score matrix (small splits: the family metrics)."""
        return self.block(0, self.n_img, 0, self.n_cap)

    def evaluate(self, protocol: str, source="embeddings") -> dict:
        """Retrieval metrics (+ "protocol") under `protocol` (pipeline.evaluation.protocols)."""
        from pipeline.evaluation.protocols import evaluate_block_fn, evaluate_embeddings

        if self.indexable:
            return evaluate_embeddings(*self.rows(), protocol, source=source)
        pos = self.positives()
        check_embedding_rows(pos.reshape(-1, 1), source, "caption", lead="the model gives",
                             zero_ok=True)
        return evaluate_block_fn(self._checked_block(source), pos, self.n_img, protocol,
                                 source=source)

    def evaluate_and_matrix(self, protocol: str, source="embeddings") -> tuple[dict, np.ndarray]:
        """(metrics, the whole matrix) where both are needed (the embedded data's family
        metrics): a cross model's or an ensemble's matrix is scored once, not twice."""
        if self.indexable:
            return self.evaluate(protocol, source=source), self.matrix()
        from pipeline.evaluation.protocols import evaluate_sims

        matrix = self._checked_block(source)(0, self.n_img, 0, self.n_cap)
        return evaluate_sims(matrix, protocol, source=source), matrix

    def _checked_block(self, source):
        def block(r0, r1, c0, c1):
            s = self.block(r0, r1, c0, c1)
            if not np.isfinite(s).all():
                r, c = np.argwhere(~np.isfinite(s))[0]
                raise InputError(source, f"the model gives a non-finite score for image {r0 + r}, "
                                         f"caption {c0 + c}")
            return s
        return block


def checked_pair_scores(gallery, ii, jj, *, source=None, who: str = "the model", tail: str = "",
                        progress: bool = False, desc: str = "score pairs") -> np.ndarray:
    """gallery.pair_scores(ii, jj); a non-finite score is an InputError(source) naming the
    pair: "<who> gives a non-finite score (v) for image i, caption j<tail>"."""
    out = gallery.pair_scores(ii, jj, progress=progress, desc=desc)
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        p = int(bad[0])
        raise InputError(source, f"{who} gives a non-finite score ({out[p]}) for image "
                                 f"{int(np.asarray(ii)[p])}, caption {int(np.asarray(jj)[p])}{tail}")
    return out


def encode_gallery(model, split, *, batch_size: int = 128, device: str = "cpu",
                   progress: bool = False, source=None) -> Gallery:
    """Encode every unique image and caption of `split` with `model` (on `device`).

    A non-finite (or, for indep models, all-zero) encoding raises InputError(source) (e.g.
    the checkpoint path): every caller scores or mines these, and such a model must give
    no number at all."""
    img = encode_images(model, split, batch_size=batch_size, device=device, progress=progress)
    check_embedding_rows(img.data, source, "image", lead="the model gives", zero_ok=not indexable(model))
    cap = encode_captions(model, split, batch_size=2 * batch_size, device=device, progress=progress)
    check_embedding_rows(cap.data, source, "caption", lead="the model gives", zero_ok=not indexable(model))
    return Gallery(model, img, cap, str(device))


def mine_split(model, split, k_i2t: int, k_t2i: int, *, precision: str = "auto",
               device: str = "cpu", batch_size: int = 256, source=None):
    """Exact top-K candidates of a split under the model (the candidate refresh)."""
    from pipeline.mining import mine_torch

    require_indexable(model, source)
    gallery = encode_gallery(model, split, batch_size=batch_size, device=device, source=source)
    img, cap = gallery.rows()
    return mine_torch(img, cap, k_i2t, k_t2i, precision=precision, device=device, progress=False)
