"""Offline candidate files: write/load round trip, validation, import of AOQ files, CLI."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import pipeline.mining.candidates as C
from cli.import_candidates import import_candidates as import_cmd
from pipeline.errors import InputError
from pipeline.mining.candidates import (Candidates, dataset_name, import_candidates, load_candidates,
                                        validate_candidates, write_candidates)

META = {"checkpoint_sha256": "ab" * 32, "D": 8, "k_i2t": 12, "k_t2i": 6, "backend": "numpy",
        "precision": "fp32", "filters": [], "created_at": "2026-01-01T00:00:00Z"}


def brute_force(n_img=20, d=8, k_i2t=12, k_t2i=6, seed=0) -> Candidates:
    """Exact top-K of both directions on random embeddings, positives excluded."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_img, d))
    cap = rng.standard_normal((5 * n_img, d))
    S = img @ cap.T                                  # (N_img, 5 N_img) float64
    j = np.arange(5 * n_img)
    S_i2t = S.copy()
    S_i2t[j // 5, j] = -np.inf
    S_t2i = S.T.copy()
    S_t2i[j, j // 5] = -np.inf
    i2t = np.argsort(-S_i2t, axis=1, kind="stable")[:, :k_i2t]
    t2i = np.argsort(-S_t2i, axis=1, kind="stable")[:, :k_t2i]
    return Candidates(
        i2t=i2t.astype(np.int32), t2i=t2i.astype(np.int32),
        i2t_scores=np.take_along_axis(S_i2t, i2t, 1).astype(np.float32),
        t2i_scores=np.take_along_axis(S_t2i, t2i, 1).astype(np.float32))


@pytest.fixture
def cands():
    return brute_force()


def _raises(c, match, source="i2t", **kw):
    with pytest.raises(InputError) as ei:
        validate_candidates(c, source_i2t="I2T_FILE", source_t2i="T2I_FILE", **kw)
    assert ei.value.source == {"i2t": "I2T_FILE", "t2i": "T2I_FILE"}[source]
    assert match in ei.value.problem, ei.value.problem
    return ei.value


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize("path,want", [("coco_precomp", "coco"), ("f30k_precomp", "f30k"),
                                       ("artifacts/data", "data"), ("data/coco_precomp/", "coco"),
                                       ("/x/f30k", "f30k")])
def test_dataset_name(path, want, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths must not meet a real artifacts/data here
    assert dataset_name(path) == want


def test_dataset_name_from_prepared_folder(tmp_path):
    """A folder written by prepare-data names its content in dataset.json."""
    syn, real = tmp_path / "data_a", tmp_path / "data_b"
    syn.mkdir()
    real.mkdir()
    (syn / "dataset.json").write_text(json.dumps({"dataset": "synthetic", "config": {}}))
    (real / "dataset.json").write_text(json.dumps({"dataset": "precomp",
                                                   "source": "/data/coco_precomp"}))
    assert dataset_name(syn) == "synthetic"
    assert dataset_name(real) == "coco"


# ----------------------------------------------------------------------------- round trip
def test_round_trip(tmp_path, cands):
    paths = write_candidates(tmp_path / "out", "coco", cands, META)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["i2t_coco.npy", "t2i_coco.npy", "i2t_coco.parquet", "t2i_coco.parquet", "candidates_coco.json"])
    assert set(paths) == {"i2t_npy", "t2i_npy", "i2t_parquet", "t2i_parquet", "summary"}

    # AOQ format: exactly what np.save writes for a C-order int32 array
    for key, arr in (("i2t_npy", cands.i2t), ("t2i_npy", cands.t2i)):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr, dtype=np.int32))
        assert paths[key].read_bytes() == buf.getvalue()
        raw = np.load(paths[key])
        assert raw.dtype == np.int32 and raw.flags.c_contiguous

    # Parquet: long form, metadata
    t = pq.read_table(paths["i2t_parquet"])
    assert t.schema.names == ["query", "rank", "candidate", "score"]
    assert [str(f.type) for f in t.schema] == ["int32", "int32", "int32", "float"]
    assert t.num_rows == 20 * 12
    q, r, cnd, s = (t.column(n).to_numpy() for n in t.schema.names)
    np.testing.assert_array_equal(cnd.reshape(20, 12), cands.i2t)
    np.testing.assert_array_equal(q.reshape(20, 12), np.repeat(np.arange(20), 12).reshape(20, 12))
    np.testing.assert_array_equal(r.reshape(20, 12)[3], np.arange(12))
    np.testing.assert_array_equal(s.reshape(20, 12), cands.i2t_scores)
    md = json.loads(pq.read_metadata(paths["t2i_parquet"]).metadata[b"itm_pipeline"])
    assert md == {**META, "direction": "t2i", "k": 6, "n_queries": 100, "format_version": 1}

    summary = json.loads(paths["summary"].read_text())
    assert summary["meta"] == META and summary["i2t"]["shape"] == [20, 12]
    assert summary["t2i"]["scores"]["rank_0"]["max"] == pytest.approx(float(cands.t2i_scores[:, 0].max()))
    assert summary["files"]["i2t_npy"] == "i2t_coco.npy"

    got = load_candidates(tmp_path / "out")          # name inferred
    assert isinstance(got.i2t, np.memmap) and isinstance(got.t2i, np.memmap)
    np.testing.assert_array_equal(got.i2t, cands.i2t)
    np.testing.assert_array_equal(got.t2i, cands.t2i)
    np.testing.assert_array_equal(got.i2t_scores, cands.i2t_scores)
    np.testing.assert_array_equal(got.t2i_scores, cands.t2i_scores)
    assert got.meta == META
    assert (got.n_images, got.n_captions, got.k_i2t, got.k_t2i) == (20, 100, 12, 6)

    eager = load_candidates(tmp_path / "out", "coco", mmap=False, check="sample", n_images=20)
    assert not isinstance(eager.i2t, np.memmap)


def test_small_row_groups_and_no_scores(tmp_path, cands, monkeypatch):
    monkeypatch.setattr(C, "ROW_GROUP_ROWS", 50)
    c = Candidates(cands.i2t, cands.t2i)
    paths = write_candidates(tmp_path, "f30k", c, {"x": 1})
    md = pq.read_metadata(paths["t2i_parquet"])
    assert md.num_row_groups > 1 and max(md.row_group(i).num_rows for i in range(md.num_row_groups)) <= 50
    assert pq.read_table(paths["i2t_parquet"]).column("score").null_count == 20 * 12
    got = load_candidates(tmp_path, "f30k")
    assert got.i2t_scores is None and got.t2i_scores is None and got.meta == {"x": 1}


def test_load_errors(tmp_path, cands):
    with pytest.raises(InputError, match="no candidate set found"):
        load_candidates(tmp_path)
    write_candidates(tmp_path, "a", cands, {})
    write_candidates(tmp_path, "b", cands, {})
    with pytest.raises(InputError, match="several candidate sets"):
        load_candidates(tmp_path)
    with pytest.raises(InputError) as ei:
        load_candidates(tmp_path, "a", n_images=50)
    assert ei.value.source.endswith("i2t_a.npy")
    assert "has 20 rows but the training split has 50 images" in ei.value.problem
    # parquet from another run
    other = brute_force(k_i2t=11)
    write_candidates(tmp_path / "o", "a", other, {})
    (tmp_path / "o" / "i2t_a.parquet").replace(tmp_path / "i2t_a.parquet")
    with pytest.raises(InputError) as ei:
        load_candidates(tmp_path, "a")
    assert ei.value.source.endswith("i2t_a.parquet") and "not from the same run" in ei.value.problem


# ----------------------------------------------------------------------------- validation
def test_valid_passes(cands):
    validate_candidates(cands, n_images=20)
    validate_candidates(cands, check="sample")


def test_not_2d(cands):
    cands.t2i = cands.t2i.reshape(-1)
    _raises(cands, "expected a 2-D array", source="t2i")


def test_dtype_int64(cands):
    cands.i2t = cands.i2t.astype(np.int64)
    e = _raises(cands, "int64")
    assert "convert it with itm-pipeline import-candidates" in e.problem


def test_t2i_rows_not_5x(cands):
    cands.t2i = cands.t2i[:-5]
    _raises(cands, "has 95 rows but the i2t file has 20 rows", source="t2i")


def test_rows_not_n_images(cands):
    _raises(cands, "has 20 rows but the training split has 5000 images", n_images=5000)


def test_id_out_of_range(cands):
    cands.t2i[17, 2] = 20
    _raises(cands, "row 17 has image id 20 (rank 2) out of range [0, 20)", source="t2i")
    cands.t2i[17, 2] = 0
    cands.i2t = cands.i2t.copy()
    cands.i2t[4, 0] = -1
    _raises(cands, "row 4 has caption id -1")


def test_positive_present(cands):
    cands.i2t[7, 3] = 36                      # caption 36 belongs to image 7
    _raises(cands, "row 7 contains a positive: caption 36 (rank 3)")
    c = brute_force()
    c.t2i[42, 0] = 8                          # caption 42 belongs to image 8
    _raises(c, "row 42 contains a positive: image 8", source="t2i")


def test_duplicate_ids(cands):
    cands.t2i[63, 5] = cands.t2i[63, 1]
    _raises(cands, f"row 63 lists image id {cands.t2i[63, 1]} more than once", source="t2i")


def test_k_too_large():
    c = brute_force(n_img=4, k_i2t=15, k_t2i=3)
    c.t2i = np.concatenate([c.t2i, c.t2i[:, :1]], axis=1)
    _raises(c, "K = 4 candidates per row, but only 3 images remain", source="t2i")


def test_scores_shape_mismatch(cands):
    cands.i2t_scores = cands.i2t_scores[:, :-1]
    _raises(cands, "i2t scores have shape (20, 11)")


def test_scores_non_finite(cands):
    cands.t2i_scores[9, 4] = np.nan
    _raises(cands, "row 9 has a non-finite score", source="t2i")


def test_scores_not_sorted(cands):
    cands.i2t_scores[17, 5] = cands.i2t_scores[17, 4] + 1
    _raises(cands, "row 17 is not sorted by descending score")


def test_errors_on_load_name_the_file_and_row(tmp_path, cands):
    write_candidates(tmp_path, "coco", cands, {})
    bad = np.load(tmp_path / "t2i_coco.npy")
    bad[31, 0] = 6                            # caption 31's own image
    np.save(tmp_path / "t2i_coco.npy", bad)
    with pytest.raises(InputError) as ei:
        load_candidates(tmp_path, "coco")
    assert ei.value.source == str(tmp_path / "t2i_coco.npy") and "row 31" in ei.value.problem
    np.save(tmp_path / "t2i_coco.npy", np.load(tmp_path / "t2i_coco.npy").astype(np.int64))
    with pytest.raises(InputError, match="int64: convert it"):
        load_candidates(tmp_path, "coco")


def test_full_check_in_chunks_memmap(tmp_path, cands, monkeypatch):
    write_candidates(tmp_path, "coco", cands, {})
    monkeypatch.setattr(C, "_CHUNK_BYTES", 100)   # a few rows per chunk
    arr = np.load(tmp_path / "i2t_coco.npy")
    arr[19, 11] = arr[19, 0]
    np.save(tmp_path / "i2t_coco.npy", arr)
    seen = []
    orig = C._check_ids_block
    monkeypatch.setattr(C, "_check_ids_block", lambda b, *a: (seen.append(len(b)), orig(b, *a)))
    with pytest.raises(InputError, match="row 19 lists caption id"):
        load_candidates(tmp_path, "coco", check="full")
    assert len(seen) > 3 and max(seen) < 20        # never the whole array at once


# ----------------------------------------------------------------------------- atomicity
def test_write_is_all_or_nothing(tmp_path, cands, monkeypatch):
    out = tmp_path / "out"
    write_candidates(out, "coco", cands, {"run": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class Boom(RuntimeError):
        pass

    calls = {"n": 0}
    real = C.pq.ParquetWriter

    class FailingWriter(real):
        def write_table(self, *a, **k):
            calls["n"] += 1
            if calls["n"] >= 3:
                raise Boom("disk full")
            return super().write_table(*a, **k)

    monkeypatch.setattr(C, "ROW_GROUP_ROWS", 64)
    monkeypatch.setattr(C.pq, "ParquetWriter", FailingWriter)
    new = brute_force(seed=1)
    with pytest.raises(Boom):
        write_candidates(out, "coco", new, {"run": 2})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # intact, no temp files
    with pytest.raises(Boom):
        write_candidates(tmp_path / "fresh", "coco", new, {"run": 2})
    assert list((tmp_path / "fresh").iterdir()) == []
    monkeypatch.setattr(C.pq, "ParquetWriter", real)
    assert load_candidates(out).meta == {"run": 1}


# ----------------------------------------------------------------------------- import
def test_import_int64_and_float(tmp_path, cands):
    src = tmp_path / "pub"
    src.mkdir()
    np.save(src / "i2t_coco.npy", cands.i2t.astype(np.int64))
    np.save(src / "t2i_coco.npy", cands.t2i.astype(np.float64))
    paths = import_candidates(src / "i2t_coco.npy", src / "t2i_coco.npy", tmp_path / "out", "coco",
                              n_images=20, meta={"note": "AOQ release"})
    assert np.load(paths["i2t_npy"]).dtype == np.int32
    got = load_candidates(tmp_path / "out")
    np.testing.assert_array_equal(got.i2t, cands.i2t)
    np.testing.assert_array_equal(got.t2i, cands.t2i)
    assert got.i2t_scores is None and got.t2i_scores is None
    assert got.meta["imported_from"]["i2t_dtype"] == "int64" and got.meta["note"] == "AOQ release"
    assert pq.read_table(paths["t2i_parquet"]).column("score").null_count == 100 * 6


def test_import_range_checked_before_cast(tmp_path, cands):
    i2t = cands.i2t.astype(np.int64)
    i2t[3, 2] = 2**32 + 7                     # would wrap to a valid id if cast first
    np.save(tmp_path / "i2t_x.npy", i2t)
    np.save(tmp_path / "t2i_x.npy", cands.t2i)
    with pytest.raises(InputError) as ei:
        import_candidates(tmp_path / "i2t_x.npy", tmp_path / "t2i_x.npy", tmp_path / "out", "x")
    assert ei.value.source == str(tmp_path / "i2t_x.npy") and "row 3 has caption id 4294967303" in ei.value.problem
    t2i = cands.t2i.astype(np.float32)
    t2i[5, 1] = 2.5
    np.save(tmp_path / "i2t_x.npy", cands.i2t)
    np.save(tmp_path / "t2i_x.npy", t2i)
    with pytest.raises(InputError, match="row 5 has a non-integer id 2.5"):
        import_candidates(tmp_path / "i2t_x.npy", tmp_path / "t2i_x.npy", tmp_path / "out", "x")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- CLI
def _pub(tmp_path, cands, name="f30k"):
    src = tmp_path / "pub"
    src.mkdir(exist_ok=True)
    np.save(src / f"i2t_{name}.npy", cands.i2t.astype(np.int64))
    np.save(src / f"t2i_{name}.npy", cands.t2i.astype(np.int64))
    return src / f"i2t_{name}.npy", src / f"t2i_{name}.npy"


def test_cli_import(tmp_path, cands):
    i2t, t2i = _pub(tmp_path, cands)
    data = tmp_path / "f30k_precomp"
    data.mkdir()
    np.save(data / "train_ims.npy", np.zeros((20, 2, 3), np.float32))
    res = CliRunner().invoke(import_cmd, ["--i2t", str(i2t), "--t2i", str(t2i), "--out", str(tmp_path / "out"),
                                          "--data", str(data)])
    assert res.exit_code == 0, res.output
    assert "imported 'f30k': 20 images, 100 captions" in res.output and "int64 -> int32" in res.output
    got = load_candidates(tmp_path / "out", "f30k", n_images=20)
    np.testing.assert_array_equal(got.i2t, cands.i2t)
    assert got.meta["n_images_checked_against"] == 20


def test_cli_errors(tmp_path, cands):
    i2t, t2i = _pub(tmp_path, cands)
    run = CliRunner().invoke
    res = run(import_cmd, ["--i2t", str(i2t), "--t2i", str(t2i), "--out", str(tmp_path / "o"), "--n-images", "50"])
    assert isinstance(res.exception, InputError) and res.exception.source == str(i2t)
    assert "training split has 50 images" in res.exception.problem
    np.save(tmp_path / "pub" / "i2t_other.npy", cands.i2t)
    res = run(import_cmd, ["--i2t", str(tmp_path / "pub" / "i2t_other.npy"), "--t2i", str(t2i),
                           "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, InputError) and "pass --name" in res.exception.problem
    (tmp_path / "pub" / "t2i_bad.npy").write_bytes(b"not an npy file")
    res = run(import_cmd, ["--i2t", str(i2t), "--t2i", str(tmp_path / "pub" / "t2i_bad.npy"),
                           "--out", str(tmp_path / "o"), "--name", "f30k"])
    assert isinstance(res.exception, InputError) and res.exception.source.endswith("t2i_bad.npy")
    res = run(import_cmd, ["--i2t", str(i2t), "--t2i", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, InputError)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- issue 19.7
def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _retype(path, column, make, **write_kw):
    """Rewrite a Parquet candidate file with `column` replaced by make(old column), metadata kept."""
    import pyarrow as pa

    t = pq.read_table(path)
    new = make(t.column(column))
    t = t.set_column(t.schema.get_field_index(column), pa.field(column, new.type), new)
    pq.write_table(t.replace_schema_metadata(pq.read_schema(path).metadata), path, **write_kw)


_NULL_FIRST = lambda c: __import__("pyarrow").array([None] + c.to_pylist()[1:], "int32")  # noqa: E731


@pytest.mark.parametrize("column,make,found,stats", [
    ("score", lambda c: c.cast("string"), "type string", True),
    ("score", lambda c: c.cast("float64").cast("int64", safe=False), "type int64", True),
    ("candidate", lambda c: c.cast("float64"), "type double", True),
    ("query", lambda c: c.cast("float32"), "type float", True),
    ("candidate", _NULL_FIRST, "is null in 1 rows", True),     # from the row-group statistics
    ("candidate", _NULL_FIRST, "is null in 1 rows", False),    # counted by the full check
])
def test_parquet_column_types_through_the_cli(tmp_path, cands, capsys, column, make, found, stats):
    """String scores, float ids (accepted before: numpy converted them) and null ids are one
    line naming the file, the column and what it holds; nothing is written."""
    from cli.main import main

    folder = tmp_path / "cands"
    paths = write_candidates(folder, "coco", cands, META)
    _retype(paths["i2t_parquet"], column, make, write_statistics=stats)
    before = _tree(tmp_path)
    assert main(["candidates-report", str(folder), "--out", str(tmp_path / "report")]) == 2
    err = _one_line(capsys)
    assert f"{paths['i2t_parquet']}: column {column!r}" in err and found in err, err
    assert _tree(tmp_path) == before


def test_parquet_float64_scores_and_int64_ids_are_fine(tmp_path, cands):
    paths = write_candidates(tmp_path, "coco", cands, META)
    _retype(paths["i2t_parquet"], "score", lambda c: c.cast("float64"))
    _retype(paths["i2t_parquet"], "candidate", lambda c: c.cast("int64"))
    got = load_candidates(tmp_path, "coco")
    np.testing.assert_array_equal(got.i2t_scores, cands.i2t_scores)


def _with_test_split_like_train(tiny_data, root):
    """tiny_data with a `test` split holding as many images as `train` (a copy of it)."""
    import shutil

    data = root / "data"
    shutil.copytree(tiny_data, data)
    for f in data.glob("train_*"):
        shutil.copy(f, data / f.name.replace("train_", "test_", 1))
    return data


def test_candidates_of_another_split_are_refused_by_finetune(ckpt, tiny_data, tmp_path, capsys):
    """Mined on `test` (as many rows as train, so the row count check passes): finetune
    names the metadata file, the split recorded and the one it trains on; nothing written."""
    from cli.main import main

    data = _with_test_split_like_train(tiny_data, tmp_path)
    cands = tmp_path / "cands"
    assert main(["mine-candidates", "--quiet", "--checkpoint", str(ckpt), "--data", str(data),
                 "--split", "test", "--k-i2t", "10", "--k-t2i", "3", "--out", str(cands)]) == 0
    capsys.readouterr()
    before = _tree(tmp_path)
    out = tmp_path / "run"
    assert main(["finetune", "--quiet", "--model", "vsepp", "--init", str(ckpt), "--data", str(data),
                 "--candidates", str(cands), "--epochs", "1", "--batch-size", "16",
                 "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert f"{cands / 'candidates_synthetic.json'}: the candidates were mined on split 'test', " \
           "expected 'train'" in err, err
    assert _tree(tmp_path) == before and not out.exists()


def test_checkpoint_provenance(tmp_path, cands):
    """The weights' sha256 recorded at mining is compared (a path may move); a set that does
    not record it (imported from AOQ's release) passes any expectation."""
    h, other = "ab" * 32, "cd" * 32
    meta = {"checkpoint_hash": h, "source": {"split": "train", "checkpoint": "artifacts/base/checkpoint"}}
    paths = write_candidates(tmp_path / "m", "coco", cands, meta)
    assert load_candidates(tmp_path / "m", split="train", checkpoint_hash=h).meta == meta
    with pytest.raises(InputError) as ei:
        load_candidates(tmp_path / "m", split="train", checkpoint_hash=other)
    assert ei.value.source == str(paths["summary"])
    assert h in ei.value.problem and other in ei.value.problem and "artifacts/base/checkpoint" in ei.value.problem
    paths["summary"].unlink()                  # the Parquet metadata says the same
    with pytest.raises(InputError, match="mined on split 'train', expected 'dev'") as ei:
        load_candidates(tmp_path / "m", split="dev")
    assert ei.value.source == str(paths["i2t_parquet"])
    src = tmp_path / "pub"
    src.mkdir()
    np.save(src / "i2t_coco.npy", cands.i2t.astype(np.int64))
    np.save(src / "t2i_coco.npy", cands.t2i.astype(np.int64))
    import_candidates(src / "i2t_coco.npy", src / "t2i_coco.npy", tmp_path / "imp", "coco", n_images=20)
    load_candidates(tmp_path / "imp", split="train", checkpoint_hash=other)   # nothing recorded
