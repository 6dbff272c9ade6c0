"""The toy models of tests/toy_models through the real stages: each is one model file and
one YAML, registered by ITM_PIPELINE_MODELS alone.

* toy_cross (kind "cross"): train_base, AOQ fine-tuning on candidates mined by the
  package's own mining from an indep checkpoint, evaluation through pipeline.scoring's
  blocks against a brute-force reference; embedding/mining refuse it.
* toy_bert (an HFTokenizer + transformers BERT indep model): trains, embeds for mining
  (finite unit rows), and its checkpoint reloads without the BERT folder it was built
  from, giving the same embeddings.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from test_model_contract import register_toy_models, write_tiny_bert

register_toy_models()

from pipeline.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pipeline.data.datasets import CaptionDataset  # noqa: E402
from pipeline.data.precomp import open_split  # noqa: E402
from pipeline.errors import InputError  # noqa: E402
from pipeline.mining.embed import CAP_FILE, IMG_FILE, embed_split  # noqa: E402
from pipeline.mining.mine import MineConfig  # noqa: E402
from pipeline.models import create_model, model_class, model_config  # noqa: E402
from rank_reference import ref_metrics, ref_ranks  # noqa: E402

TRAIN = {"epochs": 1, "batch_size": 16}


# --------------------------------------------------------------------------- toy_cross
@pytest.fixture(scope="module")
def cross_ckpt(tiny_trained):
    return tiny_trained("toy_cross")


@pytest.fixture(scope="module")
def mined(ckpt, tiny_data, tmp_path_factory):
    """Candidates mined by the package from the tiny vsepp checkpoint (conftest's ckpt)."""
    from stages import mine

    out = tmp_path_factory.mktemp("toy_cands") / "candidates"
    mine.run(out_dir=out, cfg=MineConfig(k_i2t=30, k_t2i=8), checkpoint=ckpt,
             data_dir=tiny_data, progress=False)
    return out


def _brute_force_scores(model, split) -> np.ndarray:
    """The whole (n_img, n_cap) matrix from ONE model.similarity call, captions encoded
    in file order in one batch (no pipeline.scoring)."""
    dataset = CaptionDataset(split, model.tokenizer)
    caps = [dataset[j]["tokens"] for j in range(split.n_captions)]
    lengths = torch.tensor([len(t) for t in caps])
    tokens = torch.zeros(len(caps), int(lengths.max()), dtype=torch.long)
    for j, t in enumerate(caps):
        tokens[j, :len(t)] = t
    feats = torch.from_numpy(split.image_rows(np.arange(split.n_images)))
    img_lengths = torch.full((split.n_images,), feats.shape[1], dtype=torch.long)
    model.eval()
    with torch.no_grad():
        img = model.encode_image(feats, img_lengths)
        txt = model.encode_text(tokens, lengths)
        return model.similarity(img, txt).float().numpy()


def test_toy_cross_trains_finetunes_and_evaluates_like_brute_force(
        cross_ckpt, mined, tiny_data, tmp_path, monkeypatch):
    from stages import evaluate, finetune

    base, _ = load_checkpoint(cross_ckpt)
    assert base.kind == "cross" and base.name == "toy_cross"
    res = finetune.run(model="toy_cross", data_dir=tiny_data, out_dir=tmp_path / "ft",
                       loss="aoq", candidates_dir=mined, init=cross_ckpt,
                       train_options=TRAIN, progress=False)
    header, row = (tmp_path / "ft" / "train_log.tsv").read_text().splitlines()
    cols = dict(zip(header.split("\t"), row.split("\t")))
    assert float(cols["train_off_it_active"]) >= 0 and np.isfinite(float(cols["train_loss"]))
    tuned, cfg = load_checkpoint(res["checkpoint"])
    assert cfg["meta"]["loss"] == "aoq" and cfg["meta"]["candidates"] == str(mined)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(),
                                                     base.state_dict().values()))

    # the evaluation scores small blocks (several per axis) and the positives apart
    monkeypatch.setattr(model_class("toy_cross"), "score_block", (4, 16))
    got = evaluate.run(checkpoint=res["checkpoint"], data_dir=tiny_data, split="test",
                       progress=False)["metrics"]
    test = open_split(tiny_data, "test")
    scores = _brute_force_scores(tuned, test)
    assert scores.shape == (25, 125) and np.isfinite(scores).all()
    want = ref_metrics(*ref_ranks(scores))
    assert got["protocol"] == "full"
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-9)
    # the gallery's block matrix is the same matrix
    from pipeline.scoring import encode_gallery

    gallery = encode_gallery(tuned, test, batch_size=8)
    np.testing.assert_allclose(gallery.matrix(), scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gallery.positives(),
                               scores[np.arange(125) // 5, np.arange(125)], rtol=1e-6, atol=1e-6)


def test_toy_cross_similarity_chunks_equal_one_pass(monkeypatch):
    """similarity walks the images in memory-bounded chunks: any chunk size, same scores."""
    import sys

    from pipeline.data.vocab import Vocab

    torch.manual_seed(0)
    model = create_model("toy_cross", img_dim=16, tokenizer=Vocab(f"w{i}" for i in range(20)),
                         **model_config("toy_cross")["tiny"]).eval()
    g = torch.Generator().manual_seed(0)
    img_lengths = torch.tensor([5, 2, 4, 1, 5, 3, 5])
    lengths = torch.tensor([6, 6, 5, 4, 3, 3, 2, 2, 2])
    with torch.no_grad():
        img = model.encode_image(torch.randn(7, 5, 16, generator=g), img_lengths)
        txt = model.encode_text(torch.randint(4, 24, (9, 6), generator=g), lengths)
        full = model.similarity(img, txt)
        module = sys.modules[model_class("toy_cross").__module__]
        for budget in (1, 9 * 6 * 16, 3 * 9 * 6 * 16):   # 1, 1 and 3 images per chunk
            monkeypatch.setattr(module, "_BUDGET", budget)
            assert torch.equal(model.similarity(img, txt), full)


def test_embedding_and_mining_refuse_the_cross_model(cross_ckpt, mined, tiny_data, tmp_path):
    from pipeline.scoring import encode_gallery, mine_split
    from stages import finetune, mine

    with pytest.raises(InputError, match="cross-attention"):
        embed_split(cross_ckpt, tiny_data, "train", tmp_path / "emb", progress=False)
    assert not (tmp_path / "emb" / IMG_FILE).exists()
    with pytest.raises(InputError, match="cross-attention"):
        mine.run(out_dir=tmp_path / "cands", cfg=MineConfig(k_i2t=30, k_t2i=8),
                 checkpoint=cross_ckpt, data_dir=tiny_data, progress=False)
    assert not (tmp_path / "cands").exists()
    model, _ = load_checkpoint(cross_ckpt)
    with pytest.raises(InputError, match="cross-attention"):
        mine_split(model, open_split(tiny_data, "train"), 30, 8)
    with pytest.raises(InputError, match="cross-attention"):   # no pooled rows to index
        encode_gallery(model, open_split(tiny_data, "dev")).rows()
    # the candidate refresh mines with the model being trained: refused before any step
    with pytest.raises(InputError, match="cross-attention"):
        finetune.run(model="toy_cross", data_dir=tiny_data, out_dir=tmp_path / "ft",
                     loss="aoq", candidates_dir=mined, init=cross_ckpt, refresh_every=1,
                     train_options=TRAIN, progress=False)
    assert not (tmp_path / "ft").exists()


# --------------------------------------------------------------------------- toy_bert
def _caption_words(data_dir) -> list[str]:
    from pipeline.data.vocab import tokenize

    split = open_split(data_dir, "train")
    return sorted({w for c in split.captions for w in tokenize(c) if w.isalpha()})


def test_toy_bert_trains_embeds_and_reloads_without_its_folder(tiny_data, tmp_path):
    from stages import train_base

    folder = write_tiny_bert(tmp_path / "bert", _caption_words(tiny_data))
    res = train_base.run(model="toy_bert", data_dir=tiny_data, out_dir=tmp_path / "run",
                         model_options={**model_config("toy_bert")["tiny"],
                                        "text_encoder": str(folder)},
                         train_options=TRAIN, progress=False)
    ckpt = res["checkpoint"]
    shutil.rmtree(folder)   # the checkpoint holds the tokenizer and the BERT config

    meta = embed_split(ckpt, tiny_data, "train", tmp_path / "emb", progress=False)
    img, cap = np.load(tmp_path / "emb" / IMG_FILE), np.load(tmp_path / "emb" / CAP_FILE)
    assert meta["model"] == "toy_bert" and img.shape == (100, 16) and cap.shape == (500, 16)
    for rows in (img, cap):
        assert np.isfinite(rows).all()
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert len(np.unique(cap.round(5), axis=0)) > 1   # not a constant text encoder

    # round trip: load, save again, embed again -> the same bytes
    model, cfg = load_checkpoint(ckpt)
    assert model.config["bert_config"]["hidden_size"] == 32
    save_checkpoint(tmp_path / "again", model, cfg["meta"])
    embed_split(tmp_path / "again", tiny_data, "train", tmp_path / "emb2", progress=False)
    assert np.array_equal(np.load(tmp_path / "emb2" / IMG_FILE), img)
    assert np.array_equal(np.load(tmp_path / "emb2" / CAP_FILE), cap)


def test_toy_bert_loads_the_folder_weights_when_it_has_them(tmp_path):
    from transformers import BertModel

    from pipeline.data.tokens import HFTokenizer

    folder = write_tiny_bert(tmp_path / "bert", weights_seed=3)
    saved = BertModel.from_pretrained(str(folder), local_files_only=True,
                                      add_pooling_layer=False).state_dict()
    torch.manual_seed(0)
    model = create_model("toy_bert", img_dim=16, tokenizer=HFTokenizer.load_folder(folder),
                         embed_size=16, text_encoder=str(folder))
    got = model.bert.state_dict()
    assert got.keys() == saved.keys()
    assert all(torch.equal(got[k], saved[k]) for k in saved)
