"""Atomic writes: every artifact appears whole or not at all."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_beside(path: str | Path) -> Path:
    """An empty hidden temp file in path's folder, with the mode a new file normally gets
    (mkstemp makes 0600, and a rename keeps the mode)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; it replaces `path` (a directory) only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | Path, obj, indent: int = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


# -- reading .npy files with one-line errors ----------------------------------------------
def open_npy(path: str | Path, *, mmap: bool = True, what: str = "") -> np.ndarray:
    """One .npy array, memory-mapped by default. Every way the file can be broken (missing,
    not a file, empty, not npy, truncated, object array, archive) is an InputError naming
    it. ``what`` ("image embeddings", ...) only words the messages."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"{what} file not found" if what else "file not found")
    if not path.is_file():
        raise InputError(path, f"{what}: not a file" if what else "not a file")
    check_npy_header(path)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError, TypeError) as e:
        raise InputError(path, f"unreadable or corrupt .npy file ({short_error(e)})") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(path, "not a single .npy array")
    return arr


def check_npy_header(path: Path) -> None:
    """Clear messages for the common ways an .npy file is broken (not npy, truncated)."""
    fmt = np.lib.format
    try:
        size = path.stat().st_size
        if size == 0:
            raise InputError(path, "empty file (not a .npy array)")
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise InputError(path, "not a .npy file (no NumPy header); corrupt or another format")
            f.seek(0)
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                return  # leave newer versions to np.load
            offset = f.tell()
    except InputError:
        raise
    except (ValueError, OSError, EOFError, TypeError) as e:
        raise InputError(path, f"unreadable or corrupt .npy file ({short_error(e)})") from None
    if dtype.hasobject:
        raise InputError(path, "the .npy file holds Python objects, not numbers")
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = size - offset
    if have < need:
        raise InputError(path, f"truncated .npy file: shape {tuple(shape)} {dtype} needs {need} bytes "
                               f"of data, the file has {have}")


def short_error(e: Exception) -> str:
    """An exception as one short line: its class and message."""
    msg = " ".join(str(e).split())
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return f"{e.__class__.__name__}: {msg}" if msg else e.__class__.__name__


def jsonable(x):
    """x with numpy values made plain (arrays to lists, scalars to Python numbers), dict keys
    as strings, non-finite floats and other objects as strings: safe for strict JSON."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)
