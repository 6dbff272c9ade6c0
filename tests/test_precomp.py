"""SCAN precomp readers: layouts (npy, h5, 5x rows, ids, precaps) and bad inputs."""
from __future__ import annotations

import json
import pickle

import h5py
import numpy as np
import pytest

from pipeline.data.precomp import PrecompSplit, open_split
from pipeline.data.vocab import find_vocab
from pipeline.errors import InputError

N_IMG, R, F = 6, 36, 8
WORDS = ["dog", "cat", "red", "blue", "man", "table", "grass", "ball"]


def captions(n_img: int) -> list[str]:
    rng = np.random.default_rng(1)
    return [f"A {rng.choice(WORDS)} {rng.choice(WORDS)} on the {rng.choice(WORDS)}."
            for _ in range(5 * n_img)]


def make_precomp(root, split="train", *, n_img=N_IMG, storage="npy", repeat=False, ids=False,
                 precaps=False, feats=None):
    """A tiny precomp folder; returns (data_dir, features array as written)."""
    root.mkdir(parents=True, exist_ok=True)
    if feats is None:
        feats = np.random.default_rng(0).standard_normal((n_img, R, F)).astype(np.float32)
    written = np.repeat(feats, 5, axis=0) if repeat else feats
    if storage == "npy":
        np.save(root / f"{split}_ims.npy", written)
    else:
        with h5py.File(root / f"{split}.h5", "w") as f:
            f.create_dataset("feat", data=written, chunks=(1,) + written.shape[1:])
    if precaps:
        lines = [",".join(str(4 + (k + i) % 7) for i in range(3 + k % 4)) for k in range(5 * n_img)]
        (root / f"{split}_precaps.txt").write_text("\n".join(lines) + "\n")
    else:
        (root / f"{split}_caps.txt").write_text("\n".join(captions(n_img)) + "\n")
    if ids:
        (root / f"{split}_ids.txt").write_text("\n".join(str(100 + i) for i in range(n_img)) + "\n")
    return root, written


def raises_input_error(path_fragment: str, *fragments: str):
    """Context manager: InputError whose message names the file and contains `fragments`."""
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(InputError)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.cm.__exit__(*exc)
            msg = str(self.info.value)
            assert path_fragment in msg, msg
            assert "\n" not in msg
            for frag in fragments:
                assert frag in msg, msg
            return handled
    return _Ctx()


# -- layouts -------------------------------------------------------------------------------
def test_npy_is_memmapped_and_rows_match(tmp_path):
    d, raw = make_precomp(tmp_path / "p")
    sp = open_split(d, "train")
    assert isinstance(sp, PrecompSplit)
    assert isinstance(sp.features, np.memmap)
    assert (sp.n_images, sp.n_captions, sp.n_regions, sp.feature_dim) == (N_IMG, 30, R, F)
    assert sp.rows_per_image == 1 and sp.storage == "npy" and sp.ids is None and sp.precaps is None
    assert sp.captions_path.name == "train_caps.txt" and len(sp.captions) == 30
    x = sp.image_features(4)
    assert x.dtype == np.float32 and not isinstance(x, np.memmap) and x.flags.writeable
    np.testing.assert_array_equal(x, raw[4])
    idx = np.array([5, 0, 3, 3])
    np.testing.assert_array_equal(sp.image_rows(idx), raw[idx])
    with pytest.raises(IndexError):
        sp.image_features(N_IMG)


def test_h5_variant(tmp_path):
    d, raw = make_precomp(tmp_path / "p", "dev", storage="h5", ids=True)
    sp = open_split(d, "dev", expected_dim=F)
    assert isinstance(sp.features, h5py.Dataset) and sp.storage == "h5"
    assert sp.ids == [str(100 + i) for i in range(N_IMG)]
    np.testing.assert_array_equal(sp.image_features(2), raw[2])
    idx = np.array([4, 1, 1, 0])
    np.testing.assert_array_equal(sp.image_rows(idx), raw[idx])
    sp.close()


@pytest.mark.parametrize("storage", ["npy", "h5"])
def test_repeated_rows(tmp_path, storage):
    base = np.random.default_rng(3).standard_normal((N_IMG, R, F)).astype(np.float32)
    d, _ = make_precomp(tmp_path / "p", "test", storage=storage, repeat=True, feats=base)
    sp = open_split(d, "test")
    assert sp.rows_per_image == 5 and sp.n_images == N_IMG and sp.n_captions == 30
    np.testing.assert_array_equal(sp.image_features(3), base[3])
    np.testing.assert_array_equal(sp.image_rows([5, 2]), base[[5, 2]])


def test_ids_one_per_row_with_repeated_rows(tmp_path):
    d, _ = make_precomp(tmp_path / "p", repeat=True)
    (d / "train_ids.txt").write_text("\n".join(str(i // 5) for i in range(30)) + "\n")
    assert open_split(d, "train").ids == [str(i) for i in range(N_IMG)]


def test_precaps_source(tmp_path):
    d, _ = make_precomp(tmp_path / "p", precaps=True)
    sp = open_split(d, "train")
    assert sp.captions is None and sp.captions_path.name == "train_precaps.txt"
    assert len(sp.precaps) == 30 and sp.precaps[0] == [4, 5, 6]


def test_caps_preferred_and_crlf_trailing_blank_ok(tmp_path):
    d, _ = make_precomp(tmp_path / "p", precaps=True)
    (d / "train_caps.txt").write_bytes(("\r\n".join(captions(N_IMG)) + "\r\n\r\n").encode())
    sp = open_split(d, "train")
    assert sp.precaps is None and sp.captions == captions(N_IMG)


def test_pickle_drops_array_and_reopens(tmp_path):
    d, raw = make_precomp(tmp_path / "p", storage="h5")
    sp = open_split(d, "train")
    blob = pickle.dumps(sp)
    assert len(blob) < raw.nbytes
    sp2 = pickle.loads(blob)
    np.testing.assert_array_equal(sp2.image_features(1), raw[1])


# -- bad inputs ----------------------------------------------------------------------------
def test_missing_features(tmp_path):
    d, _ = make_precomp(tmp_path / "p")
    with raises_input_error("dev_ims.npy", "dev.h5", "not found"):
        open_split(d, "dev")


def test_missing_folder(tmp_path):
    with raises_input_error("nope", "not found"):
        open_split(tmp_path / "nope", "train")


def test_four_captions_per_image(tmp_path):
    d, _ = make_precomp(tmp_path / "p")
    (d / "train_caps.txt").write_text("\n".join(captions(N_IMG)[:24]) + "\n")
    with raises_input_error("train_caps.txt", "24 captions for 6 images", "expected 5 per image (30)"):
        open_split(d, "train")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mode", ["full", "sample", "auto"])
def test_nonfinite_features(tmp_path, bad, mode):
    feats = np.ones((N_IMG, R, F), np.float32)
    feats[3, 7, 2] = bad
    feats[5, 0, 0] = bad
    d, _ = make_precomp(tmp_path / "p", feats=feats)
    with raises_input_error("train_ims.npy", "row 3 has NaN/inf values"):
        open_split(d, "train", check_finite=mode)


def test_nonfinite_h5_and_lazy_check(tmp_path):
    feats = np.ones((N_IMG, R, F), np.float32)
    feats[2, 1, 1] = np.nan
    d, _ = make_precomp(tmp_path / "p", storage="h5", feats=feats)
    with raises_input_error("train.h5", "row 2 has NaN/inf values"):
        open_split(d, "train", check_finite="full")
    sp = open_split(d, "train", check_finite="none")
    sp.image_features(1)
    with raises_input_error("train.h5", "row 2"):
        sp.image_features(2)
    with raises_input_error("train.h5", "row 2"):
        sp.image_rows([0, 2])


def test_bad_check_finite_mode(tmp_path):
    d, _ = make_precomp(tmp_path / "p")
    with raises_input_error("check_finite", "full"):
        open_split(d, "train", check_finite="fast")


@pytest.mark.parametrize("shape", [(N_IMG, R * F), (N_IMG, R, F, 1), (N_IMG,)])
def test_wrong_rank(tmp_path, shape):
    d, _ = make_precomp(tmp_path / "p")
    np.save(d / "train_ims.npy", np.zeros(shape, np.float32))
    with raises_input_error("train_ims.npy", "expected (N_images, regions, features)", str(shape)):
        open_split(d, "train")


def test_wrong_rank_h5(tmp_path):
    d, _ = make_precomp(tmp_path / "p", storage="h5")
    with h5py.File(d / "train.h5", "w") as f:
        f.create_dataset("feat", data=np.zeros((N_IMG, R * F), np.float32))
    with raises_input_error("train.h5", "got shape"):
        open_split(d, "train")


def test_wrong_width(tmp_path):
    d, _ = make_precomp(tmp_path / "p")
    with raises_input_error("train_ims.npy", f"width is {F}", "expected 2048"):
        open_split(d, "train", expected_dim=2048)


def test_integer_dtype(tmp_path):
    d, _ = make_precomp(tmp_path / "p")
    np.save(d / "train_ims.npy", np.zeros((N_IMG, R, F), np.int32))
    with raises_input_error("train_ims.npy", "floating point", "int32"):
        open_split(d, "train")


def test_corrupt_npy_random_bytes(tmp_path):
    d, _ = make_precomp(tmp_path / "p")
    (d / "train_ims.npy").write_bytes(np.random.default_rng(0).bytes(5000))
    with raises_input_error("train_ims.npy", ".npy"):
        open_split(d, "train")


@pytest.mark.parametrize("keep", [0, 6, 100, 2000])
def test_truncated_npy(tmp_path, keep):
    d, _ = make_precomp(tmp_path / "p")
    p = d / "train_ims.npy"
    p.write_bytes(p.read_bytes()[:keep])
    with raises_input_error("train_ims.npy", ".npy"):
        open_split(d, "train")


def test_corrupt_h5(tmp_path):
    d, _ = make_precomp(tmp_path / "p", storage="h5")
    (d / "train.h5").write_bytes(b"\x89HDF\r\n" + bytes(300))
    with raises_input_error("train.h5", "unreadable HDF5"):
        open_split(d, "train")


def test_h5_without_feat(tmp_path):
    d, _ = make_precomp(tmp_path / "p", storage="h5")
    with h5py.File(d / "train.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((N_IMG, R, F), np.float32))
    with raises_input_error("train.h5", "no dataset 'feat'", "features"):
        open_split(d, "train")


def test_empty_caption_line(tmp_path):
    d, _ = make_precomp(tmp_path / "p")
    caps = captions(N_IMG)
    caps[16] = "   "
    (d / "train_caps.txt").write_text("\n".join(caps) + "\n")
    with raises_input_error("train_caps.txt", "line 17 is empty"):
        open_split(d, "train")


def test_missing_caption_file(tmp_path):
    d, _ = make_precomp(tmp_path / "p")
    (d / "train_caps.txt").unlink()
    with raises_input_error("train_caps.txt", "not found", "train_precaps.txt"):
        open_split(d, "train")


def test_non_utf8_captions(tmp_path):
    d, _ = make_precomp(tmp_path / "p")
    caps = [c.encode() for c in captions(N_IMG)]
    caps[2] = b"a caf\xe9 table"
    (d / "train_caps.txt").write_bytes(b"\n".join(caps) + b"\n")
    with raises_input_error("train_caps.txt", "not UTF-8", "line 3"):
        open_split(d, "train")


def test_bad_precaps(tmp_path):
    d, _ = make_precomp(tmp_path / "p", precaps=True)
    lines = (d / "train_precaps.txt").read_text().splitlines()
    lines[4] = "4,five,6"
    (d / "train_precaps.txt").write_text("\n".join(lines) + "\n")
    with raises_input_error("train_precaps.txt", "line 5"):
        open_split(d, "train")


def test_ids_count_mismatch(tmp_path):
    d, _ = make_precomp(tmp_path / "p", ids=True)
    (d / "train_ids.txt").write_text("1\n2\n3\n")
    with raises_input_error("train_ids.txt", "3 ids for 6 images"):
        open_split(d, "train")


# -- vocab lookup --------------------------------------------------------------------------
def _vocab_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}}))
    return path


def test_find_vocab_order(tmp_path):
    d = tmp_path / "data" / "f30k_precomp"
    d.mkdir(parents=True)
    with raises_input_error("f30k_precomp", "no vocab found"):
        find_vocab(d)
    scan = _vocab_file(tmp_path / "data" / "vocab" / "f30k_precomp_vocab.json")
    _vocab_file(tmp_path / "data" / "vocab" / "coco_precomp_vocab.json")
    assert find_vocab(d) == d / ".." / "vocab" / "f30k_precomp_vocab.json"
    assert find_vocab(d).resolve() == scan.resolve()
    local = _vocab_file(d / "vocab.json")
    assert find_vocab(d) == local
    explicit = _vocab_file(tmp_path / "mine.json")
    assert find_vocab(d, explicit) == explicit
    with raises_input_error("missing.json", "not found"):
        find_vocab(d, tmp_path / "missing.json")


def test_find_vocab_single_glob_and_ambiguous(tmp_path):
    d = tmp_path / "ours"
    d.mkdir()
    one = _vocab_file(d / "x_vocab.json")
    assert find_vocab(d) == one
    _vocab_file(d / "y_vocab.json")
    with raises_input_error("ours", "several vocab files"):
        find_vocab(d)


def test_h5_in_dataloader_workers(tmp_path):
    import torch
    from torch.utils.data import DataLoader

    from pipeline.data.datasets import ImageDataset, collate_images

    d, raw = make_precomp(tmp_path / "p", storage="h5")
    sp = open_split(d, "train")
    sp.image_features(0)  # handle used in the parent before the fork
    loader = DataLoader(ImageDataset(sp), batch_size=4, num_workers=2, collate_fn=collate_images)
    got = torch.cat([b["images"] for b in loader]).numpy()
    np.testing.assert_array_equal(got, raw)


# -- validate-data -------------------------------------------------------------------------
def _invoke(*args):
    from click.testing import CliRunner

    from cli.validate_data import validate_data

    return CliRunner().invoke(validate_data, [str(a) for a in args])


def test_validate_data_summary(tmp_path):
    from pipeline.data.vocab import build_vocab

    d, _ = make_precomp(tmp_path / "f30k_precomp", "train")
    make_precomp(d, "dev", storage="h5", repeat=True, ids=True)
    make_precomp(d, "test", precaps=True)
    caps = captions(N_IMG)
    build_vocab(caps[:10], threshold=1).save(d / "vocab.json")
    res = _invoke(d)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    train = next(ln for ln in lines if ln.startswith("train:"))
    assert "6 images" in train and "30 captions" in train and "36 regions x 8 features" in train
    assert "storage npy" in train and "train_caps.txt" in train and "rows per image 1" in train
    dev = next(ln for ln in lines if ln.startswith("dev:"))
    assert "storage h5" in dev and "rows per image 5" in dev and "ids 6" in dev
    assert "test_precaps.txt" in next(ln for ln in lines if ln.startswith("test:"))
    assert any(ln.startswith("vocab: ") and "words" in ln for ln in lines)
    assert any(ln.startswith("train: <unk> ") and "%" in ln for ln in lines)
    assert not any(ln.startswith("testall") for ln in lines)

    res = _invoke(d, "--split", "dev", "--check-finite", "none")
    assert res.exit_code == 0 and "train:" not in res.output and "dev:" in res.output


def test_validate_data_unk_share_and_no_vocab(tmp_path):
    d, _ = make_precomp(tmp_path / "p")
    make_precomp(d, "dev")
    res = _invoke(d)
    assert res.exit_code == 0 and "vocab: none" in res.output
    from pipeline.data.vocab import Vocab

    Vocab([]).save(d / "vocab.json")          # only specials: every word is <unk>
    res = _invoke(d)
    assert "train: <unk> 100.00% of" in res.output


def test_validate_data_errors(tmp_path):
    res = _invoke(tmp_path / "missing")
    assert isinstance(res.exception, InputError) and "missing" in str(res.exception)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _invoke(empty)
    assert isinstance(res.exception, InputError) and "no split found" in str(res.exception)
    d, _ = make_precomp(tmp_path / "p")
    feats = np.ones((N_IMG, R, F), np.float32)
    feats[1, 0, 0] = np.nan
    np.save(d / "train_ims.npy", feats)
    res = _invoke(d, "--split", "train")
    assert isinstance(res.exception, InputError) and "row 1 has NaN/inf" in str(res.exception)
    res = _invoke(d, "--split", "train", "--check-finite", "none", "--vocab", tmp_path / "nope.json")
    assert isinstance(res.exception, InputError) and "nope.json" in str(res.exception)
    res = _invoke(d, "--split", "dev")
    assert isinstance(res.exception, InputError) and "dev_ims.npy" in str(res.exception)
    res = _invoke(d, "--check-finite", "none")      # default: train and dev are required
    assert isinstance(res.exception, InputError) and "no dev split" in str(res.exception)
