"""`mine-candidates --rescore CKPT`: an exact independent shortlist re-ordered by a second
model, against a full-matrix reference; cross checkpoints refused where they cannot serve."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cli.main import main
from pipeline.checkpoint import checkpoint_hash, load_checkpoint
from pipeline.data.precomp import open_split
from pipeline.mining.candidates import load_candidates
from pipeline.mining.embed import CAP_FILE, IMG_FILE, embed_split
from pipeline.scoring import encode_gallery

N_IMG = 100
K1, K2, KP = 12, 4, 30


@pytest.fixture(scope="module")
def cross_ckpt(tiny_trained):
    return tiny_trained("bfan")


@pytest.fixture(scope="module")
def emb_dir(ckpt, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "embeddings"
    embed_split(ckpt, tiny_data, "train", out, progress=False)
    return out


def _reference(first: np.ndarray, second: np.ndarray, kp: int, k: int, axis: int) -> np.ndarray:
    """Per query (rows of `first`, or its columns when axis=0): the top kp by `first`
    (positives excluded, ties to the lower id), then the top k of those by `second`."""
    if axis == 0:
        first, second = first.T, second.T
    out = []
    for q in range(first.shape[0]):
        f = first[q].astype(np.float64).copy()
        own = np.arange(f.size) // 5 == q if axis == 1 else np.arange(f.size) == q // 5
        f[own] = -np.inf
        short = np.lexsort((np.arange(f.size), -f))[:kp]
        s2 = second[q, short].astype(np.float64)
        out.append(short[np.lexsort((short, -s2))][:k])
    return np.array(out, dtype=np.int32)


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert str(w) in err, err
    return err


def test_rescore_equals_a_full_matrix_reference(emb_dir, cross_ckpt, tiny_data, tmp_path, capsys):
    out = tmp_path / "cands"
    rc = main(["mine-candidates", "--quiet", "--embeddings-dir", str(emb_dir), "--out", str(out),
               "--k-i2t", str(K1), "--k-t2i", str(K2), "--rescore", str(cross_ckpt),
               "--rescore-k", str(KP)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "re-scored by bfan" in text.out
    img = np.load(emb_dir / IMG_FILE).astype(np.float64)
    cap = np.load(emb_dir / CAP_FILE).astype(np.float64)
    first = img @ cap.T
    model, _ = load_checkpoint(cross_ckpt)
    second = encode_gallery(model, open_split(tiny_data, "train")).matrix()
    kp2 = math.ceil(KP * K2 / K1)
    i2t, t2i = np.load(out / "i2t_synthetic.npy"), np.load(out / "t2i_synthetic.npy")
    np.testing.assert_array_equal(i2t, _reference(first, second, KP, K1, axis=1))
    np.testing.assert_array_equal(t2i, _reference(first, second, kp2, K2, axis=0))
    cands = load_candidates(out, "synthetic", n_images=N_IMG)
    meta = json.loads((out / "candidates_synthetic.json").read_text())["meta"]
    r = meta["rescore"]
    assert r["model"] == "bfan" and r["kind"] == "cross" and r["split"] == "train"
    assert r["checkpoint_hash"] == checkpoint_hash(cross_ckpt)
    assert r["shortlist"] == {"i2t": KP, "t2i": kp2}
    # the Parquet scores are the re-scorer's, in descending order
    import pyarrow.parquet as pq

    tab = pq.read_table(out / "i2t_synthetic.parquet")
    q, rank, score = (tab.column(c).to_numpy() for c in ("query", "rank", "score"))
    row0 = score[q == 0][np.argsort(rank[q == 0])]
    np.testing.assert_allclose(row0, second[0, i2t[0]], rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(row0) <= 0)
    assert np.asarray(cands.i2t).shape == (N_IMG, K1)


def test_rescore_with_filters_uses_the_rescorers_positives(emb_dir, cross_ckpt, tiny_data,
                                                           tmp_path, capsys, monkeypatch):
    """The filters after re-scoring see the re-scorer's scores and positive scores (not the
    embeddings'), and the shortlist holds the filters' headroom."""
    import pipeline.mining.filters as filters

    seen = {}
    real = filters.apply_filters

    def spy(knn, k1, k2, fcfg, *, pos_i2t, pos_t2i, **kw):
        seen.update(scores=knn.i2t_scores.copy(), ids=knn.i2t.copy(), pos_i2t=pos_i2t, pos_t2i=pos_t2i)
        return real(knn, k1, k2, fcfg, pos_i2t=pos_i2t, pos_t2i=pos_t2i, **kw)

    monkeypatch.setattr(filters, "apply_filters", spy)
    out = tmp_path / "cands"
    rc = main(["mine-candidates", "--quiet", "--embeddings-dir", str(emb_dir), "--out", str(out),
               "--k-i2t", str(K1), "--k-t2i", str(K2), "--rescore", str(cross_ckpt),
               "--range-min", "2"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "candidates_synthetic.json").read_text())["meta"]
    assert meta["rescore"]["shortlist"]["i2t"] >= 2 * (K1 + 2)     # default: 2 x (K + headroom)
    model, _ = load_checkpoint(cross_ckpt)
    gallery = encode_gallery(model, open_split(tiny_data, "train"))
    sims, pos = gallery.matrix(), gallery.positives().astype(np.float64)
    np.testing.assert_allclose(seen["pos_t2i"], pos, rtol=1e-6)
    np.testing.assert_allclose(seen["pos_i2t"], pos.reshape(-1, 5).mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(seen["scores"], np.take_along_axis(sims, seen["ids"].astype(np.int64), 1),
                               rtol=1e-5, atol=1e-6)
    # range-min 2 dropped the re-scorer's first two of every row
    i2t = np.load(out / "i2t_synthetic.npy")
    np.testing.assert_array_equal(i2t, seen["ids"][:, 2:2 + K1])


def test_cross_checkpoint_cannot_be_embedded(cross_ckpt, tiny_data, tmp_path, capsys):
    for cmd in (["embed", "--checkpoint", str(cross_ckpt), "--data", str(tiny_data),
                 "--out", str(tmp_path / "e")],
                ["mine-candidates", "--checkpoint", str(cross_ckpt), "--data", str(tiny_data),
                 "--out", str(tmp_path / "m")]):
        assert main([*cmd, "--quiet"]) == 2
        _one_line_error(capsys, cross_ckpt, "cannot be embedded", "--rescore")
        assert not (tmp_path / "e").exists() and not (tmp_path / "m").exists()


def test_rescore_bad_inputs(emb_dir, cross_ckpt, tiny_data, tmp_path, capsys):
    base = ["mine-candidates", "--quiet", "--embeddings-dir", str(emb_dir), "--out",
            str(tmp_path / "c"), "--k-i2t", str(K1), "--k-t2i", str(K2)]
    assert main([*base, "--rescore-k", "20"]) == 2
    _one_line_error(capsys, "--rescore-k", "--rescore")
    assert main([*base, "--rescore", str(cross_ckpt), "--rescore-k", "5"]) == 2
    _one_line_error(capsys, "--rescore-k", "below")
    assert main([*base, "--rescore", str(tmp_path / "nothing")]) == 2
    _one_line_error(capsys, "nothing")
    assert not (tmp_path / "c").exists()


def test_rescorer_split_must_match_the_embeddings(ckpt, cross_ckpt, tiny_data, tmp_path, capsys):
    """Embeddings of the dev split (25 images, no metadata) re-scored against --data's train split."""
    import shutil

    dev = tmp_path / "dev"
    embed_split(ckpt, tiny_data, "dev", dev, progress=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in (IMG_FILE, CAP_FILE):
        shutil.copy(dev / f, bare / f)
    rc = main(["mine-candidates", "--quiet", "--img-embs", str(bare / IMG_FILE), "--cap-embs",
               str(bare / CAP_FILE), "--data", str(tiny_data), "--out", str(tmp_path / "c"),
               "--k-i2t", "5", "--k-t2i", "2", "--rescore", str(cross_ckpt)])
    assert rc == 2
    _one_line_error(capsys, cross_ckpt, "100 images", "25 images")
    assert not (tmp_path / "c").exists()
