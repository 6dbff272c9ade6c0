"""`ensemble`: evaluate the mean similarity of two or more checkpoints (pipeline.ensemble)."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.errors import InputError


def _weights(text: str | None, n: int):
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise InputError("--weights", f"{text!r}: give {n} comma-separated numbers") from None
    if len(values) != n:
        raise InputError("--weights", f"{text!r}: give {n} numbers, one per checkpoint")
    return values


@click.command("ensemble")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@click.option("--data", "data_dir", type=click.Path(), default=None,
              help="SCAN precomp data folder.  [default: artifacts/data]")
@click.option("--split", default=None, help="Split to score.  [default: test]")
@click.option("--protocol", type=click.Choice(["full", "f30k_1k", "coco1k_5fold", "coco5k"]),
              default=None, help="[default: full]")
@click.option("--weights", default=None,
              help="Comma-separated member weights (normalised).  [default: equal: the papers' mean]")
@click.option("--json", "out_json", type=click.Path(), default=None,
              help="Write the metrics (and the members) here.")
@click.option("--groups-json", type=click.Path(), default=None,
              help="Embedded dataset: write within-family vs random-group metrics here.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ...  [default: cpu]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward pass.  [default: 128]")
@click.option("--params", "params_file", type=click.Path(), default=None,
              help="Read split, protocol, device and batch size from this params.yaml's "
                   "--section (evaluate's); explicit options win.")
@click.option("--section", default="evaluate_base", show_default=True)
@click.option("--quiet", is_flag=True)
def ensemble(checkpoints, data_dir, split, protocol, weights, out_json, groups_json, device,
             batch_size, params_file, section, quiet):
    """Evaluate the averaged similarity of CHECKPOINTS (any kinds; e.g. SGRAF = an sgr and an
    saf checkpoint, BFAN = focal_type equal + prob, SCAN = t2i + i2t)."""
    from pipeline.ensemble import load_ensemble
    from pipeline.evaluation.table import format_metrics_table
    from pipeline.io import refuse_overlap, write_json
    from stages.evaluate import family_evaluation

    from cli.params import load_section, pick
    from stages.params_schema import evaluate_section

    p = load_section(params_file, section, known=evaluate_section()) if params_file else {}
    data_dir = pick(data_dir, p, "data", "artifacts/data")
    split, protocol = pick(split, p, "split", "test"), pick(protocol, p, "protocol", "full")
    device, batch_size = pick(device, p, "device", "cpu"), pick(batch_size, p, "batch_size", 128)
    for out in (out_json, groups_json):
        if out:
            refuse_overlap(out, [*checkpoints, data_dir])
    gallery, members = load_ensemble(checkpoints, data_dir, split, device=device,
                                     batch_size=batch_size, weights=_weights(weights, len(checkpoints)),
                                     progress=not quiet)
    with_groups = (Path(data_dir) / f"{split}_graphs.jsonl").exists()
    if with_groups:             # the family metrics need the matrix: score it once
        metrics, matrix = gallery.evaluate_and_matrix(protocol, source="ensemble")
    else:
        metrics = gallery.evaluate(protocol, source="ensemble")
    metrics["members"] = members
    metrics["weights"] = [round(float(w), 6) for w in gallery.weights]
    name = " + ".join(f"{m['model']}({Path(m['checkpoint']).parent.name})" for m in members)
    click.echo(format_metrics_table({f"ensemble/{split}": metrics},
                                    title=f"{name}, protocol {metrics['protocol']}"))
    if with_groups:
        groups = family_evaluation(data_dir, split, matrix)
        metrics["groups"] = groups
        if groups_json:
            write_json(groups_json, groups)
        click.echo(f"within-family (groups of {groups['group_size']}): rsum "
                   f"{groups['family']['rsum']:.1f} | random groups: rsum {groups['random']['rsum']:.1f}")
    if out_json:
        write_json(out_json, {k: v for k, v in metrics.items() if k != "groups"})
