"""dask.distributed scale-out: sharded mining and embedding give the single-process answers."""
import json
import time

import numpy as np
import pytest

pytest.importorskip("distributed")

from pipeline.errors import InputError  # noqa: E402
from pipeline.mining import mine_reference, mine_torch  # noqa: E402
from pipeline.mining.distributed import (embed_distributed, get_client,  # noqa: E402
                                         merge_t2i, mine_distributed)
from pipeline.mining.knn_torch import mine_torch_block  # noqa: E402

N_IMG, DIM = 23, 16


@pytest.fixture(scope="module")
def client():
    with get_client(workers=2, threads_per_worker=1) as c:
        yield c


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    """Random unit rows, with exact duplicates and 1-ulp neighbours of some images in other
    shards: equal canonical scores (tie by id) and equal float32 scores whose float64
    canonical scores differ (the merge must consult the canonical score)."""
    rng = np.random.default_rng(3)
    img = _unit(rng.standard_normal((N_IMG, DIM)))
    cap = _unit(rng.standard_normal((5 * N_IMG, DIM)))
    img[17] = img[2]
    img[11] = img[2]
    img[20] = img[6]
    img[20, 0] = np.nextafter(img[20, 0], np.float32(2))
    img[13] = img[6]
    img[13, 3] = np.nextafter(img[13, 3], np.float32(-2))
    return img, cap


@pytest.fixture(scope="module")
def expected(data):
    img, cap = data
    return {k2: mine_torch(img, cap, 40, k2) for k2 in (0, 4, 9, N_IMG - 2, N_IMG - 1)}


def _same(a, b):
    for name in ("i2t", "i2t_scores", "t2i", "t2i_scores"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_torch_matches_reference(data, expected):
    img, cap = data
    for k2 in (4, N_IMG - 1):
        _same(expected[k2], mine_reference(img, cap, 40, k2))


@pytest.mark.parametrize("shard_rows", [None, 1, 5, 7, 11, 23])
def test_mine_distributed_equals_mine_torch(client, data, expected, shard_rows):
    img, cap = data
    for k2 in (4, 9, N_IMG - 1) if shard_rows in (5, 7) else (9,):
        res = mine_distributed(img, cap, 40, k2, client, shard_rows=shard_rows)
        _same(res, expected[k2])
        n = -(-N_IMG // (shard_rows or -(-N_IMG // 4)))
        assert res.stats["shards"] == n
        assert res.stats["workers"] == 2


def test_mine_distributed_k_edges(client, data, expected):
    img, cap = data
    for k2 in (0, N_IMG - 2, N_IMG - 1):
        _same(mine_distributed(img, cap, 40, k2, client, shard_rows=6), expected[k2])
    res = mine_distributed(img, cap, 0, N_IMG + 50, client, shard_rows=9)   # K capped
    assert res.i2t.shape == (N_IMG, 0)
    np.testing.assert_array_equal(res.t2i, expected[N_IMG - 1].t2i)


def test_mine_distributed_other_precisions(client, data):
    img, cap = data
    for precision in ("fp32", "fp16"):
        res = mine_distributed(img, cap, 12, 5, client, shard_rows=8, precision=precision,
                               row_block=3, col_block=17)
        _same(res, mine_torch(img, cap, 12, 5, precision=precision))


def test_mine_distributed_from_npy_paths(client, data, expected, tmp_path):
    img, cap = data
    pi, pc = tmp_path / "img_embs.npy", tmp_path / "cap_embs.npy"
    np.save(pi, img)
    np.save(pc, cap)
    res = mine_distributed(str(pi), pc, 40, 9, client, shard_rows=7)
    assert res.stats["inputs"] == "paths"
    _same(res, expected[9])
    _same(mine_distributed(pi, cap, 40, 9, client, shard_rows=10), expected[9])   # mixed
    with pytest.raises(InputError, match="not found"):
        mine_distributed(tmp_path / "missing.npy", pc, 40, 9, client)


def test_mine_distributed_errors(client, data):
    img, cap = data
    with pytest.raises(InputError, match="5 captions per image"):
        mine_distributed(img, cap[:-1], 4, 4, client)
    with pytest.raises(InputError, match="shard_rows"):
        mine_distributed(img, cap, 4, 4, client, shard_rows=0)
    with pytest.raises(InputError, match="unknown mining option"):
        mine_distributed(img, cap, 4, 4, client, bogus=1)
    with pytest.raises(InputError, match="precision"):
        mine_distributed(img, cap, 4, 4, client, precision="int4")


def test_block_and_merge_locally(data, expected):
    """No cluster: blocks + pairwise merges in the reverse order give the same t2i."""
    img, cap = data
    k2 = 9
    parts = [mine_torch_block(img, cap, s, min(N_IMG, s + 4), 40, k2)
             for s in range(0, N_IMG, 4)]
    ids, sc = parts[-1].t2i, parts[-1].t2i_scores
    for p in parts[-2::-1]:
        ids, sc = merge_t2i(ids, sc, p.t2i, p.t2i_scores, k2, img, cap)
    np.testing.assert_array_equal(ids, expected[k2].t2i)
    np.testing.assert_array_equal(sc, expected[k2].t2i_scores)
    np.testing.assert_array_equal(np.concatenate([p.i2t for p in parts]), expected[k2].i2t)


def test_bad_scheduler_address_fails_fast():
    t = time.perf_counter()
    with pytest.raises(InputError, match="cannot reach dask scheduler"):
        get_client("tcp://127.0.0.1:1", connect_timeout=2)
    with pytest.raises(InputError, match="cannot reach dask scheduler"):
        get_client("not an address:::")
    assert time.perf_counter() - t < 15
    with pytest.raises(InputError, match="workers"):
        get_client(workers=0)


# --------------------------------------------------------------------------- embedding
def test_embed_distributed_equals_embed_split(client, ckpt, tiny_data, tmp_path):
    from pipeline.mining.embed import CAP_FILE, IMG_FILE, META_FILE, embed_split

    single, dist = tmp_path / "single", tmp_path / "dist"
    ref = embed_split(ckpt, tiny_data, "train", single, batch_size=8, block_rows=12,
                      progress=False)
    dist.mkdir()
    (dist / IMG_FILE).write_bytes(b"stale")            # replaced atomically
    meta = embed_distributed(ckpt, tiny_data, "train", dist, client, shard_size=30,
                             batch_size=8, block_rows=12)
    for name in (IMG_FILE, CAP_FILE):
        assert (dist / name).read_bytes() == (single / name).read_bytes(), name
    ref.pop("seconds")
    meta.pop("seconds")
    assert meta == ref
    on_disk = json.loads((dist / META_FILE).read_text())
    assert on_disk == ref                   # the wall time is returned, not written
    assert sorted(p.name for p in dist.iterdir()) == sorted([IMG_FILE, CAP_FILE, META_FILE])
    assert np.load(dist / IMG_FILE).shape == (100, 16)
