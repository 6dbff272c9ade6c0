"""Commands behind the DVC stages: prepare-data, train, evaluate; and small utilities."""
from __future__ import annotations

import json
from pathlib import Path

import click

from cli.params import EVALUATE_KEYS, TRAIN_KEYS, load_section, pick, run_options
from pipeline.errors import InputError

PARAMS_HELP = "Read defaults from this params.yaml (its --section); explicit options win."


@click.command("prepare-data")
@click.option("--dataset", type=click.Choice(["synthetic", "precomp"]), default=None,
              help="synthetic: generate the embedded default dataset; precomp: a real SCAN folder.")
@click.option("--out", "out_dir", type=click.Path(), default=None,
              help="Output data folder (SCAN precomp layout).  [default: artifacts/data]")
@click.option("--source", type=click.Path(), default=None, help="The SCAN precomp folder (--dataset precomp).")
@click.option("--n-train", type=int, default=None, help="Synthetic: training images.")
@click.option("--n-dev", type=int, default=None, help="Synthetic: dev images.")
@click.option("--n-test", type=int, default=None, help="Synthetic: test images.")
@click.option("--feature-dim", type=int, default=None, help="Synthetic: region feature width (2048 = BUTD).")
@click.option("--caption-mode", type=click.Choice(["full", "varied"]), default=None,
              help="Synthetic: captions state every fact (full) or a random subset (varied).")
@click.option("--seed", type=int, default=None)
@click.option("--params", "params_file", type=click.Path(), default=None, help=PARAMS_HELP)
@click.option("--section", default="prepare", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def prepare_data(dataset, out_dir, source, n_train, n_dev, n_test, feature_dim, caption_mode,
                 seed, params_file, section, quiet):
    """Write the data folder: generate the embedded dataset or validate a real one."""
    from stages import prepare

    from stages.params_schema import check_prepare

    p = load_section(params_file, section)
    if params_file:
        check_prepare(p, params_file, section)
    out_dir = out_dir or p.pop("out", None) or "artifacts/data"
    p.pop("out", None)
    for key, val in (("dataset", dataset), ("source", source), ("n_train", n_train),
                     ("n_dev", n_dev), ("n_test", n_test), ("feature_dim", feature_dim),
                     ("caption_mode", caption_mode), ("seed", seed)):
        if val is not None:
            p[key] = val
    p.setdefault("dataset", "synthetic")
    summary = prepare.run(p, out_dir, progress=not quiet)
    click.echo(f"wrote {out_dir}: " + json.dumps({k: v for k, v in summary.items()
                                                 if not isinstance(v, (dict, list))}))


def run_folder_options(f):
    """--data, --out, --epochs, --batch-size, --lr, --seed: shared by train and finetune."""
    for opt in reversed([
        click.option("--data", "data_dir", type=click.Path(), default=None, help="SCAN precomp data folder."),
        click.option("--out", "out_dir", type=click.Path(), default=None,
                     help="Run folder (checkpoint/, state/, logs)."),
        click.option("--epochs", type=int, default=None),
        click.option("--batch-size", type=int, default=None),
        click.option("--lr", type=float, default=None),
        click.option("--seed", type=int, default=None),
    ]):
        f = opt(f)
    return f


@click.command("train")
@click.option("--model", default=None, help="Registered model name (see list-models).  [default: vse_inf]")
@run_folder_options
@click.option("--model-option", "model_opts", multiple=True, metavar="KEY=VALUE",
              help="Override an architecture option of configs/models/<model>.yaml (repeatable).")
@click.option("--train-option", "train_opts", multiple=True, metavar="KEY=VALUE",
              help="Override a training option (repeatable), e.g. lr_update=8.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ...  [default: cpu]")
@click.option("--resume", is_flag=True, help="Continue from OUT/state exactly where it stopped.")
@click.option("--init", "init_from", type=click.Path(), default=None, help="Start from this checkpoint's weights.")
@click.option("--params", "params_file", type=click.Path(), default=None, help=PARAMS_HELP)
@click.option("--section", default="train_base", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--crash-after-steps", type=int, default=None, hidden=True)  # resume tests: SIGKILL itself
def train(model, data_dir, out_dir, epochs, batch_size, lr, seed, model_opts, train_opts, device,
          resume, init_from, params_file, section, quiet, crash_after_steps):
    """Train a model with the shared loop (dev-split selection, safetensors checkpoints)."""
    from stages import train_base

    p = load_section(params_file, section, known=TRAIN_KEYS)
    model = pick(model, p, "model", "vse_inf")
    data_dir = pick(data_dir, p, "data", "artifacts/data")
    out_dir = pick(out_dir, p, "out", None)
    if not out_dir:
        raise InputError(None, "--out is required (or 'out' in the params section)")
    model_options, train_options = run_options(p, model_opts, train_opts, epochs=epochs,
                                               batch_size=batch_size, lr=lr, seed=seed)
    result = train_base.run(model=model, data_dir=data_dir, out_dir=out_dir,
                            model_options=model_options, train_options=train_options,
                            device=pick(device, p, "device", "cpu"), resume=resume,
                            init_from=pick(init_from, p, "init", None), progress=not quiet,
                            kill_after_steps=crash_after_steps)
    click.echo(f"best dev rsum {result['best_dev_rsum']:.2f} at epoch {result['best_epoch']}; "
               f"checkpoint {result['checkpoint']}")


@click.command("evaluate")
@click.option("--checkpoint", type=click.Path(), default=None, help="Checkpoint folder.")
@click.option("--data", "data_dir", type=click.Path(), default=None, help="SCAN precomp data folder.")
@click.option("--split", default=None, help="Split to score.  [default: test]")
@click.option("--protocol", type=click.Choice(["full", "f30k_1k", "coco1k_5fold", "coco5k"]), default=None,
              help="full: the whole split; the others check the split's size.  [default: full]")
@click.option("--json", "out_json", type=click.Path(), default=None, help="Write the metrics here.")
@click.option("--groups-json", type=click.Path(), default=None,
              help="Embedded dataset: write within-family vs random-group metrics here.")
@click.option("--device", default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward pass.  [default: 128]")
@click.option("--sims", "sims_path", type=click.Path(), default=None,
              help="Also write the whole (N_img, 5*N_img) float32 score matrix to this .npy, block "
                   "by block with a sidecar PATH.json: a killed run resumes; evaluate-sims reads it.")
@click.option("--shortlist", type=click.Path(), default=None,
              help="Cross models: two-stage evaluation; the first stage from this `embed` folder or "
                   "independent-model checkpoint folder.")
@click.option("--shortlist-k", type=click.IntRange(min=1), default=None,
              help="Shortlist size per query re-scored by the cross model.  [default: 100]")
@click.option("--params", "params_file", type=click.Path(), default=None, help=PARAMS_HELP)
@click.option("--section", default="evaluate_base", show_default=True)
@click.option("--quiet", is_flag=True)
@click.option("--sims-block-rows", type=click.IntRange(min=1), default=None, hidden=True)  # resume tests
@click.option("--crash-after-blocks", type=int, default=None, hidden=True)  # resume tests: SIGKILL itself
def evaluate(checkpoint, data_dir, split, protocol, out_json, groups_json, device, batch_size,
             sims_path, shortlist, shortlist_k, params_file, section, quiet, sims_block_rows,
             crash_after_blocks):
    """Score a checkpoint on a split under a standard protocol and print the metrics table."""
    from pipeline.evaluation.table import format_metrics_table
    from stages import evaluate as stage

    p = load_section(params_file, section, known=EVALUATE_KEYS)
    checkpoint = pick(checkpoint, p, "checkpoint")
    if not checkpoint:
        raise InputError(None, "--checkpoint is required")
    split = pick(split, p, "split", "test")
    res = stage.run(checkpoint=checkpoint, data_dir=pick(data_dir, p, "data", "artifacts/data"),
                    split=split, protocol=pick(protocol, p, "protocol", "full"),
                    out_json=pick(out_json, p, "json"), groups_json=pick(groups_json, p, "groups_json"),
                    device=pick(device, p, "device", "cpu"),
                    batch_size=pick(batch_size, p, "batch_size", 128),
                    sims=pick(sims_path, p, "sims"), shortlist=pick(shortlist, p, "shortlist"),
                    shortlist_k=pick(shortlist_k, p, "shortlist_k"), sims_block_rows=sims_block_rows,
                    kill_after_blocks=crash_after_blocks, progress=not quiet)
    m = res["metrics"]
    title = f"protocol {m['protocol']}"
    if "shortlist_k" in m:
        title += f", two-stage (shortlist K={m['shortlist_k']} from {m['shortlist']})"
    click.echo(format_metrics_table({f"{Path(checkpoint).parent.name}/{split}": m}, title=title))
    if "shortlist_k" in m:
        click.echo(f"ground truth in the shortlist: i2t {m['gt_in_shortlist_i2t']:.1f}%, t2i "
                   f"{m['gt_in_shortlist_t2i']:.1f}%; {m['pairs_scored']:,} cross scores")
    if "sims" in m:
        click.echo(f"similarity matrix: {m['sims']} ({m['sims_blocks_computed']} blocks computed "
                   f"in this run)")
    if "groups" in res:
        g = res["groups"]
        click.echo(f"within-family (groups of {g['group_size']}): rsum {g['family']['rsum']:.1f}, "
                   f"R@1 i2t {g['family']['i2t_r1']:.1f} t2i {g['family']['t2i_r1']:.1f} | random groups: "
                   f"rsum {g['random']['rsum']:.1f}, R@1 i2t {g['random']['i2t_r1']:.1f} "
                   f"t2i {g['random']['t2i_r1']:.1f}")


@click.command("metrics-table")
@click.argument("files", nargs=-1, type=click.Path())
@click.option("--markdown", is_flag=True, help="Markdown instead of plain text.")
def metrics_table(files, markdown):
    """Print a table of metrics JSON files (as written by evaluate / evaluate-sims)."""
    from pipeline.evaluation.table import (format_markdown_table, format_metrics_table,
                                           read_metrics_json)

    rows = {}
    for f in files:
        path = Path(f)
        doc = read_metrics_json(path)
        if "family" in doc and "random" in doc:  # evaluate --groups-json
            size = doc.get("group_size", "")
            rows[f"{path.stem}: within family ({size})"] = doc["family"]
            rows[f"{path.stem}: random groups ({size})"] = doc["random"]
        else:
            rows[path.stem] = doc
    if not rows:
        raise InputError(None, "no metrics files given")
    click.echo(format_markdown_table(rows) if markdown else format_metrics_table(rows))


@click.command("list-models")
def list_models():
    """List the registered models and their config files."""
    from pipeline.models import list_models as names, model_config

    for name in names():
        m = model_config(name).get("model", {})
        click.echo(f"{name:12s} " + ", ".join(f"{k}={v}" for k, v in m.items()))
