"""The one schema of params.yaml's values: each section's keys with their rules
(pipeline.options). The commands check the section they read with it (cli.params
load_section: one line naming the params file and the key); check-params checks every
section dvc.yaml runs with it before any stage starts. Command-line flags carry the same
ranges as click types, and the stages check what a programmatic caller passes.
"""
from __future__ import annotations



def _r(kind: str, **kw) -> dict:
    return {"type": kind, **kw}


PATH, OPT_PATH = _r("path"), _r("path", null=True)
DEVICE = _r("device")
POS_INT = _r("int", min=1)


def _train_rules() -> dict:
    from pipeline.training import TrainSettings

    return TrainSettings.rules()


def _finetune_model_rules() -> dict:
    return {"init": PATH, "candidates": PATH, "model_options": _r("mapping"),
            "train": _r("mapping", items=_train_rules())}


def train_section() -> dict:
    return {"model": _r("str"), "data": PATH, "out": PATH, "init": OPT_PATH, "device": DEVICE,
            "model_options": _r("mapping", null=True),
            "train": _r("mapping", null=True, items=_train_rules())}


def evaluate_section() -> dict:
    from pipeline.evaluation.protocols import PROTOCOLS

    return {"checkpoint": PATH, "data": PATH, "split": _r("str"), "protocol": _r("str", choices=PROTOCOLS),
            "json": OPT_PATH, "groups_json": OPT_PATH, "device": DEVICE, "batch_size": POS_INT,
            # cross models: a resumable .npy of the whole matrix (pipeline.evaluation.sims_file);
            # or a two-stage evaluation: an `embed` folder or indep checkpoint, its top K re-scored
            "sims": OPT_PATH, "shortlist": OPT_PATH, "shortlist_k": _r("int", min=1, null=True)}



EMBED = {"checkpoint": PATH, "data": PATH, "split": _r("str"), "out": PATH, "batch_size": POS_INT,
         "device": DEVICE, "block_rows": POS_INT, "scheduler": _r("str", null=True),
         "workers": _r("int", min=1, null=True)}
FILTERS = {"relative_margin": _r("float", min=0, max=1, null=True),
           "absolute_margin": _r("float", min=0, null=True),
           "range_min": _r("int", min=0, null=True), "text_filter": _r("bool", null=True)}
# a candidate-set name becomes part of file names (i2t_<name>.npy) and of dvc.yaml paths
NAME = _r("str", null=True, pattern=r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def mine_section() -> dict:
    from pipeline.mining.mine import BACKENDS, INDEXES, PRECISIONS

    return {"img_embs": PATH, "cap_embs": PATH, "embeddings_dir": PATH, "checkpoint": PATH, "data": PATH,
            "split": _r("str"), "out": PATH, "name": NAME, "k_i2t": _r("int", min=1),
            "k_t2i": _r("int", min=1), "backend": _r("str", choices=BACKENDS),
            "precision": _r("str", choices=PRECISIONS), "index": _r("str", choices=INDEXES),
            "device": DEVICE, "row_block": POS_INT, "col_block": POS_INT, "batch_size": POS_INT,
            "summary_json": OPT_PATH, "scheduler": _r("str", null=True),
            "workers": _r("int", min=1, null=True), "filters": _r("mapping", null=True, items=FILTERS),
            "rescore": OPT_PATH, "rescore_k": _r("int", min=1, null=True)}


def finetune_section() -> dict:
    """params.yaml's finetune section (what check-params knows) and the keys a hand-written
    one for `itm-pipeline finetune --params` may add."""
    from pipeline.losses.aoq import AOQ_RULES
    from pipeline.losses.registry import loss_names

    return {"runs": _r("mapping"), "models": _r("mapping"), "data": PATH, "candidates": PATH,
            "device": DEVICE, "offcandisize": _r("int", min=1, null=True),
            "refresh_every": _r("int", min=0, null=True), "refresh_every_steps": _r("int", min=0, null=True),
            "passes": _r("str", choices=("batched", "three")), "aoq": _r("mapping", null=True, items=AOQ_RULES),
            "model": _r("str"), "loss": _r("str", choices=tuple(loss_names())), "init": PATH, "out": PATH,
            "model_options": _r("mapping", null=True), "train": _r("mapping", null=True, items=_train_rules())}


def finetune_model() -> dict:
    return _finetune_model_rules()


def check_section(node: dict, rules, source, section: str) -> dict:
    """The one check of a params section: an unknown key (a typo) or a value breaking its
    rule is one line naming the params file and the key. `rules`: a dict of rules, a
    callable returning one, or a plain set of keys (names only)."""
    from pipeline.errors import refuse_unknown
    from pipeline.options import check_values

    rules = rules() if callable(rules) else rules
    refuse_unknown(node, rules, source, f"key(s) in section '{section}':")
    if isinstance(rules, dict):
        check_values(node, rules, source, f"{section}.")
    return node


def check_document(doc: dict, source) -> None:
    """Every section dvc.yaml runs, by its rules (check-params: before any stage starts)."""
    from pipeline.errors import InputError

    def section(key):
        node = doc.get(key)
        if not isinstance(node, dict):
            raise InputError(source, f"no '{key}' section")
        return node

    check_prepare(section("prepare"), source)
    check_section(section("train_base"), train_section, source, "train_base")
    for m in section("pretrain").get("models") or []:
        check_section(section("pretrain")[m], {"model_options": _r("mapping", null=True),
                                               "train": _r("mapping", null=True, items=_train_rules())},
                      source, f"pretrain.{m}")
    check_section(section("evaluate_base"), evaluate_section, source, "evaluate_base")
    check_section(section("embed"), EMBED, source, "embed")
    check_section(section("mine"), mine_section, source, "mine")
    ft = section("finetune")
    check_section(ft, finetune_section, source, "finetune")
    for m, conf in (ft.get("models") or {}).items():
        if not isinstance(conf, dict):
            raise InputError(source, f"finetune.models.{m}={conf!r}: must be a mapping")
        check_section(conf, finetune_model, source, f"finetune.models.{m}")


def check_prepare(node: dict, source, section: str = "prepare") -> dict:
    """The prepare section: dataset and source, and for the embedded dataset every knob of
    pipeline.data.synthetic.SyntheticConfig (its own checks, reported against `source`)."""
    import dataclasses

    from pipeline.data.synthetic import SyntheticConfig
    from pipeline.errors import InputError

    knobs = dict(node)
    check_section({k: knobs.pop(k) for k in ("dataset", "source", "out") if k in knobs},
                  {"dataset": _r("str", choices=("synthetic", "precomp")), "source": OPT_PATH,
                   "out": PATH}, source, section)
    if node.get("dataset", "synthetic") == "synthetic":
        check_section(knobs, {f.name: {} for f in dataclasses.fields(SyntheticConfig)}, source, section)
        try:
            SyntheticConfig(**knobs)
        except InputError as e:
            raise InputError(source, f"{section}: {e.problem}") from None
    return node
