"""Exact ranks and metrics against an independent full-sort reference."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pipeline.evaluation.ranks import (
    METRIC_KEYS,
    metrics_from_ranks,
    ranks_from_blocks,
    ranks_from_embeddings,
    ranks_from_matrix,
)


from rank_reference import ref_metrics, ref_ranks  # noqa: E402


def make_sims(n, seed=0, signal=2.0, dtype=np.float32):
    """Random scores with a boost on the positives, so ranks spread over 0..N."""
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((n, 5 * n))
    j = np.arange(5 * n)
    S[j // 5, j] += signal * rng.random(5 * n)
    return S.astype(dtype)


def check(S, chunk):
    i2t, t2i = ranks_from_matrix(S, chunk=chunk)
    r_i, r_t = ref_ranks(S)
    assert i2t.dtype == np.int64 and t2i.dtype == np.int64
    assert np.array_equal(i2t, r_i)
    assert np.array_equal(t2i, r_t)
    assert metrics_from_ranks(i2t, t2i) == ref_metrics(r_i, r_t)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("n", [1, 2, 13, 40])
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_random_matrix_matches_reference(n, chunk):
    check(make_sims(n, seed=n * 31 + chunk), chunk)


def test_reference_is_not_trivial():
    r_i, r_t = ref_ranks(make_sims(40))
    assert 0 < np.count_nonzero(r_i < 5) < 40 and r_i.max() >= 10
    assert 0 < np.count_nonzero(r_t < 5) < 200 and r_t.max() >= 10


@pytest.mark.parametrize("chunk", [1, 4, 9, 64])
def test_many_ties_quantised(chunk):
    S = np.round(make_sims(30, seed=5, signal=1.0, dtype=np.float64), 1)
    assert len(np.unique(S)) < 100  # plenty of ties
    check(S, chunk)
    check(S.astype(np.float32), chunk)


@pytest.mark.parametrize("chunk", [1, 5, 100])
def test_integer_and_constant_matrices(chunk):
    rng = np.random.default_rng(3)
    check(rng.integers(0, 3, size=(21, 105)), chunk)
    const = np.zeros((8, 40), dtype=np.float32)
    check(const, chunk)
    i2t, t2i = ranks_from_matrix(const, chunk=chunk)
    # all tied: the lower index wins, so image i's best caption sits at position 5i,
    # and caption j's image at position j // 5
    assert np.array_equal(i2t, 5 * np.arange(8))
    assert np.array_equal(t2i, np.arange(40) // 5)


def test_float16_matrix():
    check(make_sims(25, seed=9).astype(np.float16), chunk=6)


def test_memmap_input(tmp_path):
    S = make_sims(33, seed=11)
    np.save(tmp_path / "s.npy", S)
    mm = np.load(tmp_path / "s.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap)
    for chunk in (1, 8, 50):
        check(mm, chunk)


def test_blocks_are_bounded_and_single_pass():
    S = make_sims(23, seed=2)
    calls = []

    def block_fn(r0, r1):
        calls.append((r0, r1))
        return S[r0:r1]

    j = np.arange(5 * 23)
    i2t, t2i = ranks_from_blocks(block_fn, 23, S[j // 5, j], chunk=5)
    assert calls == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    r_i, r_t = ref_ranks(S)
    assert np.array_equal(i2t, r_i) and np.array_equal(t2i, r_t)


def test_own_image_never_counted_against_itself():
    """pos_scores a hair below the block's value (separately computed dot products)."""
    S = make_sims(20, seed=4).astype(np.float64)
    j = np.arange(100)
    pos = S[j // 5, j]
    low = np.nextafter(pos, -np.inf)
    _, t2i = ranks_from_blocks(lambda r0, r1: S[r0:r1], 20, low, chunk=3)
    assert np.array_equal(t2i, ref_ranks(S)[1])


def test_bad_block_shape_raises():
    with pytest.raises(ValueError):
        ranks_from_blocks(lambda r0, r1: np.zeros((r1 - r0, 9)), 2, np.zeros(10), chunk=1)
    with pytest.raises(ValueError):
        ranks_from_blocks(lambda r0, r1: np.zeros((r1 - r0, 10)), 2, np.zeros(9))
    with pytest.raises(ValueError):
        ranks_from_matrix(np.zeros((3, 14)))
    with pytest.raises(ValueError):
        ranks_from_matrix(np.zeros((3, 15)), chunk=0)


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_embeddings_match_reference(chunk):
    # small integers: every dot product is exact in float32, whatever the blocking,
    # and there are many ties
    rng = np.random.default_rng(7)
    img = rng.integers(-2, 3, size=(19, 6)).astype(np.float32)
    cap = rng.integers(-2, 3, size=(95, 6)).astype(np.float32)
    cap += np.repeat(img, 5, axis=0)  # make the positives more likely to win
    S = img.astype(np.float64) @ cap.T.astype(np.float64)
    r_i, r_t = ref_ranks(S)
    for a, b in ((img, cap), (torch.from_numpy(img), torch.from_numpy(cap)),
                 (img.astype(np.float64), cap.astype(np.float64))):
        i2t, t2i = ranks_from_embeddings(a, b, chunk=chunk)
        assert np.array_equal(i2t, r_i) and np.array_equal(t2i, r_t)
    with pytest.raises(ValueError):
        ranks_from_embeddings(img, cap[:90])


def test_embeddings_from_read_only_memmaps(tmp_path):
    rng = np.random.default_rng(8)
    img = rng.integers(-2, 3, size=(11, 4)).astype(np.float32)
    cap = rng.integers(-2, 3, size=(55, 4)).astype(np.float32)
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "cap.npy", cap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable arrays
        i2t, t2i = ranks_from_embeddings(np.load(tmp_path / "img.npy", mmap_mode="r"),
                                         np.load(tmp_path / "cap.npy", mmap_mode="r"), chunk=4)
    r_i, r_t = ref_ranks(img.astype(np.float64) @ cap.T.astype(np.float64))
    assert np.array_equal(i2t, r_i) and np.array_equal(t2i, r_t)


def test_metrics_by_hand():
    m = metrics_from_ranks(np.array([0, 4, 9, 20]), np.array([0, 0, 1, 5, 10, 12]))
    assert list(m) == list(METRIC_KEYS)
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_r10"]) == (25.0, 50.0, 75.0)
    assert m["i2t_medr"] == 7.0  # median 6.5 -> floor 6 -> +1
    assert m["i2t_meanr"] == 9.25  # 33 / 4 + 1
    assert m["t2i_r1"] == pytest.approx(100 * 2 / 6)
    assert m["t2i_r5"] == pytest.approx(100 * 3 / 6)
    assert m["t2i_r10"] == pytest.approx(100 * 4 / 6)
    assert m["t2i_medr"] == 4.0  # median 3 -> +1
    assert m["rsum"] == pytest.approx(150 + 100 * 9 / 6)
    assert all(isinstance(v, float) for v in m.values())
