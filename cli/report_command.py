"""`itm-pipeline report`: the test-split table and recall plot of every run of the grid."""
from __future__ import annotations

import click

from cli.params import load_section
from pipeline.errors import InputError


@click.command("report")
@click.option("--metrics-dir", type=click.Path(), default="artifacts/metrics", show_default=True,
              help="Folder of evaluate's <run>.json / <run>_groups.json files.")
@click.option("--run", "runs", multiple=True, metavar="MODEL-LOSS",
              help="A fine-tuned run to include (repeatable).  [default: the params' finetune.runs]")
@click.option("--base", default="base_test", show_default=True,
              help="Metrics file stem of the base model ('' for none).")
@click.option("--out", "out_dir", type=click.Path(), default="artifacts/report",
              show_default=True, help="Writes report.md and recall.png here.")
@click.option("--pretrained", multiple=True, metavar="MODEL",
              help="A model pretrained by the pretrain stage: its pretrain-MODEL row "
                   "(repeatable).  [default: the params' pretrain.models]")
@click.option("--ensemble", "ensemble_names", multiple=True, metavar="NAME",
              help="An ensemble's ensemble-NAME row (repeatable).  [default: the params' ensembles]")
@click.option("--params", "params_file", type=click.Path(), default=None,
              help="Take the runs from this params.yaml's finetune.runs (grouped by model).")
def report(metrics_dir, runs, base, pretrained, ensemble_names, out_dir, params_file):
    """Markdown table and recall plot of the base model and every fine-tuned run."""
    from stages import report as stage

    if not runs and params_file:
        from stages.check_params import finetune_runs

        runs = [r["name"] for r in finetune_runs(load_section(params_file, "finetune"), params_file)]
    if not runs:
        raise InputError(params_file, "no runs: give --run MODEL-LOSS or finetune.runs in --params")
    if not pretrained:
        pretrained = load_section(params_file, "pretrain", optional=True).get("models") or []
    if not ensemble_names and params_file:
        from stages.check_params import ensembles, load

        ensemble_names = list(ensembles(load(params_file), params_file))
    res = stage.run(metrics_dir=metrics_dir, runs=list(runs), out_dir=out_dir, base=base or None,
                    pretrained=list(pretrained), ensembles=list(ensemble_names))
    click.echo(res["markdown"], nl=False)
