"""Exact k-NN core of candidate mining: torch single pass and faiss against the reference.

Exactness means bit equality with ``mine_reference`` (ids and float32 scores), on random
and on adversarial embeddings built to put many scores within the low-precision error
bound of the K-th score (duplicates, tiny perturbations, a ring, quantised scores, ulp-level
near-ties that only the canonical float64 sum can order).
"""
from __future__ import annotations

import math
import warnings

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.mining import (canonical_dot, canonical_matrix, lowp_error_bound, mine_faiss,
                             mine_reference, mine_torch, recall)
from pipeline.mining.knn_torch import bound, mine_torch_block, selection, tiled_pass
from pipeline.mining.reference import rescore_delta, rescore_topk

PRECISIONS = ("bf16", "fp16", "fp32")
FIELDS = ("i2t", "i2t_scores", "t2i", "t2i_scores")


# --------------------------------------------------------------------------- data
def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_pair(n_i: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    img = unit(rng.standard_normal((n_i, d)))
    # captions near their image, so the positives are the nearest (as in real data)
    cap = unit(np.repeat(img, 5, axis=0) + 0.9 * rng.standard_normal((5 * n_i, d)) / math.sqrt(d))
    return img, cap


def duplicated(n_i=40, d=32, seed=1):
    """Few distinct vectors, each used many times: exact ties everywhere."""
    rng = np.random.default_rng(seed)
    img_pool, cap_pool = unit(rng.standard_normal((7, d))), unit(rng.standard_normal((11, d)))
    return img_pool[rng.integers(0, 7, n_i)], cap_pool[rng.integers(0, 11, 5 * n_i)]


def perturbed(n_i=40, d=32, seed=2, sigma=0.03):
    """Every vector a perturbation of one base: all scores within a few bf16 / fp16 ulps
    (~1e-2) of each other, i.e. inside the low-precision error bound."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d)
    img = unit(base + sigma * rng.standard_normal((n_i, d)))
    cap = unit(base + sigma * rng.standard_normal((5 * n_i, d)))
    return img, cap


def perturbed_tiny(n_i=40, d=32, seed=2):
    """Scores within ~1e-8 of each other: all tied in bf16 / fp16, inside the fp32 bound."""
    return perturbed(n_i, d, seed, sigma=1e-4)


def ring(n_i=40, d=32, seed=3):
    """Images and captions evenly spaced on one circle: symmetric, near-tied scores."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, 2)))[0].T          # 2 orthonormal rows
    def on_ring(n):
        t = 2 * np.pi * np.arange(n) / n
        return unit(np.stack([np.cos(t), np.sin(t)], 1) @ basis)
    return on_ring(n_i), on_ring(5 * n_i)


def quantised(n_i=40, d=64, seed=4):
    """16 non-zero components of +-1/4 per row: unit norm exactly, scores multiples of
    1/16, exact ties everywhere (and exactly representable in bf16)."""
    rng = np.random.default_rng(seed)
    def rows(n):
        x = np.zeros((n, d), dtype=np.float32)
        for r in range(n):
            idx = rng.choice(d, 16, replace=False)
            x[r, idx] = rng.choice([-0.25, 0.25], 16)
        return x
    return rows(n_i), rows(5 * n_i)


def ulp_ties(n_i=30, d=16, seed=5):
    """Captions that differ from another caption by one float32 ulp in a component where
    the images are ~1e-9: score differences of ~1e-17, far below float64 dot-product
    rounding, so only the canonical sum orders them."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_i, d))
    img[:, 0] = 1e-9 * rng.standard_normal(n_i)
    img = img.astype(np.float32)
    base = unit(rng.standard_normal((5 * n_i // 3 + 1, d)))
    cap = base[rng.integers(0, base.shape[0], 5 * n_i)].copy()
    bump = rng.random(5 * n_i) < 0.5
    cap[bump, 0] = np.nextafter(cap[bump, 0], np.float32(np.inf))
    return img, cap


ADVERSARIAL = {"duplicated": duplicated, "perturbed": perturbed,
               "perturbed_tiny": perturbed_tiny, "ring": ring,
               "quantised": quantised, "ulp_ties": ulp_ties}


# --------------------------------------------------------------------------- checks
def assert_valid(res, n_i, k1, k2):
    n_c = 5 * n_i
    assert res.i2t.shape == (n_i, k1) and res.i2t.dtype == np.int32
    assert res.t2i.shape == (n_c, k2) and res.t2i.dtype == np.int32
    assert res.i2t_scores.shape == (n_i, k1) and res.i2t_scores.dtype == np.float32
    assert res.t2i_scores.shape == (n_c, k2) and res.t2i_scores.dtype == np.float32
    if k1:
        assert res.i2t.min() >= 0 and res.i2t.max() < n_c
        assert not ((res.i2t // 5) == np.arange(n_i)[:, None]).any(), "own caption in i2t"
        assert all(len(set(r)) == k1 for r in res.i2t.tolist())
        assert (np.diff(res.i2t_scores, axis=1) <= 0).all()
    if k2:
        assert res.t2i.min() >= 0 and res.t2i.max() < n_i
        assert not (res.t2i == (np.arange(n_c) // 5)[:, None]).any(), "own image in t2i"
        assert all(len(set(r)) == k2 for r in res.t2i.tolist())
        assert (np.diff(res.t2i_scores, axis=1) <= 0).all()


def assert_same(res, ref):
    for f in FIELDS:
        a, b = getattr(res, f), getattr(ref, f)
        assert a.shape == b.shape and a.dtype == b.dtype, f
        if not np.array_equal(a, b):
            bad = np.argwhere(a != b)[0]
            pytest.fail(f"{f} differs first at {tuple(bad)}: {a[tuple(bad)]} != {b[tuple(bad)]}")


_REF_CACHE: dict = {}


def reference(name, img, cap, k1, k2):
    key = (name, img.shape, k1, k2)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = mine_reference(img, cap, k1, k2)
    return _REF_CACHE[key]


# --------------------------------------------------------------------------- reference
def test_reference_matches_a_naive_sort():
    img, cap = random_pair(6, 8, seed=10)
    ref = mine_reference(img, cap, 7, 3)
    assert_valid(ref, 6, 7, 3)
    s = img.astype(np.float64) @ cap.astype(np.float64).T
    for i in range(6):
        order = sorted((j for j in range(30) if j // 5 != i), key=lambda j: (-s[i, j], j))
        assert ref.i2t[i].tolist() == order[:7]
    for j in range(30):
        order = sorted((i for i in range(6) if i != j // 5), key=lambda i: (-s[i, j], i))
        assert ref.t2i[j].tolist() == order[:3]


def test_canonical_scores_are_layout_independent_and_accurate():
    img, cap = random_pair(9, 37, seed=11)
    full = canonical_matrix(img, cap)
    rows, cols = np.meshgrid(np.arange(9), np.arange(45), indexing="ij")
    pairs = canonical_dot(img[rows.ravel()], cap[cols.ravel()]).reshape(9, 45)
    assert np.array_equal(full, pairs)
    assert np.array_equal(full[3:5, 7:20], canonical_matrix(img[3:5], cap[7:20]))
    exact = img.astype(np.float64) @ cap.astype(np.float64).T
    assert np.abs(full - exact).max() < 1e-14


def test_exact_ties_go_to_the_lower_id():
    img, cap = duplicated(12, 8)
    ref = mine_reference(img, cap, 59, 11)
    full = canonical_matrix(img, cap)
    for i in range(12):
        s = full[i, ref.i2t[i]]
        tied = s[1:] == s[:-1]
        assert tied.any()
        assert (ref.i2t[i][1:][tied] > ref.i2t[i][:-1][tied]).all()


# --------------------------------------------------------------------------- torch: random
RANDOM_CASES = [
    # n_i, d, k_i2t, k_t2i, row_block, col_block
    (40, 32, 10, 5, 4096, 8192),
    (60, 48, 150, 20, 16, 64),      # K_i2t > one tile
    (50, 32, 245, 49, 7, 33),       # K = full gallery; blocks do not divide N
    (77, 40, 25, 7, 20, 150),
    (12, 32, 9, 4, 1, 1),           # blocks of one row / one column
    (300, 64, 40, 8, 128, 512),
]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", RANDOM_CASES, ids=lambda c: "x".join(map(str, c)))
def test_torch_random_equals_reference(case, precision):
    n_i, d, k1, k2, rb, cb = case
    img, cap = random_pair(n_i, d, seed=n_i + d)
    ref = reference("random", img, cap, k1, k2)
    res = mine_torch(img, cap, k1, k2, precision=precision, row_block=rb, col_block=cb)
    assert_valid(res, n_i, k1, k2)
    assert_same(res, ref)
    st = res.stats
    assert st["tiles"] == -(-n_i // rb) * -(-5 * n_i // cb)
    assert st["peak_buffered"] >= min(k1, 1) * n_i
    assert st["precision"] == precision


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_scratch_files_equal_in_memory(tmp_path, precision):
    """With a scratch folder the outputs, the t2i selections and the low-precision copies
    live in memory-mapped files there; the answer is the same, bit for bit."""
    img, cap = random_pair(77, 40, seed=3)
    mem = mine_torch(img, cap, 25, 7, precision=precision, row_block=20, col_block=150)
    folder = tmp_path / "scratch"
    res = mine_torch(np.load(_saved(tmp_path / "img.npy", img), mmap_mode="r"),
                     np.load(_saved(tmp_path / "cap.npy", cap), mmap_mode="r"), 25, 7,
                     precision=precision, row_block=20, col_block=150, scratch=folder)
    assert_same(res, reference("random-seed3", img, cap, 25, 7))
    for d in ("i2t", "t2i", "i2t_scores", "t2i_scores"):
        x = getattr(res, d)
        np.testing.assert_array_equal(x, getattr(mem, d))
        assert isinstance(x, np.memmap) and Path(x.filename).parent == folder, d
    names = {p.name.split("-")[0] for p in folder.iterdir()}
    assert {"i2t_ids", "i2t_scores", "t2i_ids", "t2i_keys"} <= names
    assert ("lowp" in names) == (precision == "bf16")


def _saved(path, x):
    np.save(path, x)
    return path


@pytest.mark.parametrize("case", RANDOM_CASES[:4], ids=lambda c: "x".join(map(str, c)))
def test_faiss_flat_random_equals_reference(case):
    n_i, d, k1, k2, _, _ = case
    img, cap = random_pair(n_i, d, seed=n_i + d)
    res = mine_faiss(img, cap, k1, k2, index="flat", use_gpu=False)
    assert_valid(res, n_i, k1, k2)
    assert_same(res, reference("random", img, cap, k1, k2))


# --------------------------------------------------------------------------- adversarial
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_torch_adversarial_equals_reference(name, precision):
    img, cap = ADVERSARIAL[name]()
    n_i = img.shape[0]
    k1, k2 = 37, 9
    ref = reference(name, img, cap, k1, k2)
    for rb, cb in ((4096, 8192), (7, 25)):
        res = mine_torch(img, cap, k1, k2, precision=precision, row_block=rb, col_block=cb)
        assert_valid(res, n_i, k1, k2)
        assert_same(res, ref)


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_faiss_flat_adversarial_equals_reference(name):
    img, cap = ADVERSARIAL[name]()
    res = mine_faiss(img, cap, 37, 9, use_gpu=False)
    assert_same(res, reference(name, img, cap, 37, 9))


def test_ulp_ties_need_the_canonical_sum():
    img, cap = ulp_ties()
    res = mine_torch(img, cap, 37, 9, precision="bf16")
    assert res.stats["canonical_refined"] > 0
    assert_same(res, reference("ulp_ties", img, cap, 37, 9))


def midpoints(n_i=30, d=8, seed=13):
    """Scores 1 + m 2^-24 with m = u v (small integers, exact in float64): for odd m the
    canonical score lies exactly halfway between two float32 values, so no float64 dot
    product with an error bound can decide the reported score; many exact ties too."""
    rng = np.random.default_rng(seed)
    def rows(n):
        x = np.zeros((n, d), dtype=np.float32)
        x[:, 0] = 1.0
        x[:, 1] = rng.integers(1, 8, n) * 2.0 ** -12
        return x
    return rows(n_i), rows(5 * n_i)


def test_keys_at_float32_rounding_midpoints():
    img, cap = midpoints()
    res = mine_torch(img, cap, 37, 9, precision="fp32", row_block=8, col_block=32)
    assert res.stats["canonical_rounding"] > 0 and res.stats["canonical_ties"] > 0
    assert_same(res, mine_reference(img, cap, 37, 9))


def test_pack_orders_keys_like_the_answer():
    """uint64 keys sort by descending score, then ascending id; unpacking restores both."""
    rng = np.random.default_rng(0)
    values = np.float32([-np.inf, -1.5, -1e-30, 0.0, 1e-30, 0.5, 2.0, np.inf])
    f = rng.choice(values, (7, 40))
    ids = rng.integers(-1, 50, (7, 40)).astype(np.int32)
    keys = selection._pack(f, ids)
    got, want = np.argsort(keys, axis=1), np.lexsort((ids.astype(np.uint32), -f), axis=1)
    for x in (f, ids):
        assert np.array_equal(np.take_along_axis(x, got, 1), np.take_along_axis(x, want, 1))
    f2, ids2 = selection._unpack(keys)
    assert np.array_equal(f2, f) and np.array_equal(ids2, ids)


@pytest.mark.parametrize("name", ["random", "duplicated", "ulp_ties"])
def test_failed_speculation_is_mined_again(monkeypatch, name):
    """Floors far too aggressive (z < 0): many queries fail the check and are mined again
    with proven floors; the answer stays exact."""
    img, cap = random_pair(60, 32, seed=14) if name == "random" else ADVERSARIAL[name]()
    monkeypatch.setattr(selection, "Z_SPEC", -2.0)
    monkeypatch.setattr(tiled_pass, "PILOT", 8)
    res = mine_torch(img, cap, 30, 8, precision="fp32", row_block=16, col_block=40)
    st = res.stats
    assert st.get("rechecked_i2t", 0) > 0 and st.get("rechecked_t2i", 0) > 0
    assert_same(res, mine_reference(img, cap, 30, 8))


@pytest.mark.parametrize("name", ["duplicated", "quantised"])
def test_exact_cut_when_ties_exceed_the_capacity(name):
    """Tie groups larger than the slack: selections are cut to exactly k by (-c, id)."""
    img, cap = ADVERSARIAL[name]()
    res = mine_torch(img, cap, 37, 9, precision="bf16", row_block=5, col_block=17,
                     buffer_slack=0.0)
    assert res.stats["exact_cuts"] > 0
    assert_same(res, reference(name, img, cap, 37, 9))


@pytest.mark.parametrize("dense", [0.0, 1.0])
def test_dense_and_sparse_keys_agree(monkeypatch, dense):
    monkeypatch.setattr(tiled_pass, "DENSE_SHARE", dense)
    monkeypatch.setattr(tiled_pass, "KEY_ROWS", 7)               # several key blocks
    img, cap = random_pair(50, 48, seed=15)
    res = mine_torch(img, cap, 40, 7, precision="fp32", row_block=24, col_block=96)
    st = res.stats
    assert st.get("keyed_dense", 0) == (st["keyed"] if dense == 0.0 else 0)
    assert_same(res, reference("random", img, cap, 40, 7))


def test_memmap_inputs_contiguous_outputs_threads_restored(tmp_path):
    img, cap = random_pair(50, 32, seed=16)
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "cap.npy", cap)
    img_m = np.load(tmp_path / "img.npy", mmap_mode="r")
    cap_m = np.load(tmp_path / "cap.npy", mmap_mode="r")
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # no "not writable" warning
        res = mine_torch(img_m, cap_m, 30, 6, precision="fp32", row_block=16, col_block=64)
    assert torch.get_num_threads() == threads
    assert_same(res, mine_reference(img, cap, 30, 6))
    assert all(getattr(res, f).flags.c_contiguous for f in FIELDS)


# Rates of a CPU where bf16 wins (AMD EPYC Zen 4, issue 19: bf16 244, fp32 53 GFLOP/s)
ZEN4 = {"gemm_gflops": {"fp32": 53.0, "fp16": 30.0, "bf16": 244.0}, "f64_gflops": 25.0,
        "key_ns": 300.0, "extract_ns": 30.0, "scan_ns": 1.0, "copy_ns": 1.0}


def test_cost_model_takes_the_lowest_predicted_cost():
    """The choice is the argmin of the predicted pass cost, whatever the rates; a faster GEMM
    lowers only its own precision's cost, a wider band only raises the keys."""
    img, cap = random_pair(200, 64, seed=91)
    cpu = torch.device("cpu")
    for gemm in ({"fp32": 53, "fp16": 30, "bf16": 244}, {"fp32": 120, "fp16": 20, "bf16": 17},
                 {"fp32": 50, "fp16": 400, "bf16": 410}, {"fp32": 100, "fp16": 100, "bf16": 100}):
        rates = {**ZEN4, "gemm_gflops": gemm}
        p, rec = bound._pick_precision(64, cpu, img=img, cap=cap, k_i2t=50, k_t2i=10,
                                       rates=rates)
        pred = rec["predicted_seconds"]
        assert p == rec["chosen"] == min(pred, key=lambda q: pred[q]["total"])
        assert rec["rates"] == rates and p in rec["reason"]
    # equal GEMM rates: the narrowest band is never worse
    assert p == "fp32"
    sh = rec["shares"]
    assert sh["fp32"] <= sh["fp16"] <= sh["bf16"]
    assert pred["fp32"]["keys"] <= pred["fp16"]["keys"] <= pred["bf16"]["keys"]


def test_cost_model_bf16_when_its_gemm_is_much_faster_and_the_band_narrow():
    img, cap = random_pair(400, 256, seed=92)
    p, rec = bound._pick_precision(256, torch.device("cpu"), img=img, cap=cap, k_i2t=40,
                                   k_t2i=8, rates=ZEN4)
    assert p == "bf16", rec["reason"]
    assert rec["shares_source"] == "data"
    pred = rec["predicted_seconds"]
    # the extra keys of its band cost less than its GEMM saves
    assert 0 < pred["bf16"]["keys"] - pred["fp32"]["keys"] < pred["fp32"]["gemm"] - pred["bf16"]["gemm"]


@pytest.mark.parametrize("why", ["dense scores", "large K"])
def test_cost_model_fp32_when_the_band_costs_more_than_the_gemm_saves(why):
    """The keys of the wider band outweigh bf16's faster GEMM: scores packed within the bf16
    band (every vector a perturbation of one base), or a K (5.5% of the gallery) whose bf16
    band tips the tiles over DENSE_SHARE into dense float64 keying, on a slow float64 GEMM."""
    if why == "dense scores":
        img, cap = perturbed(400, 256, seed=93, sigma=0.03)
        k1, k2, rates = 40, 8, ZEN4
    else:
        img, cap = random_pair(400, 256, seed=94)
        k1, k2, rates = 110, 22, {**ZEN4, "f64_gflops": 5.0}
    p, rec = bound._pick_precision(256, torch.device("cpu"), img=img, cap=cap, k_i2t=k1,
                                   k_t2i=k2, rates=rates)
    assert p == "fp32", rec["reason"]
    sh, pred = rec["shares"], rec["predicted_seconds"]
    assert sh["bf16"] > sh["fp32"]
    assert pred["bf16"]["keys"] - pred["fp32"]["keys"] > pred["fp32"]["gemm"] - pred["bf16"]["gemm"]
    if why == "large K":
        limit = tiled_pass.DENSE_SHARE / bound.EARLY_FLOORS
        assert sh["fp32"] < limit < sh["bf16"]


# Rates and band shares of a CPU with AMX (Intel Xeon, 2026-12-04, benchmarks/mining.py
# --n-img 10000): bf16 GEMM 5.4x fp32's, yet the fp32 pass was faster (11.7 s vs 14.6 s)
AMX = {"gemm_gflops": {"fp32": 330.0, "fp16": 286.0, "bf16": 1782.0}, "f64_gflops": 135.0,
       "key_ns": 152.0, "extract_ns": 18.0, "keep_ns": 88.0, "scan_ns": 0.53, "copy_ns": 0.73,
       "convert_ns": {"fp32": 0.0, "fp16": 11.0, "bf16": 20.0}}
AMX_SHARES = {"fp32": 0.0447, "fp16": 0.0469, "bf16": 0.0645}


def test_cost_model_fp32_on_the_amx_run_where_fp32_was_faster():
    """Measured: the survivors' keys and insertions (~260 ns each) of bf16's 46% more
    survivors outweighed its GEMM saving; the model must see it from the same rates."""
    pred = bound.predict_pass_seconds(AMX, AMX_SHARES, 10000, 50000, 1024, 4096, 8192)
    assert min(pred, key=lambda q: pred[q]["total"]) == "fp32"
    # measured 11.7 (fp32) and 14.6 s (bf16); what every precision pays alike (the filter's
    # compares, the final ordering: ~2.5 s) is left out of the model
    assert 0.6 < pred["fp32"]["total"] / 11.7 < 1.0 and 0.6 < pred["bf16"]["total"] / 14.6 < 1.0
    assert pred["bf16"]["total"] - pred["fp32"]["total"] > 1.0
    # without the insertion and rounding costs the same shares would have picked bf16
    no_keep = {**AMX, "keep_ns": 0.0, "convert_ns": {}}
    pred0 = bound.predict_pass_seconds(no_keep, AMX_SHARES, 10000, 50000, 1024, 4096, 8192)
    assert min(pred0, key=lambda q: pred0[q]["total"]) == "bf16"


def test_default_shares_without_data():
    """No data at the call: shares of random unit vectors at K / N = 1%."""
    sh = bound.default_shares(1024)
    assert sh["shares"]["fp32"] == pytest.approx(0.01, rel=0.02)
    assert sh["shares"]["fp32"] < sh["shares"]["fp16"] < sh["shares"]["bf16"] < 0.1
    p, rec = bound._pick_precision(1024, torch.device("cpu"), rates=ZEN4)
    assert rec["shares_source"].startswith("default") and p == rec["chosen"]


def test_band_shares_of_random_data_match_k():
    """fp32's band is ~1e-4 wide: its share is about the larger direction's K / N."""
    img, cap = random_pair(600, 128, seed=95)
    sh = bound.band_shares(img, cap, 150, 30)
    assert sh["shares"]["fp32"] == pytest.approx(150 / 2995, rel=0.35)
    assert sh["band"]["fp32"] < 1e-4 < sh["band"]["fp16"] < sh["band"]["bf16"] < 2e-2


@pytest.mark.parametrize("rates, expect", [(ZEN4, "bf16"), (
    {**ZEN4, "gemm_gflops": {"fp32": 120.0, "fp16": 20.0, "bf16": 17.0}}, "fp32")])
def test_auto_records_its_choice_and_stays_exact(monkeypatch, rates, expect):
    """mine_torch / mine_torch_block with 'auto': the choice, the rates it came from and the
    predicted costs are in the stats, and the answer equals the float64 reference."""
    monkeypatch.setattr(bound, "measure_rates", lambda d, dev: rates)
    monkeypatch.setattr(bound, "AUTO_MIN_FLOP", 0.0)
    img, cap = random_pair(400, 256, seed=96)
    res = mine_torch(img, cap, 40, 8, precision="auto", row_block=128, col_block=512)
    st = res.stats
    assert st["precision"] == expect == st["precision_choice"]["chosen"]
    ch = st["precision_choice"]
    assert ch["rates"]["gemm_gflops"] == rates["gemm_gflops"]
    assert set(ch["predicted_seconds"]) == {"fp32", "fp16", "bf16"}
    assert set(ch["predicted_seconds"][expect]) == {"gemm", "keys", "fixed", "total"}
    assert_same(res, reference("random", img, cap, 40, 8))
    blk = mine_torch_block(img, cap, 100, 300, 40, 8, precision="auto", row_block=128,
                           col_block=512)
    assert blk.stats["precision"] == blk.stats["precision_choice"]["chosen"]
    assert np.array_equal(blk.i2t, res.i2t[100:300])


def test_auto_on_a_tiny_pass_takes_fp32_unprobed(monkeypatch):
    def fail(d, dev):
        raise AssertionError("probed")
    monkeypatch.setattr(bound, "measure_rates", fail)
    img, cap = random_pair(40, 32, seed=97)
    res = mine_torch(img, cap, 10, 5, precision="auto")
    assert res.stats["precision"] == "fp32"
    assert "not probed" in res.stats["precision_choice"]["reason"]


def test_measure_rates_is_quick_and_cached():
    """The probe measures every component of the model on this machine, once per (device, d)."""
    cpu = torch.device("cpu")
    bound._RATES.pop(("cpu", 64), None)
    r = bound.measure_rates(64, cpu)
    assert bound.measure_rates(64, cpu) is r
    assert set(r["gemm_gflops"]) == {"fp32", "fp16", "bf16"}
    assert all(v > 0 for v in r["gemm_gflops"].values())
    assert r["convert_ns"]["fp32"] == 0 and r["convert_ns"]["bf16"] > 0
    for key in ("f64_gflops", "key_ns", "extract_ns", "keep_ns", "scan_ns", "copy_ns"):
        assert r[key] >= 0, key
    assert r["key_ns"] > 0 and r["probe_seconds"] < 10   # (a loose bound: shared machines)


@pytest.mark.parametrize("precision, name", [
    ("bf16", "perturbed"), ("fp16", "perturbed"), ("fp32", "perturbed_tiny"),
    ("bf16", "ring"), ("fp16", "ring"), ("fp32", "ring")])
def test_adversarial_data_has_teeth(monkeypatch, precision, name):
    """With the error bound switched off the pass loses true neighbours: the adversarial
    data really puts scores inside the bound of each precision."""
    img, cap = ADVERSARIAL[name]()
    monkeypatch.setattr(tiled_pass, "_data_bound", lambda *a: (0.0, 0.0))
    monkeypatch.setattr(tiled_pass, "_probe", lambda *a: 0.0)
    res = mine_torch(img, cap, 37, 9, precision=precision)
    ref = reference(name, img, cap, 37, 9)
    assert not (np.array_equal(res.i2t, ref.i2t) and np.array_equal(res.t2i, ref.t2i))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_unnormalised_inputs(precision):
    rng = np.random.default_rng(7)
    img, cap = random_pair(30, 24, seed=7)
    img = img * rng.uniform(0.01, 300, (30, 1)).astype(np.float32)   # fp16 would overflow
    cap = cap * rng.uniform(0.01, 300, (150, 1)).astype(np.float32)
    res = mine_torch(img, cap, 20, 6, precision=precision, row_block=8, col_block=40)
    assert_same(res, mine_reference(img, cap, 20, 6))


# --------------------------------------------------------------------------- the bound
def test_bound_values():
    b = {p: lowp_error_bound(1024, p) for p in PRECISIONS}
    assert 0.0117 < b["bf16"] < 0.0119           # 2u + u^2 + u_out + gamma, u = 2^-8
    assert 0.00150 < b["fp16"] < 0.00156
    assert 6.0e-5 < b["fp32"] < 6.3e-5            # gamma_1024 for float32
    assert lowp_error_bound(64, "bf16") < b["bf16"]
    assert lowp_error_bound(1024, "bf16", output_rounding=False) < b["bf16"] - 0.0038
    with pytest.raises(InputError):
        lowp_error_bound(8, "int8")


def _lowp_scores(a, b, precision):
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return (torch.from_numpy(a).to(dt) @ torch.from_numpy(b).to(dt).T).double().numpy()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("d", [16, 256, 1024])
def test_bound_holds_on_random_unit_vectors(precision, d):
    rng = np.random.default_rng(d)
    a = unit(rng.standard_normal((32, d)))
    b = unit(np.vstack([rng.standard_normal((64, d)), np.abs(rng.standard_normal((64, d)))]))
    a = np.vstack([a, np.abs(a)])                            # no cancellation in the sums
    err = np.abs(_lowp_scores(a, b, precision) - canonical_matrix(a, b)).max()
    assert err <= lowp_error_bound(d, precision)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("d", [16, 1024])
def test_bound_holds_and_is_nearly_tight_on_adversarial_vectors(precision, d):
    """Every component of both vectors rounds up by ~u (a . a^ adds the errors); the
    observed error reaches more than half of the bound."""
    u = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}[precision]
    x = np.full(d, 1 + u + 2.0 ** -22) / math.sqrt(d)
    x = np.float32(x)
    exact = np.array([[canonical_dot(x[None], x[None])[0]]])
    norm2 = float(np.dot(x.astype(np.float64), x.astype(np.float64)))
    err = np.abs(_lowp_scores(x[None], x[None], precision) - exact).max() / norm2
    bound = lowp_error_bound(d, precision)
    assert err <= bound
    assert err > 0.5 * bound


@pytest.mark.parametrize("precision", PRECISIONS)
def test_data_dependent_bound_is_within_the_a_priori_one(precision):
    img, cap = random_pair(64, 256, seed=3)
    res = mine_torch(img, cap, 5, 2, precision=precision)
    st = res.stats
    worst = st["eps0"] + st["rho"] * 1.0
    # float32-normalised rows have norms 1 +- ~1e-7, hence the tiny relative allowance
    assert worst <= lowp_error_bound(256, precision) * (1 + 1e-6)
    if precision != "fp32":      # measured rounding (~1u) beats the a-priori 2u + u^2
        assert worst < 0.85 * lowp_error_bound(256, precision)
    assert st["probe_max_excess"] <= 0
    s_hat = _lowp_scores(img, cap, precision)
    err = np.abs(s_hat - canonical_matrix(img, cap))
    assert (err <= st["eps0"] + st["rho"] * np.abs(s_hat)).all()


def test_probe_refuses_a_gemm_that_breaks_the_bound(monkeypatch):
    real = bound._tile_mm
    monkeypatch.setattr(bound, "_tile_mm", lambda a, b: real(a, b) + 0.05)
    img, cap = random_pair(20, 16, seed=1)
    with pytest.raises(RuntimeError, match="error bound"):
        mine_torch(img, cap, 5, 2, precision="bf16")


def test_global_matmul_precision_settings_are_overridden_and_restored():
    """A user's global 'fp32 matmul may use bf16' setting must not leak into the pass."""
    mm = torch.backends.mkldnn.matmul
    old = mm.fp32_precision
    try:
        mm.fp32_precision = "bf16"
        img, cap = perturbed_tiny()
        res = mine_torch(img, cap, 37, 9, precision="fp32")
        assert_same(res, reference("perturbed_tiny", img, cap, 37, 9))
        assert mm.fp32_precision == "bf16"
    finally:
        mm.fp32_precision = old


def test_auto_precision_and_progress():
    img, cap = random_pair(40, 32, seed=72)
    res = mine_torch(img, cap, 10, 5, precision="auto", progress=True, row_block=16)
    assert res.stats["precision"] in PRECISIONS
    assert_same(res, reference("random", img, cap, 10, 5))


# --------------------------------------------------------------------------- inputs, K
def test_k_is_capped_and_zero_is_allowed():
    img, cap = random_pair(10, 16, seed=2)
    res = mine_torch(img, cap, 10_000, 10_000, precision="fp32")
    assert_valid(res, 10, 45, 9)
    assert_same(res, mine_reference(img, cap, 45, 9))
    assert res.stats["k_i2t"] == 45 and res.stats["k_t2i"] == 9
    zero = mine_torch(img, cap, 0, 3, precision="fp32")
    assert zero.i2t.shape == (10, 0) and zero.t2i.shape == (50, 3)
    zero = mine_faiss(img, cap, 4, 0, use_gpu=False)
    assert zero.i2t.shape == (10, 4) and zero.t2i.shape == (50, 0)


@pytest.mark.parametrize("bad, match", [
    (lambda img, cap: (img, cap[:-1], 3, 3), "5 captions per image"),
    (lambda img, cap: (img[:, :-1], cap, 3, 3), "dimension"),
    (lambda img, cap: (img[0], cap, 3, 3), "2-D"),
    (lambda img, cap: (np.where(np.arange(10)[:, None] == 4, np.nan, img), cap, 3, 3), "row 4"),
    (lambda img, cap: (img, cap, -1, 3), "K_i2t"),
    (lambda img, cap: (img, cap, 3, 2.5), "K_t2i"),
    (lambda img, cap: (img[:1], cap[:5], 3, 3), "at least 2 images"),
])
def test_bad_inputs_raise_input_error(bad, match):
    img, cap = random_pair(10, 16, seed=2)
    args = bad(img, cap)
    for fn in (mine_torch, mine_faiss, mine_reference):
        with pytest.raises(InputError, match=match):
            fn(*args)


def test_bad_options_raise_input_error():
    img, cap = random_pair(10, 16, seed=2)
    with pytest.raises(InputError, match="precision"):
        mine_torch(img, cap, 3, 3, precision="int4")
    with pytest.raises(InputError, match="row_block"):
        mine_torch(img, cap, 3, 3, row_block=0)
    with pytest.raises(InputError, match="nprobe"):
        mine_faiss(img, cap, 3, 3, index="flat", nprobe=3)
    with pytest.raises(InputError, match="flat, ivf or hnsw"):
        mine_faiss(img, cap, 3, 3, index="pq")


# --------------------------------------------------------------------------- faiss approx
@pytest.mark.parametrize("index, opts, min_recall", [
    ("hnsw", {}, 0.95),
    ("hnsw", {"M": 8, "efSearch": 16, "efConstruction": 16}, 0.5),
    ("ivf", {"nlist": 8, "nprobe": 8}, 0.99),          # every list probed: exhaustive
    ("ivf", {"nlist": 16, "nprobe": 2}, 0.2),
])
def test_faiss_approximate_indexes(index, opts, min_recall):
    img, cap = random_pair(120, 32, seed=9)
    k1, k2 = 30, 8
    res = mine_faiss(img, cap, k1, k2, index=index, use_gpu=False, **opts)
    assert_valid(res, 120, k1, k2)
    ref = reference("random", img, cap, k1, k2)
    r1, r2 = recall(res.i2t, ref.i2t), recall(res.t2i, ref.t2i)
    assert min_recall <= r1 <= 1 and min_recall <= r2 <= 1
    # whatever it returns is scored exactly: scores equal the canonical ones
    full = canonical_matrix(img, cap)
    assert np.array_equal(res.i2t_scores, full[np.arange(120)[:, None], res.i2t].astype(np.float32))


def test_faiss_ivf_too_few_results_fall_back_to_exact():
    img, cap = random_pair(60, 16, seed=4)
    res = mine_faiss(img, cap, 40, 20, index="ivf", nlist=20, nprobe=1, use_gpu=False)
    assert_valid(res, 60, 40, 20)
    assert res.stats.get("fallback_exact_i2t", 0) + res.stats.get("fallback_exact_t2i", 0) > 0


def test_faiss_flat_requery_when_the_margin_is_too_small():
    img, cap = quantised(30, 64)
    res = mine_faiss(img, cap, 20, 5, use_gpu=False, margin=0)
    assert res.stats.get("requeried_i2t", 0) + res.stats.get("requeried_t2i", 0) > 0
    assert_same(res, mine_reference(img, cap, 20, 5))


# --------------------------------------------------------------------------- GPU
def test_faiss_gpu_k_limit(monkeypatch):
    import faiss
    img, cap = random_pair(420, 8, seed=5)            # 2100 captions: K_i2t up to 2095
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    with pytest.raises(InputError, match="2048"):
        mine_faiss(img, cap, 2044, 5)                   # 2044 + 5 positives > 2048
    mine_faiss(img[:40], cap[:200], 5, 5, use_gpu=False)   # CPU when asked, GPUs or not
    big_img, big_cap = random_pair(2050, 4, seed=5)
    with pytest.raises(InputError, match="2048"):
        mine_faiss(big_img, big_cap, 5, 2048, use_gpu=True)   # 2048 + 1 positive > 2048
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    with pytest.raises(InputError, match="no GPU"):
        mine_faiss(img, cap, 5, 5, use_gpu=True)


def _has_faiss_gpu() -> bool:
    try:
        import faiss
    except ImportError:      # a GPU machine may have torch and no faiss at all
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@pytest.mark.skipif(not _has_faiss_gpu(), reason="no GPU faiss")
def test_faiss_gpu_flat_equals_reference():  # pragma: no cover - needs a GPU
    img, cap = random_pair(200, 64, seed=6)
    res = mine_faiss(img, cap, 50, 10, use_gpu=True)
    assert res.stats["gpu"]
    assert_same(res, mine_reference(img, cap, 50, 10))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_torch_cuda_equals_reference(precision):  # pragma: no cover - needs a GPU
    for name in ("perturbed", "quantised"):
        img, cap = ADVERSARIAL[name]()
        res = mine_torch(img, cap, 37, 9, precision=precision, device="cuda", row_block=16,
                         col_block=64)
        assert_same(res, reference(name, img, cap, 37, 9))


# --------------------------------------------------------------------------- rescoring
def test_rescore_topk_orders_by_canonical_score_then_id():
    img, cap = ulp_ties(12, 8, seed=8)
    full = canonical_matrix(img, cap)
    cand = torch.from_numpy(np.tile(np.arange(60), (12, 1)))
    cand[:, ::7] = -1                                   # padding is ignored
    q, g = torch.from_numpy(img), torch.from_numpy(cap)
    delta = rescore_delta(8, float(q.norm(dim=1).max()) * 1.01, 1.01)
    stats: dict = {}
    ids, sc = rescore_topk(q, g, img, cap, cand, 20, delta=delta, stats=stats)
    for i in range(12):
        pool = [j for j in range(60) if j % 7]
        want = sorted(pool, key=lambda j: (-full[i, j], j))[:20]
        assert ids[i].tolist() == want
        assert np.array_equal(sc[i], full[i, want].astype(np.float32))
    assert stats["canonical_refined"] > 0
