"""Option values checked by one rule language, wherever they come from (params.yaml,
command-line flags, a model's YAML schema, a checkpoint's config.json).

A rule is a dict: type (int | float | bool | str | path | device | mapping | list),
min / gt / max (numbers), choices, pattern (strings), null (None allowed), items (a rule for each entry of
a mapping: a sub-schema). Ints are never bools, numbers are finite.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any

import numpy as np

from pipeline.errors import InputError

_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def rule_violation(value: Any, rule: dict) -> str | None:
    """Why `value` breaks `rule` (a phrase: "must be ..."), or None."""
    if value is None:
        return None if rule.get("null") else "must be set (not null)"
    kind = rule.get("type")
    if kind == "bool" and not isinstance(value, bool):
        return "must be true or false"
    if kind in ("str", "path", "device") and not isinstance(value, str):
        return "must be a string"
    if kind == "path" and not value:
        return "must be a non-empty path"
    if kind == "device" and not _DEVICE.fullmatch(value):
        return "must be cpu, cuda or cuda:N"
    if kind == "mapping" and not isinstance(value, dict):
        return "must be a mapping"
    if kind == "list" and not isinstance(value, list):
        return "must be a list"
    if kind in ("int", "float"):
        ok = isinstance(value, numbers.Integral if kind == "int" else numbers.Real)
        if isinstance(value, (bool, np.bool_)) or not ok:
            return f"must be {'an integer' if kind == 'int' else 'a number'}"
        if not math.isfinite(value):
            return "must be finite"
        if "min" in rule and value < rule["min"]:
            return f"must be >= {rule['min']}"
        if "gt" in rule and value <= rule["gt"]:
            return f"must be > {rule['gt']}"
        if "max" in rule and value > rule["max"]:
            return f"must be <= {rule['max']}"
    if "pattern" in rule and not re.fullmatch(rule["pattern"], value):
        return f"must match {rule['pattern']}"
    if "choices" in rule and value not in rule["choices"]:
        return f"must be one of {', '.join(map(str, rule['choices']))}"
    return None


def check_values(values: dict, rules: dict, source, prefix: str = "") -> None:
    """Every value of `values` that has a rule, by its rule (a mapping's `items` recursively);
    InputError(source, "<prefix><key>=<value>: must be ..."). Keys without a rule pass:
    the unknown-key check is separate (pipeline.errors.refuse_unknown)."""
    for key, value in values.items():
        rule = rules.get(key)
        if rule is None:
            continue
        bad = rule_violation(value, rule)
        if bad:
            raise InputError(source, f"{prefix}{key}={value!r}: {bad}")
        if isinstance(value, dict) and rule.get("items"):
            unknown = sorted(str(k) for k in set(value) - set(rule["items"]))
            if unknown:
                raise InputError(source, f"{prefix}{key}: unknown key(s) {unknown} "
                                         f"(known: {sorted(rule['items'])})")
            check_values(value, rule["items"], source, f"{prefix}{key}.")
