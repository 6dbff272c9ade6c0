"""Checkpoints: safetensors weights + a JSON config + the vocab, in one directory.

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

from pipeline.data.vocab import Vocab
from pipeline.errors import InputError
from pipeline.io import atomic_dir

FORMAT = "itm-pipeline/checkpoint-v1"
WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.json"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(path: str | Path, model, vocab: Vocab | None, meta: dict[str, Any] | None = None) -> Path:
    """Write model weights, config and vocab atomically into directory `path`."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(_contiguous(model.state_dict()), str(tmp / WEIGHTS))
        config = {"format": FORMAT, "model": model.config, "meta": meta or {}}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if vocab is not None:
            vocab.save(tmp / VOCAB)
    return path


def read_checkpoint_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_path = path / CONFIG
    if not path.is_dir():
        raise InputError(path, "checkpoint directory not found")
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise InputError(cfg_path, "missing: not an itm-pipeline checkpoint directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(cfg_path, f"unreadable checkpoint config ({e.__class__.__name__})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or "model" not in cfg:
        raise InputError(cfg_path, f"not an {FORMAT} config")
    return cfg


def load_state_dict(file: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    file = Path(file)
    try:
        return load_file(str(file), device=str(device))
    except FileNotFoundError:
        raise InputError(file, "weights file not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(file, f"unreadable safetensors file ({e})") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Returns (model in eval mode on `device`, vocab or None, config dict)."""
    from pipeline.device import resolve_device
    from pipeline.models import model_from_config

    device = resolve_device(device)          # a bad --device is one line, before any reading
    path = Path(path)
    cfg = read_checkpoint_config(path)
    model = model_from_config(cfg["model"])
    state = load_state_dict(path / WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(path / WEIGHTS, f"weights do not match the config "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    vocab = Vocab.load(path / VOCAB) if (path / VOCAB).exists() else None
    return model.to(device).eval(), vocab, cfg


def checkpoint_hash(path: str | Path) -> str:
    """sha256 of the weights file: identifies the model that produced an artifact."""
    h = hashlib.sha256()
    with open(Path(path) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
