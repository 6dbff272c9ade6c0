"""Model registry and factory.

Each model family registers its class under a name; its architecture and training
defaults live in `configs/models/{name}.yaml` (`model:` and `train:` sections). A model is
built from the YAML's `model:` defaults plus overrides, and its `config` dict (name,
img_dim, vocab_size and every architecture option) is all that is needed to rebuild it
from a checkpoint's config.json.
"""
from __future__ import annotations

import copy
import functools
import importlib.resources
from typing import Any, Callable

import yaml

from pipeline.errors import InputError

_MODELS: dict[str, type] = {}


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator: register an ITMModel subclass (constructor `Model(config)`)."""

    def deco(cls: type) -> type:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model {name!r} is already registered by {_MODELS[name].__name__}")
        cls.name = name
        _MODELS[name] = cls
        return cls

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def _yaml_path(name: str) -> str:
    return f"configs/models/{name}.yaml"


def _model_class(name: str) -> type:
    try:
        return _MODELS[name]
    except KeyError:
        raise InputError(None, f"unknown model {name!r} (known: {', '.join(list_models())})") from None


@functools.lru_cache(maxsize=None)
def _load_yaml(name: str) -> dict[str, Any]:
    resource = importlib.resources.files("configs") / "models" / f"{name}.yaml"
    try:
        text = resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(_yaml_path(name), "model config file is missing") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InputError(_yaml_path(name), f"invalid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise InputError(_yaml_path(name), "needs a 'model:' mapping")
    if not isinstance(data.setdefault("train", {}), dict):
        raise InputError(_yaml_path(name), "'train:' must be a mapping")
    return data


def model_config(name: str) -> dict[str, Any]:
    """The parsed configs/models/{name}.yaml: {"model": {...}, "train": {...}} (a copy)."""
    _model_class(name)
    return copy.deepcopy(_load_yaml(name))


def create_model(name: str, *, img_dim: int, vocab_size: int, **overrides: Any):
    """Build model `name` from its YAML defaults; `overrides` replace `model:` options.

    An override whose value is None is ignored (keeps the default), so optional CLI
    options can be passed through unchanged.
    """
    cls = _model_class(name)
    defaults = model_config(name)["model"]
    for key in overrides:
        if key not in defaults:
            raise InputError(_yaml_path(name), f"unknown model option {key!r}")
    config = {"name": name, "img_dim": int(img_dim), "vocab_size": int(vocab_size), **defaults}
    config.update({k: v for k, v in overrides.items() if v is not None})
    return cls(config)


def model_from_config(config: dict[str, Any]):
    """Rebuild a model from its saved `config` (the dict `model.config` holds)."""
    if not isinstance(config, dict) or "name" not in config:
        raise InputError(None, "model config has no 'name'")
    rest = dict(config)
    name = rest.pop("name")
    missing = [k for k in ("img_dim", "vocab_size") if k not in rest]
    if missing:
        raise InputError(None, f"model config of {name!r} lacks {', '.join(missing)}")
    img_dim, vocab_size = rest.pop("img_dim"), rest.pop("vocab_size")
    return create_model(name, img_dim=img_dim, vocab_size=vocab_size, **rest)
