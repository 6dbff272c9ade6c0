"""Commands behind the mining stages: embed, mine-candidates."""
from __future__ import annotations

from pathlib import Path

import click

from cli.params import load_section, pick
from pipeline.errors import InputError
from pipeline.timings import beside, write_timings
from stages.params_schema import EMBED as EMBED_KEYS
from stages.params_schema import mine_section as MINE_KEYS

PARAMS_HELP = "Read defaults from this params.yaml (its --section); explicit options win."

SCHEDULER_HELP = "Address of a running dask scheduler (tcp://host:8786): shard the work over its workers."
WORKERS_HELP = "Start a local dask cluster of N one-thread worker processes and shard the work."


def _section(params_file, section: str, known) -> dict:
    return load_section(params_file, section, known=known)


@click.command("embed")
@click.option("--checkpoint", type=click.Path(), default=None, help="Checkpoint folder (an indep model).")
@click.option("--data", "data_dir", type=click.Path(), default=None,
              help="SCAN precomp data folder.  [default: artifacts/data]")
@click.option("--split", default=None, help="Split to embed.  [default: train]")
@click.option("--out", "out_dir", type=click.Path(), default=None,
              help="Output folder: img_embs.npy, cap_embs.npy, embeddings.json.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward pass (captions: twice as many).  [default: 256]")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ...  [default: cpu]")
@click.option("--block-rows", type=click.IntRange(min=1), default=None,
              help="Rows encoded and written per block (memory bound).  [default: 4096]")
@click.option("--params", "params_file", type=click.Path(), default=None, help=PARAMS_HELP)
@click.option("--section", default="embed", show_default=True)
@click.option("--scheduler", default=None, help=SCHEDULER_HELP)
@click.option("--workers", type=click.IntRange(min=1), default=None, help=WORKERS_HELP)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def embed(checkpoint, data_dir, split, out_dir, batch_size, device, block_rows, params_file,
          section, scheduler, workers, quiet):
    """Embed a split with a checkpoint: L2-normalised float32 rows, streamed to .npy files."""
    from pipeline.mining.embed import DEFAULT_BLOCK_ROWS
    from stages import embed as stage

    p = _section(params_file, section, EMBED_KEYS)
    checkpoint = pick(checkpoint, p, "checkpoint")
    if not checkpoint:
        raise InputError(None, "--checkpoint is required")
    out_dir = pick(out_dir, p, "out")
    if not out_dir:
        raise InputError(None, "--out is required (or 'out' in the params section)")
    meta = stage.run(checkpoint=checkpoint, data_dir=pick(data_dir, p, "data", "artifacts/data"),
                     out_dir=out_dir, split=pick(split, p, "split", "train"),
                     batch_size=pick(batch_size, p, "batch_size", 256),
                     device=pick(device, p, "device", "cpu"),
                     block_rows=pick(block_rows, p, "block_rows", DEFAULT_BLOCK_ROWS),
                     scheduler=pick(scheduler, p, "scheduler"), workers=pick(workers, p, "workers"),
                     progress=not quiet)
    write_timings(beside(out_dir), "embed", {"seconds": meta["seconds"]})
    click.echo(f"embedded {meta['split']}: images ({meta['n_img']}, {meta['dim']}), captions "
               f"({meta['n_cap']}, {meta['dim']}) in {meta['seconds']:.1f} s -> {out_dir}")


@click.command("mine-candidates")
@click.option("--img-embs", type=click.Path(), default=None, help="(N_img, D) image embeddings .npy.")
@click.option("--cap-embs", type=click.Path(), default=None, help="(5 N_img, D) caption embeddings .npy.")
@click.option("--embeddings-dir", type=click.Path(), default=None,
              help="Folder written by `embed` (input); with --checkpoint, where to embed to.  "
                   "[default with --checkpoint: OUT/embeddings]")
@click.option("--checkpoint", type=click.Path(), default=None, help="Embed with this checkpoint first.")
@click.option("--data", "data_dir", type=click.Path(), default=None,
              help="SCAN precomp folder (to embed with --checkpoint; also names the files).")
@click.option("--split", default=None, help="Split to embed with --checkpoint.  [default: train]")
@click.option("--out", "out_dir", type=click.Path(), default=None,
              help="Output folder for the candidate files.")
@click.option("--name", default=None,
              help="File name suffix: i2t_<name>.npy, t2i_<name>.npy.  [default: from the data folder, "
                   "coco_precomp -> coco]")
@click.option("--k-i2t", type=click.IntRange(min=1), default=None,
              help="Captions per image (capped at N_cap - 5).  [default: 2000, AOQ's]")
@click.option("--k-t2i", type=click.IntRange(min=1), default=None,
              help="Images per caption (capped at N_img - 1).  [default: 400, AOQ's]")
@click.option("--backend", type=click.Choice(["torch", "faiss"]), default=None,
              help="torch: one exact tiled pass for both directions; faiss: one search per "
                   "direction.  [default: torch]")
@click.option("--precision", type=click.Choice(["bf16", "fp16", "fp32", "auto"]), default=None,
              help="torch GEMM precision (auto: the fastest on this machine); the answer is exact "
                   "in every case.  [default: auto]")
@click.option("--index", type=click.Choice(["flat", "ivf", "hnsw"]), default=None,
              help="faiss index: flat is exact, ivf / hnsw approximate.  [default: flat]")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ...  [default: cpu]")
@click.option("--row-block", type=click.IntRange(min=1), default=None, help="torch tile rows.  [default: 4096]")
@click.option("--col-block", type=click.IntRange(min=1), default=None, help="torch tile columns.  [default: 8192]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Embedding batch size with --checkpoint.  [default: 256]")
@click.option("--summary-json", type=click.Path(dir_okay=False), default=None,
              help="Also write a small summary JSON here (for dvc metrics).")
@click.option("--params", "params_file", type=click.Path(), default=None, help=PARAMS_HELP)
@click.option("--section", default="mine", show_default=True)
@click.option("--relative-margin", type=float, default=None,
              help="Drop a candidate scoring above (1 - M) x the anchor's positive score (0.05: above 95%).")
@click.option("--absolute-margin", type=float, default=None,
              help="Drop a candidate scoring above the anchor's positive score minus M.")
@click.option("--range-min", type=click.IntRange(min=0), default=None,
              help="Skip the top R ranks of the mined list.")
@click.option("--text-filter/--no-text-filter", default=None,
              help="Drop captions that duplicate (normalised text) one of the anchor image's own.")
@click.option("--rescore", type=click.Path(), default=None,
              help="Re-score the shortlists with this checkpoint (e.g. a cross-attention model, "
                   "which cannot be embedded) and keep its top K; needs the split's data.")
@click.option("--rescore-k", type=click.IntRange(min=1), default=None,
              help="Shortlist per image for --rescore (per caption: scaled by K t2i / K i2t).  "
                   "[default: 2 x K i2t]")
@click.option("--scheduler", default=None, help=SCHEDULER_HELP)
@click.option("--workers", type=click.IntRange(min=1), default=None, help=WORKERS_HELP)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def mine_candidates(img_embs, cap_embs, embeddings_dir, checkpoint, data_dir, split, out_dir, name,
                    k_i2t, k_t2i, backend, precision, index, device, row_block, col_block,
                    batch_size, summary_json, params_file, section, relative_margin,
                    absolute_margin, range_min, text_filter, rescore, rescore_k, scheduler,
                    workers, quiet):
    """Mine offline hard-negative candidates (AOQ's i2t_/t2i_<name>.npy plus Parquet)."""
    from pipeline.mining.mine import MineConfig
    from stages import mine as stage

    p = _section(params_file, section, MINE_KEYS)
    out_dir = pick(out_dir, p, "out")
    if not out_dir:
        raise InputError(None, "--out is required (or 'out' in the params section)")
    cfg = MineConfig.from_dict({
        "k_i2t": pick(k_i2t, p, "k_i2t"), "k_t2i": pick(k_t2i, p, "k_t2i"),
        "backend": pick(backend, p, "backend"), "precision": pick(precision, p, "precision"),
        "index": pick(index, p, "index"), "device": pick(device, p, "device"),
        "row_block": pick(row_block, p, "row_block"), "col_block": pick(col_block, p, "col_block"),
    }, source=str(params_file) if params_file else "options")
    if cfg.backend == "torch" and index not in (None, "flat"):
        raise InputError("--index", f"{index!r} is a faiss index: it needs --backend faiss "
                                    "(the torch pass is exact)")
    # Explicit input options replace the params section's inputs as a group, so that
    # `--img-embs A --cap-embs B` is not mixed with a `checkpoint:` from the params file.
    explicit_inputs = any(v is not None for v in (img_embs, cap_embs, embeddings_dir, checkpoint))
    src = {} if explicit_inputs else p
    if split is not None and not pick(checkpoint, src, "checkpoint"):
        raise InputError("--split", "applies only with --checkpoint (embeddings name their own split)")
    batch = pick(batch_size, p, "batch_size")
    summary = stage.run(
        out_dir=out_dir, cfg=cfg, name=pick(name, p, "name"),
        img_embs=pick(img_embs, src, "img_embs"), cap_embs=pick(cap_embs, src, "cap_embs"),
        embeddings_dir=pick(embeddings_dir, src, "embeddings_dir"),
        checkpoint=pick(checkpoint, src, "checkpoint"), data_dir=pick(data_dir, p, "data"),
        split=pick(split, p, "split", "train"),
        embed_options={"batch_size": batch} if batch is not None else None,
        summary_json=pick(summary_json, p, "summary_json"),
        filters=_filters(p.get("filters"), relative_margin, absolute_margin, range_min, text_filter),
        scheduler=pick(scheduler, p, "scheduler"), workers=pick(workers, p, "workers"),
        rescore=pick(rescore, p, "rescore"), rescore_k=pick(rescore_k, p, "rescore_k"),
        progress=not quiet)
    timings = summary["timings"]      # the precision `auto` picked, seconds: untracked
    write_timings(beside(out_dir), "mine-candidates", timings)
    prec = f", {timings['precision']}" if timings["precision"] else ""
    idx = f", {summary['index']}" if summary["index"] else ""
    click.echo(f"mined {summary['name']}: {summary['n_img']} images x {summary['n_cap']} captions, "
               f"D={summary['dim']}; i2t ({summary['n_img']}, {summary['k_i2t']}), "
               f"t2i ({summary['n_cap']}, {summary['k_t2i']}) "
               f"[{summary['backend']}{prec}{idx}] in {timings['seconds']:.2f} s, "
               f"{timings['gflops']:.1f} GFLOP/s effective (2*N_img*N_cap*D / s)")
    if summary.get("rescore"):
        r = summary["rescore"]
        click.echo(f"re-scored by {r['model']} ({r['checkpoint']}): shortlists i2t "
                   f"{r['shortlist']['i2t']}, t2i {r['shortlist']['t2i']} -> K "
                   f"{summary['k_i2t']} / {summary['k_t2i']}")
    choice = (timings.get("stats") or {}).get("precision_choice")
    if choice:
        click.echo(f"precision auto -> {choice['reason']}")
    capped = [f"{d} {summary[f'k_{d}_requested']} -> {summary[f'k_{d}']}" for d in ("i2t", "t2i")
              if summary[f"k_{d}"] != summary[f"k_{d}_requested"]]
    if capped:
        click.echo("K capped at the gallery size minus the positives: " + ", ".join(capped))
    click.echo(f"wrote {out_dir}: " + ", ".join(sorted(
        Path(f).name for f in summary["files"].values())))


def _filters(from_params, relative_margin, absolute_margin, range_min, text_filter) -> dict:
    """The params section's `filters:` mapping, overridden by the command-line flags."""
    out = dict(from_params or {})
    for key, val in (("relative_margin", relative_margin), ("absolute_margin", absolute_margin),
                     ("range_min", range_min), ("text_filter", text_filter)):
        if val is not None:
            out[key] = val
    return out
