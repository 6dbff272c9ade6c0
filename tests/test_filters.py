"""False-negative filters: each filter on hand-built candidates, trimming, errors, text
normalisation, positive scores, and false-negative counting on the embedded dataset."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.scene_graphs import caption_describes_image, family_ids, load_graphs
from pipeline.errors import InputError
import pipeline.mining.filters as F
from pipeline.data.scene_graphs import FactIndex
from pipeline.mining.filters import (FilterConfig, apply_filters, count_false_negatives,
                                     normalize_caption, positive_scores)
from pipeline.mining.reference import KnnResult, mine_reference


def knn(i2t, i2t_s, t2i, t2i_s):
    return KnnResult(np.asarray(i2t, np.int32), np.asarray(i2t_s, np.float32),
                     np.asarray(t2i, np.int32), np.asarray(t2i_s, np.float32), stats={"backend": "test"})


# 2 images, 10 captions; scores are exact binary fractions so thresholds are unambiguous.
I2T = [[7, 3, 9, 5, 6, 8], [0, 4, 2, 1, 3, 9]]
I2T_S = [[0.875, 0.75, 0.625, 0.5, 0.375, 0.25], [0.5, 0.4375, 0.375, 0.25, 0.125, 0.0]]
T2I = [[1]] * 5 + [[0]] * 5
T2I_S = [[0.5], [0.25], [0.75], [0.125], [0.0], [0.5], [0.625], [0.25], [0.375], [-0.5]]
POS_I2T = np.array([1.0, 0.5])
POS_T2I = np.full(10, 0.5)


def base():
    return knn(I2T, I2T_S, T2I, T2I_S)


def run(cfg, k1=4, k2=1, **kw):
    return apply_filters(base(), k1, k2, cfg, pos_i2t=POS_I2T, pos_t2i=POS_T2I, **kw)


def test_config_defaults_and_headroom():
    cfg = FilterConfig()
    assert not cfg.active() and cfg.headroom(300) == 0
    assert cfg.to_dict() == {"relative_margin": None, "absolute_margin": None, "range_min": 0,
                             "text_filter": False}
    assert FilterConfig(range_min=3).headroom(20) == 3 + 32
    assert FilterConfig(relative_margin=0.05).headroom(300) == 150
    assert FilterConfig(text_filter=True).active()
    assert FilterConfig.from_dict(FilterConfig(absolute_margin=0.1).to_dict()).absolute_margin == 0.1
    for bad in ({"relative_margin": 1.5}, {"range_min": -1}, {"absolute_margin": float("nan")}):
        with pytest.raises(InputError):
            FilterConfig(**bad)
    with pytest.raises(InputError, match="unknown filter"):
        FilterConfig.from_dict({"margin": 0.1})


def test_inactive_only_trims():
    out, rep = run(FilterConfig())
    np.testing.assert_array_equal(out.i2t, np.array(I2T)[:, :4])
    np.testing.assert_array_equal(out.i2t_scores, np.array(I2T_S, np.float32)[:, :4])
    assert out.i2t.dtype == np.int32 and out.i2t_scores.dtype == np.float32
    assert rep == {"removed": {}}
    assert out.stats["backend"] == "test" and out.stats["k_i2t"] == 4


def test_relative_margin():
    # threshold (1 - 0.25) * pos: row 0 -> 0.75 (0.875 removed, 0.75 kept: equal),
    # row 1 -> 0.375 (0.5, 0.4375 removed); t2i -> 0.375: rows 0, 2, 5, 6 lose rank 0 (8: equal)
    t2i = [[1, 0]] * 5 + [[0, 1]] * 5     # (the second column is filler: only 2 images)
    out, rep = apply_filters(knn(I2T, I2T_S, t2i, np.c_[T2I_S, np.full(10, -1.0)]), 3, 1,
                             FilterConfig(relative_margin=0.25), pos_i2t=POS_I2T, pos_t2i=POS_T2I)
    np.testing.assert_array_equal(out.i2t, [[3, 9, 5], [2, 1, 3]])
    np.testing.assert_array_equal(out.i2t_scores, [[0.75, 0.625, 0.5], [0.375, 0.25, 0.125]])
    assert rep["relative_margin"] == {"i2t": 3, "t2i": 4}
    q, c = rep["removed"]["relative_margin"]["i2t"]
    np.testing.assert_array_equal(q, [0, 1, 1])
    np.testing.assert_array_equal(c, [7, 0, 4])
    q, c = rep["removed"]["relative_margin"]["t2i"]
    np.testing.assert_array_equal(q, [0, 2, 5, 6])
    np.testing.assert_array_equal(c, [1, 1, 0, 0])
    np.testing.assert_array_equal(out.t2i[:, 0], [0, 1, 0, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(out.t2i_scores[:, 0], [-1, .25, -1, .125, 0, -1, -1, .25, .375, -.5])


def test_absolute_margin():
    # threshold pos - 0.125: row 0 -> 0.875 (nothing above), row 1 -> 0.375 (0.5, 0.4375 removed)
    out, rep = apply_filters(base(), 4, 1, FilterConfig(absolute_margin=0.125), pos_i2t=POS_I2T,
                             pos_t2i=np.full(10, 0.875))
    np.testing.assert_array_equal(out.i2t, [[7, 3, 9, 5], [2, 1, 3, 9]])
    assert rep["absolute_margin"] == {"i2t": 2, "t2i": 0}
    assert list(rep) == ["absolute_margin", "removed"]


def test_range_min_counts_mined_ranks():
    res = knn(I2T, I2T_S, [[1, 0]] * 5 + [[0, 1]] * 5, np.c_[T2I_S, np.full(10, -1.0)])
    with pytest.raises(InputError, match="10 of 10 t2i rows keep fewer than 1 candidates"):
        apply_filters(res, 4, 1, FilterConfig(range_min=2), pos_i2t=POS_I2T, pos_t2i=POS_T2I)
    out, rep = apply_filters(res, 4, 1, FilterConfig(range_min=1), pos_i2t=POS_I2T, pos_t2i=POS_T2I)
    np.testing.assert_array_equal(out.i2t, [[3, 9, 5, 6], [4, 2, 1, 3]])
    np.testing.assert_array_equal(out.t2i[:, 0], [0] * 5 + [1] * 5)
    assert rep["range_min"] == {"i2t": 2, "t2i": 10}


def test_filter_order_first_remover_counts():
    i2t = [[7, 3, 9, 5, 6, 8], [0, 4, 2, 1, 3, 9]]
    res = knn(i2t, I2T_S, [[1, 0, 1]] * 5 + [[0, 1, 0]] * 5, np.tile([0.0, -1.0, -2.0], (10, 1)))
    cfg = FilterConfig(relative_margin=0.25, absolute_margin=0.0625, range_min=2)
    out, rep = apply_filters(res, 3, 1, cfg, pos_i2t=POS_I2T, pos_t2i=np.full(10, 10.0))
    # row 0: relative removes 7 (0.875 > 0.75); absolute (> 0.9375) nothing; range removes 3
    # row 1: relative removes 0, 4; absolute (> 0.4375) nothing new; range nothing new
    assert rep["relative_margin"]["i2t"] == 3
    assert rep["absolute_margin"]["i2t"] == 0
    assert rep["range_min"]["i2t"] == 1 and rep["range_min"]["t2i"] == 20
    np.testing.assert_array_equal(out.i2t, [[9, 5, 6], [2, 1, 3]])
    assert list(rep) == ["relative_margin", "absolute_margin", "range_min", "removed"]


def test_shortfall_message():
    with pytest.raises(InputError) as e:
        run(FilterConfig(relative_margin=0.25), k1=5, k2=1)
    assert str(e.value) == ("1 of 2 i2t rows keep fewer than 5 candidates after filtering (fewest: 4); "
                            "mine more headroom or relax the filters")
    with pytest.raises(InputError, match="K_i2t = 7 but only 6"):
        run(FilterConfig(), k1=7)


def test_normalize_caption():
    assert normalize_caption("A dog, on THE beach.") == "dog on beach"
    assert normalize_caption("  A red car to the left of  an orange dog!  ") == \
        normalize_caption("red car to the left of orange dog")
    # binding sibling: same bag of words, different text
    a, b = "A red car left of a blue dog.", "A blue car left of a red dog."
    assert sorted(normalize_caption(a).split()) == sorted(normalize_caption(b).split())
    assert normalize_caption(a) != normalize_caption(b)
    assert normalize_caption("a dog") != normalize_caption("a dogs")


def test_text_filter_both_directions():
    caps = ["A red car left of a blue dog.", "a cat", "a cow", "a hen", "a pig",          # image 0
            "A blue car left of a red dog.",                                             # 5: same bag, kept
            "red car, left of the blue DOG",                                             # 6: duplicate of 0
            "an owl", "a bee", "a fox",                                                  # image 1
            "a yak", "an elk", "a bat", "a rat", "an ant"]                               # image 2
    t2i = [[1, 2]] * 5 + [[0, 2]] * 5 + [[0, 1]] * 5
    res = knn([[6, 5, 7, 8, 10], [0, 1, 2, 3, 10], [0, 1, 2, 3, 4]], np.tile([0.5, 0.4, 0.3, 0.2, 0.1], (3, 1)),
              t2i, np.tile([0.2, 0.1], (15, 1)))
    out, rep = apply_filters(res, 2, 1, FilterConfig(text_filter=True), pos_i2t=np.ones(3),
                             pos_t2i=np.ones(15), captions=caps)
    np.testing.assert_array_equal(out.i2t, [[5, 7], [1, 2], [0, 1]])
    expect_t2i = [r[0] for r in t2i]
    expect_t2i[0] = 2           # caption 0 vs image 1 (holds caption 6, a duplicate): removed
    expect_t2i[6] = 2           # caption 6 vs image 0 (holds caption 0): removed
    np.testing.assert_array_equal(out.t2i[:, 0], expect_t2i)   # row 5 (binding sibling) keeps image 0
    assert rep["text_filter"] == {"i2t": 2, "t2i": 2}
    q, c = rep["removed"]["text_filter"]["i2t"]
    assert list(zip(q.tolist(), c.tolist())) == [(0, 6), (1, 0)]
    q, c = rep["removed"]["text_filter"]["t2i"]
    assert list(zip(q.tolist(), c.tolist())) == [(0, 1), (6, 0)]
    with pytest.raises(InputError, match="needs the captions"):
        apply_filters(res, 2, 1, FilterConfig(text_filter=True), pos_i2t=np.ones(3), pos_t2i=np.ones(15))
    with pytest.raises(InputError, match="14 captions given"):
        apply_filters(res, 2, 1, FilterConfig(text_filter=True), pos_i2t=np.ones(3), pos_t2i=np.ones(15),
                      captions=caps[:14])


def test_positive_scores_direct():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((6, 7)).astype(np.float32)
    cap = rng.standard_normal((30, 7)).astype(np.float32)
    p_i2t, p_t2i = positive_scores(img, cap)
    assert p_i2t.dtype == np.float64 and p_t2i.shape == (30,)
    full = img.astype(np.float64) @ cap.astype(np.float64).T
    j = np.arange(30)
    np.testing.assert_allclose(p_t2i, full[j // 5, j], rtol=0, atol=1e-12)
    np.testing.assert_allclose(p_i2t, [full[i, 5 * i:5 * i + 5].mean() for i in range(6)], atol=1e-12)
    with pytest.raises(InputError):
        positive_scores(img, cap[:29])


@pytest.mark.parametrize("block", [None, 7, 100])
def test_against_brute_force_on_mined_lists(block, monkeypatch):
    if block:
        monkeypatch.setattr(F, "BLOCK_ENTRIES", block)    # several rows per block, or one
    rng = np.random.default_rng(1)
    img = rng.standard_normal((12, 8)).astype(np.float32)
    cap = (np.repeat(img, 5, axis=0) + 0.8 * rng.standard_normal((60, 8))).astype(np.float32)
    caps = [f"caption {j % 17}" for j in range(60)]          # many cross-image duplicates
    cfg = FilterConfig(relative_margin=0.1, range_min=1, text_filter=True)
    k1, k2 = 10, 3
    res = mine_reference(img, cap, 40, 9)
    p1, p2 = positive_scores(img, cap)
    out, rep = apply_filters(res, k1, k2, cfg, pos_i2t=p1, pos_t2i=p2, captions=caps)
    norm = [normalize_caption(c) for c in caps]
    for i in range(12):
        own = {norm[5 * i + t] for t in range(5)}
        want = [c for r, (c, s) in enumerate(zip(res.i2t[i], res.i2t_scores[i]))
                if norm[c] not in own and not s > 0.9 * p1[i] and r >= 1][:k1]
        assert out.i2t[i].tolist() == want
    for j in range(60):
        want = [m for r, (m, s) in enumerate(zip(res.t2i[j], res.t2i_scores[j]))
                if norm[j] not in {norm[5 * m + t] for t in range(5)} and not s > 0.9 * p2[j] and r >= 1][:k2]
        assert out.t2i[j].tolist() == want
    survivors = sum(1 for i in range(12) for r, c in enumerate(res.i2t[i])
                    if norm[c] not in {norm[5 * i + t] for t in range(5)}
                    and not res.i2t_scores[i, r] > 0.9 * p1[i] and r >= 1)
    assert sum(rep[f]["i2t"] for f in cfg.active_filters()) == res.i2t.size - survivors
    assert rep["text_filter"]["i2t"] > 0 and rep["relative_margin"]["i2t"] > 0


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    from pipeline.data.synthetic import SyntheticConfig, generate

    out = tmp_path_factory.mktemp("fdata") / "syn"
    generate(out, SyntheticConfig(n_train=50, n_dev=25, n_test=25, feature_dim=16, caption_mode="varied"),
             progress=False)
    return out


def test_count_false_negatives_embedded(varied):
    graphs = load_graphs(varied, "train")
    caps = (varied / "train_caps.txt").read_text().splitlines()
    fam = family_ids(graphs)
    n = len(graphs)
    # a false negative: a caption of another image that truly describes the anchor
    fn = [(i, c) for i in range(n) for c in range(5 * n)
          if c // 5 != i and caption_describes_image(graphs, c, i)]
    assert fn, "the varied dataset should hold some false negatives"
    a, c_fn = fn[0]
    # a sibling caption that does NOT describe the anchor (a true hard negative)
    c_sib = next(c for c in range(5 * n) if c // 5 != a and fam[c // 5] == fam[a]
                 and not caption_describes_image(graphs, c, a))
    others = [c for c in range(5 * n) if c // 5 != a and c not in (c_fn, c_sib)]
    i2t = np.zeros((n, 6), np.int64)
    for i in range(n):
        row = [c for c in range(5 * n) if c // 5 != i][:6]
        if i == a:
            row = [c_fn, c_sib] + others[:4]
        i2t[i] = row
    # t2i: the false-negative caption's row starts with the anchor image it describes
    t2i = np.zeros((5 * n, 3), np.int64)
    for j in range(5 * n):
        row = [m for m in range(n) if m != j // 5][:3]
        if j == c_fn:
            sib_img = next(m for m in range(n) if m not in (a, j // 5) and fam[m] == fam[j // 5])
            row = [a, sib_img] + [m for m in range(n) if m not in (a, sib_img, j // 5)][:1]
        t2i[j] = row
    res = knn(i2t, -np.sort(-np.random.default_rng(0).random((n, 6)), axis=1),
              t2i, np.tile([0.3, 0.2, 0.1], (5 * n, 1)))
    out, rep = apply_filters(res, 4, 1, FilterConfig(range_min=2), pos_i2t=np.ones(n),
                             pos_t2i=np.ones(5 * n), captions=caps)
    got = count_false_negatives(rep, graphs)
    want_i2t = sum(caption_describes_image(graphs, int(c), int(i))
                   for i, c in zip(*rep["removed"]["range_min"]["i2t"]))
    want_t2i = sum(caption_describes_image(graphs, int(j), int(m))
                   for j, m in zip(*rep["removed"]["range_min"]["t2i"]))
    assert got == {"range_min": {"i2t": want_i2t, "t2i": want_t2i}}
    assert got["range_min"]["i2t"] >= 1 and got["range_min"]["t2i"] >= 1
    # the FactIndex agrees with scene_graphs on random pairs
    idx = FactIndex(graphs)
    rng = np.random.default_rng(2)
    cc, ii = rng.integers(0, 5 * n, 300), rng.integers(0, n, 300)
    assert idx.describes(cc, ii).tolist() == [caption_describes_image(graphs, int(c), int(i))
                                              for c, i in zip(cc, ii)]
    assert idx.describes([c_fn], [a]).tolist() == [True]
    # the text filter keeps same-family captions that are not textual duplicates
    out, rep = apply_filters(res, 4, 1, FilterConfig(text_filter=True), pos_i2t=np.ones(n),
                             pos_t2i=np.ones(5 * n), captions=caps)
    assert c_sib in out.i2t[a].tolist()
