"""Group-restricted ranks, random groups and pairwise accuracy against brute-force loops."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.groups import group_metrics, group_ranks, pairwise_accuracy, random_groups
from pipeline.evaluation.ranks import metrics_from_ranks, ranks_from_matrix


def make_sims(n, seed=0, quantise=None):
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((n, 5 * n))
    j = np.arange(5 * n)
    S[j // 5, j] += rng.random(5 * n)
    if quantise is not None:
        S = np.round(S, quantise)
    return S.astype(np.float32)


def brute_group_ranks(S, groups):
    """Loops over images and captions; candidates = members of the query's group."""
    n = S.shape[0]
    i2t = np.zeros(n, dtype=np.int64)
    t2i = np.zeros(5 * n, dtype=np.int64)
    for i in range(n):
        members = [k for k in range(n) if groups[k] == groups[i]]
        cands = [c for k in members for c in range(5 * k, 5 * k + 5)]
        ranks = []
        for c in range(5 * i, 5 * i + 5):
            r = 0
            for c2 in cands:
                if S[i, c2] > S[i, c] or (S[i, c2] == S[i, c] and c2 < c):
                    r += 1
            ranks.append(r)
        i2t[i] = min(ranks)
        for c in range(5 * i, 5 * i + 5):
            r = 0
            for k in members:
                if S[k, c] > S[i, c] or (S[k, c] == S[i, c] and k < i):
                    r += 1
            t2i[c] = r
    return i2t, t2i


@pytest.mark.parametrize("quantise", [None, 1])
def test_group_ranks_match_brute_force(quantise):
    n = 30
    S = make_sims(n, seed=1, quantise=quantise)
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 7, size=n) * 3 - 5  # arbitrary (negative, unsorted) labels
    i2t, t2i = group_ranks(S, groups)
    r_i, r_t = brute_group_ranks(S, groups)
    assert np.array_equal(i2t, r_i) and np.array_equal(t2i, r_t)

    m = group_metrics(S, groups)
    ref = metrics_from_ranks(r_i, r_t)
    assert {k: m[k] for k in ref} == ref
    sizes = np.unique(groups, return_counts=True)[1]
    assert m["n_groups"] == len(sizes)
    assert m["group_size"] == pytest.approx(sizes.mean())


def test_group_ranks_memmap_and_one_group(tmp_path):
    S = make_sims(17, seed=3)
    np.save(tmp_path / "s.npy", S)
    mm = np.load(tmp_path / "s.npy", mmap_mode="r")
    groups = random_groups(17, 4, seed=5)
    a = group_ranks(mm, groups)
    b = brute_group_ranks(S, groups)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # a single group is the full matrix
    whole = group_ranks(S, np.zeros(17, dtype=int))
    full = ranks_from_matrix(S)
    assert np.array_equal(whole[0], full[0]) and np.array_equal(whole[1], full[1])
    # singleton groups: every caption finds its image first; every image its best caption
    single = group_ranks(S, np.arange(17))
    assert np.all(single[1] == 0) and np.all(single[0] == 0)


def test_group_ranks_bad_input():
    S = make_sims(5)
    with pytest.raises(ValueError):
        group_ranks(S, np.zeros(4, dtype=int))
    with pytest.raises(ValueError):
        group_ranks(S, np.zeros(5))  # float labels
    with pytest.raises(ValueError):
        group_ranks(S[:, :20], np.zeros(5, dtype=int))


def test_random_groups():
    g = random_groups(23, 5, seed=1)
    assert g.shape == (23,)
    sizes = np.bincount(g)
    assert sorted(sizes.tolist()) == [3, 5, 5, 5, 5]
    assert np.array_equal(g, random_groups(23, 5, seed=1))
    assert not np.array_equal(g, random_groups(23, 5, seed=2))
    assert not np.array_equal(g, np.arange(23) // 5)  # actually shuffled
    assert np.all(np.bincount(random_groups(20, 4)) == 4)
    assert np.array_equal(random_groups(3, 10), np.zeros(3, dtype=int))
    with pytest.raises(ValueError):
        random_groups(10, 0)


def brute_pairwise(S, pairs):
    acc = {}
    for i, j, label in pairs:
        a = np.mean([S[i, c] > S[i, c2] for c in range(5 * i, 5 * i + 5) for c2 in range(5 * j, 5 * j + 5)])
        b = np.mean([S[i, c] > S[j, c] for c in range(5 * i, 5 * i + 5)])
        for key in (label, "all"):
            acc.setdefault(key, []).append((a, b))
    return {k: {"i2t": 100 * np.mean([x[0] for x in v]), "t2i": 100 * np.mean([x[1] for x in v]), "n": len(v)}
            for k, v in acc.items()}


@pytest.mark.parametrize("quantise", [None, 0])
def test_pairwise_accuracy_matches_loop(quantise):
    S = make_sims(12, seed=4, quantise=quantise)
    rng = np.random.default_rng(0)
    pairs = [(int(rng.integers(12)), int(rng.integers(12)), ["family", "random", 3][k % 3]) for k in range(40)]
    got = pairwise_accuracy(S, pairs)
    want = brute_pairwise(S, pairs)
    assert list(got) == ["family", "random", 3, "all"]
    for k in want:
        assert got[k]["n"] == want[k]["n"]
        assert got[k]["i2t"] == pytest.approx(want[k]["i2t"])
        assert got[k]["t2i"] == pytest.approx(want[k]["t2i"])
    # pairs as a numpy array work too
    assert pairwise_accuracy(S, np.array([[0, 1, 7]]))[7]["n"] == 1


def test_pairwise_accuracy_memmap(tmp_path):
    S = make_sims(9, seed=8)
    np.save(tmp_path / "s.npy", S)
    mm = np.load(tmp_path / "s.npy", mmap_mode="r")
    pairs = [(i, (i * 4 + 1) % 9, "a") for i in range(9)]
    assert pairwise_accuracy(mm, pairs) == pairwise_accuracy(S, pairs)


def test_pairwise_accuracy_edges():
    S = make_sims(4)
    assert pairwise_accuracy(S, []) == {"all": {"i2t": None, "t2i": None, "n": 0}}
    # ties count as failures: comparing an image with itself gives 0 for t2i
    assert pairwise_accuracy(S, [(1, 1, "self")])["self"]["t2i"] == 0.0
    with pytest.raises(ValueError):
        pairwise_accuracy(S, [(0, 4, "x")])
    with pytest.raises(ValueError):
        pairwise_accuracy(S, [(0, 1, "all")])
