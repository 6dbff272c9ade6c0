"""DVC stage `finetune`: train a model with offline hard negatives (AOQ and its ablations).

`init` is a checkpoint folder (fine-tune; the architecture and tokenizer come from it) or
"scratch" (a new model of `model` with `model_options`, as AOQ itself trained). `loss`
triplet needs no candidates; the offline losses sample their negatives from a candidate
folder checked against the training split before the first step.
"""
from __future__ import annotations

import torch

from pipeline.data.datasets import PairDataset, collate_pairs
from pipeline.data.offline import (OfflineNegativeDataset, collate_offline, default_offcandisize)
from pipeline.data.precomp import open_split
from pipeline.device import resolve_device
from pipeline.errors import InputError, refuse_unknown
from pipeline.io import claim_dir
from pipeline.finetuning import CandidateRefresh
from pipeline.losses.aoq import AOQ_OPTIONS
from pipeline.losses.registry import get_loss
from pipeline.models import new_model
from pipeline.training import Trainer
from stages.train_base import settings_for

SECTION = "finetune"
# fine-tuning starts from a trained model: no sum-over-negatives warm-up (AOQ needs
# max-violation from the first step)
FINETUNE_DEFAULTS = {"warmup_epochs": 0}


def _initial_model(model: str, init: str, img_dim: int, data_dir, model_options: dict):
    if init == "scratch":
        return new_model(model, img_dim=img_dim, data_dir=data_dir, **model_options)
    from pipeline.checkpoint import load_checkpoint

    net, cfg = load_checkpoint(init, data_dir=data_dir)
    if net.name != model:
        raise InputError(init, f"checkpoint holds a {net.name!r} model, not {model!r}")
    if cfg["model"].get("img_dim") != img_dim:
        raise InputError(init, f"checkpoint expects {cfg['model'].get('img_dim')}-d region "
                               f"features, the data has {img_dim}")
    return net


def _refresh_flag(every: int, every_steps: int) -> str | None:
    """The refresh option in use (None: no refresh); at most one may be given."""
    for flag, n in (("--refresh-every", every), ("--refresh-every-steps", every_steps)):
        if n < 0:
            raise InputError(flag, f"must be >= 0, got {n}")
    if every and every_steps:
        raise InputError("--refresh-every-steps", "give --refresh-every (epochs) or "
                                                  "--refresh-every-steps, not both")
    return "--refresh-every" if every else "--refresh-every-steps" if every_steps else None


def run(*, model: str, data_dir, out_dir, loss: str = "aoq", candidates_dir=None,
        init: str = "scratch", model_options: dict | None = None, train_options: dict | None = None,
        aoq_options: dict | None = None, offcandisize: int | None = None, refresh_every: int = 0,
        refresh_every_steps: int = 0, refresh_precision: str = "auto", passes: str = "batched",
        device: str = "cpu", resume: bool = False, progress: bool = True,
        stop_after_steps: int | None = None, kill_after_steps: int | None = None) -> dict:
    resolve_device(device)                  # a bad --device: one line, before any work
    refresh_flag = _refresh_flag(refresh_every, refresh_every_steps)
    spec = get_loss(loss, "--loss")
    offline = spec.offline
    settings = settings_for(model, {**FINETUNE_DEFAULTS, **(train_options or {})})
    # finetune.aoq holds the AOQ family's settings: checked for every run, used by those
    refuse_unknown(aoq_options or {}, AOQ_OPTIONS, "finetune.aoq", "AOQ setting(s)")
    objective = spec.objective(settings, aoq_options if offline else None, passes)
    if model_options and init != "scratch":
        raise InputError(init, "model options apply to --init scratch only (a checkpoint "
                               "fixes the architecture)")
    train = open_split(data_dir, "train")
    dev = open_split(data_dir, "dev", expected_dim=train.feature_dim)
    torch.manual_seed(settings.seed)  # weight init of a scratch model
    net = _initial_model(model, str(init), train.feature_dim, data_dir, model_options or {})
    pairs = PairDataset(train, net.tokenizer, train=True, region_drop=settings.region_drop,
                        token_aug=settings.token_aug, seed=settings.seed)
    meta = {"data_dir": str(data_dir), "init": str(init), "loss": loss,
            # a triplet run reads none: its checkpoint must not name a folder it never
            # depended on (params.yaml's default candidates)
            "candidates": str(candidates_dir) if candidates_dir and offline else None}
    kwargs: dict = {"dataset": pairs, "collate_fn": collate_pairs, "objective": objective}
    if offline:
        if candidates_dir is None:
            raise InputError(None, f"--loss {loss} samples offline negatives: give --candidates DIR")
        from pipeline.mining.candidates import load_candidates

        # split: candidates mined on dev/test with as many rows would pass the count check.
        # No expected checkpoint: the candidates may come from any independent model (the
        # base's serve every run of params.yaml, each fine-tuned from its own init)
        cands = load_candidates(candidates_dir, n_images=train.n_images, split="train")
        k = default_offcandisize(train.n_captions) if offcandisize is None else int(offcandisize)
        dataset = OfflineNegativeDataset(pairs, cands.i2t, cands.t2i, k, source=candidates_dir)
        kwargs = {"dataset": dataset, "collate_fn": collate_offline, "objective": objective}
        meta.update(offcandisize=k, **getattr(objective, "record", {}))
        if refresh_flag:
            refresh = CandidateRefresh(dataset, train, net, cands.k_i2t, cands.k_t2i, out_dir,
                                       "train", every=refresh_every, every_steps=refresh_every_steps,
                                       precision=refresh_precision, source=init)
            kwargs.update(on_start=refresh.start, on_epoch_end=refresh.on_epoch_end,
                          on_step_end=refresh.on_step_end if refresh_every_steps else None)
            meta.update(refresh_every=int(refresh_every),
                        refresh_every_steps=int(refresh_every_steps))
    elif refresh_flag:
        raise InputError(refresh_flag, "the triplet loss uses no candidates to refresh")
    claim_dir(out_dir, "finetune", inputs=[data_dir, init, candidates_dir])
    trainer = Trainer(net, train, dev, settings, out_dir, device=device, progress=progress,
                      meta=meta, **kwargs)
    return trainer.run(resume=resume, stop_after_steps=stop_after_steps,
                       kill_after_steps=kill_after_steps)

