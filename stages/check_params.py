"""DVC stage `check_params`: the params.yaml values that dvc.yaml interpolates, checked
before any other stage runs.

DVC substitutes `${...}` into the stage commands, which a shell runs, and into dependency
and output paths: a model named `x;touch PWNED;#` would run `touch`. dvc.yaml quotes
every interpolation in a command, and every other stage is downstream of this one
(`prepare` depends on its output), so `dvc repro` stops here first, with one line naming
params.yaml and the bad value. Checked: `train_base.model`, `pretrain.models` (registered
models, `[a-z0-9_]+`), and `finetune.runs` (see :func:`finetune_runs`), which must agree
with `finetune.models`. The output holds no names: it is the same bytes for every valid
params file, so editing the params re-runs this stage but not, through it, `prepare`.

`ensembles` (:func:`ensembles`): names and checkpoint paths of the `ensemble@<name>`
stages. `report` reads the runs with :func:`finetune_runs` and the ensembles with
:func:`ensembles` too.
"""
from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import InputError
from pipeline.io import read_yaml, write_json

NAME = re.compile(r"[a-z0-9_]+")
# a path a stage depends on (and is handed on its command line): no shell syntax, spaces
# or quotes, and no leading '-' (it would read as an option)
PATH = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_./-]*")
GROUPS = {"online": "runs without candidates", "offline": "runs with offline hard negatives"}
RUN_KEYS = {"online": {"model", "loss", "init"},
            "offline": {"model", "loss", "init", "candidates"}}
# the finetune keys dvc.yaml tracks for a run (DVC refuses a run whose tracked key is
# missing), and the others a run may not read: an untracked key would change a result
# without re-running its stage
TRACKED = {"device", "offcandisize", "refresh_every", "refresh_every_steps", "passes", "aoq"}
FINETUNE_KEYS = TRACKED | {"runs", "models", "data", "candidates"}
OUTPUT = {"checked_by": "itm-pipeline check-params", "ok": True}


def load(params_file) -> dict:
    path = Path(params_file)
    doc = read_yaml(path)
    if not isinstance(doc, dict):
        raise InputError(path, "not a mapping of stage sections")
    return doc


def _name(value, where: str, source, *, registered: bool = False) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise InputError(source, f"{where} {value!r}: a name is lower-case letters, digits "
                                 "and '_' (dvc.yaml puts it in commands and paths)")
    if registered:
        from pipeline.models import list_models

        if value not in list_models():
            raise InputError(source, f"{where} {value!r}: not a registered model "
                                     f"(registered: {', '.join(list_models())})")
    return value


def _path(value, where: str, source) -> str:
    if not isinstance(value, str) or not PATH.fullmatch(value):
        raise InputError(source, f"{where} {value!r}: a path of letters, digits, '_', '.', "
                                 "'/' and '-' (not first) is required here (dvc.yaml depends on it)")
    return value


def _section(doc: dict, key: str, source) -> dict:
    node = doc.get(key)
    if not isinstance(node, dict):
        raise InputError(source, f"no '{key}' section")
    return node


def finetune_runs(finetune: dict, source) -> list[dict]:
    """The runs of `finetune.runs`: {"name", "group", "model", "loss", "init"[, "candidates"]}
    each, ordered by model (first appearance), online before offline.

    `finetune.runs` maps `online` and `offline` to {<model>-<loss>: {model, loss, init
    [, candidates]}}; DVC fine-tunes and evaluates each (stages finetune_<group>@<name>,
    evaluate_<group>@<name>), and a run's stage depends on its `init` and `candidates`."""
    from pipeline.losses.registry import get_loss, loss_names

    groups = {g: f"{GROUPS[g]} (loss {', '.join(loss_names(offline=g == 'offline'))})"
              for g in GROUPS}
    runs = finetune.get("runs")
    if not isinstance(runs, dict) or set(runs) != set(GROUPS):
        raise InputError(source, "finetune.runs: expected the two mappings 'online' ("
                                 f"{groups['online']}) and 'offline' ({groups['offline']}), "
                                 "each {<model>-<loss>: {model, loss, init, ...}}")
    found: dict[str, dict] = {}
    for group in GROUPS:
        entries = runs[group] if runs[group] is not None else {}
        if not isinstance(entries, dict):
            raise InputError(source, f"finetune.runs.{group}: expected a mapping of runs "
                                     "({} for none)")
        for name, run in entries.items():
            where = f"finetune.runs.{group}.{name}"
            if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_]+-[a-z0-9_]+", name):
                raise InputError(source, f"finetune.runs.{group} run {name!r}: a run is named "
                                         "<model>-<loss> (lower-case letters, digits, '_')")
            if not isinstance(run, dict) or set(run) != RUN_KEYS[group]:
                got = sorted(run) if isinstance(run, dict) else type(run).__name__
                raise InputError(source, f"{where}: expected the keys "
                                         f"{sorted(RUN_KEYS[group])}, got {got}")
            model = _name(run["model"], f"{where}.model", source, registered=True)
            loss = run["loss"]
            if not isinstance(loss, str) or loss not in loss_names():
                raise InputError(source, f"{where}.loss {loss!r}: not one of {', '.join(loss_names())}")
            other = "offline" if get_loss(loss).offline else "online"
            if other != group:
                raise InputError(source, f"{where}.loss {loss!r} belongs in finetune.runs.{other} "
                                         f"({groups[other]})")
            if name != f"{model}-{loss}":
                raise InputError(source, f"{where}: a run of model {model!r} with loss "
                                         f"{loss!r} is named {model}-{loss}")
            if name in found:
                raise InputError(source, f"{where}: run {name!r} is also in "
                                         f"finetune.runs.{found[name]['group']}")
            if run["init"] == "scratch":
                raise InputError(source, f"{where}.init: the pipeline fine-tunes a checkpoint "
                                         "(its stage depends on it), not 'scratch'")
            out = {"name": name, "group": group, "model": model, "loss": loss,
                   "init": _path(run["init"], f"{where}.init", source)}
            if group == "offline":
                out["candidates"] = _path(run["candidates"], f"{where}.candidates", source)
            found[name] = out
    order = list(dict.fromkeys(r["model"] for g in GROUPS for r in found.values() if r["group"] == g))
    return sorted(found.values(), key=lambda r: (order.index(r["model"]), r["group"] != "online"))


def ensembles(doc: dict, source) -> dict[str, tuple[str, str]]:
    """params.yaml's `ensembles`: {<name>: {a: CHECKPOINT, b: CHECKPOINT}}, the pairs the
    `ensemble@<name>` stages average (papers report two-model ensembles); {} for none."""
    node = doc.get("ensembles") or {}
    if not isinstance(node, dict):
        raise InputError(source, "ensembles: expected a mapping {<name>: {a: CHECKPOINT, "
                                 "b: CHECKPOINT}} ({} for none)")
    out = {}
    for name, pair in node.items():
        where = f"ensembles.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_][a-z0-9_+-]*", name):
            raise InputError(source, f"ensembles entry {name!r}: a name is lower-case letters, "
                                     "digits, '_', '+' and '-' (dvc.yaml puts it in paths)")
        if not isinstance(pair, dict) or set(pair) != {"a", "b"}:
            got = sorted(pair) if isinstance(pair, dict) else type(pair).__name__
            raise InputError(source, f"{where}: expected the keys ['a', 'b'] (two checkpoints), got {got}")
        out[name] = (_path(pair["a"], f"{where}.a", source), _path(pair["b"], f"{where}.b", source))
        if pair["a"] == pair["b"]:
            raise InputError(source, f"{where}: a and b are the same checkpoint")
    return out


def check(doc: dict, source) -> list[dict]:
    """Raise InputError on the first value dvc.yaml must not interpolate; the runs otherwise."""
    _name(_section(doc, "train_base", source).get("model"), "train_base.model", source,
          registered=True)
    pretrain = _section(doc, "pretrain", source)
    models = pretrain.get("models")
    if not isinstance(models, list):
        raise InputError(source, "pretrain.models: expected a list of model names ([] for none)")
    for m in models:
        _name(m, "pretrain.models entry", source, registered=True)
        if not isinstance(pretrain.get(m), dict):
            raise InputError(source, f"pretrain.models names {m!r}: no 'pretrain.{m}' section "
                                     "(its sizes and recipe)")
    if len(set(models)) != len(models):
        raise InputError(source, f"pretrain.models {models}: a model is listed twice")

    finetune = _section(doc, "finetune", source)
    unknown = sorted(set(finetune) - FINETUNE_KEYS)
    if unknown:
        raise InputError(source, f"finetune.{unknown[0]}: not a key of the finetune section "
                                 f"(known: {', '.join(sorted(FINETUNE_KEYS))}; per-model "
                                 "settings go under finetune.models.<model>)")
    missing = sorted(TRACKED - set(finetune))
    if missing:
        raise InputError(source, f"finetune.{missing[0]}: missing (dvc.yaml tracks it; "
                                 "null or 0 for the default)")
    per_model = finetune.get("models")
    if not isinstance(per_model, dict):
        raise InputError(source, "no 'finetune.models' section (each run's model: init, train)")
    from stages.params_schema import check_document

    check_document(doc, source)
    ensembles(doc, source)
    runs = finetune_runs(finetune, source)
    for run in runs:
        where = f"finetune.runs.{run['group']}.{run['name']}"
        conf = per_model.get(run["model"])
        if not isinstance(conf, dict):
            raise InputError(source, f"{where}: no 'finetune.models.{run['model']}' section")
        # the run's paths are what its stage depends on and is handed; the model's are
        # what a plain `itm-pipeline finetune --params` reads: they must be the same
        if run["init"] != conf.get("init"):
            raise InputError(source, f"{where}.init {run['init']!r} is not "
                                     f"finetune.models.{run['model']}.init {conf.get('init')!r}")
        if run["group"] == "offline":
            want = conf.get("candidates", finetune.get("candidates"))
            if run["candidates"] != want:
                raise InputError(source, f"{where}.candidates {run['candidates']!r} is not the "
                                         f"model's candidates {want!r} (finetune.models."
                                         f"{run['model']}.candidates, else finetune.candidates)")
    return runs


def run(*, params_file, out) -> list[dict]:
    """Check `params_file`; write `out` (fixed content) only when it passes."""
    runs = check(load(params_file), params_file)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, OUTPUT)
    return runs
