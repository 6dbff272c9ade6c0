"""`ensemble`: the mean of members' score matrices, evaluated like one model; members of
another vocabulary, a lone checkpoint and bad weights refused in one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cli.main import main
from pipeline.checkpoint import load_checkpoint
from pipeline.data.precomp import open_split
from pipeline.evaluation.protocols import evaluate_sims
from pipeline.scoring import encode_gallery


@pytest.fixture(scope="module")
def bfan_pair(tiny_trained):
    """BFAN focal_type equal and prob, one epoch each on the tiny data."""
    return [tiny_trained("bfan"), tiny_trained("bfan", focal_type="prob")]


def _matrix(ckpt, data, split="test"):
    model, _ = load_checkpoint(ckpt)
    return encode_gallery(model, open_split(data, split)).matrix().astype(np.float64)


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert str(w) in err, err


@pytest.mark.parametrize("with_indep", [False, True])
def test_ensemble_equals_the_mean_matrix(bfan_pair, ckpt, tiny_data, tmp_path, capsys, with_indep):
    members = [*bfan_pair, ckpt] if with_indep else bfan_pair
    out = tmp_path / "ens.json"
    rc = main(["ensemble", *map(str, members), "--data", str(tiny_data), "--split", "test",
               "--json", str(out), "--quiet"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "ensemble/test" in text.out and "within-family" in text.out
    mean = np.mean([_matrix(c, tiny_data) for c in members], axis=0).astype(np.float32)
    ref = evaluate_sims(mean, "full")
    got = json.loads(out.read_text())
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"):
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key
    assert [m["model"] for m in got["members"]] == [m for m in
                                                     (["bfan", "bfan", "vsepp"] if with_indep else ["bfan", "bfan"])]
    assert got["weights"] == pytest.approx([1 / len(members)] * len(members))


def test_weights_are_normalised_and_applied(bfan_pair, tiny_data, tmp_path, capsys):
    out = tmp_path / "ens.json"
    rc = main(["ensemble", *map(str, bfan_pair), "--data", str(tiny_data), "--weights", "3,1",
               "--json", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    a, b = (_matrix(c, tiny_data) for c in bfan_pair)
    ref = evaluate_sims((0.75 * a + 0.25 * b).astype(np.float32), "full")
    got = json.loads(out.read_text())
    assert got["weights"] == [0.75, 0.25] and got["rsum"] == pytest.approx(ref["rsum"], abs=1e-9)


def test_ensemble_bad_inputs(bfan_pair, ckpt, tiny_data, tmp_path, capsys):
    # a member whose vocabulary assigns other ids (two words swapped)
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    vocab = json.loads((other / "vocab.json").read_text())
    w2i = vocab["word2idx"]
    a, b = sorted(w2i, key=w2i.get)[-2:]
    w2i[a], w2i[b] = w2i[b], w2i[a]
    vocab["idx2word"] = {str(i): w for w, i in w2i.items()}
    (other / "vocab.json").write_text(json.dumps(vocab))
    out = tmp_path / "ens.json"
    assert main(["ensemble", str(bfan_pair[0]), str(other), "--data", str(tiny_data),
                 "--json", str(out), "--quiet"]) == 2
    _one_line_error(capsys, other, "vocabulary")
    assert main(["ensemble", str(bfan_pair[0]), "--data", str(tiny_data), "--quiet"]) == 2
    _one_line_error(capsys, "at least two")
    for w in ("1", "1,x", "-1,2", "0,0"):
        assert main(["ensemble", *map(str, bfan_pair), "--data", str(tiny_data), "--weights", w,
                     "--quiet"]) == 2
        _one_line_error(capsys, "--weights")
    assert not out.exists()
