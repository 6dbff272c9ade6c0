"""embed (streamed, L2-normalised embeddings) and mine-candidates (CLI end to end)."""
import json
import shutil

import numpy as np
import pytest

from cli.main import main
from pipeline.io import STAMP
from pipeline.checkpoint import checkpoint_hash, load_checkpoint
from pipeline.data.precomp import open_split
from pipeline.scoring import encode_gallery
from pipeline.mining import mine_reference
from pipeline.mining.candidates import dataset_name, load_candidates
from pipeline.mining.embed import (CAP_FILE, IMG_FILE, META_FILE, embed_split,
                                   encode_caption_range, encode_image_range)
from pipeline.mining.mine import MineConfig, mine_embeddings

N_IMG = 100  # tiny_data train split


@pytest.fixture(scope="module")
def emb_dir(ckpt, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "embeddings"
    embed_split(ckpt, tiny_data, "train", out, progress=False)
    return out


@pytest.fixture(scope="module")
def embs(emb_dir):
    return np.load(emb_dir / IMG_FILE), np.load(emb_dir / CAP_FILE)


def _one_line_error(capsys, *names):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert "Traceback" not in err
    for n in names:
        assert str(n) in err, err
    return err


# --------------------------------------------------------------------------- embed
def test_embed_matches_encode_split(ckpt, tiny_data, emb_dir, embs):
    img, cap = embs
    model, _ = load_checkpoint(ckpt)
    split = open_split(tiny_data, "train")
    ref_img, ref_cap = encode_gallery(model, split).rows()
    assert img.dtype == np.float32 and cap.dtype == np.float32
    assert img.shape == ref_img.shape == (N_IMG, 16) and cap.shape == ref_cap.shape == (5 * N_IMG, 16)
    np.testing.assert_allclose(img, ref_img, atol=1e-6, rtol=0)
    np.testing.assert_allclose(cap, ref_cap, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(cap, axis=1), 1.0, atol=1e-6)
    meta = json.loads((emb_dir / META_FILE).read_text())
    assert meta["checkpoint_hash"] == checkpoint_hash(ckpt)
    assert (meta["n_img"], meta["n_cap"], meta["dim"], meta["split"]) == (N_IMG, 5 * N_IMG, 16, "train")
    assert meta["model"] == "vsepp" and "seconds" not in meta   # tracked: no wall time
    assert sorted(p.name for p in emb_dir.iterdir()) == sorted([IMG_FILE, CAP_FILE, META_FILE])


def test_embed_streaming_and_ranges(ckpt, tiny_data, embs, tmp_path):
    img, cap = embs
    out = tmp_path / "small_blocks"
    embed_split(ckpt, tiny_data, "train", out, batch_size=4, block_rows=7, progress=False)
    np.testing.assert_allclose(np.load(out / IMG_FILE), img, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.load(out / CAP_FILE), cap, atol=1e-6, rtol=0)
    model, _ = load_checkpoint(ckpt)
    split = open_split(tiny_data, "train")
    np.testing.assert_allclose(encode_image_range(model, split, 13, 31, batch_size=5), img[13:31], atol=1e-6)
    np.testing.assert_allclose(encode_caption_range(model, split, 41, 97, batch_size=9),
                               cap[41:97], atol=1e-6)
    assert encode_image_range(model, split, 5, 5).shape == (0, 16)
    with pytest.raises(IndexError):
        encode_caption_range(model, split, 0, 5 * N_IMG + 1)


def test_embed_failure_leaves_previous_files(ckpt, tiny_data, tmp_path, monkeypatch):
    import pipeline.mining.embed as embed_mod

    out = tmp_path / "e"
    embed_split(ckpt, tiny_data, "train", out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return real(*a, **k)

    real = embed_mod.encode_caption_range
    monkeypatch.setattr(embed_mod, "encode_caption_range", boom)
    with pytest.raises(RuntimeError):
        embed_split(ckpt, tiny_data, "train", out, block_rows=50, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # no temp file, old set intact


def test_embed_cli(ckpt, tiny_data, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["embed", "--checkpoint", str(ckpt), "--data", str(tiny_data), "--out", str(out),
                 "--quiet"]) == 0
    assert "images (100, 16), captions (500, 16)" in capsys.readouterr().out
    assert (out / META_FILE).exists()
    missing = tmp_path / "nope"
    assert main(["embed", "--checkpoint", str(missing), "--data", str(tiny_data),
                 "--out", str(tmp_path / "e2"), "--quiet"]) == 2
    _one_line_error(capsys, missing)
    assert not (tmp_path / "e2").exists()


# --------------------------------------------------------------------------- mine
def _mine(args, capsys):
    rc = main(["mine-candidates", "--quiet", *args])
    return rc, capsys.readouterr()


def test_mine_cli_from_embeddings_equals_reference(emb_dir, embs, ckpt, tmp_path, capsys):
    out = tmp_path / "cands"
    rc, cap_out = _mine(["--img-embs", str(emb_dir / IMG_FILE), "--cap-embs", str(emb_dir / CAP_FILE),
                         "--out", str(out), "--name", "tiny", "--k-i2t", "30", "--k-t2i", "7"], capsys)
    assert rc == 0, cap_out.err
    assert "i2t (100, 30), t2i (500, 7)" in cap_out.out and "GFLOP/s" in cap_out.out
    ref = mine_reference(*embs, 30, 7)
    i2t, t2i = np.load(out / "i2t_tiny.npy"), np.load(out / "t2i_tiny.npy")
    assert i2t.dtype == np.int32 and t2i.dtype == np.int32
    np.testing.assert_array_equal(i2t, ref.i2t)
    np.testing.assert_array_equal(t2i, ref.t2i)
    loaded = load_candidates(out, "tiny", n_images=N_IMG)
    np.testing.assert_array_equal(np.asarray(loaded.i2t), ref.i2t)
    meta = json.loads((out / "candidates_tiny.json").read_text())["meta"]
    assert meta["checkpoint_hash"] == checkpoint_hash(ckpt)     # from embeddings.json
    assert meta["dim"] == 16 and meta["backend"] == "torch"
    assert meta["precision"] == "auto"   # as asked: what `auto` picked is in the timings
    assert meta["k"] == {"i2t": 30, "t2i": 7} and meta["k_requested"] == {"i2t": 30, "t2i": 7}
    assert meta["filters"] == {} and not {"created_at", "seconds", "stats"} & set(meta)
    timings = json.loads((tmp_path / "cands.timings.json").read_text())
    assert timings["command"] == "mine-candidates" and timings["host"] and timings["seconds"] >= 0
    assert timings["precision"] in ("bf16", "fp16", "fp32") and "tiles" in timings["stats"]
    assert sorted(p.name for p in out.iterdir() if p.name != STAMP) == sorted(    # the scratch folder is gone
        ["i2t_tiny.npy", "t2i_tiny.npy", "i2t_tiny.parquet", "t2i_tiny.parquet",
         "candidates_tiny.json"])


def _tree_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_identical_inputs_give_identical_bytes(ckpt, tiny_data, tmp_path, capsys):
    """DVC keeps the stages downstream cached only if a re-run writes the same bytes: embed
    and mine twice into the same folders (precision auto, which picks by timing) and compare
    every file, Parquet and JSON metadata included; times go to the untracked timings."""
    emb, out, summary = tmp_path / "emb", tmp_path / "cands", tmp_path / "mine.json"
    embed = ["embed", "--checkpoint", str(ckpt), "--data", str(tiny_data), "--out", str(emb),
             "--quiet"]
    mine = ["mine-candidates", "--quiet", "--embeddings-dir", str(emb), "--out", str(out),
            "--k-i2t", "30", "--k-t2i", "7", "--summary-json", str(summary)]
    runs = []
    for _ in range(2):
        assert main(embed) == 0 and main(mine) == 0, capsys.readouterr().err
        runs.append((_tree_bytes(emb), _tree_bytes(out), summary.read_bytes()))
    assert runs[0] == runs[1]
    assert {"embeddings.json", "img_embs.npy"} <= set(runs[0][0])
    assert sum(name.endswith(".parquet") for name in runs[0][1]) == 2
    assert "seconds" not in json.loads(summary.read_text())
    for name in ("emb", "cands"):
        assert json.loads((tmp_path / f"{name}.timings.json").read_text())["seconds"] >= 0
    assert "GFLOP/s" in capsys.readouterr().out      # the printed summary keeps its times


def test_mine_failure_leaves_nothing(emb_dir, tmp_path, capsys, monkeypatch):
    import pipeline.mining.candidates as candidates

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(candidates, "write_candidates", broken)
    out = tmp_path / "new" / "cands"
    # an OSError is one line and exit 2, never a traceback
    assert main(["mine-candidates", "--quiet", "--embeddings-dir", str(emb_dir), "--out", str(out),
                 "--name", "x", "--k-i2t", "5", "--k-t2i", "2"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()                   # neither outputs nor the scratch folder
    existing = tmp_path / "old"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    # a folder the command did not write is refused before any work, and left as it was
    assert main(["mine-candidates", "--quiet", "--embeddings-dir", str(emb_dir), "--out",
                 str(existing), "--name", "x", "--k-i2t", "5", "--k-t2i", "2"]) == 2
    assert "was not written by mine-candidates" in capsys.readouterr().err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("backend,extra", [("torch", ["--precision", "fp32"]),
                                           ("torch", ["--precision", "fp16", "--row-block", "16",
                                                      "--col-block", "64"]),
                                           ("faiss", ["--index", "flat"])])
def test_backends_identical_ids(emb_dir, embs, tmp_path, capsys, backend, extra):
    if backend == "faiss":
        pytest.importorskip("faiss")
    out = tmp_path / backend
    rc, res = _mine(["--embeddings-dir", str(emb_dir), "--out", str(out), "--backend", backend,
                     "--k-i2t", "25", "--k-t2i", "6", *extra], capsys)
    assert rc == 0, res.err
    name = dataset_name(json.loads((emb_dir / META_FILE).read_text())["data"])
    ref = mine_reference(*embs, 25, 6)
    np.testing.assert_array_equal(np.load(out / f"i2t_{name}.npy"), ref.i2t)
    np.testing.assert_array_equal(np.load(out / f"t2i_{name}.npy"), ref.t2i)


def test_mine_embeddings_api_dispatch(embs):
    img, cap = embs
    a = mine_embeddings(img, cap, MineConfig(k_i2t=12, k_t2i=4), progress=False)
    assert a.stats["backend"] == "torch"
    if pytest.importorskip("faiss"):
        b = mine_embeddings(img, cap, MineConfig(k_i2t=12, k_t2i=4, backend="faiss"), progress=False)
        np.testing.assert_array_equal(a.i2t, b.i2t)
        np.testing.assert_array_equal(a.t2i, b.t2i)


def test_k_capped(emb_dir, tmp_path, capsys):
    out = tmp_path / "capped"
    rc, res = _mine(["--embeddings-dir", str(emb_dir), "--out", str(out), "--name", "c",
                     "--k-i2t", "5000", "--k-t2i", "1000"], capsys)
    assert rc == 0, res.err
    assert "i2t 5000 -> 495" in res.out and "t2i 1000 -> 99" in res.out
    assert np.load(out / "i2t_c.npy").shape == (N_IMG, 5 * N_IMG - 5)
    assert np.load(out / "t2i_c.npy").shape == (5 * N_IMG, N_IMG - 1)
    meta = json.loads((out / "candidates_c.json").read_text())["meta"]
    assert meta["k_requested"] == {"i2t": 5000, "t2i": 1000} and meta["k"] == {"i2t": 495, "t2i": 99}


def test_mine_from_checkpoint_and_params(ckpt, tiny_data, embs, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("mine:\n  k_i2t: 10\n  k_t2i: 3\n  backend: torch\n  precision: auto\n")
    out = tmp_path / "from_ckpt"
    rc, res = _mine(["--checkpoint", str(ckpt), "--data", str(tiny_data), "--out", str(out),
                     "--params", str(params)], capsys)
    assert rc == 0, res.err
    name = dataset_name(tiny_data)
    assert (out / "embeddings" / IMG_FILE).exists()
    ref = mine_reference(*embs, 10, 3)
    np.testing.assert_array_equal(np.load(out / f"i2t_{name}.npy"), ref.i2t)
    np.testing.assert_array_equal(np.load(out / f"t2i_{name}.npy"), ref.t2i)
    meta = json.loads((out / f"candidates_{name}.json").read_text())["meta"]
    assert meta["checkpoint_hash"] == checkpoint_hash(ckpt) and meta["source"]["split"] == "train"
    # unknown params key -> one line naming the params file
    params.write_text("mine:\n  k_i2t: 10\n  kk: 3\n")
    rc, res = _mine(["--checkpoint", str(ckpt), "--data", str(tiny_data), "--out",
                     str(tmp_path / "x"), "--params", str(params)], capsys)
    assert rc == 2 and str(params) in res.err and res.err.strip().count("\n") == 0


def _write_bad(kind, folder, embs):
    img, cap = embs
    folder.mkdir()
    i, c = folder / "img.npy", folder / "cap.npy"
    np.save(i, img)
    np.save(c, cap)
    if kind == "missing_img":
        i.unlink()
        return i, c, i
    if kind == "wrong_rows":
        np.save(c, cap[:-5])
        return i, c, c
    if kind == "wrong_dim":
        np.save(c, cap[:, :8])
        return i, c, c
    if kind == "nan":
        bad = cap.copy()
        bad[17, 3] = np.nan
        np.save(c, bad)
        return i, c, c
    if kind == "3d":
        np.save(i, img.reshape(N_IMG, 4, 4))
        return i, c, i
    if kind == "int":
        np.save(i, (img * 100).astype(np.int64))
        return i, c, i
    if kind == "corrupt":
        i.write_bytes(b"this is not a numpy file at all")
        return i, c, i
    if kind == "truncated":
        data = c.read_bytes()
        c.write_bytes(data[: len(data) // 2])
        return i, c, c
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing_img", "wrong_rows", "wrong_dim", "nan", "3d", "int",
                                  "corrupt", "truncated"])
def test_bad_embeddings_one_line(kind, embs, tmp_path, capsys):
    i, c, culprit = _write_bad(kind, tmp_path / "in", embs)
    out = tmp_path / "out"
    rc, res = _mine(["--img-embs", str(i), "--cap-embs", str(c), "--out", str(out),
                     "--name", "bad", "--k-i2t", "5", "--k-t2i", "2"], capsys)
    assert rc == 2
    err = res.err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    assert str(culprit) in err, err
    assert not out.exists() or not any(out.iterdir())


def test_input_mode_errors(emb_dir, tmp_path, capsys):
    copy = tmp_path / "loose"
    copy.mkdir()
    shutil.copy(emb_dir / IMG_FILE, copy / "a.npy")
    shutil.copy(emb_dir / CAP_FILE, copy / "b.npy")
    for args in (["--img-embs", str(copy / "a.npy"), "--cap-embs", str(copy / "b.npy")],  # no name
                 ["--img-embs", str(copy / "a.npy")],                                     # half a pair
                 [],                                                                      # no input
                 ["--embeddings-dir", str(emb_dir), "--backend", "faiss", "--device", "tpu"]):
        rc, res = _mine([*args, "--out", str(tmp_path / "o")], capsys)
        assert rc == 2, args
        err = res.err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_bad_device_is_one_line_for_checkpoint_readers(ckpt, tiny_data, tmp_path, capsys):
    for args in (["evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_data)],
                 ["embed", "--checkpoint", str(ckpt), "--data", str(tiny_data),
                  "--out", str(tmp_path / "e")]):
        assert main([*args, "--device", "bogus"]) == 2, args
        _one_line_error(capsys, "bogus")
    assert not (tmp_path / "e").exists()
