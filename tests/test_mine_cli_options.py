"""mine-candidates: filters and dask scale-out through the command line."""
import json

import numpy as np
import pytest

from cli.main import main


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    """Random unit embeddings in the layout `embed` writes (no provenance file)."""
    d = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(0)
    img = rng.standard_normal((40, 16)).astype(np.float32)
    cap = np.repeat(img, 5, axis=0) + 0.8 * rng.standard_normal((200, 16)).astype(np.float32)
    for name, x in (("img_embs.npy", img), ("cap_embs.npy", cap)):
        np.save(d / name, x / np.linalg.norm(x, axis=1, keepdims=True))
    return d


def _mine(emb, out, *extra):
    return main(["mine-candidates", "--embeddings-dir", str(emb), "--out", str(out), "--name", "t",
                 "--k-i2t", "20", "--k-t2i", "8", "--quiet", *extra])


def test_workers_equal_single_process(embeddings, tmp_path):
    assert _mine(embeddings, tmp_path / "one") == 0
    assert _mine(embeddings, tmp_path / "two", "--workers", "2") == 0
    for d in ("i2t", "t2i"):
        a, b = np.load(tmp_path / "one" / f"{d}_t.npy"), np.load(tmp_path / "two" / f"{d}_t.npy")
        assert a.dtype == np.int32 and np.array_equal(a, b)


def test_filters_are_applied_and_recorded(embeddings, tmp_path):
    assert _mine(embeddings, tmp_path / "plain") == 0
    assert _mine(embeddings, tmp_path / "range", "--range-min", "2") == 0
    meta = json.loads((tmp_path / "range" / "candidates_t.json").read_text())["meta"]
    assert meta["filters"]["config"]["range_min"] == 2
    assert meta["filters"]["removed"]["range_min"] == {"i2t": 40 * 2, "t2i": 200 * 2}
    plain = np.load(tmp_path / "plain" / "i2t_t.npy")
    skipped = np.load(tmp_path / "range" / "i2t_t.npy")
    assert skipped.shape == plain.shape
    assert np.array_equal(skipped[:, :18], plain[:, 2:])  # the same ranking, two ranks later
    assert _mine(embeddings, tmp_path / "rel", "--relative-margin", "0.3") == 0
    meta = json.loads((tmp_path / "rel" / "candidates_t.json").read_text())["meta"]
    removed = meta["filters"]["removed"]["relative_margin"]
    assert removed["i2t"] > 0 and removed["t2i"] > 0
    assert not np.array_equal(np.load(tmp_path / "rel" / "i2t_t.npy"), plain)


def test_filter_shortfall_and_backend_errors(embeddings, tmp_path, capsys):
    rc = _mine(embeddings, tmp_path / "x", "--absolute-margin", "2.5")  # removes everything
    assert rc == 2 and "fewer than" in capsys.readouterr().err
    assert not (tmp_path / "x" / "i2t_t.npy").exists()
    rc = _mine(embeddings, tmp_path / "y", "--backend", "faiss", "--workers", "2")
    assert rc == 2 and "torch" in capsys.readouterr().err
