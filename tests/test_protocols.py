"""Protocols (full, f30k_1k, coco1k_5fold, coco5k), embeddings/block_fn entry points, load_sims."""
from __future__ import annotations

import numpy as np
import pytest

import pipeline.evaluation.protocols as P
from pipeline.errors import InputError
from rank_reference import ref_metrics, ref_ranks
from pipeline.evaluation.protocols import (
    PROTOCOLS,
    evaluate_block_fn,
    evaluate_embeddings,
    evaluate_sims,
    load_sims,
)

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
        "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum")


# --------------------------------------------------------------------------- references
sort_ref_ranks = ref_ranks


def count_ref_ranks(S, step=100):
    """Vectorised count form of the same tie rule (for 5K, where a full sort is slow).

    i2t: the rank of each of the five positives separately, then the minimum, over row
    slabs; t2i: over column slabs (slabs only keep the temporaries small).
    """
    S = np.asarray(S)
    n, m = S.shape
    cols = np.arange(m)
    i2t = np.empty(n, dtype=np.int64)
    for r0 in range(0, n, step):
        rows = np.arange(r0, min(r0 + step, n))
        T = S[rows]
        best = np.full(rows.size, np.iinfo(np.int64).max)
        for a in range(5):
            p = 5 * rows + a
            v = S[rows, p][:, None]
            r = np.count_nonzero(T > v, axis=1) + np.count_nonzero((T == v) & (cols[None, :] < p[:, None]), axis=1)
            best = np.minimum(best, r)
        i2t[rows] = best
    t2i = np.empty(m, dtype=np.int64)
    all_rows = np.arange(n)
    for c0 in range(0, m, 5 * step):
        cs = np.arange(c0, min(c0 + 5 * step, m))
        T = S[:, cs]
        g = cs // 5
        v = S[g, cs][None, :]
        t2i[cs] = np.count_nonzero(T > v, axis=0) + np.count_nonzero((T == v) & (all_rows[:, None] < g[None, :]), axis=0)
    return i2t, t2i


def ref_protocol(S, folds, ranks=sort_ref_ranks):
    """Reference metrics: per fold (image ranges), averaged; rsum from averaged recalls."""
    per = []
    for f0, f1 in folds:
        per.append(ref_metrics(*ranks(S[f0:f1, 5 * f0:5 * f1])))
    avg = {k: float(np.mean([m[k] for m in per])) for k in KEYS if k != "rsum"}
    avg["rsum"] = sum(avg[k] for k in RECALLS)
    return avg, per


def make_sims(n, seed=0, signal=1.0, quantise=None):
    """Uniform float32 scores (ties are common at 5K scale) with a boost on the positives."""
    rng = np.random.default_rng(seed)
    S = rng.random((n, 5 * n), dtype=np.float32)
    j = np.arange(5 * n)
    S[j // 5, j] += np.float32(signal) * rng.random(5 * n, dtype=np.float32)
    if quantise is not None:
        S = np.round(S, quantise)
    return S


def assert_metrics_equal(got, ref, protocol):
    assert got["protocol"] == protocol
    assert set(got) == set(KEYS) | {"protocol"}
    for k in KEYS:
        assert isinstance(got[k], float)
        assert got[k] == ref[k], k


@pytest.fixture
def small_sizes(monkeypatch):
    """Shrink the protocol sizes: f30k_1k = 12 images, coco = 50 images in folds of 10."""
    monkeypatch.setitem(P.PROTOCOL_SIZES, "f30k_1k", 12)
    monkeypatch.setitem(P.PROTOCOL_SIZES, "coco5k", 50)
    monkeypatch.setitem(P.PROTOCOL_SIZES, "coco1k_5fold", 50)
    monkeypatch.setattr(P, "FOLD_SIZE", 10)


# --------------------------------------------------------------------------- full
@pytest.mark.parametrize("n,chunk", [(1, 1), (7, 3), (31, 4), (31, 100)])
def test_full_any_size(n, chunk):
    S = make_sims(n, seed=n)
    ref, _ = ref_protocol(S, [(0, n)])
    assert_metrics_equal(evaluate_sims(S, "full", chunk=chunk), ref, "full")


def test_quantised_ties_all_protocols_small(small_sizes):
    S = make_sims(50, seed=3, quantise=1)
    assert np.unique(S).size <= 25
    for protocol, folds in (("full", [(0, 50)]), ("coco5k", [(0, 50)]),
                            ("coco1k_5fold", [(f, f + 10) for f in range(0, 50, 10)])):
        ref, _ = ref_protocol(S, folds)
        for chunk in (1, 6, 64):
            assert_metrics_equal(evaluate_sims(S, protocol, chunk=chunk), ref, protocol)


# --------------------------------------------------------------------------- fold logic on small sizes
def test_small_protocols(small_sizes):
    S = make_sims(50, seed=8, signal=0.6)
    folds = [(f, f + 10) for f in range(0, 50, 10)]
    ref5, per = ref_protocol(S, folds)
    got5 = evaluate_sims(S, "coco1k_5fold", chunk=3)
    assert_metrics_equal(got5, ref5, "coco1k_5fold")
    # every metric is the fold average; rsum comes from the averaged recalls
    for k in KEYS:
        if k != "rsum":
            assert got5[k] == pytest.approx(sum(m[k] for m in per) / 5)
    assert got5["rsum"] == pytest.approx(sum(got5[k] for k in RECALLS))
    assert got5["rsum"] == pytest.approx(sum(m["rsum"] for m in per) / 5)
    six_i2t = 2 * (got5["i2t_r1"] + got5["i2t_r5"] + got5["i2t_r10"])
    assert got5["rsum"] != pytest.approx(six_i2t)  # not the SCAN-lineage 6 x i2t

    ref_all, _ = ref_protocol(S, [(0, 50)])
    assert_metrics_equal(evaluate_sims(S, "coco5k", chunk=7), ref_all, "coco5k")
    assert evaluate_sims(S, "coco5k")["i2t_r1"] != got5["i2t_r1"]  # 5K is harder than 1K folds

    S12 = make_sims(12, seed=2)
    ref12, _ = ref_protocol(S12, [(0, 12)])
    assert_metrics_equal(evaluate_sims(S12, "f30k_1k", chunk=5), ref12, "f30k_1k")


def test_folds_only_use_diagonal_blocks(small_sizes):
    """Off-diagonal blocks must not influence coco1k_5fold."""
    S = make_sims(50, seed=4)
    T = S.copy()
    for f in range(5):  # wreck everything outside the fold blocks
        T[10 * f:10 * f + 10, :50 * f] = 9.0
        T[10 * f:10 * f + 10, 50 * f + 50:] = 9.0
    assert evaluate_sims(T, "coco1k_5fold") == evaluate_sims(S, "coco1k_5fold")
    assert evaluate_sims(T, "coco5k") != evaluate_sims(S, "coco5k")


# --------------------------------------------------------------------------- real sizes
def test_f30k_1k_real_size():
    S = make_sims(1000, seed=10, signal=0.01)
    ref, _ = ref_protocol(S, [(0, 1000)], ranks=count_ref_ranks)
    got = evaluate_sims(S, "f30k_1k", chunk=300)
    assert_metrics_equal(got, ref, "f30k_1k")
    assert 0 < got["i2t_r10"] < 100 and 0 < got["t2i_r10"] < 100


def test_coco_real_size():
    S = make_sims(5000, seed=11, signal=0.002)
    ref5k, _ = ref_protocol(S, [(0, 5000)], ranks=count_ref_ranks)
    got5k = evaluate_sims(S, "coco5k", chunk=1500)
    assert_metrics_equal(got5k, ref5k, "coco5k")
    assert 0 < got5k["i2t_r10"] < 100 and 0 < got5k["t2i_r10"] < 100

    ref1k, _ = ref_protocol(S, [(f, f + 1000) for f in range(0, 5000, 1000)], ranks=count_ref_ranks)
    got1k = evaluate_sims(S, "coco1k_5fold")
    assert_metrics_equal(got1k, ref1k, "coco1k_5fold")
    assert got1k["rsum"] == pytest.approx(sum(got1k[k] for k in RECALLS))
    assert got1k["rsum"] > got5k["rsum"]


def test_count_reference_agrees_with_sort_reference():
    S = make_sims(40, seed=12, quantise=2)
    for step in (3, 7, 100):
        for a, b in zip(count_ref_ranks(S, step=step), sort_ref_ranks(S)):
            assert np.array_equal(a, b)


# --------------------------------------------------------------------------- embeddings and block_fn
def int_embeddings(n, d=5, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    cap = rng.integers(-2, 3, size=(5 * n, d)).astype(np.float32) + np.repeat(img, 5, axis=0)
    return img, cap  # every dot product exact in float32


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_embeddings_and_block_fn_match_sims(small_sizes, protocol):
    n = 12 if protocol == "f30k_1k" else 50
    img, cap = int_embeddings(n, seed=n)
    S = img @ cap.T
    want = evaluate_sims(S, protocol, chunk=4)
    assert evaluate_embeddings(img, cap, protocol, chunk=4) == want
    assert evaluate_embeddings(img, cap, protocol, chunk=1000) == want

    calls = []

    def block_fn(r0, r1, c0, c1):
        calls.append((r0, r1, c0, c1))
        return S[r0:r1, c0:c1]

    j = np.arange(5 * n)
    assert evaluate_block_fn(block_fn, S[j // 5, j], n, protocol, chunk=4) == want
    if protocol == "coco1k_5fold":
        assert {(c0, c1) for _, _, c0, c1 in calls} == {(50 * f, 50 * f + 50) for f in range(5)}
        assert all(10 * (c0 // 50) <= r0 < r1 <= 10 * (c0 // 50) + 10 for r0, r1, c0, _ in calls)
    else:
        assert {(c0, c1) for _, _, c0, c1 in calls} == {(0, 5 * n)}
        assert max(r1 - r0 for r0, r1, _, _ in calls) <= 4


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("protocol,need", [("f30k_1k", 1000), ("coco5k", 5000), ("coco1k_5fold", 5000)])
def test_wrong_size_is_input_error(protocol, need):
    S = make_sims(20)
    with pytest.raises(InputError) as e:
        evaluate_sims(S, protocol, source="my_sims.npy")
    msg = str(e.value)
    assert "my_sims.npy" in msg
    assert f"protocol {protocol} needs {need} images, got 20 (use --protocol full)" in msg
    img, cap = int_embeddings(20)
    with pytest.raises(InputError):
        evaluate_embeddings(img, cap, protocol)
    with pytest.raises(InputError):
        evaluate_block_fn(lambda *a: None, np.zeros(100), 20, protocol)


def test_unknown_protocol_and_bad_shapes():
    S = make_sims(4)
    with pytest.raises(InputError, match="unknown protocol 'coco1k'"):
        evaluate_sims(S, "coco1k")
    with pytest.raises(InputError, match="x.npy"):
        evaluate_sims(np.zeros((4, 16)), "full", source="x.npy")
    with pytest.raises(InputError, match="transposed"):
        evaluate_sims(np.zeros((20, 4)), "full")
    img, cap = int_embeddings(4)
    with pytest.raises(InputError):
        evaluate_embeddings(img, cap[:19], "full")


def test_load_sims_ok_and_path_input(tmp_path):
    S = make_sims(9, seed=1)
    path = tmp_path / "ok.npy"
    np.save(path, S)
    mm = load_sims(path)
    assert isinstance(mm, np.memmap) and mm.shape == (9, 45)
    assert evaluate_sims(str(path), "full", chunk=2) == evaluate_sims(S, "full")
    assert evaluate_sims(mm, "full", chunk=4) == evaluate_sims(S, "full")


def _bad_files(tmp_path):
    files = {}
    files["missing"] = tmp_path / "missing.npy"
    p = tmp_path / "corrupt.npy"
    p.write_bytes(b"\x93NUMPY\x01\x00garbage that is not a header" + bytes(range(200)))
    files["corrupt"] = p
    p = tmp_path / "random_bytes.npy"
    p.write_bytes(np.random.default_rng(0).bytes(500))
    files["random_bytes"] = p
    p = tmp_path / "truncated.npy"
    np.save(p, make_sims(10))
    p.write_bytes(p.read_bytes()[:300])
    files["truncated"] = p
    p = tmp_path / "empty.npy"
    p.write_bytes(b"")
    files["empty"] = p
    p = tmp_path / "three_d.npy"
    np.save(p, np.zeros((2, 10, 3), dtype=np.float32))
    files["3-D"] = p
    p = tmp_path / "four_n.npy"
    np.save(p, np.zeros((6, 24), dtype=np.float32))
    files["(N, 4N)"] = p
    p = tmp_path / "nan.npy"
    S = make_sims(6)
    S[5, 29] = np.nan
    np.save(p, S)
    files["NaN"] = p
    p = tmp_path / "inf.npy"
    S = make_sims(6).astype(np.float64)
    S[0, 0] = -np.inf
    np.save(p, S)
    files["inf"] = p
    p = tmp_path / "strings.npy"
    np.save(p, np.array([["a"] * 5]))
    files["strings"] = p
    p = tmp_path / "arch.npz"
    np.savez(p, s=make_sims(2))
    files["npz"] = p
    p = tmp_path / "adir.npy"
    p.mkdir()
    files["directory"] = p
    return files


def test_load_sims_errors_name_the_file(tmp_path):
    for what, path in _bad_files(tmp_path).items():
        with pytest.raises(InputError) as e:
            load_sims(path)
        msg = str(e.value)
        assert str(path) in msg, what
        assert "\n" not in msg
    with pytest.raises(InputError, match="not found"):
        load_sims(tmp_path / "missing.npy")
    with pytest.raises(InputError, match=r"row 5, column 29"):
        load_sims(tmp_path / "nan.npy")
    with pytest.raises(InputError, match=r"\(6, 24\)"):
        load_sims(tmp_path / "four_n.npy")


def test_finite_check_is_chunked(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_FINITE_CHECK_ELEMS", 45)  # one row of a (9, 45) matrix per block
    S = make_sims(9)
    S[8, 44] = np.inf
    np.save(tmp_path / "late_inf.npy", S)
    with pytest.raises(InputError, match="row 8, column 44"):
        load_sims(tmp_path / "late_inf.npy")
    S[8, 44] = 0.5
    np.save(tmp_path / "fine.npy", S)
    assert load_sims(tmp_path / "fine.npy").shape == (9, 45)
