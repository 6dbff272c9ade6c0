"""`itm-pipeline check-params`: the first DVC stage (stages/check_params.py)."""
from __future__ import annotations

import click


@click.command("check-params")
@click.option("--params", "params_file", type=click.Path(dir_okay=False), default="params.yaml",
              show_default=True, help="The params file dvc.yaml interpolates.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write this small file (the same bytes for every valid params file) "
                   "when the check passes: the stage's output that `prepare` depends on.")
def check_params(params_file, out):
    """Check every params value dvc.yaml puts in a command or path: model names, losses,
    the fine-tuning runs (one line and exit code 2 on the first bad one)."""
    from stages import check_params as stage

    if out:
        runs = stage.run(params_file=params_file, out=out)
    else:
        runs = stage.check(stage.load(params_file), params_file)
    click.echo(f"{params_file}: ok ({len(runs)} fine-tuning runs: "
               + ", ".join(r["name"] for r in runs) + ")")
