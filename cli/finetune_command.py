"""`itm-pipeline finetune`: AOQ (or ablation) training with offline hard negatives."""
from __future__ import annotations

import click

from cli.params import (FINETUNE_MODEL_KEYS, FINETUNE_SECTION_KEYS, check_keys, load_section, pick,
                        run_options)
from cli.stage_commands import PARAMS_HELP, run_folder_options
from pipeline.errors import InputError
from pipeline.losses.registry import loss_names, losses_help


@click.command("finetune")
@click.option("--model", default=None, help="Registered model name (see list-models).  [default: vse_inf]")
@click.option("--loss", type=click.Choice(loss_names()), default=None,
              help=f"{losses_help()}.  [default: aoq]")
@click.option("--candidates", "candidates_dir", type=click.Path(), default=None,
              help="Candidate folder (i2t_<name>.npy, t2i_<name>.npy) of the training split.")
@click.option("--init", default=None,
              help="A checkpoint folder to fine-tune, or 'scratch'.  [default: scratch]")
@run_folder_options
@click.option("--offcandisize", type=click.IntRange(min=1), default=None,
              help="Sample offline negatives from the top ranks [0, N) of each candidate row "
                   "(reference: 300 for COCO).  [default: 300 scaled to the gallery, floor 10]")
@click.option("--refresh-every", type=click.IntRange(min=0), default=None,
              help="Re-mine the candidates with the model being trained every N epochs (0: never).")
@click.option("--refresh-every-steps", type=click.IntRange(min=0), default=None,
              help="Re-mine them every N optimizer steps instead (0: never; not with --refresh-every).")
@click.option("--alpha", type=float, default=None, help="AOQ weight scale α.  [default: 0.3]")
@click.option("--beta", type=float, default=None, help="AOQ weight offset β.  [default: 1.5]")
@click.option("--offline-margin", type=float, default=None, help="Margin of the offline terms.  [default: 0]")
@click.option("--mask-accidental-positives/--no-mask-accidental-positives", default=None,
              help="Drop the quintuplet pair terms when i~ is t~'s own image (both pairs are then "
                   "true pairs); --no-... matches the reference.  [default: mask]")
@click.option("--detach-weights/--no-detach-weights", default=None,
              help="Stop the gradient through AOQ's adaptive weights (the reference keeps it, "
                   "which pushes offline negatives up while the online hinge is active).  "
                   "[default: keep, as the reference]")
@click.option("--passes", type=click.Choice(["batched", "three"]), default=None,
              help="batched: one forward of 3B items (ghost BN); three: the reference's three passes.")
@click.option("--model-option", "model_opts", multiple=True, metavar="KEY=VALUE",
              help="Architecture option for --init scratch (repeatable).")
@click.option("--train-option", "train_opts", multiple=True, metavar="KEY=VALUE",
              help="Training option (repeatable), e.g. max_violation=false, mask_same_image=true.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ...  [default: cpu]")
@click.option("--resume", is_flag=True, help="Continue from OUT/state exactly where it stopped.")
@click.option("--params", "params_file", type=click.Path(), default=None, help=PARAMS_HELP)
@click.option("--section", default="finetune", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--crash-after-steps", type=int, default=None, hidden=True)  # resume tests
def finetune(model, loss, candidates_dir, init, data_dir, out_dir, epochs, batch_size, lr, seed,
             offcandisize, refresh_every, refresh_every_steps, alpha, beta, offline_margin,
             mask_accidental_positives, detach_weights, passes, model_opts, train_opts, device, resume,
             params_file, section, quiet, crash_after_steps):
    """Train MODEL with offline hard negatives from CANDIDATES (AOQ, SPEC §4).

    With --params, the section's keys are defaults and its `models.<MODEL>` mapping
    (init, model_options, train) refines them per model.
    """
    from stages import finetune as stage

    p = load_section(params_file, section, known=FINETUNE_SECTION_KEYS)
    model = pick(model, p, "model", "vse_inf")
    per_model = (p.get("models") or {}).get(model) or {}
    if not isinstance(per_model, dict):
        raise InputError(params_file, f"{section}.models.{model}={per_model!r}: must be a mapping")
    per_model = check_keys(dict(per_model), FINETUNE_MODEL_KEYS, params_file, f"{section}.models.{model}")
    p = {**p, **per_model}
    out_dir = pick(out_dir, p, "out", None)
    if not out_dir:
        raise InputError(None, "--out is required (or 'out' in the params section)")
    model_options, train_options = run_options(p, model_opts, train_opts, epochs=epochs,
                                               batch_size=batch_size, lr=lr, seed=seed)
    aoq_options = dict(p.get("aoq") or {})
    for key, val in (("alpha", alpha), ("beta", beta), ("offline_margin", offline_margin),
                     ("mask_accidental_positives", mask_accidental_positives),
                     ("detach_weights", detach_weights)):
        if val is not None:
            aoq_options[key] = val
    init = pick(init, p, "init", "scratch")
    result = stage.run(model=model, loss=pick(loss, p, "loss", "aoq"),
                       candidates_dir=pick(candidates_dir, p, "candidates", None),
                       init=init, data_dir=pick(data_dir, p, "data", "artifacts/data"),
                       out_dir=out_dir, model_options=model_options if init == "scratch" else None,
                       train_options=train_options, aoq_options=aoq_options,
                       offcandisize=pick(offcandisize, p, "offcandisize", None),
                       refresh_every=int(pick(refresh_every, p, "refresh_every", 0) or 0),
                       refresh_every_steps=int(pick(refresh_every_steps, p, "refresh_every_steps", 0) or 0),
                       passes=pick(passes, p, "passes", "batched"),
                       device=pick(device, p, "device", "cpu"), resume=resume,
                       progress=not quiet, kill_after_steps=crash_after_steps)
    click.echo(f"best dev rsum {result['best_dev_rsum']:.2f} at epoch {result['best_epoch']}; "
               f"checkpoint {result['checkpoint']}")
