"""params.yaml values are checked by one schema per section (stages/params_schema.py),
shared by the commands and check-params: a bad value is one line naming the params file
and the key, exit 2, nothing written (issue 19, item 2)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from cli.main import main

REPO = Path(__file__).resolve().parents[1]

# (section, override, command, key named in the error)
CASES = [
    ("train_base", {"model_options": "abc"}, "train", "train_base.model_options"),
    ("train_base", {"train": [1, 2]}, "train", "train_base.train"),
    ("train_base", {"model": ["vsepp"]}, "train", "train_base.model"),
    ("train_base", {"train": {"lr": "abc"}}, "train", "train_base.train.lr"),
    ("train_base", {"train": {"epochs": 1.5}}, "train", "train_base.train.epochs"),
    ("train_base", {"train": {"epochz": 1}}, "train", "epochz"),
    ("train_base", {"device": "mps"}, "train", "train_base.device"),
    ("train_base", {"data": 5}, "train", "train_base.data"),
    ("evaluate_base", {"batch_size": 0}, "evaluate", "evaluate_base.batch_size"),
    ("evaluate_base", {"batch_size": "x"}, "evaluate", "evaluate_base.batch_size"),
    ("evaluate_base", {"protocol": "x"}, "evaluate", "evaluate_base.protocol"),
    ("evaluate_base", {"json": 5}, "evaluate", "evaluate_base.json"),
    ("embed", {"batch_size": 0}, "embed", "embed.batch_size"),
    ("embed", {"split": 5}, "embed", "embed.split"),
    ("mine", {"k_i2t": "abc"}, "mine-candidates", "mine.k_i2t"),
    ("mine", {"k_t2i": 0}, "mine-candidates", "mine.k_t2i"),
    ("mine", {"k_i2t": True}, "mine-candidates", "mine.k_i2t"),
    ("mine", {"name": "../x"}, "mine-candidates", "mine.name"),
    ("mine", {"precision": "x"}, "mine-candidates", "mine.precision"),
    ("finetune", {"offcandisize": "abc"}, "finetune", "finetune.offcandisize"),
    ("finetune", {"refresh_every": -1}, "finetune", "finetune.refresh_every"),
    ("finetune", {"passes": 5}, "finetune", "finetune.passes"),
    ("finetune", {"aoq": [1]}, "finetune", "finetune.aoq"),
    ("finetune", {"aoq": {"alpha": "x"}}, "finetune", "finetune.aoq.alpha"),
    ("finetune", {"aoq": {"alpha": math.nan}}, "finetune", "finetune.aoq.alpha"),
    ("finetune", {"aoq": {"mask_accidental_positives": "maybe"}}, "finetune",
     "finetune.aoq.mask_accidental_positives"),
    ("finetune", {"models": [1]}, "finetune", "finetune.models"),
    ("prepare", {"seed": "x"}, "prepare-data", "seed"),
    ("prepare", {"n_train": 0}, "prepare-data", "n_train"),
    ("prepare", {"dataset": "x"}, "prepare-data", "prepare.dataset"),
]


def _argv(command, params, out, ckpt, data):
    return {
        "train": ["train", "--quiet", "--out", out],
        "evaluate": ["evaluate", "--quiet", "--checkpoint", ckpt, "--data", data, "--split", "dev"],
        "embed": ["embed", "--quiet", "--checkpoint", ckpt, "--data", data, "--out", out],
        "mine-candidates": ["mine-candidates", "--quiet", "--out", out],
        "finetune": ["finetune", "--quiet", "--model", "vse_inf", "--out", out],
        "prepare-data": ["prepare-data", "--quiet", "--out", out],
    }[command] + ["--params", params]


@pytest.mark.parametrize("section,override,command,key", CASES,
                         ids=[f"{c[0]}-{next(iter(c[1]))}-{i}" for i, c in enumerate(CASES)])
def test_bad_params_value_is_one_line_naming_file_and_key(tmp_path, capsys, ckpt, tiny_data,
                                                          section, override, command, key):
    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc[section] = {**doc[section], **override}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    assert main([str(a) for a in _argv(command, params, out, ckpt, tiny_data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {params}: ") and "\n" not in err and key in err, err
    assert not out.exists()

    # check-params, which runs before every DVC stage, refuses the same value
    assert main(["check-params", "--params", str(params), "--out", str(tmp_path / "ok.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {params}: ") and "\n" not in err and key in err, err
    assert not (tmp_path / "ok.json").exists()


def test_the_repository_params_pass(tmp_path):
    for name in ("params.yaml", "params.smoke.yaml"):
        assert main(["check-params", "--params", str(REPO / name), "--out", str(tmp_path / "c.json")]) == 0
        assert json.loads((tmp_path / "c.json").read_text())["ok"] is True


@pytest.mark.parametrize("argv,fragment", [
    (["evaluate", "--batch-size", "0"], "--batch-size"),
    (["finetune", "--offcandisize", "0"], "--offcandisize"),
    (["finetune", "--refresh-every", "-1"], "--refresh-every"),
    (["mine-candidates", "--k-i2t", "0"], "--k-i2t"),
    (["train", "--train-option", "epochs=1.5"], "epochs=1.5"),
    (["train", "--train-option", "lr=abc"], "lr='abc'"),
])
def test_bad_flag_values_are_one_line(capsys, tmp_path, argv, fragment):
    out = ["--out", str(tmp_path / "out")] if argv[0] != "evaluate" else []
    assert main(argv + out) == 2
    assert not (tmp_path / "out").exists()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and fragment in err, err
