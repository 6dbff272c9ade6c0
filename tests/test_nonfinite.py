"""Issue 21 section 2: a NaN (or overflowing) model must never score, embed or mine.

Ranks with NaN scores are checked against tests/rank_reference.py run on the matrix with
NaN replaced by -inf, a NaN positive then set to the worst rank (N - 1).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli.main import main
from pipeline.checkpoint import WEIGHTS
from pipeline.errors import InputError
from pipeline.evaluation.groups import group_metrics, group_ranks
from pipeline.evaluation.protocols import evaluate_embeddings
from pipeline.evaluation.ranks import (
    metrics_from_ranks,
    ranks_from_blocks,
    ranks_from_embeddings,
    ranks_from_matrix,
)
from tests.rank_reference import ref_metrics, ref_ranks


# --------------------------------------------------------------------------- helpers
def ref_ranks_nan(S):
    """Reference ranks where NaN sorts below every number and a NaN positive ranks last."""
    S = np.asarray(S, dtype=np.float64)
    n, m = S.shape
    i2t, t2i = ref_ranks(np.where(np.isnan(S), -np.inf, S))
    own_all_nan = np.isnan(S.reshape(n, n, 5)[np.arange(n), np.arange(n)]).all(axis=1)
    i2t[own_all_nan] = m - 1
    j = np.arange(m)
    t2i[np.isnan(S[j // 5, j])] = n - 1
    return i2t, t2i


def nan_sims(n=8, seed=0):
    """Finite, distinct scores with NaN rows, columns, positives and negatives mixed in."""
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((n, 5 * n)).astype(np.float32)
    j = np.arange(5 * n)
    S[j // 5, j] += 2.0
    S[1] = np.nan                   # an image whose every score is NaN
    S[:, 12] = np.nan               # a caption every image scores NaN (positive of image 2)
    S[3, 15:17] = np.nan            # two of image 3's five positives
    S[4, 0:10] = np.nan             # NaN negatives of image 4
    S[5, 25:30] = np.nan            # all five positives of image 5
    S[0::2, 35] = np.nan            # NaN negatives of caption 35 (image 7 keeps its score)
    return S


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def altered_checkpoint(ckpt, dest, fill):
    """A copy of the checkpoint with every float tensor set to `fill`."""
    shutil.copytree(ckpt, dest)
    state = load_file(str(dest / WEIGHTS))
    state = {k: torch.full_like(v, fill) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(dest / WEIGHTS))
    return dest, next(k for k, v in state.items() if v.is_floating_point())


# --------------------------------------------------------------------------- ranks
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_nan_ranks_full_matrix_match_reference(chunk):
    S = nan_sims()
    want = ref_ranks_nan(S)
    got = ranks_from_matrix(S, chunk=chunk)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert metrics_from_ranks(*got) == pytest.approx(ref_metrics(*want))


def test_all_nan_scores_give_recall_zero_not_perfect():
    n = 11   # worst t2i rank 10: outside R@10
    S = np.full((n, 5 * n), np.nan, dtype=np.float32)
    for i2t, t2i in (ranks_from_matrix(S, chunk=2),
                     ranks_from_blocks(lambda r0, r1: S[r0:r1], n, S[np.arange(5 * n) // 5,
                                                                      np.arange(5 * n)])):
        assert (i2t == 5 * n - 1).all() and (t2i == n - 1).all()
        m = metrics_from_ranks(i2t, t2i)
        assert m["rsum"] == 0.0 and m["i2t_r1"] == 0.0 and m["t2i_r10"] == 0.0


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_nan_ranks_chunked_embedding_path(chunk):
    rng = np.random.default_rng(1)
    n, d = 7, 6
    img = rng.standard_normal((n, d)).astype(np.float32)
    cap = (np.repeat(img, 5, axis=0) + 0.5 * rng.standard_normal((5 * n, d))).astype(np.float32)
    img[2, 0] = np.nan        # row 2 of S all NaN
    cap[[8, 20, 21], 3] = np.nan  # columns 8, 20, 21 all NaN
    S = img.astype(np.float64) @ cap.T.astype(np.float64)
    want = ref_ranks_nan(S)
    got = ranks_from_embeddings(img, cap, chunk=chunk)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0][2] == 5 * n - 1 and got[1][8] == n - 1


def test_nan_group_metrics_match_reference():
    S = nan_sims(n=12, seed=3)
    groups = np.array([0, 1, 2] * 4)
    i2t, t2i = group_ranks(S, groups)
    for g in range(3):
        images = np.flatnonzero(groups == g)
        caps = (5 * images[:, None] + np.arange(5)).reshape(-1)
        want = ref_ranks_nan(S[np.ix_(images, caps)])
        np.testing.assert_array_equal(i2t[images], want[0])
        np.testing.assert_array_equal(t2i[caps], want[1])
    i2t, t2i = group_ranks(np.full_like(S, np.nan), groups)
    assert (i2t == 19).all() and (t2i == 3).all()      # last of a 4-image group
    big = np.full((22, 110), np.nan, dtype=np.float32)
    assert group_metrics(big, np.arange(22) % 2)["rsum"] == 0.0


# --------------------------------------------------------------------------- the shared check
def test_check_counts_across_chunks_of_a_memmap(tmp_path, monkeypatch):
    import pipeline.embeddings as emb

    monkeypatch.setattr(emb, "_CHECK_CHUNK_ELEMS", 8)  # 2 rows of 4 per chunk
    a = np.ones((9, 4), dtype=np.float32)
    a[3, 1] = np.inf
    a[6] = 0.0
    a[8, 0] = np.nan
    np.save(tmp_path / "x.npy", a)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    with pytest.raises(InputError) as e:
        emb.check_embedding_rows(mm, tmp_path / "x.npy", "caption")
    assert e.value.problem == ("has 2 non-finite and 1 zero-norm caption embeddings "
                               "(first: caption 3)")
    emb.check_embedding_rows(np.ones((3, 4), dtype=np.float32), "ok", "image")


def test_evaluate_embeddings_refuses_nan_rows():
    """The trainer's dev evaluation goes through evaluate_embeddings too."""
    img = np.eye(4, dtype=np.float32)
    cap = np.repeat(img, 5, axis=0)
    cap[5:7] = np.nan
    with pytest.raises(InputError, match=r"2 non-finite caption embeddings \(first: caption 5\)"):
        evaluate_embeddings(img, cap, "full")


# --------------------------------------------------------------------------- CLI
def test_evaluate_nan_checkpoint_exits_2(ckpt, tiny_data, tmp_path, capsys):
    bad, first_tensor = altered_checkpoint(ckpt, tmp_path / "nan_ckpt", float("nan"))
    out_json = tmp_path / "m.json"
    rc = main(["evaluate", "--checkpoint", str(bad), "--data", str(tiny_data),
               "--json", str(out_json), "--quiet"])
    assert rc == 2
    one_error_line(capsys, bad / WEIGHTS, repr(first_tensor), "non-finite")
    assert not out_json.exists()


def test_huge_weights_give_zero_image_embeddings(ckpt, tiny_data, tmp_path):
    """The premise of the embed test: 1e30 weights are finite but the norm overflows."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.data.precomp import open_split
    from pipeline.scoring import encode_gallery, encode_image_range

    bad, _ = altered_checkpoint(ckpt, tmp_path / "huge", 1e30)
    model, _ = load_checkpoint(bad)          # finite: loads
    split = open_split(tiny_data, "train")
    img = encode_image_range(model, split, 0, split.n_images, normalize=False)
    assert np.isfinite(img).all() and not img.any()
    # the scoring module (evaluate, the trainer's dev evaluation, finetune refresh) refuses them
    with pytest.raises(InputError, match=r"^the model gives 100 zero-norm image embeddings "
                                         r"\(first: image 0\)$"):
        encode_gallery(model, split)


def test_embed_huge_checkpoint_exits_2_and_writes_nothing(ckpt, tiny_data, tmp_path, capsys):
    bad, _ = altered_checkpoint(ckpt, tmp_path / "huge", 1e30)
    out = tmp_path / "emb"
    rc = main(["embed", "--checkpoint", str(bad), "--data", str(tiny_data), "--out", str(out),
               "--quiet"])
    assert rc == 2
    one_error_line(capsys, bad, "the model gives 100 zero-norm image embeddings (first: image 0)")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge"]   # no temp folder left


def test_evaluate_huge_checkpoint_exits_2(ckpt, tiny_data, tmp_path, capsys):
    bad, _ = altered_checkpoint(ckpt, tmp_path / "huge", 1e30)
    rc = main(["evaluate", "--checkpoint", str(bad), "--data", str(tiny_data), "--quiet"])
    assert rc == 2
    one_error_line(capsys, bad, "zero-norm image embeddings (first: image 0)")


@pytest.mark.parametrize("bad_value", [0.0, np.nan])
def test_mine_candidates_refuses_bad_rows(tmp_path, capsys, bad_value):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((4, 3)).astype(np.float32)
    cap = rng.standard_normal((20, 3)).astype(np.float32)
    cap[7] = bad_value
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "cap.npy", cap)
    out = tmp_path / "cands"
    rc = main(["mine-candidates", "--quiet", "--img-embs", str(tmp_path / "img.npy"),
               "--cap-embs", str(tmp_path / "cap.npy"), "--out", str(out), "--name", "x",
               "--k-i2t", "3", "--k-t2i", "2"])
    assert rc == 2
    kind = "zero-norm" if bad_value == 0.0 else "non-finite"
    one_error_line(capsys, tmp_path / "cap.npy", f"1 {kind} caption embedding (first: caption 7)")
    assert not out.exists()
