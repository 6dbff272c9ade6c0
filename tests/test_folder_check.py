"""validate-data / prepare-data check the folder as a whole (issue 19, item 6): exit 0 from
validate-data means every stage can read it; each problem is one line naming the file,
exit 2, and prepare-data writes nothing."""
from __future__ import annotations

import numpy as np
import pytest

from cli.main import main
from pipeline.data import MAX_CAPTION_TOKENS
from pipeline.data.vocab import build_vocab

WORDS = ["dog", "cat", "red", "blue", "man", "table", "grass", "ball"]


def _caps(n_img, seed=0):
    rng = np.random.default_rng(seed)
    return [f"a {rng.choice(WORDS)} {rng.choice(WORDS)} on the {rng.choice(WORDS)} ."
            for _ in range(5 * n_img)]


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "precomp"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("dev", 3), ("test", 3)):
        np.save(d / f"{split}_ims.npy", rng.standard_normal((n, 4, 8)).astype(np.float32))
        (d / f"{split}_caps.txt").write_text("\n".join(_caps(n)) + "\n")
    build_vocab(_caps(6), threshold=1).save(d / "vocab.json")
    return d


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def _both_refuse(folder, tmp_path, capsys, *fragments):
    assert main(["validate-data", str(folder)]) == 2
    _one_line_error(capsys, *fragments)
    out = tmp_path / "prepared"
    assert main(["prepare-data", "--dataset", "precomp", "--source", str(folder), "--out", str(out)]) == 2
    _one_line_error(capsys, *fragments)
    assert not out.exists() and not list(tmp_path.glob("prepared*"))


def test_good_folder_validates_and_prepares(folder, tmp_path, capsys):
    assert main(["validate-data", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "train: <unk> 0.00% of" in out and "longest caption 9 tokens" in out
    assert main(["prepare-data", "--dataset", "precomp", "--source", str(folder),
                 "--out", str(tmp_path / "prepared")]) == 0


def test_feature_widths_differ(folder, tmp_path, capsys):
    np.save(folder / "test_ims.npy", np.ones((3, 4, 16), np.float32))
    _both_refuse(folder, tmp_path, capsys, "test_ims.npy", "feature width 16", "is 8")


def test_missing_dev(folder, tmp_path, capsys):
    (folder / "dev_ims.npy").unlink()
    _both_refuse(folder, tmp_path, capsys, str(folder), "no dev split")


def test_one_caption_per_image_row(folder, tmp_path, capsys):
    """30 distinct rows for 30 captions: read as 5 repeated rows per image, they differ."""
    np.save(folder / "train_ims.npy", np.random.default_rng(1).standard_normal((30, 4, 8)).astype(np.float32))
    _both_refuse(folder, tmp_path, capsys, "train_ims.npy", "rows 0 and 1 differ")


def test_repeated_rows_are_accepted(folder, capsys):
    rows = np.repeat(np.random.default_rng(1).standard_normal((6, 4, 8)).astype(np.float32), 5, axis=0)
    np.save(folder / "train_ims.npy", rows)
    assert main(["validate-data", str(folder)]) == 0
    assert "rows per image 5" in capsys.readouterr().out


def test_precaps_beyond_vocab(folder, tmp_path, capsys):
    (folder / "train_caps.txt").unlink()
    lines = ["4,5,6"] * 30
    lines[7] = "4,500,6"
    (folder / "train_precaps.txt").write_text("\n".join(lines) + "\n")
    _both_refuse(folder, tmp_path, capsys, "train_precaps.txt", "line 8", "word id 500")


def test_precaps_without_vocab(folder, tmp_path, capsys):
    (folder / "train_caps.txt").unlink()
    (folder / "train_precaps.txt").write_text("\n".join(["4,5,6"] * 30) + "\n")
    (folder / "vocab.json").unlink()
    _both_refuse(folder, tmp_path, capsys, "train_precaps.txt", "no vocab")


def test_scene_graphs_of_another_size(folder, tmp_path, capsys):
    import json

    g = {"family": 0, "edit": "base", "facts": [], "caption_facts": [[]] * 5}
    (folder / "train_graphs.jsonl").write_text(
        "".join(json.dumps({"image": i, **g}) + "\n" for i in range(30)))
    _both_refuse(folder, tmp_path, capsys, "train_graphs.jsonl", "30 scene graphs for 6 images")


def test_huge_caption_is_counted_then_truncated(folder, tmp_path, capsys):
    caps = _caps(6)
    caps[3] = " ".join(["dog"] * 200_000)           # a ~1 MB line
    (folder / "train_caps.txt").write_text("\n".join(caps) + "\n")
    assert main(["validate-data", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"1 caption(s) over {MAX_CAPTION_TOKENS} tokens (truncated when tokenised)" in out
    assert "longest caption 200002 tokens" in out

    from pipeline.data.precomp import open_split
    from pipeline.data.tokens import caption_tokens
    from pipeline.data.vocab import END, START, Vocab

    vocab = Vocab.load(folder / "vocab.json")
    toks = caption_tokens(open_split(folder, "train"), vocab)
    err = capsys.readouterr().err
    assert "train_caps.txt: 1 caption(s) longer than 128 tokens truncated (longest 200002)" in err
    ids = toks(3)
    assert len(ids) == MAX_CAPTION_TOKENS and toks.truncated == 1
    assert ids[0] == vocab.word2idx[START] and ids[-1] == vocab.word2idx[END]
    assert toks(2) == vocab.encode(caps[2])          # the others untouched


def test_training_on_a_huge_caption_stays_bounded(folder, tmp_path, capsys):
    caps = _caps(6)
    caps[3] = " ".join(["dog"] * 200_000)
    (folder / "train_caps.txt").write_text("\n".join(caps) + "\n")
    rc = main(["train", "--quiet", "--model", "vsepp", "--data", str(folder), "--out", str(tmp_path / "run"),
               "--epochs", "1", "--batch-size", "4", "--model-option", "embed_size=8",
               "--model-option", "word_dim=4"])
    assert rc == 0, capsys.readouterr().err
    assert "truncated" in capsys.readouterr().err
