"""DVC stage `report`: one table and one plot comparing the fine-tuned runs with the base.

Inputs are the test-metric JSONs written by `evaluate` (`<run>.json`, and on the embedded
data set `<run>_groups.json` with the within-family scores). Runs are named
`<model>-<loss>`; the base model's row comes first, then the rows of models pretrained by
the `pretrain` stage (`pretrain-<model>`), the runs, and the ensembles (`ensemble-<name>`,
written by `itm-pipeline ensemble`). Outputs (atomic): `report.md`
(markdown: model, loss, R@1/5/10 both ways, rsum, within-family rsum) and `recall.png`
(R@1 per direction and run).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.evaluation.table import read_metrics_json
from pipeline.io import atomic_dir, atomic_path, write_text

_RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def collect(metrics_dir, runs: list[str], base: str | None = "base_test",
            pretrained: list[str] = (), ensembles: list[str] = ()) -> list[dict]:
    """One row per run: {"run", "model", "loss", metrics..., "family_rsum"}; first the
    base model, then each pretrained model's own base (`pretrain-<model>`), the runs, and
    last the ensembles (`ensemble-<name>`)."""
    folder = Path(metrics_dir)
    rows = []
    names = ([base] if base else []) + [f"pretrain-{m}" for m in pretrained] + list(runs) \
        + [f"ensemble-{e}" for e in ensembles]
    for name in names:
        m = read_metrics_json(folder / f"{name}.json")
        model, _, loss = name.partition("-")
        if name == base:
            model, loss = "base", "(base)"
        elif model == "pretrain":
            model, loss = loss, "(pretrain)"
        elif model == "ensemble":
            model, loss = f"ensemble {loss}", "(mean of " + " + ".join(
                mb.get("model", "?") for mb in m.get("members", [])) + ")"
        row = {"run": name, "model": model, "loss": loss, **{k: m.get(k) for k in _RECALLS},
               "rsum": m["rsum"], "family_rsum": None}
        groups = folder / f"{name}_groups.json"
        if groups.is_file():
            row["family_rsum"] = read_metrics_json(groups)["family"]["rsum"]
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| model | loss | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | within-family rsum |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    fmt = lambda v: "-" if v is None else f"{float(v):.1f}"  # noqa: E731
    body = "".join(f"| {r['model']} | {r['loss']} | " + " | ".join(fmt(r[k]) for k in _RECALLS)
                   + f" | {fmt(r['rsum'])} | {fmt(r['family_rsum'])} |\n" for r in rows)
    return head + body


def recall_plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 1.1 * len(rows) + 2), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = range(len(rows))
    width = 0.38
    ax.bar([i - width / 2 for i in x], [r["i2t_r1"] for r in rows], width, label="image→text R@1")
    ax.bar([i + width / 2 for i in x], [r["t2i_r1"] for r in rows], width, label="text→image R@1")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r["run"] for r in rows], rotation=20, ha="right", fontsize=8)
    low = min(min(r["i2t_r1"], r["t2i_r1"]) for r in rows)
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.set_ylabel("R@1 (test)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def run(*, metrics_dir, runs: list[str], out_dir, base: str | None = "base_test",
        pretrained: list[str] = (), ensembles: list[str] = ()) -> dict:
    rows = collect(metrics_dir, runs, base, pretrained, ensembles)
    table = markdown(rows)
    with atomic_dir(out_dir, "report", inputs=[metrics_dir]) as out:
        write_text(out / "report.md", "# Test-split retrieval, base and fine-tuned runs\n\n" + table)
        recall_plot(rows, out / "recall.png")
    return {"rows": rows, "markdown": table}
