"""Checkpoints: safetensors weights + a JSON config + the model's tokenizer, in one directory.

No pickles: a checkpoint loads with any torch version, and its config says how to rebuild
the model (SPEC §7: torch >= 2.6 refuses the references' pickled argparse Namespaces).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import InputError
from pipeline.io import atomic_dir, read_json, require_free_space

FORMAT = "itm-pipeline/checkpoint-v1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(path: str | Path, model, meta: dict[str, Any] | None = None) -> Path:
    """Write model weights, config and tokenizer atomically into directory `path`."""
    path = Path(path)
    state = _contiguous(model.state_dict())
    require_free_space(path.parent, sum(t.numel() * t.element_size() for t in state.values()),
                       "the checkpoint")
    with atomic_dir(path, "checkpoint") as tmp:
        save_file(state, str(tmp / WEIGHTS))
        config = {"format": FORMAT, "model": model.config, "meta": meta or {}}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save_to(tmp)
    return path


def read_checkpoint_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_path = path / CONFIG
    if not path.is_dir():
        raise InputError(path, "checkpoint directory not found")
    cfg = read_json(cfg_path, missing="missing: not an itm-pipeline checkpoint directory",
                    unreadable="unreadable checkpoint config")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or "model" not in cfg:
        raise InputError(cfg_path, f"not an {FORMAT} config")
    return cfg


def load_state_dict(file: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    file = Path(file)
    try:
        state = load_file(str(file), device=str(device))
    except FileNotFoundError:
        raise InputError(file, "weights file not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(file, f"unreadable safetensors file ({e})") from None
    # a NaN/inf weight makes every score NaN, which no later check can tell from a model
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(file, f"tensor {name!r} has non-finite values (NaN or inf)")
    return state


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", *, data_dir=None):
    """Returns (model in eval mode on `device`, with its tokenizer; config dict).

    A checkpoint saved without a tokenizer (an imported one) takes the tokenizer of
    `data_dir` (its SCAN vocab) if given."""
    from pipeline.device import resolve_device
    from pipeline.models import model_class, model_from_config

    device = resolve_device(device)          # a bad --device is one line, before any reading
    path = Path(path)
    cfg = read_checkpoint_config(path)
    model_cfg = cfg["model"]
    name = model_cfg.get("name") if isinstance(model_cfg, dict) else None
    try:
        tok_class = model_class(name).tokenizer_class
    except InputError as e:
        raise InputError(path / CONFIG, e.problem) from None
    tokenizer = tok_class.load_from(path)
    if tokenizer is None:
        if data_dir is None:
            raise InputError(path, "checkpoint has no tokenizer (vocab.json) and no data folder "
                                   "was given to take one from")
        tokenizer = tok_class.for_training(model_cfg, data_dir)
    model = model_from_config(model_cfg, tokenizer, source=path / CONFIG)
    state = load_state_dict(path / WEIGHTS)
    want = model.state_dict()
    for key, tensor in state.items():
        if key in want and tuple(tensor.shape) != tuple(want[key].shape):
            raise InputError(path / WEIGHTS, f"tensor {key!r} has shape {tuple(tensor.shape)}, "
                                             f"the config gives {tuple(want[key].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(path / WEIGHTS, f"weights do not match the config "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.to(device).eval(), cfg


def checkpoint_hash(path: str | Path) -> str:
    """sha256 of the weights file: identifies the model that produced an artifact."""
    h = hashlib.sha256()
    with open(Path(path) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
