"""`prepare-data`: the embedded dataset and a real-layout SCAN precomp folder."""
import json
import os

import numpy as np

from cli.main import main

CAPS = ["a red car left of a small dog .", "a small dog right of a red car .",
        "a red car and a dog on a beach .", "a car is left of a dog .", "red car , small dog ."]


def _precomp(d, with_vocab=False, h5_test=False):
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("dev", 4), ("test", 4)):
        feats = rng.standard_normal((n, 36, 8)).astype(np.float32)
        if split == "test" and h5_test:
            import h5py
            with h5py.File(d / "test.h5", "w") as f:
                f.create_dataset("feat", data=feats)
        else:
            np.save(d / f"{split}_ims.npy", feats)
        (d / f"{split}_caps.txt").write_text("\n".join(CAPS * n) + "\n")
        (d / f"{split}_ids.txt").write_text("\n".join(str(100 + i) for i in range(n)) + "\n")
    if with_vocab:
        (d / "coco_precomp_vocab.json").write_text(json.dumps(
            {"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "car": 4},
             "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "car"},
             "idx": 5}))
    return d


def test_precomp_folder_is_linked_not_copied(tmp_path, capsys):
    src = _precomp(tmp_path / "coco_precomp", h5_test=True)
    out = tmp_path / "data"
    assert main(["prepare-data", "--dataset", "precomp", "--source", str(src), "--out", str(out)]) == 0
    assert os.path.islink(out / "train_ims.npy") and os.path.islink(out / "test.h5")
    assert os.path.realpath(out / "train_ims.npy") == str((src / "train_ims.npy").resolve())
    vocab = json.loads((out / "vocab.json").read_text())
    assert "car" in vocab["word2idx"] and vocab["idx2word"]["0"] == "<pad>"  # built: count >= 4
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["splits"]["test"]["images"] == 4
    # the linked folder trains like any other
    assert main(["train", "--model", "vsepp", "--data", str(out), "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--batch-size", "8", "--quiet",
                 "--model-option", "embed_size=8", "--model-option", "word_dim=4"]) == 0


def test_precomp_uses_the_folders_own_vocab(tmp_path):
    src = _precomp(tmp_path / "coco_precomp", with_vocab=True)
    out = tmp_path / "data"
    assert main(["prepare-data", "--dataset", "precomp", "--source", str(src), "--out", str(out)]) == 0
    assert json.loads((out / "vocab.json").read_text())["idx"] == 5


def test_bad_precomp_folder_leaves_nothing(tmp_path, capsys):
    src = _precomp(tmp_path / "coco_precomp")
    (src / "dev_caps.txt").write_text("\n".join(CAPS[:4] * 4) + "\n")
    out = tmp_path / "data"
    assert main(["prepare-data", "--dataset", "precomp", "--source", str(src), "--out", str(out)]) == 2
    assert "dev_caps.txt" in capsys.readouterr().err
    assert not out.exists()
    assert main(["prepare-data", "--dataset", "precomp", "--out", str(out)]) == 2
    assert "source" in capsys.readouterr().err


def test_synthetic_options(tmp_path):
    out = tmp_path / "syn"
    assert main(["prepare-data", "--dataset", "synthetic", "--out", str(out), "--n-train", "50",
                 "--n-dev", "25", "--n-test", "25", "--feature-dim", "8", "--quiet"]) == 0
    assert np.load(out / "train_ims.npy", mmap_mode="r").shape == (50, 36, 8)
