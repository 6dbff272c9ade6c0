"""`itm-pipeline candidates-report`: plots and tables describing a mined candidate set."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.data import CAPS_PER_IMAGE
from pipeline.errors import InputError


@click.command("candidates-report")
@click.argument("candidates_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--name", default=None,
              help="Candidate set name (i2t_<name>.npy); default: the folder's only set.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Dataset folder of the split the candidates were mined on: its captions add "
                   "examples, and the embedded dataset's scene graphs add the sibling / "
                   "false-negative composition.")
@click.option("--split", default="train", show_default=True, help="Split of --data.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Report folder.  [default: DIR_report_<name> or DIR_report, beside DIR]")
@click.option("--bucket", "buckets", type=click.IntRange(min=1), multiple=True,
              help="Rank bucket b, 'top b' (repeatable).  [default: 1 5 10 20 50 100 300 1000 2000]")
def candidates_report(candidates_dir: Path, name: str | None, data_dir: Path | None, split: str,
                      out_dir: Path | None, buckets: tuple[int, ...]):
    """Write score plots, report.md and report.json for the candidate set in DIR."""
    from pipeline.data.scene_graphs import graphs_path, load_graphs
    from pipeline.mining.candidates import load_candidates
    from pipeline.mining.report import DEFAULT_BUCKETS
    from pipeline.mining.report import candidates_report as write_report

    graphs = captions = None
    n_images = None
    if data_dir is not None:
        from pipeline.data.precomp import _read_captions

        if not data_dir.is_dir():
            raise InputError(data_dir, "data folder not found" if not data_dir.exists() else "not a folder")
        caps_path = data_dir / f"{split}_caps.txt"
        if caps_path.is_file():
            captions = _read_captions(caps_path)
        if graphs_path(data_dir, split).is_file():
            graphs = load_graphs(data_dir, split)
            n_images = len(graphs)
        elif captions is not None:
            n_images = len(captions) // CAPS_PER_IMAGE
        if captions is None and graphs is None:
            raise InputError(data_dir, f"neither {split}_caps.txt nor {split}_graphs.jsonl found")
        if captions is not None and graphs is not None and len(captions) != CAPS_PER_IMAGE * len(graphs):
            raise InputError(caps_path, f"{len(captions)} captions, but {len(graphs)} scene graphs")
    cands = load_candidates(candidates_dir, name, n_images=n_images)
    if captions is not None and len(captions) != cands.n_captions:
        raise InputError(data_dir / f"{split}_caps.txt",
                         f"{len(captions)} captions, the candidates have {cands.n_captions} caption rows")
    if out_dir is None:   # beside DIR: an output never lies inside an input
        out_dir = candidates_dir.parent / f"{candidates_dir.name}_report{'_' + name if name else ''}"
    res = write_report(cands, out_dir, graphs=graphs, captions=captions,
                       buckets=buckets or DEFAULT_BUCKETS, name=name,
                       inputs=[candidates_dir, data_dir])
    click.echo(f"candidates: i2t {tuple(cands.i2t.shape)}, t2i {tuple(cands.t2i.shape)}, "
               f"scores {'stored' if cands.i2t_scores is not None else 'none (plots skipped)'}")
    for d in ("i2t", "t2i"):
        comp = res[d]["composition"]
        if comp:
            last = comp[-1]
            click.echo(f"{d} top {last['top']}: siblings {100 * last['sibling_share']:.1f}%, "
                       f"false negatives {100 * last['false_negative_share']:.1f}%, "
                       f"unrelated {100 * last['unrelated_share']:.1f}%")
    if data_dir is not None and graphs is None:
        click.echo(f"no {split}_graphs.jsonl in {data_dir}: composition skipped")
    files = ", ".join(res["plots"] + ["report.md", "report.json"])
    click.echo(f"wrote {out_dir}: {files}")
