"""`itm-pipeline`: one command per DVC stage plus utilities."""
from __future__ import annotations

import os
import sys

import click

from pipeline.errors import InputError
from pipeline.io import disk_full, final_name, short_error


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="itm-pipeline")
@click.option("--threads", type=click.IntRange(min=1), envvar="ITM_THREADS", default=None,
              help="CPU threads for torch (env ITM_THREADS).  [default: torch's, = cores]")
def cli(threads):
    """Offline hard-negative mining and fine-tuning for image-text matching.

    Every DVC stage in dvc.yaml runs one of these commands; `dvc repro` runs them all.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)


def _register():
    from cli.candidates_report import candidates_report
    from cli.check_params import check_params
    from cli.ensemble_command import ensemble
    from cli.evaluate_sims import evaluate_sims
    from cli.finetune_command import finetune
    from cli.import_candidates import import_candidates
    from cli.mining_commands import embed, mine_candidates
    from cli.report_command import report
    from cli.stage_commands import evaluate, list_models, metrics_table, prepare_data, train
    from cli.validate_data import validate_data

    for cmd in (prepare_data, validate_data, train, evaluate, embed, mine_candidates, finetune,
                import_candidates, candidates_report, evaluate_sims, metrics_table, list_models,
                report, check_params, ensemble):
        cli.add_command(cmd)


_register()


def main(argv: list[str] | None = None) -> int:
    """Entry point; callable from tests. Bad input: one line on stderr, exit code 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cli.main(args=argv, prog_name="itm-pipeline", standalone_mode=False)
    except InputError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except OSError as e:
        # a full disk, a read-only file system, a missing permission wherever the writers
        # do not word it themselves: one line, exit 2 (their temp files are already gone)
        where = final_name(e.filename) if e.filename else "writing an output"
        what = "no space left on the device" if disk_full(e) else (e.strerror or short_error(e))
        click.echo(f"error: {where}: {what}", err=True)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.UsageError as e:
        # a bad option or value: one line like every other bad input (not click's usage block)
        where = e.ctx.command_path if e.ctx is not None else "itm-pipeline"
        click.echo(f"error: {where}: {e.format_message()} (see '{where} --help')", err=True)
        return 2
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
