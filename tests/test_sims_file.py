"""`evaluate --sims PATH` (pipeline.evaluation.sims_file): the whole matrix written block by
block with a sidecar; an interrupted run (an exception, or a real SIGKILL of the CLI)
resumes to the byte-identical matrix and the same metrics; evaluate-sims reads the result;
a foreign, misshapen or other-checkpoint file is one line, exit 2, and left untouched;
non-finite scores give no metrics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from cli.main import main
from pipeline.errors import InputError
from pipeline.evaluation import sims_file
from pipeline.evaluation.protocols import evaluate_sims
from pipeline.scoring import Gallery
from stages import evaluate



@pytest.fixture(scope="module")
def cross_ckpt(tiny_trained):
    return tiny_trained("bfan")


@pytest.fixture(scope="module")
def reference(cross_ckpt, tiny_data, tmp_path_factory):
    """An uninterrupted run: (npy bytes, metrics, in-memory metrics)."""
    path = tmp_path_factory.mktemp("ref") / "sims.npy"
    res = evaluate.run(checkpoint=cross_ckpt, data_dir=tiny_data, sims=path, sims_block_rows=4,
                       progress=False)
    plain = evaluate.run(checkpoint=cross_ckpt, data_dir=tiny_data, progress=False)
    return path.read_bytes(), res["metrics"], plain["metrics"], path


def _run(ckpt, data, path, **kw):
    return evaluate.run(checkpoint=ckpt, data_dir=data, sims=path, sims_block_rows=4,
                        progress=False, **kw)


def test_complete_file_is_a_normal_matrix(reference, tmp_path, capsys):
    data, metrics, plain, path = reference
    side = json.loads(sims_file.sidecar_path(path).read_text())
    assert side["status"] == "complete" and side["shape"] == [25, 125]
    assert side["done_blocks"] == list(range(7)) and side["block_rows"] == 4
    assert side["split"] == "test" and len(side["checkpoint_hash"]) == 64
    assert sorted(p.name for p in path.parent.iterdir()) == ["sims.npy", "sims.npy.json"]
    arr = np.load(path)
    assert arr.dtype == np.float32 and arr.shape == (25, 125)
    assert metrics["sims_blocks_computed"] == 7
    # the same ranks as the in-memory evaluation (the positives: the matrix's own diagonal)
    assert {k: metrics[k] for k in plain} == pytest.approx(plain, abs=1e-9)
    # evaluate-sims reads it, to the same numbers
    out = tmp_path / "m.json"
    assert main(["evaluate-sims", "--sims", str(path), "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert {k: saved[k] for k in plain} == {k: metrics[k] for k in plain}


def test_resume_after_an_exception_is_byte_identical(reference, cross_ckpt, tiny_data, tmp_path,
                                                     monkeypatch):
    data, metrics, _, _ = reference
    path = tmp_path / "sims.npy"
    real, calls = Gallery.block, []

    def dying(self, *a):
        if len(calls) == 3:
            raise RuntimeError("killed")
        calls.append(a)
        return real(self, *a)

    monkeypatch.setattr(Gallery, "block", dying)
    with pytest.raises(RuntimeError, match="killed"):
        _run(cross_ckpt, tiny_data, path)
    side = json.loads(sims_file.sidecar_path(path).read_text())
    assert side["status"] == "partial" and side["done_blocks"] == [0, 1, 2]
    assert not path.exists() and sims_file.partial_path(path).exists()
    monkeypatch.setattr(Gallery, "block", real)
    res = _run(cross_ckpt, tiny_data, path)["metrics"]
    assert res["sims_blocks_computed"] == 4
    assert path.read_bytes() == data
    assert {k: v for k, v in res.items() if k != "sims"} == \
        {k: v for k, v in metrics.items() if k != "sims" and k != "sims_blocks_computed"} | \
        {"sims_blocks_computed": 4}
    # complete: reused, nothing computed
    again = _run(cross_ckpt, tiny_data, path)["metrics"]
    assert again["sims_blocks_computed"] == 0 and again["rsum"] == metrics["rsum"]


def test_resume_after_sigkill_of_the_cli(reference, cross_ckpt, tiny_data, tmp_path):
    data, metrics, _, _ = reference
    path = tmp_path / "sims.npy"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "cli.main", "evaluate", "--checkpoint", str(cross_ckpt),
            "--data", str(tiny_data), "--quiet", "--sims", str(path), "--sims-block-rows", "4"]
    proc = subprocess.run(base + ["--crash-after-blocks", "2"], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(sims_file.sidecar_path(path).read_text())["done_blocks"] == [0, 1]
    out = tmp_path / "m.json"
    proc = subprocess.run(base + ["--json", str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "5 blocks computed" in proc.stdout
    assert path.read_bytes() == data
    assert json.loads(out.read_text())["rsum"] == metrics["rsum"]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_foreign_and_mismatched_files_are_refused(reference, cross_ckpt, ckpt, tiny_data,
                                                  tmp_path, capsys):
    _, _, _, ref_path = reference
    base = ["evaluate", "--checkpoint", str(cross_ckpt), "--data", str(tiny_data), "--quiet"]
    # a file the tool did not write (no sidecar)
    foreign = tmp_path / "foreign.npy"
    np.save(foreign, np.zeros((25, 125), np.float32))
    before = foreign.read_bytes()
    assert main(base + ["--sims", str(foreign)]) == 2
    assert "no sidecar" in _err(capsys) and foreign.read_bytes() == before
    # another split: the dev matrix at this path
    dev = tmp_path / "dev.npy"
    assert main(base + ["--sims", str(dev), "--split", "dev"]) == 0
    capsys.readouterr()
    before = dev.read_bytes()
    assert main(base + ["--sims", str(dev)]) == 2
    assert "split 'dev'" in _err(capsys) and dev.read_bytes() == before
    # another checkpoint (an indep model's matrix)
    other = tmp_path / "other.npy"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_data), "--quiet",
                 "--sims", str(other)]) == 0
    capsys.readouterr()
    assert main(base + ["--sims", str(other)]) == 2
    assert "another checkpoint" in _err(capsys)
    # a wrong shape under a matching sidecar
    bent = tmp_path / "bent.npy"
    bent.write_bytes(ref_path.read_bytes())
    sims_file.sidecar_path(bent).write_text(sims_file.sidecar_path(ref_path).read_text())
    np.save(bent, np.zeros((5, 25), np.float32))
    assert main(base + ["--sims", str(bent)]) == 2
    assert "shape (5, 25)" in _err(capsys)
    # a sidecar that is not ours
    sims_file.sidecar_path(foreign).write_text('{"hello": 1}')
    assert main(base + ["--sims", str(foreign)]) == 2
    assert "not a sidecar" in _err(capsys)
    # a metrics file on the matrix
    assert main(base + ["--sims", str(dev), "--split", "dev", "--json", str(dev)]) == 2
    _err(capsys)


def test_non_finite_scores_give_no_metrics(cross_ckpt, tiny_data, tmp_path, monkeypatch):
    real = Gallery.block

    def nan_block(self, r0, r1, c0, c1):
        s = real(self, r0, r1, c0, c1)
        if r0 <= 9 < r1:
            s[9 - r0, 17] = np.nan
        return s

    monkeypatch.setattr(Gallery, "block", nan_block)
    path, out = tmp_path / "sims.npy", tmp_path / "m.json"
    with pytest.raises(InputError, match="non-finite score .* image 9, caption 17"):
        _run(cross_ckpt, tiny_data, path, out_json=out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_params_keys_are_validated(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    for bad, word in (("shortlist_k: 0", "shortlist_k=0"), ("sims: 3", "sims=3"),
                      ("shortlist_x: a", "unknown")):
        params.write_text(f"evaluate_base:\n  checkpoint: c\n  {bad}\n")
        assert main(["evaluate", "--params", str(params)]) == 2
        assert word in _err(capsys)
