"""DVC stage `train_base`: train the base model whose embeddings feed candidate mining."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.data.precomp import open_split
from pipeline.device import resolve_device
from pipeline.errors import InputError
from pipeline.io import claim_dir
from pipeline.models import model_config, new_model
from pipeline.training import Trainer, TrainSettings

SECTION = "train_base"


def settings_for(model_name: str, train_options: dict, source: str = "params") -> TrainSettings:
    """The model's configs/models/<name>.yaml train defaults, overridden by train_options."""
    defaults = dict(model_config(model_name).get("train", {}))
    return TrainSettings.from_dict({**defaults, **train_options}, source)


def run(*, model: str, data_dir: str | Path, out_dir: str | Path, model_options: dict | None = None,
        train_options: dict | None = None, device: str = "cpu", resume: bool = False,
        init_from: str | Path | None = None, tokenizer_source: str | Path | None = None,
        progress: bool = True, stop_after_steps: int | None = None,
        kill_after_steps: int | None = None) -> dict:
    """`tokenizer_source`: what the model's tokenizer is read from instead of the data
    folder's default (a SCAN vocab file for the GRU models, the CLI's --vocab)."""
    resolve_device(device)                  # a bad --device: one line, before any work
    settings = settings_for(model, train_options or {})
    train = open_split(data_dir, "train")
    dev = open_split(data_dir, "dev", expected_dim=train.feature_dim)
    torch.manual_seed(settings.seed)  # weight init
    net = new_model(model, img_dim=train.feature_dim, data_dir=data_dir,
                    tokenizer_source=tokenizer_source, **(model_options or {}))
    if init_from:
        from pipeline.checkpoint import load_checkpoint

        init_model, _ = load_checkpoint(init_from, data_dir=data_dir)
        if init_model.config != net.config:
            raise InputError(init_from, "checkpoint config differs from the model being trained")
        net.load_state_dict(init_model.state_dict())
    claim_dir(out_dir, "train", inputs=[data_dir, init_from, tokenizer_source])
    trainer = Trainer(net, train, dev, settings, out_dir, device=device, progress=progress,
                      meta={"data_dir": str(data_dir), "init_from": str(init_from) if init_from else None})
    return trainer.run(resume=resume, stop_after_steps=stop_after_steps,
                       kill_after_steps=kill_after_steps)
