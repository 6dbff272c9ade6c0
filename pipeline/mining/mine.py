"""Mining driver: validated embedding inputs -> exact (or faiss-approximate) candidates.

:func:`mine_embeddings` dispatches one :class:`MineConfig` to a k-NN backend
(:func:`pipeline.mining.mine_torch` or :func:`pipeline.mining.mine_faiss`) and returns its
:class:`KnnResult`. :func:`open_embeddings` opens an ``.npy`` embedding file memory-mapped
and checks it, every problem an ``InputError`` naming the file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data import CAPS_PER_IMAGE
from pipeline.errors import InputError, refuse_unknown
from pipeline.mining.reference import KnnResult

BACKENDS = ("torch", "faiss")
PRECISIONS = ("bf16", "fp16", "fp32", "auto")
INDEXES = ("flat", "ivf", "hnsw")


@dataclass
class MineConfig:
    # AOQ's files keep 2000 / 400; both are capped at the gallery size minus the positives
    # (N_cap - 5 and N_img - 1). On small galleries scale them down (SPEC §9).
    k_i2t: int = 2000
    k_t2i: int = 400
    backend: str = "torch"          # torch (one tiled pass, exact) | faiss
    precision: str = "auto"         # torch GEMM: auto | bf16 | fp16 | fp32 (exact in every case)
    index: str = "flat"             # faiss: flat (exact) | ivf | hnsw (approximate)
    device: str = "cpu"
    row_block: int = 4096           # torch tile: image rows x caption columns
    col_block: int = 8192

    @classmethod
    def from_dict(cls, d: dict, source: str = "params") -> "MineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        refuse_unknown(d, names, source, "mining option(s)")
        cfg = cls(**{k: v for k, v in d.items() if v is not None})
        cfg.validate(source)
        return cfg

    def validate(self, source: str | None = None) -> "MineConfig":
        def choice(name, allowed):
            v = getattr(self, name)
            if v not in allowed:
                raise InputError(source, f"{name} must be one of {', '.join(allowed)}; got {v!r}")

        choice("backend", BACKENDS)
        choice("precision", PRECISIONS)
        choice("index", INDEXES)
        for name in ("k_i2t", "k_t2i"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(source, f"{name} must be an integer >= 1, got {v!r}")
        for name in ("row_block", "col_block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(source, f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.device, str) or not self.device:
            raise InputError(source, f"device must be cpu, cuda or cuda:N; got {self.device!r}")
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def mine_embeddings(img, cap, cfg: MineConfig, progress: bool = True,
                    scratch=None) -> KnnResult:
    """Candidates of both directions for (N_img, D) image and (5 N_img, D) caption rows.

    scratch (torch backend on CPU): a folder for memory-mapped work files; memory-mapped
    inputs are then used in place and the result's arrays are memmaps into the folder, so
    private memory does not grow with the number of queries (the caller removes it)."""
    cfg.validate()
    if cfg.backend == "torch":
        from pipeline.mining import mine_torch

        if scratch is None or cfg.device.split(":")[0] != "cpu":
            img, cap, scratch = _in_memory(img), _in_memory(cap), None
        return mine_torch(img, cap, cfg.k_i2t, cfg.k_t2i, precision=cfg.precision,
                          device=cfg.device, row_block=int(cfg.row_block),
                          col_block=int(cfg.col_block), progress=progress, scratch=scratch)
    img, cap = _in_memory(img), _in_memory(cap)
    from pipeline.mining import mine_faiss

    dev = cfg.device.split(":")[0]
    if dev not in ("cpu", "cuda"):
        raise InputError(None, f"device must be cpu, cuda or cuda:N; got {cfg.device!r}")
    return mine_faiss(img, cap, cfg.k_i2t, cfg.k_t2i, index=cfg.index, use_gpu=dev == "cuda")


def _in_memory(x):
    """A read-only memmap is read once into a writable float32 array (both backends hand the
    rows to torch, which wants writable memory, and read every row several times)."""
    if isinstance(x, np.ndarray) and (isinstance(x, np.memmap) or not x.flags.writeable):
        return np.array(x, dtype=np.float32, order="C")
    return x


# --------------------------------------------------------------------------- inputs
def open_embeddings(path: str | Path, what: str) -> np.ndarray:
    """Memory-map a 2-D float .npy embedding file and check it (non-empty; every row
    finite and not all zero).
    ``what`` ("image" / "caption") only words the messages."""
    from pipeline.embeddings import check_embedding_rows
    from pipeline.io import open_npy

    path = Path(path)
    arr = open_npy(path, what=f"{what} embeddings")
    if arr.ndim != 2:
        raise InputError(path, f"{what} embeddings must be 2-D (rows, D), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(path, f"{what} embeddings must be floating point, got dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(path, f"{what} embeddings are empty, shape {arr.shape}")
    check_embedding_rows(arr, path, what)  # in chunks: the memmap is not read whole
    return arr


def open_embedding_pair(img_path, cap_path) -> tuple[np.ndarray, np.ndarray]:
    """Both files, checked against each other (same D, 5 captions per image, >= 2 images)."""
    img = open_embeddings(img_path, "image")
    cap = open_embeddings(cap_path, "caption")
    if img.shape[0] < 2:
        raise InputError(img_path, f"need at least 2 images to mine negatives, got {img.shape[0]}")
    if cap.shape[1] != img.shape[1]:
        raise InputError(cap_path, f"dimension {cap.shape[1]} differs from the image "
                                   f"embeddings' {img.shape[1]} ({Path(img_path).name})")
    if cap.shape[0] != CAPS_PER_IMAGE * img.shape[0]:
        raise InputError(cap_path, f"{cap.shape[0]} caption rows for {img.shape[0]} images "
                                   f"({Path(img_path).name}): expected "
                                   f"{CAPS_PER_IMAGE * img.shape[0]} (5 per image)")
    return img, cap
