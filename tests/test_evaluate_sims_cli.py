"""`evaluate-sims` command: table output, JSON artifact, InputError for bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import pipeline.evaluation.protocols as P
from cli.evaluate_sims import evaluate_sims
from pipeline.errors import InputError
from pipeline.evaluation.protocols import evaluate_sims as evaluate_sims_lib


def make_sims(n, seed=0):
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((n, 5 * n)).astype(np.float32)
    j = np.arange(5 * n)
    S[j // 5, j] += 2 * rng.random(5 * n, dtype=np.float32)
    return S


@pytest.fixture
def sims_file(tmp_path):
    path = tmp_path / "sims.npy"
    np.save(path, make_sims(20))
    return path


def run(args):
    return CliRunner().invoke(evaluate_sims, [str(a) for a in args])


def test_prints_table_and_writes_json(sims_file, tmp_path):
    out = tmp_path / "out" / "metrics.json"
    res = run(["--sims", sims_file, "--json", out, "--chunk", 3])
    assert res.exit_code == 0, res.output
    assert "R@1" in res.output and "rsum" in res.output and str(sims_file) in res.output
    want = evaluate_sims_lib(np.load(sims_file), "full")
    saved = json.loads(out.read_text())
    for k, v in want.items():
        assert saved[k] == v
    assert saved["n_img"] == 20
    assert f"{want['rsum']:.1f}" in res.output
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temp files left


def test_protocol_option(sims_file, tmp_path, monkeypatch):
    monkeypatch.setitem(P.PROTOCOL_SIZES, "coco1k_5fold", 20)
    monkeypatch.setattr(P, "FOLD_SIZE", 4)
    out = tmp_path / "m.json"
    res = run(["--sims", sims_file, "--protocol", "coco1k_5fold", "--json", out])
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert saved["protocol"] == "coco1k_5fold"
    assert saved["rsum"] == evaluate_sims_lib(np.load(sims_file), "coco1k_5fold")["rsum"]


def test_wrong_size_for_protocol(sims_file, tmp_path):
    out = tmp_path / "m.json"
    res = run(["--sims", sims_file, "--protocol", "coco5k", "--json", out])
    assert res.exit_code != 0
    assert isinstance(res.exception, InputError)
    msg = str(res.exception)
    assert str(sims_file) in msg
    assert "protocol coco5k needs 5000 images, got 20 (use --protocol full)" in msg
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "corrupt", "3-D", "4N", "nan"])
def test_bad_input_names_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.npy"
    if kind == "corrupt":
        path.write_bytes(b"not an npy file at all" * 10)
    elif kind == "3-D":
        np.save(path, np.zeros((2, 10, 1), dtype=np.float32))
    elif kind == "4N":
        np.save(path, np.zeros((5, 20), dtype=np.float32))
    elif kind == "nan":
        S = make_sims(5)
        S[2, 3] = np.nan
        np.save(path, S)
    out = tmp_path / "m.json"
    res = run(["--sims", path, "--json", out])
    assert res.exit_code != 0
    assert isinstance(res.exception, InputError), res.output
    assert str(path) in str(res.exception)
    assert not out.exists()


def test_bad_options_are_usage_errors(sims_file):
    assert run(["--sims", sims_file, "--protocol", "coco1k"]).exit_code == 2
    assert run(["--sims", sims_file, "--chunk", 0]).exit_code == 2
    assert run([]).exit_code == 2
