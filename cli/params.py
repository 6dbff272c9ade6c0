"""Reading a stage's section of params.yaml, and KEY=VALUE overrides."""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.errors import InputError, refuse_unknown
from pipeline.io import read_yaml
from stages.check_params import FINETUNE_KEYS

# the keys each training command reads from its params section (finetune: also from the
# section's models.<model> mapping, which refines them per model)
TRAIN_KEYS = {"model", "data", "out", "model_options", "train", "device", "init"}
EVALUATE_KEYS = {"checkpoint", "data", "split", "protocol", "json", "groups_json", "device",
                 "batch_size"}
FINETUNE_MODEL_KEYS = {"init", "candidates", "model_options", "train"}
# params.yaml's finetune section (check-params' keys), and what a hand-written one may add
FINETUNE_SECTION_KEYS = FINETUNE_KEYS | {"model", "loss", "init", "out", "model_options", "train"}


def check_keys(node: dict, known, params_file, section: str) -> dict:
    """The one unknown-key check of a params section: a typo is one line naming it."""
    refuse_unknown(node, known, params_file, f"key(s) in section '{section}':")
    return node


def load_section(params_file: str | Path | None, section: str, optional: bool = False,
                 known=None) -> dict:
    """The section (dotted: nested) of a params file; {} without a file, or when optional
    and the file has no such section. `known`: the keys the section may have."""
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
    model_options = {**(section.get("model_options") or {}),
                     **parse_assignments(model_opts, "--model-option")}
    train_options = {**(section.get("train") or {}), **parse_assignments(train_opts, "--train-option")}
    train_options.update({k: v for k, v in explicit.items() if v is not None})
    return model_options, train_options
