"""What mined candidates look like: score curves, and (embedded dataset) who the candidates are.

:func:`candidates_report` writes, atomically, into a report folder:

* ``scores_i2t.png`` / ``scores_t2i.png``: score vs rank (median, 10-90% band) and the
  histograms of the rank-0 and last-rank scores (skipped when the candidates carry no
  scores, e.g. imported AOQ files);
* ``report.md``: shapes, metadata, score statistics per rank bucket and, with the scene
  graphs of the embedded dataset, the composition of the top-b candidates per bucket;
* ``report.json``: the same numbers.

Rank buckets: for each b in ``buckets`` with b <= K (and K itself), "top b" = ranks 0 .. b-1.
Score statistics are taken AT rank b-1 (over all anchors); composition shares over ALL of
the top b (what sampling uniformly over ranks [0, b) draws, as AOQ's ``offcandisize`` does).
Composition categories (a candidate may be both sibling and false negative):

* ``sibling``: same family as the anchor (the hard negatives the generator planted);
* ``false_negative``: the caption truly describes the anchor image (i2t: candidate caption
  of anchor image; t2i: anchor caption of candidate image);
* ``sibling_and_false_negative``: both;
* ``unrelated``: neither. sibling + false_negative - both + unrelated = 1.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data import CAPS_PER_IMAGE
from pipeline.errors import InputError
from pipeline.io import atomic_dir, atomic_path, jsonable, write_text
from pipeline.data.scene_graphs import FactIndex

DEFAULT_BUCKETS = (1, 5, 10, 20, 50, 100, 300, 1000, 2000)
CATEGORIES = ("sibling", "false_negative", "sibling_and_false_negative", "unrelated")
PLOT_ROWS = 5000           # rows sampled (evenly) for the score-vs-rank curves
EXAMPLES = 3               # anchors shown per direction in report.md (with captions)
EXAMPLE_CANDS = 5
DIRECTIONS = {"i2t": "image → caption", "t2i": "caption → image"}


def _bucket_list(buckets: Sequence[int], k: int) -> list[int]:
    out = sorted({int(b) for b in buckets if 1 <= int(b) <= k} | {k})
    return out


def _score_stats(scores: np.ndarray, bks: list[int]) -> list[dict]:
    rows = []
    for b in bks:
        col = np.asarray(scores[:, b - 1], dtype=np.float64)
        p10, p50, p90 = np.percentile(col, [10, 50, 90])
        rows.append({"top": b, "rank": b - 1, "p10": float(p10), "median": float(p50),
                     "p90": float(p90), "mean": float(col.mean()),
                     "min": float(col.min()), "max": float(col.max())})
    return rows


def _categories(direction: str, ids: np.ndarray, q: np.ndarray, idx: FactIndex):
    """Bool (sibling, false negative) masks for the candidate block ``ids`` of anchors ``q``."""
    ids = np.asarray(ids, dtype=np.int64)
    if direction == "i2t":
        sib = idx.family[ids // CAPS_PER_IMAGE] == idx.family[q][:, None]
        fn = idx.describes(ids, q[:, None])
    else:
        sib = idx.family[ids] == idx.family[q // CAPS_PER_IMAGE][:, None]
        fn = idx.describes(q[:, None], ids)
    return sib, fn


def _composition(direction: str, ids: np.ndarray, idx: FactIndex, bks: list[int],
                 chunk: int = 2048) -> list[dict]:
    n, k = ids.shape
    counts = {c: np.zeros(k, dtype=np.int64) for c in CATEGORIES}
    for s in range(0, n, chunk):
        q = np.arange(s, min(n, s + chunk), dtype=np.int64)
        sib, fn = _categories(direction, ids[s:s + chunk], q, idx)
        counts["sibling"] += sib.sum(axis=0)
        counts["false_negative"] += fn.sum(axis=0)
        counts["sibling_and_false_negative"] += (sib & fn).sum(axis=0)
        counts["unrelated"] += (~sib & ~fn).sum(axis=0)
    cum = {c: np.cumsum(v) for c, v in counts.items()}
    rows = []
    for b in bks:
        total = n * b
        row = {"top": b, "candidates": int(total)}
        for c in CATEGORIES:
            row[c] = int(cum[c][b - 1])
            row[f"{c}_share"] = float(cum[c][b - 1]) / total if total else 0.0
        rows.append(row)
    return rows


def _plot(path: Path, scores: np.ndarray, direction: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, k = scores.shape
    rows = np.unique(np.linspace(0, n - 1, min(n, PLOT_ROWS)).round().astype(np.int64))
    s = np.asarray(scores[rows], dtype=np.float64)
    p10, p50, p90 = np.percentile(s, [10, 50, 90], axis=0)
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    r = np.arange(k)
    ax1.fill_between(r, p10, p90, alpha=0.3, label="10-90%")
    ax1.plot(r, p50, label="median")
    ax1.set_xlabel("rank")
    ax1.set_ylabel("score")
    if k > 20:
        ax1.set_xscale("symlog", linthresh=10)
    ax1.set_title(f"{direction}: score vs rank ({len(rows)} of {n} anchors)")
    ax1.legend()
    first = np.asarray(scores[:, 0], dtype=np.float64)
    last = np.asarray(scores[:, k - 1], dtype=np.float64)
    lo, hi = float(min(first.min(), last.min())), float(max(first.max(), last.max()))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 51)
    ax2.hist(first, bins=bins, alpha=0.6, label="rank 0")
    ax2.hist(last, bins=bins, alpha=0.6, label=f"rank {k - 1} (last)")
    ax2.set_xlabel("score")
    ax2.set_ylabel("anchors")
    ax2.set_title(f"{direction}: first and last candidate")
    ax2.legend()
    fig.suptitle(title)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.84, wspace=0.25)  # (tight_layout: 2x slower)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def _md_direction(d: str, sec: dict, examples: list[str]) -> list[str]:
    n, k = sec["shape"]
    out = [f"## {d} ({DIRECTIONS[d]}): {n} anchors × K = {k}", ""]
    if sec["scores"] is None:
        out += ["No scores stored with these candidates (e.g. imported AOQ files): "
                "score statistics and plots skipped.", ""]
    else:
        out += [f"Score at rank b-1 over all anchors (plot: `scores_{d}.png`).", "",
                "| top b | rank | p10 | median | p90 | mean | min | max |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sec["scores"]:
            out.append(f"| {r['top']} | {r['rank']} | {_fmt(r['p10'])} | {_fmt(r['median'])} | "
                       f"{_fmt(r['p90'])} | {_fmt(r['mean'])} | {_fmt(r['min'])} | {_fmt(r['max'])} |")
        out.append("")
    if sec["composition"] is not None:
        out += ["Composition of the top-b candidates (siblings: same family; false negatives: "
                "the caption truly describes the anchor image).", "",
                "| top b | candidates | siblings | false negatives | both | unrelated |",
                "|---:|---:|---:|---:|---:|---:|"]
        for r in sec["composition"]:
            out.append(f"| {r['top']} | {r['candidates']} | {_pct(r['sibling_share'])} | "
                       f"{_pct(r['false_negative_share'])} | "
                       f"{_pct(r['sibling_and_false_negative_share'])} | {_pct(r['unrelated_share'])} |")
        out.append("")
    if examples:
        out += ["Examples:", "", *examples, ""]
    return out


def _examples(d: str, ids: np.ndarray, scores, captions, idx: FactIndex | None) -> list[str]:
    lines = []
    n, k = ids.shape
    for a in range(min(EXAMPLES, n)):
        if d == "i2t":
            lines.append(f"- image {a} (\"{captions[CAPS_PER_IMAGE * a]}\")")
        else:
            lines.append(f"- caption {a}: \"{captions[a]}\"")
        row = np.asarray(ids[a, :EXAMPLE_CANDS], dtype=np.int64)
        tags = [""] * len(row)
        if idx is not None:
            sib, fn = _categories(d, row[None, :], np.array([a], dtype=np.int64), idx)
            tags = [" [" + ", ".join(t for t, on in (("sibling", s), ("false negative", f)) if on) + "]"
                    if (s or f) else "" for s, f in zip(sib[0], fn[0])]
        for r, c in enumerate(row):
            sc = f" {float(scores[a, r]):.4f}" if scores is not None else ""
            if d == "i2t":
                lines.append(f"  - rank {r}:{sc} caption {c}: \"{captions[c]}\"{tags[r]}")
            else:
                lines.append(f"  - rank {r}:{sc} image {c} (\"{captions[CAPS_PER_IMAGE * c]}\"){tags[r]}")
    return lines


def candidates_report(cands, out_dir, *, graphs=None, captions: Sequence[str] | None = None,
                      buckets: Sequence[int] = DEFAULT_BUCKETS, name: str | None = None,
                      inputs=()) -> dict:
    """Write the report files for ``cands`` (a ``Candidates``-like object: ``i2t``, ``t2i``,
    ``i2t_scores``, ``t2i_scores`` (or None), ``meta``) into ``out_dir``; return the JSON dict.

    ``graphs``: scene graphs of the split (``load_graphs``) or a ``FactIndex``: adds the
    composition tables. ``captions``: the split's captions: adds a few examples. ``name``:
    the candidate set's name (shown in titles). ``inputs``: folders the report is made
    from, which ``out_dir`` may not overlap. The folder is built beside ``out_dir`` and
    renamed into place whole (replacing only an earlier candidates report).
    """
    with atomic_dir(out_dir, "candidates-report", inputs=inputs) as tmp:
        return _write_report(cands, tmp, graphs=graphs, captions=captions, buckets=buckets,
                             name=name)


def _write_report(cands, out_dir: Path, *, graphs, captions, buckets, name) -> dict:
    i2t, t2i = cands.i2t, cands.t2i
    n_i, n_c = i2t.shape[0], t2i.shape[0]
    if i2t.ndim != 2 or t2i.ndim != 2 or i2t.shape[1] < 1 or t2i.shape[1] < 1:
        raise InputError(None, f"candidates: expected 2-D i2t and t2i arrays with K >= 1, got "
                               f"{i2t.shape} and {t2i.shape}")
    if n_c != CAPS_PER_IMAGE * n_i:
        raise InputError(None, f"candidates: {n_i} i2t rows need {CAPS_PER_IMAGE * n_i} t2i rows, got {n_c}")
    idx = None
    if graphs is not None:
        idx = graphs if isinstance(graphs, FactIndex) else FactIndex(graphs)
        if idx.n_images != n_i:
            raise InputError(None, f"scene graphs describe {idx.n_images} images, the candidates {n_i}")
    if captions is not None and len(captions) != n_c:
        raise InputError(None, f"{len(captions)} captions given, the candidates have {n_c} caption rows")
    meta = dict(getattr(cands, "meta", None) or {})

    name = name or meta.get("name")
    result: dict = {"name": name, "shapes": {"i2t": list(i2t.shape), "t2i": list(t2i.shape)},
                    "n_images": int(n_i), "n_captions": int(n_c), "meta": jsonable(meta),
                    "buckets_requested": [int(b) for b in buckets],
                    "scene_graphs": idx is not None}
    md_sections: list[str] = []
    plots = []
    for d, ids, scores in (("i2t", i2t, cands.i2t_scores), ("t2i", t2i, cands.t2i_scores)):
        k = ids.shape[1]
        bks = _bucket_list(buckets, k)
        sec = {"shape": [int(ids.shape[0]), int(k)], "buckets": bks,
               "scores": _score_stats(scores, bks) if scores is not None else None,
               "composition": _composition(d, ids, idx, bks) if idx is not None else None}
        png = out_dir / f"scores_{d}.png"
        if scores is not None:
            _plot(png, scores, d, f"{d} candidates of {name or 'an unnamed set'}")
            plots.append(png.name)
        result[d] = sec
        ex = _examples(d, ids, scores, captions, idx) if captions is not None else []
        md_sections += _md_direction(d, sec, ex)
    result["plots"] = plots

    md = [f"# Candidate report{': ' + name if name else ''}", "",
          f"- i2t: {n_i} × {i2t.shape[1]} (caption ids per image)",
          f"- t2i: {n_c} × {t2i.shape[1]} (image ids per caption)",
          f"- scores: {'stored' if cands.i2t_scores is not None else 'none (plots skipped)'}",
          f"- scene graphs: {'yes' if idx is not None else 'no (composition skipped)'}"]
    for key, value in result["meta"].items():       # every meta key, compactly (full JSON below)
        text = json.dumps(value)
        md.append(f"- meta {key}: `{text if len(text) <= 160 else text[:157] + '...'}`")
    md += ["", *md_sections, "## Metadata", "", "```json",
           json.dumps(result["meta"], indent=2, sort_keys=True), "```", ""]
    write_text(out_dir / "report.md", "\n".join(md))
    write_text(out_dir / "report.json", json.dumps(result, indent=2) + "\n")
    return result
