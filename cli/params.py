"""Reading a stage's section of params.yaml, and KEY=VALUE overrides."""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.errors import InputError, refuse_unknown
from pipeline.io import read_yaml
from pipeline.options import check_values
from stages import params_schema as schema

# the keys (with their rules: stages.params_schema) each command reads from its params
# section; callables are built on first use (they import the training module)
TRAIN_KEYS = schema.train_section
EVALUATE_KEYS = schema.evaluate_section
FINETUNE_MODEL_KEYS = schema.finetune_model
FINETUNE_SECTION_KEYS = schema.finetune_section


def check_keys(node: dict, known, params_file, section: str) -> dict:
    """The one check of a params section (stages.params_schema.check_section)."""
    return schema.check_section(node, known, params_file, section)


def load_section(params_file: str | Path | None, section: str, optional: bool = False,
                 known=None) -> dict:
    """The section (dotted: nested) of a params file; {} without a file, or when optional
    and the file has no such section. `known`: the section's keys, or their rules (a dict,
    or a callable returning one)."""
    if not params_file:
        return {}
    path = Path(params_file)
    doc = read_yaml(path) or {}
    node = doc
    for key in section.split("."):          # "pretrain.vsrn": a nested section
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            if optional:
                return {}
            raise InputError(path, f"no '{section}' section")
        node = node[key]
    return check_keys(dict(node), known, path, section) if known is not None else dict(node)


def parse_assignments(pairs: tuple[str, ...], flag: str) -> dict:
    """('embed_size=256', 'no_imgnorm=true') -> {'embed_size': 256, 'no_imgnorm': True}."""
    out = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(None, f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def pick(explicit, section: dict, key: str, default=None):
    """Command-line value if given, else the params section's, else the default."""
    if explicit is not None:
        return explicit
    return section.get(key, default)


def run_options(section: dict, model_opts: tuple[str, ...], train_opts: tuple[str, ...],
                **explicit) -> tuple[dict, dict]:
    """(model_options, train_options) of a training command: the params section's
    `model_options` / `train` mappings, then --model-option / --train-option, then the
    dedicated flags (epochs=..., lr=...; None = not given)."""
    for key in ("model_options", "train"):
        if not isinstance(section.get(key) or {}, dict):
            raise InputError("params", f"'{key}' must be a mapping of options, got "
                                       f"{section[key]!r}")
    from pipeline.training import TrainSettings

    model_options = {**(section.get("model_options") or {}),
                     **parse_assignments(model_opts, "--model-option")}
    given = parse_assignments(train_opts, "--train-option")
    refuse_unknown(given, TrainSettings.rules(), "--train-option", "training option(s)")
    check_values(given, TrainSettings.rules(), "--train-option")
    train_options = {**(section.get("train") or {}), **given}
    train_options.update({k: v for k, v in explicit.items() if v is not None})
    return model_options, train_options
