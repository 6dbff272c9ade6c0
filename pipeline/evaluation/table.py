"""Plain-text and markdown tables of retrieval metrics (one row per named result)."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import InputError

_COLUMNS = (
    ("i2t_r1", "R@1"), ("i2t_r5", "R@5"), ("i2t_r10", "R@10"),
    ("t2i_r1", "R@1"), ("t2i_r5", "R@5"), ("t2i_r10", "R@10"),
    ("rsum", "rsum"),
)


def _cell(metrics: dict, key: str) -> str:
    v = metrics.get(key)
    if v is None:
        return "-"
    return f"{float(v):.1f}"


def format_metrics_table(rows: dict[str, dict], title: str | None = None) -> str:
    """A fixed-width table: name, i2t R@1 R@5 R@10, t2i R@1 R@5 R@10, rsum (1 decimal)."""
    names = [str(n) for n in rows]
    cells = [[_cell(m, k) for k, _ in _COLUMNS] for m in rows.values()]
    name_w = max([len("name")] + [len(n) for n in names])
    w = max([6] + [len(c) for row in cells for c in row])

    def line(name: str, values: list[str]) -> str:
        i2t = " ".join(v.rjust(w) for v in values[0:3])
        t2i = " ".join(v.rjust(w) for v in values[3:6])
        return f"{name.ljust(name_w)} | {i2t} | {t2i} | {values[6].rjust(w)}"

    group_w = 3 * w + 2
    out = []
    if title:
        out.append(title)
    out.append(f"{'':{name_w}} | {'image->text'.center(group_w)} | {'text->image'.center(group_w)} | {'':{w}}")
    header = line("name", [h for _, h in _COLUMNS])
    out.append(header)
    out.append("-" * len(header))
    for name, row in zip(names, cells):
        out.append(line(name, row))
    return "\n".join(s.rstrip() for s in out) + "\n"


def format_markdown_table(rows: dict[str, dict]) -> str:
    """The same table as GitHub markdown."""
    head = ["name"] + [f"i2t {h}" for _, h in _COLUMNS[:3]] + [f"t2i {h}" for _, h in _COLUMNS[3:6]] + ["rsum"]
    out = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for name, m in rows.items():
        vals = [str(name).replace("|", "\\|")] + [_cell(m, k) for k, _ in _COLUMNS]
        out.append("| " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


def read_metrics_json(path: str | Path) -> dict:
    """A JSON written by `evaluate` (metrics with 'rsum', or --groups-json's 'family' and
    'random'); a missing or unreadable file is an InputError naming it."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "metrics file not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(path, f"unreadable metrics JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict) or not ("rsum" in doc or ("family" in doc and "random" in doc)):
        raise InputError(path, "not a metrics JSON (no 'rsum')")
    return doc
