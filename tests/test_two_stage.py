"""Two-stage evaluation (pipeline.evaluation.two_stage, `evaluate --shortlist`): ranks and
metrics equal a composite matrix built explicitly (a full-matrix stable argsort of the
first stage, then the cross scores of each query's top K), per fold too; K = n_cap gives
the full cross evaluation; a wrong shortlist source is one line, exit 2."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import pipeline.evaluation.protocols as P
from cli.main import main
from pipeline.checkpoint import load_checkpoint
from pipeline.data.precomp import open_split
from pipeline.errors import InputError
from pipeline.evaluation import two_stage
from pipeline.evaluation.ranks import metrics_from_ranks
from pipeline.scoring import encode_gallery



@pytest.fixture(scope="module")
def bfan_ckpt(tiny_trained):
    return tiny_trained("bfan")


@pytest.fixture(scope="module")
def toy_ckpt(tiny_trained):
    return tiny_trained("toy_cross")


@pytest.fixture(scope="module")
def test_embs(ckpt, tiny_data, tmp_path_factory):
    """conftest's tiny vsepp checkpoint, `embed`ded on the test split."""
    from stages import embed

    out = tmp_path_factory.mktemp("emb") / "test_embs"
    embed.run(checkpoint=ckpt, data_dir=tiny_data, out_dir=out, split="test", progress=False)
    return out


def _gallery(ckpt_path, data_dir):
    model, _ = load_checkpoint(ckpt_path)
    return encode_gallery(model, open_split(data_dir, "test"), batch_size=8)


def _first_rows(test_embs):
    return np.load(test_embs / "img_embs.npy"), np.load(test_embs / "cap_embs.npy")


def reference_ranks(s1: np.ndarray, s2: np.ndarray, k: int):
    """The composite lists, built one query at a time from the full matrices."""
    n_img, n_cap = s1.shape
    i2t, t2i = np.empty(n_img, int), np.empty(n_cap, int)
    for i in range(n_img):
        order = np.argsort(-s1[i], kind="stable")
        top, rest = order[:k], order[k:]
        top = top[np.lexsort((top, -s2[i, top]))]             # cross score desc, index asc
        pos = {c: r for r, c in enumerate(np.concatenate([top, rest]))}
        i2t[i] = min(pos[c] for c in range(5 * i, 5 * i + 5))
    for j in range(n_cap):
        order = np.argsort(-s1[:, j], kind="stable")
        top, rest = order[:k], order[k:]
        top = top[np.lexsort((top, -s2[top, j]))]
        t2i[j] = int(np.flatnonzero(np.concatenate([top, rest]) == j // 5)[0])
    return i2t, t2i


@pytest.mark.parametrize("which", ["bfan", "toy"])
def test_ranks_equal_the_explicit_composite(which, bfan_ckpt, toy_ckpt, tiny_data, test_embs):
    gallery = _gallery(bfan_ckpt if which == "bfan" else toy_ckpt, tiny_data)
    img, cap = _first_rows(test_embs)
    s1, s2 = img @ cap.T, gallery.matrix()
    for k in (1, 3, 10, 40):
        got = two_stage.two_stage_ranks(gallery, img, cap, 0, 25, k, k)
        want_i, want_t = reference_ranks(s1, s2, k)
        np.testing.assert_array_equal(got["i2t"], want_i)
        np.testing.assert_array_equal(got["t2i"], want_t)
        m = two_stage.evaluate_two_stage(gallery, img, cap, "full", k)
        ref = metrics_from_ranks(want_i, want_t)
        assert {key: m[key] for key in ref} == ref
        assert m["shortlist_k"] == k and m["protocol"] == "full"
        # shares of queries whose ground truth made the shortlist
        r1_i = np.array([min(np.flatnonzero(np.argsort(-s1[i], kind="stable") == c)[0]
                             for c in range(5 * i, 5 * i + 5)) for i in range(25)])
        assert m["gt_in_shortlist_i2t"] == pytest.approx(100 * np.mean(r1_i < k))
        assert 0 <= m["gt_in_shortlist_t2i"] <= 100
        assert m["pairs_scored"] <= 25 * k + 125 * min(k, 25)


def test_k_n_cap_is_the_full_cross_evaluation(bfan_ckpt, tiny_data, test_embs, monkeypatch):
    gallery = _gallery(bfan_ckpt, tiny_data)
    img, cap = _first_rows(test_embs)
    full = gallery.evaluate("full")
    got = two_stage.evaluate_two_stage(gallery, img, cap, "full", 125)
    assert {k: got[k] for k in full} == full
    assert got["gt_in_shortlist_i2t"] == got["gt_in_shortlist_t2i"] == 100.0
    assert got["pairs_scored"] == 25 * 125
    # folds: the shortlist is cut within each fold's gallery
    monkeypatch.setitem(P.PROTOCOL_SIZES, "coco1k_5fold", 25)
    monkeypatch.setattr(P, "FOLD_SIZE", 5)
    full5 = gallery.evaluate("coco1k_5fold")
    got5 = two_stage.evaluate_two_stage(gallery, img, cap, "coco1k_5fold", 25)
    assert {k: got5[k] for k in full5} == full5
    s1, s2 = img @ cap.T, gallery.matrix()
    folds = []
    for f in range(5):
        r, c = slice(5 * f, 5 * f + 5), slice(25 * f, 25 * f + 25)
        folds.append(metrics_from_ranks(*reference_ranks(s1[r, c], s2[r, c], 3)))
    got3 = two_stage.evaluate_two_stage(gallery, img, cap, "coco1k_5fold", 3)
    assert {k: got3[k] for k in full5} == pytest.approx(P._finish(folds, "coco1k_5fold"), abs=1e-12)


@pytest.mark.parametrize("which", ["bfan", "toy"])
def test_gallery_pair_scores_equal_pair_scores_and_blocks(which, bfan_ckpt, toy_ckpt, tiny_data,
                                                          monkeypatch):
    """Gallery.pair_scores (blocks of the shard path, grouped by image) = the model's
    aligned-pair scorer = the full matrix, for pairs in any order with repeats."""
    import pipeline.scoring as scoring

    gallery = _gallery(bfan_ckpt if which == "bfan" else toy_ckpt, tiny_data)
    rng = np.random.default_rng(0)
    ii, jj = rng.integers(0, 25, 300), rng.integers(0, 125, 300)
    ii[-10:], jj[-10:] = ii[:10], jj[:10]                        # repeats
    monkeypatch.setattr(scoring, "PAIR_BLOCK_CELLS", 64)          # many blocks
    got = gallery.pair_scores(ii, jj)
    with torch.no_grad():
        want = gallery.model.eval().pair_scores(gallery.img[torch.from_numpy(ii)],
                                                gallery.cap[torch.from_numpy(jj)]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, gallery.matrix()[ii, jj], rtol=1e-6, atol=1e-7)


def test_pair_blocks_cover_every_pair_once_within_the_slack():
    from pipeline.scoring import pair_blocks

    rng = np.random.default_rng(1)
    keys = np.unique(rng.integers(0, 40, 900) * 1000 + rng.integers(0, 1000, 900))
    ii, jj = keys // 1000, keys % 1000
    blocks = pair_blocks(ii, jj, max_cells=4000, slack=1.5, min_cells=16)
    assert blocks[0][0] == 0 and blocks[-1][1] == len(ii)
    for (p0, p1, rows, cols), nxt in zip(blocks, blocks[1:] + [(len(ii),)]):
        assert p1 == nxt[0]                                     # contiguous, no pair twice
        assert np.array_equal(rows, np.unique(ii[p0:p1]))
        assert np.isin(jj[p0:p1], cols).all() and np.array_equal(cols, np.unique(cols))
        cells = len(rows) * len(cols)
        assert len(rows) == 1 or (cells <= 4000 and cells <= max(16, 1.5 * (p1 - p0)))
    # captions shared by consecutive images: one block holds them all
    ii, jj = np.repeat(np.arange(8), 10), np.tile(np.arange(10), 8)
    assert [(b[0], b[1]) for b in pair_blocks(ii, jj)] == [(0, 80)]


def test_shortlist_mask_ties_go_to_the_lower_index():
    s = np.array([[1, 3, 3, 3, 0, 3]], dtype=np.float32)
    assert np.flatnonzero(two_stage.shortlist_mask(s, 2)[0]).tolist() == [1, 2]
    assert np.flatnonzero(two_stage.shortlist_mask(s, 5)[0]).tolist() == [0, 1, 2, 3, 5]
    assert two_stage.shortlist_mask(s, 9).all()


def test_cli_two_stage_from_an_embed_folder_and_from_a_checkpoint(bfan_ckpt, ckpt, tiny_data,
                                                                  test_embs, tmp_path, capsys):
    out = tmp_path / "m.json"
    base = ["evaluate", "--checkpoint", str(bfan_ckpt), "--data", str(tiny_data), "--quiet"]
    assert main(base + ["--shortlist", str(test_embs), "--shortlist-k", "10", "--json", str(out)]) == 0
    a = json.loads(out.read_text())
    assert a["shortlist_k"] == 10 and a["shortlist"] == str(test_embs)
    assert "two-stage" in capsys.readouterr().out
    # the indep checkpoint itself: the split embedded on the fly, the same rows
    assert main(base + ["--shortlist", str(ckpt), "--shortlist-k", "10", "--json", str(out)]) == 0
    b = json.loads(out.read_text())
    for key in ("rsum", "i2t_r1", "t2i_r10", "gt_in_shortlist_i2t", "gt_in_shortlist_t2i"):
        assert b[key] == pytest.approx(a[key], abs=1e-9)


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_shortlist_sources_are_one_line(bfan_ckpt, toy_ckpt, ckpt, tiny_data, test_embs,
                                            tmp_path, capsys):
    from stages import embed

    out = tmp_path / "m.json"
    base = ["evaluate", "--checkpoint", str(bfan_ckpt), "--data", str(tiny_data), "--quiet",
            "--json", str(out)]
    dev = tmp_path / "dev_embs"
    embed.run(checkpoint=ckpt, data_dir=tiny_data, out_dir=dev, split="dev", progress=False)
    assert main(base + ["--shortlist", str(dev)]) == 2
    assert "split 'dev'" in _err(capsys)
    # another size under the right name: the row count gives it away
    fake = tmp_path / "fake"
    shutil.copytree(test_embs, fake)
    np.save(fake / "img_embs.npy", np.load(test_embs / "img_embs.npy")[:20])
    assert main(base + ["--shortlist", str(fake)]) == 2
    err = _err(capsys)
    assert "img_embs.npy" in err and "(25, D)" in err
    assert main(base + ["--shortlist", str(toy_ckpt)]) == 2
    assert "cross-attention checkpoint" in _err(capsys)
    (tmp_path / "empty").mkdir()
    assert main(base + ["--shortlist", str(tmp_path / "empty")]) == 2
    assert "neither" in _err(capsys)
    assert main(base + ["--shortlist", str(tmp_path / "nowhere")]) == 2
    assert "not found" in _err(capsys)
    assert main(base + ["--shortlist-k", "5"]) == 2
    assert "--shortlist" in _err(capsys)
    assert main(base + ["--shortlist", str(test_embs), "--sims", str(tmp_path / "s.npy")]) == 2
    _err(capsys)
    assert not out.exists()


def test_an_indep_model_is_not_two_staged(ckpt, tiny_data, test_embs):
    gallery = _gallery(ckpt, tiny_data)
    img, cap = _first_rows(test_embs)
    with pytest.raises(InputError, match="independent"):
        two_stage.evaluate_two_stage(gallery, img, cap, "full", 10)


def test_two_stage_family_metrics_equal_the_full_matrix_ones(bfan_ckpt, tiny_data, test_embs,
                                                            monkeypatch):
    """`evaluate --shortlist` scores only the entries the family metrics read (no full
    matrix), and gets the full matrix's family metrics."""
    from pipeline.scoring import Gallery
    from stages import evaluate

    full = evaluate.run(checkpoint=bfan_ckpt, data_dir=tiny_data, split="test", progress=False)
    assert "groups" in full
    blocks = []
    real_block = Gallery.block
    monkeypatch.setattr(Gallery, "block", lambda self, *a: blocks.append(a) or real_block(self, *a))
    two = evaluate.run(checkpoint=bfan_ckpt, data_dir=tiny_data, split="test", progress=False,
                       shortlist=test_embs, shortlist_k=10)
    assert not blocks                                   # no rectangle of the matrix was scored
    assert two["groups"] == full["groups"]


def test_group_entries_are_what_the_group_metrics_read(tiny_data):
    from pipeline.evaluation.groups import group_entries, group_metrics, pairwise_accuracy, random_groups

    rng = np.random.default_rng(3)
    n = 20
    sims = rng.standard_normal((n, 5 * n)).astype(np.float32)
    fam, rand = np.arange(n) // 5, random_groups(n, 5, seed=1)
    pairs = [(0, 1, "swap"), (7, 9, "attr"), (12, 10, "swap")]
    ii, jj = group_entries(n, (fam, rand), pairs)
    part = np.full_like(sims, np.nan)
    part[ii, jj] = sims[ii, jj]
    for g in (fam, rand):
        assert group_metrics(part, g) == group_metrics(sims, g)
    assert pairwise_accuracy(part, pairs) == pairwise_accuracy(sims, pairs)
    assert len(ii) < sims.size // 2
