"""Model registry and factory.

A model family is one module with a class decorated by `@register_model(name)` and one
YAML of defaults (`model:` architecture, `train:` recipe, optional `tiny:` options of a
fast instance for the interface tests). Modules are found by discovery: every module of
the pipeline.models package, and every `*.py` in the folders named by the environment
variable ITM_PIPELINE_MODELS (os.pathsep-separated), so adding a model edits no
existing file. The YAML is configs/models/{name}.yaml, or {name}.yaml beside the module.

A model is built from its YAML's `model:` defaults plus overrides and a tokenizer
(`model.tokenizer`; its `model_config()`, e.g. vocab_size, enters the config). The config
dict (name, img_dim, the tokenizer's entries and every architecture option) is all that
is needed to rebuild the model from a checkpoint's config.json.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import importlib.resources
import importlib.util
import inspect
import os
import pkgutil
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.errors import InputError

_MODELS: dict[str, type] = {}
ENV_PATH = "ITM_PIPELINE_MODELS"
_SKIP = {"base", "registry", "features"}   # pipeline.models modules that define no model


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator: register an ITMModel subclass (constructor `Model(config)`)."""

    def deco(cls: type) -> type:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model {name!r} is already registered by {_MODELS[name].__name__}")
        cls.name = name
        _MODELS[name] = cls
        return cls

    return deco


@functools.lru_cache(maxsize=None)
def discover() -> None:
    """Import every model module once (each registers its classes). Cached: after changing
    ITM_PIPELINE_MODELS in a running process, call discover.cache_clear() first."""
    import pipeline.models as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _SKIP:
            importlib.import_module(f"pipeline.models.{info.name}")
    for folder in filter(None, os.environ.get(ENV_PATH, "").split(os.pathsep)):
        if not Path(folder).is_dir():
            raise InputError(folder, f"{ENV_PATH} names a folder that does not exist")
        for file in sorted(Path(folder).glob("*.py")):
            _import_file(file.resolve())


def _import_file(file: Path) -> None:
    """Import a model module outside the package, named by its path (two folders may hold
    files of the same name); a module that fails to import is one line, and not left
    half-imported for the next discovery to skip."""
    tag = hashlib.sha256(str(file).encode()).hexdigest()[:12]
    module = f"itm_pipeline_models.{file.stem}_{tag}"
    if module in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module, file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    try:
        spec.loader.exec_module(mod)
    except InputError:
        sys.modules.pop(module, None)
        raise
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported, not raised
        sys.modules.pop(module, None)
        raise InputError(file, f"model module failed to import ({type(e).__name__}: {e})") from None


def list_models() -> list[str]:
    discover()
    return sorted(_MODELS)


def _packaged_yaml(name: str):
    return importlib.resources.files("configs") / "models" / f"{name}.yaml"


def _yaml_path(name: str) -> str:
    """Where model `name`'s YAML is (as error messages name it)."""
    if name in _MODELS and not _packaged_yaml(name).is_file():
        return str(Path(inspect.getfile(_MODELS[name])).with_name(f"{name}.yaml"))
    return f"configs/models/{name}.yaml"


def _model_class(name) -> type:
    discover()
    if not isinstance(name, str) or name not in _MODELS:
        raise InputError(None, f"unknown model {name!r} (known: {', '.join(list_models())})")
    return _MODELS[name]


@functools.lru_cache(maxsize=None)
def _load_yaml(name: str) -> dict[str, Any]:
    resource = _packaged_yaml(name)
    if not resource.is_file():
        resource = Path(_yaml_path(name))
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
    for section in ("train", "tiny"):
        if not isinstance(data.setdefault(section, {}), dict):
            raise InputError(_yaml_path(name), f"'{section}:' must be a mapping")
    return data


def model_config(name: str) -> dict[str, Any]:
    """The parsed YAML of model `name`: {"model": {...}, "train": {...}, "tiny": {...}} (a copy)."""
    _model_class(name)
    return copy.deepcopy(_load_yaml(name))


def model_class(name: str) -> type:
    return _model_class(name)


def create_model(name: str, *, img_dim: int, tokenizer, **overrides: Any):
    """Build model `name` from its YAML defaults and `tokenizer` (which it then owns);
    `overrides` replace `model:` options.

    An override whose value is None is ignored (keeps the default), so optional CLI
    options can be passed through unchanged.
    """
    cls = _model_class(name)
    defaults = model_config(name)["model"]
    for key in overrides:
        if key not in defaults:
            raise InputError(_yaml_path(name), f"unknown model option {key!r}")
    config = {"name": name, "img_dim": int(img_dim), **tokenizer.model_config(), **defaults}
    config.update({k: v for k, v in overrides.items() if v is not None})
    model = cls(config)
    model.tokenizer = tokenizer
    return model


def new_model(name: str, *, img_dim: int, data_dir, tokenizer_source=None, **overrides: Any):
    """A freshly initialised model `name` for training on `data_dir`: its tokenizer comes
    from its tokenizer class (the data's SCAN vocab, or `tokenizer_source`)."""
    cls = _model_class(name)
    options = {**model_config(name)["model"], **{k: v for k, v in overrides.items() if v is not None}}
    tokenizer = cls.tokenizer_class.for_training(options, data_dir, tokenizer_source)
    return create_model(name, img_dim=img_dim, tokenizer=tokenizer, **overrides)


def model_from_config(config: dict[str, Any], tokenizer, source=None):
    """Rebuild a model from its saved `config` (the dict `model.config` holds) and the
    tokenizer saved beside it."""
    if not isinstance(config, dict) or "name" not in config:
        raise InputError(source, "model config has no 'name'")
    rest = dict(config)
    name = rest.pop("name")
    if "img_dim" not in rest:
        raise InputError(source, f"model config of {name!r} lacks img_dim")
    img_dim = rest.pop("img_dim")
    for key, value in tokenizer.model_config().items():
        if rest.pop(key, value) != value:
            raise InputError(source, f"the saved tokenizer gives {key}={value}, the model "
                                     f"config {config[key]}")
    return create_model(name, img_dim=img_dim, tokenizer=tokenizer, **rest)
