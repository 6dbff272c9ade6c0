"""Readers and validation for SCAN "precomp" folders (real data and our synthetic one).

Layout of one split (see SPEC §2):

    {split}_ims.npy        float (N_rows, R, F) region features, opened with mmap_mode='r'
    {split}.h5             alternative: HDF5 file with dataset 'feat' of the same shape
    {split}_caps.txt       one raw caption per line, 5 consecutive lines per image
    {split}_precaps.txt    alternative (BFAN): comma-separated word ids per line
    {split}_ids.txt        optional: one image id per line

Feature arrays are never loaded whole: rows are read on demand. Some test files repeat each
image row 5 times (one row per caption); that is inferred from the shapes.
Every problem with an input is raised as an `InputError` naming the offending file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import CAPS_PER_IMAGE
from pipeline.errors import InputError
from pipeline.io import open_npy, short_error

SPLITS = ("train", "dev", "test", "testall")
CHECK_FINITE_MODES = ("auto", "full", "sample", "none")
FULL_CHECK_LIMIT_BYTES = 2 * 1024**3     # "auto": full scan below this file size
SAMPLE_ROWS = 1000                       # "sample": rows checked, evenly spaced
_CHUNK_BYTES = 64 * 1024**2              # full scan reads this much at a time


def features_candidates(data_dir: str | Path, split: str) -> list[Path]:
    """Feature files looked for, in order of preference."""
    data_dir = Path(data_dir)
    return [data_dir / f"{split}_ims.npy", data_dir / f"{split}.h5"]


def split_present(data_dir: str | Path, split: str) -> bool:
    return any(p.is_file() for p in features_candidates(data_dir, split))


@dataclass(eq=False)
class PrecompSplit:
    data_dir: Path
    split: str
    features: Any = field(repr=False)          # np.memmap or h5py.Dataset, (N_rows, R, F)
    features_path: Path
    captions: list[str] | None = field(repr=False)
    precaps: list[list[int]] | None = field(repr=False)
    captions_path: Path
    ids: list[str] | None = field(repr=False)
    rows_per_image: int
    n_images: int
    n_captions: int
    n_regions: int
    feature_dim: int

    # -- storage ---------------------------------------------------------------------------
    @property
    def storage(self) -> str:
        return "h5" if self.features_path.suffix == ".h5" else "npy"

    @property
    def caption_source(self) -> str:
        return self.captions_path.name

    @property
    def n_rows(self) -> int:
        return self.n_images * self.rows_per_image

    def _feat(self):
        """The feature array, reopened after a fork or unpickling (h5py handles and memmaps
        are not shared safely across processes; DataLoader workers get their own)."""
        if self.features is None or getattr(self, "_pid", None) != os.getpid():
            self.features, self._h5file = _open_features(self.features_path)[:2]
            self._pid = os.getpid()
        return self.features

    def __post_init__(self):
        self._pid = os.getpid()
        self._h5file = None

    def __getstate__(self):
        # Never pickle the array: a memmap would be pickled as a full in-memory copy.
        state = dict(self.__dict__)
        state["features"] = None
        state["_h5file"] = None
        state["_pid"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._feat()  # reopen in the receiving process (cheap: nothing is read)

    def close(self) -> None:
        if getattr(self, "_h5file", None) is not None:
            self._h5file.close()
            self._h5file = None
        self.features = None

    def head(self, n_images: int) -> "PrecompSplit":
        """The first `n_images` images and their captions, as a split of their own (the
        same files; nothing is copied). The references validate on the first 1,000 dev
        images of COCO."""
        import dataclasses

        n = int(n_images)
        if not 0 < n <= self.n_images:
            raise ValueError(f"head({n}) of a split of {self.n_images} images")
        if n == self.n_images:
            return self
        caps = n * CAPS_PER_IMAGE
        return dataclasses.replace(
            self, n_images=n, n_captions=caps,
            captions=self.captions[:caps] if self.captions is not None else None,
            precaps=self.precaps[:caps] if self.precaps is not None else None,
            ids=self.ids[:n] if self.ids is not None else None)

    # -- rows ------------------------------------------------------------------------------
    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.n_images:
            raise IndexError(f"image index {i} out of range [0, {self.n_images})")
        return i

    def _ensure_finite(self, block: np.ndarray, rows: np.ndarray) -> None:
        ok = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        if not ok.all():
            bad = int(np.min(np.asarray(rows)[~ok]))
            raise InputError(self.features_path, f"row {bad} has NaN/inf values")

    def image_features(self, i: int) -> np.ndarray:
        """(R, F) float32 copy of unique image i."""
        row = self._check_index(i) * self.rows_per_image
        out = np.array(self._feat()[row], dtype=np.float32)
        self._ensure_finite(out[None], np.array([row]))
        return out

    def image_rows(self, idx) -> np.ndarray:
        """(len(idx), R, F) float32 for several unique images, in the order given."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.n_regions, self.feature_dim), dtype=np.float32)
        if len(idx) == 0:
            return out
        if idx.min() < 0 or idx.max() >= self.n_images:
            raise IndexError(f"image index out of range [0, {self.n_images})")
        rows = idx * self.rows_per_image
        order = np.argsort(rows, kind="stable")
        feat = self._feat()
        if self.storage == "npy":
            out[order] = feat[rows[order]]              # sorted reads on the memmap
        else:
            # never fancy-index a chunked HDF5 dataset: a per-item loop is much faster
            for k in order:
                out[k] = feat[int(rows[k])]
        self._ensure_finite(out, rows)
        return out


# -- opening -------------------------------------------------------------------------------
def _open_features(path: Path):
    """(array, h5file or None) for an npy or h5 feature file; InputError when unreadable."""
    if path.suffix == ".h5":
        import h5py

        try:
            f = h5py.File(path, "r")
        except (OSError, ValueError) as e:
            raise InputError(path, f"unreadable HDF5 file ({short_error(e)})") from None
        try:
            ds = f["feat"]
        except KeyError:
            keys = ", ".join(sorted(f.keys())) or "none"
            f.close()
            raise InputError(path, f"no dataset 'feat' in HDF5 file (found: {keys})") from None
        except (OSError, ValueError) as e:
            f.close()
            raise InputError(path, f"unreadable HDF5 file ({short_error(e)})") from None
        if not isinstance(ds, h5py.Dataset):
            f.close()
            raise InputError(path, "'feat' is not a dataset")
        return ds, f
    return open_npy(path), None


def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file without line endings; trailing blank lines dropped."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(path, f"cannot read file ({short_error(e)})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(path, f"not UTF-8 text (line {line}, byte offset {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = [ln.rstrip("\r") for ln in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _read_captions(path: Path) -> list[str]:
    lines = _read_lines(path)
    out = []
    for n, ln in enumerate(lines, 1):
        s = ln.strip()
        if not s:
            raise InputError(path, f"line {n} is empty")
        out.append(s)
    return out


def _read_precaps(path: Path) -> list[list[int]]:
    out = []
    for n, ln in enumerate(_read_lines(path), 1):
        s = ln.strip().strip(",")
        if not s:
            raise InputError(path, f"line {n} is empty")
        try:
            ids = [int(t) for t in s.split(",")]
        except ValueError:
            raise InputError(path, f"line {n} is not comma-separated word ids: {s[:60]!r}") from None
        if min(ids) < 0:
            raise InputError(path, f"line {n} has a negative word id")
        out.append(ids)
    return out


def _check_finite(path: Path, feat, n_rows: int, row_bytes: int, mode: str) -> None:
    if mode == "auto":
        mode = "full" if path.stat().st_size < FULL_CHECK_LIMIT_BYTES else "sample"
    if mode == "none" or n_rows == 0:
        return

    def check(block: np.ndarray, rows: np.ndarray) -> None:
        ok = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        if not ok.all():
            raise InputError(path, f"row {int(rows[np.argmin(ok)])} has NaN/inf values")

    if mode == "full":
        step = max(1, _CHUNK_BYTES // max(1, row_bytes))
        for a in range(0, n_rows, step):
            b = min(n_rows, a + step)
            check(np.asarray(feat[a:b]), np.arange(a, b))
    else:  # sample
        rows = np.unique(np.linspace(0, n_rows - 1, min(n_rows, SAMPLE_ROWS)).astype(np.int64))
        for r in rows:  # per item: works for memmaps and chunked h5 alike
            check(np.asarray(feat[int(r)])[None], np.array([r]))


REPEAT_SAMPLE_IMAGES = 16   # images whose repeated rows open_split compares


def _check_repeated_rows(path: Path, feat, n_images: int, rows_per_image: int) -> None:
    """One feature row per caption is SCAN's layout for test files: each image's row
    repeated `rows_per_image` times. Distinct rows there mean one image per caption
    (1 caption per image), which no protocol reads; compare the repeats of a sample of
    images (cheap: a few rows) so that it is refused here, not by evaluate."""
    for i in np.unique(np.linspace(0, n_images - 1, min(n_images, REPEAT_SAMPLE_IMAGES)).astype(np.int64)):
        r0 = int(i) * rows_per_image
        block = np.asarray(feat[r0:r0 + rows_per_image])
        differ = np.flatnonzero(~(block == block[0]).reshape(rows_per_image, -1).all(axis=1))
        if len(differ):
            raise InputError(path, f"{rows_per_image * n_images} feature rows for as many captions, but rows "
                                   f"{r0} and {r0 + int(differ[0])} differ: one row per caption must repeat "
                                   f"its image's row {rows_per_image} times (SCAN layout); "
                                   f"{CAPS_PER_IMAGE} captions per image are needed")


def open_split(data_dir: str | Path, split: str, *, expected_dim: int | None = None,
               check_finite: str = "auto") -> PrecompSplit:
    """Open and validate one split of a precomp folder (features stay on disk)."""
    data_dir = Path(data_dir)
    if check_finite not in CHECK_FINITE_MODES:
        raise InputError("check_finite", f"must be one of {', '.join(CHECK_FINITE_MODES)}, got {check_finite!r}")
    if not data_dir.is_dir():
        raise InputError(data_dir, "data folder not found" if not data_dir.exists() else "not a folder")

    # features
    cands = features_candidates(data_dir, split)
    features_path = next((p for p in cands if p.is_file()), None)
    if features_path is None:
        raise InputError(cands[0], f"features file for split {split!r} not found "
                                   f"(looked for {', '.join(str(p) for p in cands)})")
    feat, h5file = _open_features(features_path)
    try:
        shape = tuple(int(s) for s in feat.shape)
        if len(shape) != 3:
            raise InputError(features_path, f"expected (N_images, regions, features), got shape {shape}")
        if not np.issubdtype(feat.dtype, np.floating):
            raise InputError(features_path, f"features must be floating point, got dtype {feat.dtype}")
        n_rows, n_regions, dim = shape
        if n_rows == 0 or n_regions == 0 or dim == 0:
            raise InputError(features_path, f"empty feature array, shape {shape}")
        if expected_dim is not None and dim != int(expected_dim):
            raise InputError(features_path, f"feature width is {dim}, expected {int(expected_dim)}")

        # captions
        caps_path = data_dir / f"{split}_caps.txt"
        precaps_path = data_dir / f"{split}_precaps.txt"
        captions = precaps = None
        if caps_path.is_file():
            captions_path = caps_path
            captions = _read_captions(caps_path)
            n_caps = len(captions)
        elif precaps_path.is_file():
            captions_path = precaps_path
            precaps = _read_precaps(precaps_path)
            n_caps = len(precaps)
        else:
            raise InputError(caps_path, f"caption file for split {split!r} not found "
                                        f"(looked for {caps_path.name} and {precaps_path.name})")
        if n_caps == 0:
            raise InputError(captions_path, "no captions")

        # image/caption ratio (SCAN's im_div): one feature row per caption means 5 rows per image
        if n_rows == n_caps and n_rows % CAPS_PER_IMAGE == 0 and n_rows != 0:
            rows_per_image = CAPS_PER_IMAGE
            n_images = n_rows // CAPS_PER_IMAGE
        else:
            rows_per_image = 1
            n_images = n_rows
        if n_caps != CAPS_PER_IMAGE * n_images:
            raise InputError(captions_path,
                             f"{n_caps} captions for {n_images} images ({features_path.name}): "
                             f"expected {CAPS_PER_IMAGE} per image ({CAPS_PER_IMAGE * n_images})")
        if rows_per_image > 1:
            _check_repeated_rows(features_path, feat, n_images, rows_per_image)

        # ids (optional): one per unique image, or one per feature row when rows repeat
        ids = None
        ids_path = data_dir / f"{split}_ids.txt"
        if ids_path.is_file():
            ids = [s.strip() for s in _read_lines(ids_path)]
            if len(ids) == n_rows and rows_per_image > 1:
                ids = ids[::rows_per_image]
            if len(ids) != n_images:
                raise InputError(ids_path, f"{len(ids)} ids for {n_images} images")
            empty = next((k for k, s in enumerate(ids) if not s), None)
            if empty is not None:
                raise InputError(ids_path, f"line {empty + 1} is empty")

        _check_finite(features_path, feat, n_rows, n_regions * dim * feat.dtype.itemsize, check_finite)
    except BaseException:
        if h5file is not None:
            h5file.close()
        raise

    sp = PrecompSplit(
        data_dir=data_dir, split=split, features=feat, features_path=features_path,
        captions=captions, precaps=precaps, captions_path=captions_path, ids=ids,
        rows_per_image=rows_per_image, n_images=n_images, n_captions=n_caps,
        n_regions=n_regions, feature_dim=dim,
    )
    sp._h5file = h5file
    return sp
