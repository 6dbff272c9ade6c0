"""Model registry and factory.

A model family is one module with a class decorated by `@register_model(name)` and one
YAML of defaults (`model:` architecture, `train:` recipe, optional `tiny:` options of a
fast instance for the interface tests, optional `schema:` ranges of options beyond the
types of their defaults, see check_options). Modules are found by discovery: every module of
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
import math
import os
import pkgutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch.overrides import TorchFunctionMode

from pipeline.errors import InputError
from pipeline.options import rule_violation

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
    for section in ("train", "tiny", "schema"):
        if not isinstance(data.setdefault(section, {}), dict):
            raise InputError(_yaml_path(name), f"'{section}:' must be a mapping")
    return data


def model_config(name: str) -> dict[str, Any]:
    """The parsed YAML of model `name`: {"model": {...}, "train": {...}, "tiny": {...}} (a copy)."""
    _model_class(name)
    return copy.deepcopy(_load_yaml(name))


def model_class(name: str) -> type:
    return _model_class(name)


def create_model(name: str, *, img_dim: int, tokenizer, source=None, **overrides: Any):
    """Build model `name` from its YAML defaults and `tokenizer` (which it then owns);
    `overrides` replace `model:` options. `source` names where the options came from
    (a checkpoint's config.json) in errors; default: the model's YAML.

    An override whose value is None is ignored (keeps the default), so optional CLI
    options can be passed through unchanged. Every option is checked against the model's
    schema, and a model whose parameters would not fit in memory is refused before the
    allocation that would exceed it.
    """
    cls = _model_class(name)
    source = source or _yaml_path(name)
    yaml_doc = model_config(name)
    defaults = yaml_doc["model"]
    for key in overrides:
        if key not in defaults:
            raise InputError(source, f"unknown model option {key!r}")
    config = {"name": name, "img_dim": img_dim, **tokenizer.model_config(), **defaults}
    config.update({k: v for k, v in overrides.items() if v is not None})
    check_options(config, defaults, yaml_doc["schema"], source)
    config["img_dim"] = int(config["img_dim"])
    model = _build(cls, config, source)
    model.tokenizer = tokenizer
    return model


# the bytes one parameter costs in training: weights, gradients and two Adam moments
_TRAIN_BYTES_PER_PARAM = 16


class _AllocationBudget(TorchFunctionMode):
    """Counts the elements the tensor factories are asked for while a model is built and
    raises before the allocation that would take training past the machine's memory: a
    size that cannot train is refused without allocating it (and without a second build)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.total = limit, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _FACTORIES:
            shape = args[0] if args and isinstance(args[0], (tuple, list, torch.Size)) else args
            if func is torch.full:
                shape = args[0]
            self.total += math.prod(int(d) for d in shape)
            if self.total > self.limit:
                raise _TooLarge(self.total)
        return func(*args, **(kwargs or {}))


class _TooLarge(Exception):
    pass


_FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full)


def _build(cls, config, source):
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with _AllocationBudget(total // _TRAIN_BYTES_PER_PARAM):
            return cls(config)
    except _TooLarge as e:
        n = e.args[0]
        raise InputError(source, f"{config['name']!r} with these options has over {n:,} "
                                 f"parameters: training needs over {n * _TRAIN_BYTES_PER_PARAM / 2**30:.0f} "
                                 f"GiB, this machine has {total / 2**30:.0f} GiB") from None
    except InputError:
        raise
    except (ValueError, TypeError, RuntimeError) as e:   # an option the schema could not judge
        raise InputError(source, f"cannot build {config['name']!r} with these options "
                                 f"({type(e).__name__}: {str(e).splitlines()[0]})") from None


def check_options(config: dict, defaults: dict, schema: dict, source) -> None:
    """Each option by type and range: the type of its YAML default (bool, int, float, str;
    an int option is >= 1 unless the schema says otherwise), refined by the YAML's
    `schema:` entries ({type, min, max, gt, null, choices}). img_dim and vocab_size are
    positive ints."""
    rules = {"img_dim": {"type": "int", "min": 1}, "vocab_size": {"type": "int", "min": 1}}
    for key, default in defaults.items():
        kind = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(default))
        rules[key] = {**({"type": kind} if kind else {}), **({"min": 1} if kind == "int" else {}),
                      **(schema.get(key) or {})}
    for key, rule in rules.items():
        if key not in config:
            continue
        value = config[key]
        if value is None and (rule.get("null") or defaults.get(key, 0) is None):
            continue
        bad = rule_violation(value, rule)
        if bad:
            raise InputError(source, f"model option {key}={value!r}: {bad}")


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
    return create_model(name, img_dim=img_dim, tokenizer=tokenizer, source=source, **rest)
