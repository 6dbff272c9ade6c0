"""check-params: no params.yaml value reaches a shell (or a DVC path) unchecked."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.main import main

ROOT = Path(__file__).resolve().parents[1]
EVIL = "x;touch PWNED;#"


def _params(tmp_path, edit=None) -> Path:
    doc = yaml.safe_load((ROOT / "params.smoke.yaml").read_text())
    if edit:
        edit(doc)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_shipped_params_pass_and_the_output_is_the_same_bytes(tmp_path, capsys):
    outs = []
    for i, src in enumerate(("params.yaml", "params.smoke.yaml")):
        out = tmp_path / f"check{i}" / "params_check.json"
        assert main(["check-params", "--params", str(ROOT / src), "--out", str(out)]) == 0
        assert ("vse_inf-triplet, vse_inf-aoq, vsrn-triplet, vsrn-aoq, bfan-triplet, bfan-aoq"
                in capsys.readouterr().out)
        outs.append(out.read_bytes())
    # no names in it: a params edit that passes leaves `prepare` (downstream) cached
    assert outs[0] == outs[1]


def _offline(doc):
    return doc["finetune"]["runs"]["offline"]


BAD = {
    "pretrain model": (lambda d: d["pretrain"].update(models=[EVIL]), EVIL),
    "train_base model": (lambda d: d["train_base"].update(model="vse_inf $(id)"), "$(id)"),
    "run model": (lambda d: _offline(d)["vse_inf-aoq"].update(model=EVIL), EVIL),
    "run name": (lambda d: _offline(d).update({EVIL: _offline(d).pop("vse_inf-aoq")}), EVIL),
    "unregistered": (lambda d: d["pretrain"].update(models=["clip"]), "not a registered model"),
    "loss": (lambda d: _offline(d)["vse_inf-aoq"].update(loss="aoq;id"), "aoq;id"),
    "triplet offline": (lambda d: _offline(d).update({"vse_inf-triplet": {
        "model": "vse_inf", "loss": "triplet", "init": "artifacts/base/checkpoint",
        "candidates": "artifacts/candidates"}}), "belongs in finetune.runs.online"),
    "name mismatch": (lambda d: _offline(d).update(
        {"vsrn-offtri": _offline(d).pop("vsrn-aoq")}), "is named vsrn-aoq"),
    "init quote": (lambda d: _offline(d)["vse_inf-aoq"].update(init="a' b"), "a' b"),
    "init option": (lambda d: _offline(d)["vse_inf-aoq"].update(init="--help"), "--help"),
    "init differs": (lambda d: _offline(d)["vsrn-aoq"].update(init="artifacts/base/checkpoint"),
                     "finetune.models.vsrn.init"),
    "candidates differ": (lambda d: _offline(d)["vsrn-aoq"].update(candidates="other"),
                          "finetune.runs.offline.vsrn-aoq.candidates"),
    "untracked key": (lambda d: d["finetune"].update(train={"lr": 1}), "finetune.train"),
    "missing key": (lambda d: d["finetune"].pop("refresh_every_steps"),
                    "finetune.refresh_every_steps"),
    "old grid": (lambda d: d["finetune"].update(runs={"model": ["vsrn"], "loss": ["aoq"]}),
                 "'online'"),
    "ensemble name": (lambda d: d.update(ensembles={EVIL: {"a": "x", "b": "y"}}), EVIL),
    "ensemble keys": (lambda d: d.update(ensembles={"e": {"a": "x"}}), "['a', 'b']"),
    "ensemble path": (lambda d: d.update(ensembles={"e": {"a": "x", "b": "--help"}}), "--help"),
    "ensemble twice": (lambda d: d.update(ensembles={"e": {"a": "x", "b": "x"}}), "the same checkpoint"),
    "ensembles list": (lambda d: d.update(ensembles=["x", "y"]), "expected a mapping"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_value_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    edit, shown = BAD[case]
    params = _params(tmp_path, edit)
    out = tmp_path / "artifacts" / "params_check.json"
    assert main(["check-params", "--params", str(params), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {params}: "), err
    assert shown in err, err
    assert not out.exists() and not out.parent.exists()


def _copy_project(work: Path, edit) -> None:
    work.mkdir()
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copytree(ROOT / "configs", work / "configs")
    (work / "params.yaml").write_text(_params(work.parent, edit).read_text())


@pytest.mark.parametrize("where", ["pretrain.models", "finetune.runs"])
def test_dvc_repro_stops_before_any_command(where, tmp_path):
    """A model named `x;touch PWNED;#` (with a config file, so that no missing dependency
    stops DVC first): `dvc repro` fails at check_params, and nothing is created."""
    def edit(doc):
        if where == "pretrain.models":
            doc["pretrain"]["models"] = [EVIL]
            doc["pretrain"][EVIL] = doc["pretrain"].pop("vsrn")
        else:
            _offline(doc)["vse_inf-aoq"]["model"] = EVIL
            doc["finetune"]["models"][EVIL] = doc["finetune"]["models"]["vse_inf"]

    work = tmp_path / "project"
    _copy_project(work, edit)
    (work / "configs" / "models" / f"{EVIL}.yaml").write_text("{}\n")
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"],
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    dvc = os.path.join(bindir, "dvc")
    subprocess.run([dvc, "init", "-q"], cwd=work, env=env, check=True)
    proc = subprocess.run([dvc, "repro"], cwd=work, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log
    assert f"error: params.yaml: {where}" in log and EVIL in log, log
    assert "Running stage 'prepare'" not in log
    assert not [p for p in tmp_path.rglob("*PWNED*") if p.parent.name != "models"], log
    assert not (work / "artifacts").exists(), log
