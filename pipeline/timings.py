"""Wall times, hosts and rates of a run, kept out of the DVC-tracked outputs.

A tracked output must be the same bytes for the same inputs and parameters: a timestamp in
one makes `dvc status` report every downstream stage changed. What differs from run to run
(seconds, GFLOP/s, the host, when it finished, the GEMM precision `auto` picked by timing)
goes to a `timings.json` that dvc.yaml does not declare: inside a training run's folder, or
beside an output folder that is itself a DVC out (`artifacts/candidates.timings.json`).
"""
from __future__ import annotations

import json
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

from pipeline.errors import InputError
from pipeline.io import jsonable, write_json

FILE = "timings.json"


def beside(out_dir) -> Path:
    """The timings file of an output folder: a sibling, so the folder's bytes stay the same."""
    out = Path(out_dir)
    return out.with_name(f"{out.name}.{FILE}")


def write_timings(path, command: str, record: dict) -> Path:
    """Overwrite `path` with `record` plus the command, host and finishing time."""
    path = Path(path)
    if path.exists() and not _ours(path):   # a user's file of that name: never overwritten
        print(f"warning: {path} exists and was not written by itm-pipeline: timings not "
              "saved", file=sys.stderr)
        return path
    doc = {"command": command, "host": socket.gethostname(),
           "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}
    try:   # the timings are a record, not an output: a failure to save them fails nothing
        write_json(path, jsonable(doc))
    except (InputError, OSError) as e:
        print(f"warning: timings not saved: {e}", file=sys.stderr)
    return path


def _ours(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "command" in doc and "host" in doc and "finished_at" in doc
