"""Candidate report: files, tables, composition shares on the embedded dataset, CLI."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.io import STAMP
from pipeline.data.scene_graphs import caption_describes_image, family_ids, load_graphs
from pipeline.errors import InputError
from pipeline.mining.report import candidates_report


def family_candidates(graphs, with_scores=True):
    """Every anchor's candidates = the other members of its family (siblings only)."""
    fam = family_ids(graphs)
    n = len(fam)
    members = {f: np.flatnonzero(fam == f) for f in np.unique(fam)}
    i2t = np.array([[5 * m + t for m in members[fam[i]] if m != i for t in range(5)] for i in range(n)],
                   dtype=np.int32)
    t2i = np.array([[m for m in members[fam[j // 5]] if m != j // 5] for j in range(5 * n)], dtype=np.int32)
    rng = np.random.default_rng(0)
    s1 = -np.sort(-rng.random(i2t.shape), axis=1).astype(np.float32) if with_scores else None
    s2 = -np.sort(-rng.random(t2i.shape), axis=1).astype(np.float32) if with_scores else None
    return SimpleNamespace(i2t=i2t, t2i=t2i, i2t_scores=s1, t2i_scores=s2,
                           meta={"backend": "torch", "precision": "bf16", "filters": {"range_min": 0}})


def test_family_candidates_are_all_siblings(tiny_data, tmp_path):
    graphs = load_graphs(tiny_data, "train")
    caps = (tiny_data / "train_caps.txt").read_text().splitlines()
    c = family_candidates(graphs)
    assert c.i2t.shape[1] == 20 and c.t2i.shape[1] == 4
    out = tmp_path / "rep"
    res = candidates_report(c, out, graphs=graphs, captions=caps, name="synthetic")
    assert sorted(p.name for p in out.iterdir() if p.name != STAMP) == ["report.json", "report.md", "scores_i2t.png",
                                                     "scores_t2i.png"]
    assert (out / "scores_i2t.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(res))
    assert res["i2t"]["buckets"] == [1, 5, 10, 20] and res["t2i"]["buckets"] == [1, 4]
    n = len(graphs)
    for d, k in (("i2t", 20), ("t2i", 4)):
        for row in res[d]["composition"]:
            assert row["sibling_share"] == 1.0
            assert row["sibling"] == row["candidates"]
            assert row["unrelated"] == 0
        last = res[d]["composition"][-1]
        assert last["candidates"] == (n if d == "i2t" else 5 * n) * k
    # false negatives against a direct count with scene_graphs
    fn_i2t = sum(caption_describes_image(graphs, int(cc), i) for i in range(n) for cc in c.i2t[i])
    fn_t2i = sum(caption_describes_image(graphs, j, int(m)) for j in range(5 * n) for m in c.t2i[j])
    assert res["i2t"]["composition"][-1]["false_negative"] == fn_i2t
    assert res["t2i"]["composition"][-1]["false_negative"] == fn_t2i
    # score stats at rank b - 1
    col = c.i2t_scores[:, 4].astype(np.float64)
    st = res["i2t"]["scores"][1]
    assert st["top"] == 5 and st["rank"] == 4
    assert st["median"] == pytest.approx(float(np.median(col)))
    assert st["mean"] == pytest.approx(float(col.mean()))
    md = (out / "report.md").read_text()
    assert "# Candidate report: synthetic" in md
    assert "| top b | rank | p10 | median | p90 | mean | min | max |" in md
    assert "| top b | candidates | siblings | false negatives | both | unrelated |" in md
    assert "| 20 | " in md and "100.0%" in md
    assert "bf16" in md and "Examples:" in md and caps[0] in md and "[sibling" in md


def test_random_candidates_shares_match_brute_force(tiny_data, tmp_path):
    graphs = load_graphs(tiny_data, "train")
    fam = family_ids(graphs)
    n = len(graphs)
    rng = np.random.default_rng(3)
    i2t = np.stack([rng.choice(np.setdiff1d(np.arange(5 * n), np.arange(5 * i, 5 * i + 5)), 12, replace=False)
                    for i in range(n)]).astype(np.int32)
    # put a few siblings first so the shares differ between buckets
    for i in range(n):
        sib = next(m for m in range(n) if m != i and fam[m] == fam[i])
        i2t[i, :2] = [5 * sib, 5 * sib + 1]
    t2i = np.stack([rng.choice(np.setdiff1d(np.arange(n), [j // 5]), 3, replace=False)
                    for j in range(5 * n)]).astype(np.int32)
    c = SimpleNamespace(i2t=i2t, t2i=t2i, i2t_scores=None, t2i_scores=None, meta={})
    res = candidates_report(c, tmp_path, graphs=graphs, buckets=(1, 2, 10, 50))
    assert res["i2t"]["buckets"] == [1, 2, 10, 12]
    for row in res["i2t"]["composition"]:
        b = row["top"]
        block = i2t[:, :b]
        sib = fam[block // 5] == fam[:, None]
        fn = np.array([[caption_describes_image(graphs, int(cc), i) for cc in block[i]] for i in range(n)])
        assert row["sibling"] == int(sib.sum())
        assert row["false_negative"] == int(fn.sum())
        assert row["sibling_and_false_negative"] == int((sib & fn).sum())
        assert row["unrelated"] == int((~sib & ~fn).sum())
        assert row["sibling_share"] == pytest.approx(sib.mean())
    assert res["i2t"]["composition"][0]["sibling_share"] == 1.0
    assert res["i2t"]["composition"][-1]["sibling_share"] < 1.0
    sib_t2i = fam[t2i] == fam[np.arange(5 * n) // 5][:, None]
    assert res["t2i"]["composition"][-1]["sibling"] == int(sib_t2i.sum())
    # no scores: no plots, said so
    assert not (tmp_path / "scores_i2t.png").exists() and res["plots"] == []
    assert res["i2t"]["scores"] is None
    md = (tmp_path / "report.md").read_text()
    assert "No scores stored" in md and "plots skipped" in md


def test_without_graphs_and_bad_inputs(tmp_path):
    rng = np.random.default_rng(0)
    n = 8
    i2t = np.stack([rng.permutation(np.setdiff1d(np.arange(40), np.arange(5 * i, 5 * i + 5)))[:6]
                    for i in range(n)]).astype(np.int32)
    t2i = np.stack([rng.permutation(np.setdiff1d(np.arange(n), [j // 5]))[:2] for j in range(40)]).astype(np.int32)
    c = SimpleNamespace(i2t=i2t, t2i=t2i, i2t_scores=-np.sort(-rng.random((n, 6)), 1).astype(np.float32),
                        t2i_scores=-np.sort(-rng.random((40, 2)), 1).astype(np.float32), meta={"k": 6})
    res = candidates_report(c, tmp_path / "r")
    assert res["i2t"]["composition"] is None and res["plots"] == ["scores_i2t.png", "scores_t2i.png"]
    assert "composition skipped" in (tmp_path / "r" / "report.md").read_text()
    with pytest.raises(InputError, match="caption rows"):
        candidates_report(c, tmp_path / "r", captions=["x"] * 39)
    bad = SimpleNamespace(**{**vars(c), "t2i": t2i[:39]})
    with pytest.raises(InputError, match="need 40 t2i rows"):
        candidates_report(bad, tmp_path / "r")


def test_cli(tiny_data, tmp_path):
    from cli.candidates_report import candidates_report as cmd
    from pipeline.mining.candidates import Candidates, write_candidates

    graphs = load_graphs(tiny_data, "train")
    c = family_candidates(graphs)
    cdir = tmp_path / "cands"
    write_candidates(cdir, "synthetic", Candidates(c.i2t, c.t2i, c.i2t_scores, c.t2i_scores,
                                                   meta={"backend": "torch", "k_i2t": 20}))
    out = tmp_path / "report"
    res = CliRunner().invoke(cmd, [str(cdir), "--data", str(tiny_data), "--out", str(out), "--bucket", "5"])
    assert res.exit_code == 0, res.output
    assert "i2t top 20: siblings 100.0%" in res.output
    assert sorted(p.name for p in out.iterdir() if p.name != STAMP) == ["report.json", "report.md", "scores_i2t.png",
                                                     "scores_t2i.png"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["i2t"]["buckets"] == [5, 20] and rep["meta"]["backend"] == "torch"
    # default output folder, beside the candidates (never inside an input); no --data: no composition
    res = CliRunner().invoke(cmd, [str(cdir), "--name", "synthetic"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cands_report_synthetic" / "report.md").is_file()
    # an output inside the input folder is refused
    res = CliRunner().invoke(cmd, [str(cdir), "--out", str(cdir / "report")])
    assert isinstance(res.exception, InputError) and "is inside the input" in str(res.exception)
    # bad input: InputError (the CLI's main prints it on one line, exit 2)
    res = CliRunner().invoke(cmd, [str(tmp_path / "missing")])
    assert isinstance(res.exception, InputError) and "candidate folder not found" in str(res.exception)
    res = CliRunner().invoke(cmd, [str(cdir), "--data", str(tmp_path / "nodata")])
    assert isinstance(res.exception, InputError) and "data folder not found" in str(res.exception)
