"""Evaluation protocols (SPEC section 6) over saved matrices, embeddings or score blocks.

* ``full``: the whole (N_img, 5*N_img) matrix, any N_img.
* ``f30k_1k``: Flickr30K test, exactly 1,000 images x 5,000 captions.
* ``coco5k``: COCO testall, exactly 5,000 x 25,000, evaluated as one matrix.
* ``coco1k_5fold``: COCO testall in 5 folds (images [1000f, 1000(f+1)), captions
  [5000f, 5000(f+1))). Every metric is averaged over the folds and rsum is computed from
  the averaged recalls (NOT 6 x the mean i2t recall as the SCAN lineage prints it).

Ranks and the tie rule are those of :mod:`pipeline.evaluation.ranks`. A wrong size raises
:class:`InputError` naming the source, so a 1K-vs-5K mix-up is an error, not a number.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.embeddings import check_embedding_rows
from pipeline.errors import InputError
from pipeline.io import open_npy
from pipeline.evaluation.ranks import (
    CAPS_PER_IMAGE,
    METRIC_KEYS,
    RECALL_KEYS,
    metrics_from_ranks,
    ranks_from_blocks,
    ranks_from_embeddings,
    ranks_from_matrix,
)

PROTOCOLS = ("full", "f30k_1k", "coco1k_5fold", "coco5k")

# Module-level so that tests can shrink them (monkeypatch); looked up at call time.
PROTOCOL_SIZES: dict[str, int | None] = {
    "full": None,
    "f30k_1k": 1000,
    "coco1k_5fold": 5000,
    "coco5k": 5000,
}
FOLD_SIZE = 1000  # images per fold of coco1k_5fold

# Scores per block when scanning a loaded matrix for non-finite values.
_FINITE_CHECK_ELEMS = 1 << 24


def _check_protocol(protocol: str, n_img: int, source) -> None:
    if protocol not in PROTOCOLS:
        raise InputError(source, f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOLS)})")
    need = PROTOCOL_SIZES[protocol]
    if need is not None and n_img != need:
        raise InputError(
            source, f"protocol {protocol} needs {need} images, got {n_img} (use --protocol full)"
        )


def _folds(protocol: str, n_img: int) -> list[tuple[int, int]]:
    """Image ranges to evaluate separately: one range for every protocol but coco1k_5fold."""
    if protocol != "coco1k_5fold":
        return [(0, n_img)]
    return [(f0, min(f0 + FOLD_SIZE, n_img)) for f0 in range(0, n_img, FOLD_SIZE)]


def average_folds(fold_metrics: list[dict]) -> dict:
    """Average every metric over folds; rsum from the averaged recalls."""
    out = {k: float(np.mean([m[k] for m in fold_metrics])) for k in METRIC_KEYS if k != "rsum"}
    out["rsum"] = float(sum(out[k] for k in RECALL_KEYS))
    return {k: out[k] for k in METRIC_KEYS}


def _finish(fold_metrics: list[dict], protocol: str) -> dict:
    out = fold_metrics[0] if len(fold_metrics) == 1 else average_folds(fold_metrics)
    out = dict(out)
    out["protocol"] = protocol
    return out


def _shape_check(shape, source) -> int:
    if len(shape) != 2:
        raise InputError(source, f"expected a 2-D (N_img, 5*N_img) similarity matrix, got shape {tuple(shape)}")
    n, m = shape
    if n < 1 or m != CAPS_PER_IMAGE * n:
        hint = ""
        if m >= 1 and n == CAPS_PER_IMAGE * m:
            hint = " (looks transposed: rows must be images, columns captions)"
        raise InputError(
            source, f"expected shape (N_img, 5*N_img), got {tuple(shape)}{hint}"
        )
    return int(n)


def load_sims(path) -> np.ndarray:
    """Memory-map a saved (N_img, 5*N_img) similarity matrix (.npy) and validate it.

    Raises InputError(path, ...) for a missing file, a file numpy cannot read as one
    array, a non-numeric dtype, a shape other than (N, 5N) or any non-finite value
    (checked block by block, so the matrix is never loaded whole).
    """
    p = Path(path)
    arr = open_npy(p, what="similarity matrix")
    if arr.dtype.kind not in "fiu":
        raise InputError(p, f"dtype {arr.dtype} is not a real number type")
    n = _shape_check(arr.shape, p)
    if arr.dtype.kind == "f":
        step = max(1, _FINITE_CHECK_ELEMS // (CAPS_PER_IMAGE * n))
        for r0 in range(0, n, step):
            blk = np.asarray(arr[r0:r0 + step])
            ok = np.isfinite(blk)
            if not ok.all():
                r, c = np.argwhere(~ok)[0]
                raise InputError(p, f"non-finite value {blk[r, c]} at row {r0 + r}, column {c}")
    return arr


def evaluate_sims(sims, protocol: str, chunk: int = 1024, source="sims") -> dict:
    """Metrics (+ "protocol") of a similarity matrix: np.ndarray, np.memmap or a .npy path."""
    if isinstance(sims, (str, Path)):
        if source == "sims":
            source = str(sims)
        sims = load_sims(sims)
    n = _shape_check(sims.shape, source)
    _check_protocol(protocol, n, source)
    fold_metrics = []
    for f0, f1 in _folds(protocol, n):
        sub = sims[f0:f1, CAPS_PER_IMAGE * f0: CAPS_PER_IMAGE * f1]  # a view; memmap stays lazy
        fold_metrics.append(metrics_from_ranks(*ranks_from_matrix(sub, chunk=chunk)))
    return _finish(fold_metrics, protocol)


def evaluate_embeddings(img_embs, cap_embs, protocol: str, chunk: int = 1024, source="embeddings") -> dict:
    """Metrics (+ "protocol") for S = img_embs @ cap_embs.T, computed block by block."""
    if len(img_embs.shape) != 2 or len(cap_embs.shape) != 2:
        raise InputError(
            source, f"embeddings must be 2-D, got {tuple(img_embs.shape)} and {tuple(cap_embs.shape)}"
        )
    n = int(img_embs.shape[0])
    if n < 1 or cap_embs.shape[0] != CAPS_PER_IMAGE * n or cap_embs.shape[1] != img_embs.shape[1]:
        raise InputError(
            source,
            f"expected image embeddings (N, d) and caption embeddings (5N, d), got "
            f"{tuple(img_embs.shape)} and {tuple(cap_embs.shape)}",
        )
    _check_protocol(protocol, n, source)
    # never a score from NaN/inf rows (a zero row only ties at 0: the tie rule ranks it)
    check_embedding_rows(img_embs, source, "image", zero_ok=True)
    check_embedding_rows(cap_embs, source, "caption", zero_ok=True)
    fold_metrics = []
    for f0, f1 in _folds(protocol, n):
        ranks = ranks_from_embeddings(
            img_embs[f0:f1], cap_embs[CAPS_PER_IMAGE * f0: CAPS_PER_IMAGE * f1], chunk=chunk
        )
        fold_metrics.append(metrics_from_ranks(*ranks))
    return _finish(fold_metrics, protocol)


def evaluate_block_fn(
    block_fn: Callable[[int, int, int, int], np.ndarray],
    pos_scores,
    n_img: int,
    protocol: str,
    chunk: int = 1024,
    source="block_fn",
) -> dict:
    """Metrics (+ "protocol") from a scoring function, e.g. a cross-attention model.

    ``block_fn(r0, r1, c0, c1)`` returns ``S[r0:r1, c0:c1]`` (global indices);
    ``pos_scores`` (5 * n_img,) holds ``S[j // 5, j]``. For ``coco1k_5fold`` only the five
    diagonal (1000 x 5000) fold blocks are ever requested.
    """
    n_img = int(n_img)
    _check_protocol(protocol, n_img, source)
    pos = np.asarray(pos_scores).reshape(-1)
    if pos.shape[0] != CAPS_PER_IMAGE * n_img:
        raise InputError(source, f"pos_scores has {pos.shape[0]} entries, expected {CAPS_PER_IMAGE * n_img}")
    fold_metrics = []
    for f0, f1 in _folds(protocol, n_img):
        c0, c1 = CAPS_PER_IMAGE * f0, CAPS_PER_IMAGE * f1

        def rows(r0: int, r1: int, f0=f0, c0=c0, c1=c1) -> np.ndarray:
            return block_fn(f0 + r0, f0 + r1, c0, c1)

        ranks = ranks_from_blocks(rows, f1 - f0, pos[c0:c1], chunk=chunk)
        fold_metrics.append(metrics_from_ranks(*ranks))
    return _finish(fold_metrics, protocol)
