"""Atomic writes: every artifact appears whole or not at all."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.errors import InputError


STAMP = ".itm-pipeline"          # in every folder the tool writes: which command wrote it
IN_USE = ".itm-pipeline-pid"     # in a build folder while its process works in it: pid, host
_TEMP = re.compile(r"^\..+\.~(\d+)~.*\.tmp$")  # temp names carry the writer's pid
_TEMP_NAME = re.compile(r"^\.(.+)\.~\d+~.*\.tmp$")
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.~{os.getpid()}~"


def temp_beside(path: str | Path) -> Path:
    """An empty hidden temp file in path's folder, with the mode a new file normally gets
    (mkstemp makes 0600, and a rename keeps the mode). Its name holds this process's pid, so
    a later run can tell a temp file left by a killed run from one still being written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def final_name(path: str | Path) -> str:
    """`path` with each temp name (.NAME.~pid~xyz.tmp) read as the NAME it will be renamed to."""
    parts = [m.group(1) if (m := _TEMP_NAME.match(p)) else p for p in Path(path).parts]
    return str(Path(*parts))


def disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _FULL


def _full_error(path: Path, e: OSError) -> InputError:
    return InputError(path, f"no space left on the device while writing it ({short_error(e)})")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder: give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(path)
    except OSError as e:
        raise InputError(path, f"cannot write it ({short_error(e)})") from None
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if disk_full(e):
            raise _full_error(path, e) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


# -- output folders: written only by the command that owns them -----------------------------
def written_by(folder: str | Path) -> str | None:
    """The command whose output `folder` is (its stamp), or None."""
    stamp = Path(folder) / STAMP
    if stamp.is_symlink():          # a stamp is a file the tool wrote, never a link to one
        return None
    try:
        doc = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    return doc.get("written_by") if isinstance(doc, dict) else None


def _stamp(folder: Path, owner: str) -> None:
    # deterministic content: a DVC-tracked folder must not change between identical runs
    (folder / STAMP).write_text(json.dumps({"written_by": f"itm-pipeline {owner}"}) + "\n")


def _target(path: str | Path) -> Path:
    """The folder a (symlinked) output path names: the link stays, its target is written."""
    path = Path(path)
    if path.is_symlink():
        if not path.exists():
            raise InputError(path, "is a broken symlink: choose a new folder")
        return path.resolve()
    return path


def _check_owner(path: Path, owner: str) -> None:
    """Refuse to write into `path` unless it is new, empty, or `owner`'s earlier output."""
    if not path.exists():
        return
    if not path.is_dir():
        raise InputError(path, "exists and is not a folder")
    if any(path.iterdir()) and written_by(path) != f"itm-pipeline {owner}":
        raise InputError(path, f"is not empty and was not written by {owner}: choose a new folder")


def refuse_overlap(out: str | Path, inputs) -> None:
    """An output folder may not be, lie inside, or contain one of the command's inputs
    (resolved, symlinks followed): replacing it would destroy what it is built from."""
    o = Path(out).resolve()
    for inp in inputs:
        if inp is None or str(inp) in ("", "scratch"):
            continue
        i = Path(inp).resolve()
        how = ("is" if o == i else "is inside" if i in o.parents
               else "contains" if o in i.parents else None)
        if how:
            raise InputError(out, f"{how} the input {inp}: choose an output folder apart from "
                                  "the inputs")


def sweep_stale_temps(folder: str | Path, recursive: bool = False, only: str | None = None) -> int:
    """Remove the temp files and folders of this tool whose writing process is gone (a killed
    run); another live process's temps stay. `only`: just the temps of the output named so
    (in a folder the tool does not own, e.g. an output's parent, nothing else is touched).
    A temp file goes when the pid in its name is gone; a temp folder only when it proves it
    is ours (:func:`_stale_folder`), so a user's folder of a similar name is never touched.
    Returns how many went."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    gone, kept = 0, []
    entries = folder.rglob(".*") if recursive else folder.iterdir()
    for entry in sorted(entries, key=lambda p: len(p.parts)):     # folders before their content
        m = _TEMP.match(entry.name)
        if not m or any(k in entry.parents for k in kept):        # a kept folder keeps its temps
            continue
        if only is not None and not entry.name.startswith(f".{only}.~"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            if not _stale_folder(entry, int(m.group(1))):
                kept.append(entry)
                continue
            shutil.rmtree(entry, ignore_errors=True)
        else:
            if _alive(int(m.group(1))):
                continue
            entry.unlink(missing_ok=True)
        gone += 1
    return gone


def mark_in_use(folder: str | Path, owner: str) -> None:
    """Record in `folder` that this process (pid, host, start time) works in it: a sweep by
    another run, on this host or another one sharing the file system, then leaves it alone."""
    doc = {"written_by": f"itm-pipeline {owner}", "pid": os.getpid(), "host": socket.gethostname(),
           "start": _proc_start(os.getpid())}
    (Path(folder) / IN_USE).write_text(json.dumps(doc) + "\n")


def _in_use_mark(folder: Path) -> dict | None:
    """The IN_USE marker of `folder` when it is one this tool wrote (a plain file, its fields)."""
    mark = folder / IN_USE
    if mark.is_symlink():
        return None
    try:
        doc = json.loads(mark.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(doc, dict) and str(doc.get("written_by", "")).startswith("itm-pipeline ")
            and type(doc.get("pid")) is int and isinstance(doc.get("host"), str)):
        return None
    return doc


def _stale_folder(folder: Path, name_pid: int) -> bool:
    """Whether a temp-named folder is ours and its process gone. With an IN_USE marker, the
    marker decides: gone only on the host that wrote it (another host's pids mean nothing
    here), and only when its pid is dead or now a different process (start time). Without
    one, only a folder holding our stamp (a finished build or an output being swapped out
    when the run died) goes, by the pid in its name; any other folder is not provably ours."""
    doc = _in_use_mark(folder)
    if doc is not None:
        if doc["host"] != socket.gethostname():
            return False
        pid = doc["pid"]
        if not _alive(pid):
            return True
        start = doc.get("start")
        return start is not None and _proc_start(pid) not in (None, start)
    own = written_by(folder)
    return own is not None and own.startswith("itm-pipeline ") and not _alive(name_pid)


def _proc_start(pid: int) -> int | None:
    """A process's start time (clock ticks since boot; Linux), which tells a reused pid apart."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _checked_output(path: str | Path, owner: str, inputs) -> Path:
    """The output folder `path` names, checked before any work (no overlap with an input;
    new, empty or `owner`'s own), with the stale temps of its killed runs beside it gone."""
    path = _target(path)
    refuse_overlap(path, inputs)
    _check_owner(path, owner)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent, only=path.name)
    return path


def claim_dir(path: str | Path, owner: str, inputs=()) -> Path:
    """Make `path` `owner`'s output folder, written file by file (training runs, which resume
    in place): refused unless new, empty or `owner`'s own; stale temps of killed runs go."""
    path = _checked_output(path, owner, inputs)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if written_by(path) is None:
            _stamp(path, owner)
    except OSError as e:
        raise InputError(path, f"cannot write the output folder ({short_error(e)})") from None
    sweep_stale_temps(path, recursive=True)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, owner: str, inputs=()) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder; it replaces `path` only if the block succeeds.
    An existing `path` is replaced only when `owner` wrote it (its stamp); anything else is
    refused before any work, and so is a `path` that overlaps an input."""
    path = _checked_output(path, owner, inputs)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        mark_in_use(tmp, owner)                  # a concurrent run's sweep leaves it alone
        yield tmp
        (tmp / IN_USE).unlink(missing_ok=True)   # never part of the output
        _stamp(tmp, owner)
        if path.exists():
            _check_owner(path, owner)            # it may have changed while we worked
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
            os.replace(path, old)                # over the empty folder just made
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except OSError as e:
        if disk_full(e):
            raise _full_error(path, e) from None
        raise
    except InputError as e:
        if e.source and e.source.startswith(str(tmp)):   # name the file where it would be
            raise InputError(final_name(str(path) + e.source[len(str(tmp)):]), e.problem) from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def require_free_space(folder: str | Path, nbytes: int, what: str) -> None:
    """Refuse early (one line) when `folder`'s file system has less room than `nbytes`."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    if nbytes > free:
        raise InputError(folder, f"not enough free space: {what} needs {_size(nbytes)}, the "
                                 f"device has {_size(free)} free")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def open_memmap_out(path: str | Path, dtype, shape) -> np.ndarray:
    """A new .npy file opened as a writable memmap, its blocks allocated up front: on a full
    disk the kernel then says ENOSPC here (one line) instead of raising SIGBUS on a write."""
    path = Path(path)
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = offset = 0
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            offset = f.tell()
            size = offset + nbytes
            if size > offset:
                os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        path.unlink(missing_ok=True)
        if disk_full(e):
            raise InputError(final_name(path), f"no space left on the device for {_size(nbytes)} "
                                   f"({short_error(e)})") from None
        raise
    if size == offset:       # np.memmap cannot map zero bytes
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r+", offset=offset, shape=shape)


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


# -- reading JSON / YAML documents with one-line errors ------------------------------------
def read_json(path: str | Path, *, missing: str, unreadable: str):
    """A JSON document; a missing or broken file is an InputError naming it ("missing" and
    "unreadable" word the two messages; the error class is appended to the second)."""
    return _read_doc(Path(path), json.loads, (json.JSONDecodeError,), missing, unreadable)


def read_yaml(path: str | Path, *, missing: str = "params file not found",
              unreadable: str = "unreadable YAML"):
    import yaml

    return _read_doc(Path(path), yaml.safe_load, (yaml.YAMLError,), missing, unreadable)


def _read_doc(path: Path, parse, errors: tuple, missing: str, unreadable: str):
    try:
        return parse(path.read_text())
    except FileNotFoundError:
        raise InputError(path, missing) from None
    except (OSError, UnicodeDecodeError, *errors) as e:
        raise InputError(path, f"{unreadable} ({e.__class__.__name__})") from None


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
