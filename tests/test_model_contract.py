"""The model interface contract (pipeline.models.base.ITMModel), checked for EVERY
registered model: the package's families and the toy ones of tests/toy_models (a
cross-attention model and a transformers-BERT model, each one file + one YAML).

Each model is built from its YAML's `tiny:` options (or, for a YAML without one, the
common size options shrunk, FALLBACK_TINY) and a tokenizer of its tokenizer class: a
small SCAN `Vocab`, or for `HFTokenizer` models a tiny random BERT folder written here
(`write_tiny_bert`, nothing downloaded).

Checks per model: encoder outputs; `similarity` over row/column shards (and through a
`Gallery` in small score blocks) equals one full call; padding never enters a score;
`pair_scores` equals the diagonal; the one-pass quintuplet batch equals three passes
(loss, gradients, BatchNorm statistics); the checkpoint round trip; the config round
trip through JSON and `model_from_config`.

The toy models are registered by adding tests/toy_models to ITM_PIPELINE_MODELS at import
(`register_toy_models`; discovery is cached, so the cache is cleared when the variable
changes): the registry cannot unregister a model, so once any module does this the whole
session sees the toy models, whatever the order the modules run in.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

TOY_DIR = Path(__file__).resolve().parent / "toy_models"


def register_toy_models() -> None:
    """Put tests/toy_models on ITM_PIPELINE_MODELS (kept for the session: subprocesses
    and later discovery see the same models) and (re)run the cached discovery."""
    from pipeline.models import registry

    parts = [p for p in os.environ.get(registry.ENV_PATH, "").split(os.pathsep) if p]
    if not any(Path(p).resolve() == TOY_DIR for p in parts):
        os.environ[registry.ENV_PATH] = os.pathsep.join([*parts, str(TOY_DIR)])
        registry.discover.cache_clear()
    registry.discover()


register_toy_models()

from pipeline.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from pipeline.data.offline import collate_offline  # noqa: E402
from pipeline.data.tokens import HFTokenizer  # noqa: E402
from pipeline.data.vocab import Vocab  # noqa: E402
from pipeline.losses.aoq import AOQSettings, quintuplet_loss  # noqa: E402
from pipeline.models import (Encoded, create_model, list_models, model_class,  # noqa: E402
                             model_config, model_from_config)
from pipeline.scoring import Gallery  # noqa: E402

IMG_DIM, VOCAB = 16, 40
ALL_MODELS = list_models()
# shrunk sizes for a model whose YAML has no `tiny:` section (only the keys it has)
FALLBACK_TINY = {"embed_size": 16, "word_dim": 8, "decoder_hidden": 16, "decoder_word_dim": 8,
                 "gpo_d_pe": 8, "gpo_d_hidden": 8}
BERT_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_the_toy_models_are_registered():
    assert {"toy_cross", "toy_bert"} <= set(ALL_MODELS)
    assert model_class("toy_cross").kind == "cross"
    assert model_class("toy_bert").tokenizer_class is HFTokenizer


# --------------------------------------------------------------------------- builders
def write_tiny_bert(folder, words=(), *, weights_seed: int | None = None) -> Path:
    """A tiny random BERT folder: vocab.txt + tokenizer files + config.json (BERT_SIZES),
    and model.safetensors when weights_seed is given. Nothing is downloaded."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    base = ["a", "an", "the", "of", "on", "in", "with", "and", "is", "man", "dog", "red",
            "two", "next", "to", "."]
    vocab = list(dict.fromkeys([*specials, *base, *(w.lower() for w in words)]))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizer(str(folder / "vocab.txt"), model_max_length=BERT_SIZES["max_position_embeddings"])
    tok.save_pretrained(str(folder))
    cfg = BertConfig(vocab_size=len(vocab), **BERT_SIZES)
    cfg.save_pretrained(str(folder))
    if weights_seed is not None:
        torch.manual_seed(weights_seed)
        BertModel(cfg, add_pooling_layer=False).save_pretrained(str(folder))
    return folder


def tiny_options(name: str) -> dict:
    cfg = model_config(name)
    if cfg["tiny"]:
        return dict(cfg["tiny"])
    return {k: v for k, v in FALLBACK_TINY.items() if k in cfg["model"]}


def tiny_tokenizer(cls, folder: Path):
    """(tokenizer, extra model options) of a tiny instance of a model of class `cls`."""
    if cls.tokenizer_class is Vocab:
        return Vocab(f"w{i}" for i in range(VOCAB - 4)), {}
    if cls.tokenizer_class is HFTokenizer:
        if not (folder / "config.json").is_file():
            write_tiny_bert(folder)
        return HFTokenizer.load_folder(folder), {"text_encoder": str(folder)}
    pytest.fail(f"the contract has no tiny tokenizer for {cls.tokenizer_class.__name__}: "
                f"add one to tiny_tokenizer()")


def build(name: str, folder: Path, seed: int = 0):
    cls = model_class(name)
    tok, extra = tiny_tokenizer(cls, folder)
    torch.manual_seed(seed)
    return create_model(name, img_dim=IMG_DIM, tokenizer=tok, **{**tiny_options(name), **extra})


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(params=ALL_MODELS)
def name(request):
    return request.param


@pytest.fixture
def model(name, bert_folder):
    return build(name, bert_folder).eval()


def _word_ids(model, n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(5, model.tokenizer.size, (n,), generator=g)


def inputs(model, b: int = 7, r: int = 6, l: int = 8, seed: int = 1) -> dict:
    """A padded batch: region counts 1..r and caption lengths 3..l (sorted, desc), the
    padding zero as collate_pairs makes it."""
    g = torch.Generator().manual_seed(seed)
    img_lengths = torch.randint(1, r + 1, (b,), generator=g)
    img_lengths[0] = r
    images = torch.zeros(b, r, IMG_DIM)
    for k, n in enumerate(img_lengths.tolist()):
        images[k, :n] = torch.randn(n, IMG_DIM, generator=g)
    lengths = torch.sort(torch.randint(3, l + 1, (b,), generator=g), descending=True).values
    lengths[0] = l
    tokens = torch.zeros(b, l, dtype=torch.long)
    for k, n in enumerate(lengths.tolist()):
        tokens[k, :n] = _word_ids(model, n, g)
    return {"images": images, "img_lengths": img_lengths, "tokens": tokens, "lengths": lengths,
            "index": torch.arange(b), "img_index": torch.arange(b)}


def encode(model, batch) -> tuple[Encoded, Encoded]:
    with torch.no_grad():
        return (model.encode_image(batch["images"], batch["img_lengths"]),
                model.encode_text(batch["tokens"], batch["lengths"]))


def close(a, b, tol=1e-5, msg=""):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=msg or None)


# --------------------------------------------------------------------------- encoders
def test_encoder_outputs(model, name):
    assert model.name == name and model.kind in ("indep", "cross")
    assert model.tokenizer is not None
    json.dumps(model.config)  # JSON-serialisable
    batch = inputs(model)
    img, txt = encode(model, batch)
    assert isinstance(img, Encoded) and isinstance(txt, Encoded)
    assert len(img) == len(txt) == 7
    for enc, lengths in ((img, batch["img_lengths"]), (txt, batch["lengths"])):
        assert torch.isfinite(enc.data).all()
        if enc.pooled:
            assert enc.data.dim() == 2
        else:
            assert enc.data.dim() == 3 and enc.lengths.shape == (7,)
            assert int(enc.lengths.max()) <= enc.data.size(1)
            assert torch.equal(enc.lengths.cpu(), lengths)  # one position per region / token
    if model.kind == "indep":  # indexable: pooled rows of one width
        assert img.pooled and txt.pooled and img.data.shape[1] == txt.data.shape[1]
    s = model.similarity(img, txt)
    assert s.shape == (7, 7) and torch.isfinite(s).all()
    # encode_batch (the training entry point) gives the same encodings in eval mode
    with torch.no_grad():
        img_b, txt_b, _, logs = model.encode_batch(batch)
    assert isinstance(logs, dict)
    close(model.similarity(img_b, txt_b), s)


# --------------------------------------------------------------------------- scores
def test_similarity_over_shards_equals_full(model):
    img, txt = encode(model, inputs(model, b=7, seed=2))
    img2, txt2 = encode(model, inputs(model, b=9, seed=3))
    with torch.no_grad():
        full = model.similarity(img, txt2)                       # (7, 9)
        for r0, r1 in ((0, 3), (3, 7), (5, 6)):
            for c0, c1 in ((0, 4), (4, 9), (8, 9)):
                close(model.similarity(img[r0:r1], txt2[c0:c1]), full[r0:r1, c0:c1],
                      msg=f"block [{r0}:{r1}, {c0}:{c1}]")
        # rows picked out of order (the positives' img[j // 5] indexing)
        idx = torch.tensor([6, 0, 3, 3])
        close(model.similarity(img[idx], txt2), full[idx])
        # the scoring module's blocks: a Gallery scored in small blocks, both axes split
        both = Encoded.cat([img, img2])
        cap = Encoded.cat([txt, txt2])
        gallery = Gallery(model, both, cap)
        if model.kind == "cross":
            model.score_block = (3, 4)   # instance attribute: this model only
        whole = model.similarity(both, cap).numpy()
        assert torch.allclose(torch.from_numpy(gallery.matrix()), torch.from_numpy(whole),
                              rtol=1e-5, atol=1e-5)


def test_padding_never_enters_a_score(model):
    """Garbage or extra width in the padding of sequence encodings changes no score."""
    img, txt = encode(model, inputs(model, b=6, seed=4))
    with torch.no_grad():
        ref = model.similarity(img, txt)

        def noisy(enc: Encoded) -> Encoded:
            if enc.pooled:
                return enc
            data = torch.nn.functional.pad(enc.data, (0, 0, 0, 3))   # 3 more padding slots
            pad = ~Encoded(data, enc.lengths).mask()
            data = torch.where(pad.unsqueeze(-1), torch.full_like(data, 7.5), data)
            return Encoded(data, enc.lengths)

        close(model.similarity(noisy(img), noisy(txt)), ref)
        close(model.pair_scores(noisy(img), noisy(txt)), ref.diagonal())


def test_pair_scores_equal_the_diagonal(model):
    img, txt = encode(model, inputs(model, b=8, seed=5))
    with torch.no_grad():
        s = model.similarity(img, txt)
        p = model.pair_scores(img, txt)
        assert p.shape == (8,)
        close(p, s.diagonal())
        # aligned pairs of arbitrary rows (the offline pairs, the gallery positives)
        i = torch.tensor([7, 0, 2, 2, 5])
        j = torch.tensor([1, 1, 6, 3, 0])
        close(model.pair_scores(img[i], txt[j]), s[i, j])


# --------------------------------------------------------------------------- training
def stacked_batch(model, b: int = 6, r: int = 6, l: int = 8, seed: int = 6) -> dict:
    """A quintuplet batch as collate_offline stacks it (anchors, offline negatives, their
    partners), from made-up items: region counts and caption lengths vary per row."""
    g = torch.Generator().manual_seed(seed)

    def image():
        return torch.randn(int(torch.randint(2, r + 1, (1,), generator=g)), IMG_DIM, generator=g)

    def caption():
        return _word_ids(model, int(torch.randint(3, l + 1, (1,), generator=g)), g)

    items = []
    for slot in range(b):
        j = 5 * slot + slot % 5
        t_neg, i_neg = (j + 11) % 50, (slot + 3) % 10
        t_prime = 5 * i_neg + 1
        items.append({"image": image(), "tokens": caption(), "index": j, "img_index": j // 5,
                      "offline": {"rank": slot, "t_neg": t_neg, "i_neg": i_neg,
                                  "i_prime": t_neg // 5, "t_prime": t_prime,
                                  "image_neg": image(), "tokens_neg": caption(),
                                  "image_prime": image(), "tokens_prime": caption()}})
    return collate_offline(items)


def _train_mode(m: nn.Module) -> nn.Module:
    """Train mode (BatchNorm uses batch statistics: the ghost-BN segments matter) with
    dropout off, so that one pass and three passes draw no different masks."""
    m.train()
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.eval()
    return m


def test_batched_pass_equals_three_passes(name, bert_folder):
    probe = build(name, bert_folder)
    batch = stacked_batch(probe)
    results = []
    for passes in ("batched", "three"):
        m = _train_mode(build(name, bert_folder, seed=0))
        torch.manual_seed(0)
        loss, _ = quintuplet_loss(m, batch, AOQSettings(loss="aoq"), passes)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        stats = {n: t.clone() for n, t in m.named_buffers() if "running" in n or "num_batches" in n}
        results.append((loss.detach(), grads, stats))
    (l1, g1, b1), (l3, g3, b3) = results
    assert torch.isfinite(l1)
    close(l1, l3, tol=1e-4, msg="loss")
    assert g1.keys() == g3.keys() and g1
    bad = [n for n in g1 if not torch.isfinite(g1[n]).all()]
    assert not bad, f"non-finite gradients: {bad}"
    for n in g1:
        close(g1[n], g3[n], tol=1e-4, msg=f"gradient of {n}")
    assert b1.keys() == b3.keys()
    for n in b1:
        close(b1[n].double(), b3[n].double(), tol=1e-5, msg=f"buffer {n}")


# --------------------------------------------------------------------------- persistence
def test_checkpoint_round_trip(name, tmp_path):
    """save_checkpoint -> load_checkpoint gives the same scores; an HF model reloads
    without the folder it was built from (the tokenizer and BERT config travel along)."""
    folder = tmp_path / "text_encoder"
    m = build(name, folder).eval()
    batch = inputs(m, seed=8)
    img, txt = encode(m, batch)
    with torch.no_grad():
        ref = m.similarity(img, txt)
    save_checkpoint(tmp_path / "ckpt", m, {"note": "contract"})
    shutil.rmtree(folder, ignore_errors=True)
    loaded, cfg = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.training and loaded.name == name and type(loaded) is type(m)
    assert loaded.config == m.config and cfg["meta"] == {"note": "contract"}
    assert loaded.tokenizer.fingerprint() == m.tokenizer.fingerprint()
    img2, txt2 = encode(loaded, batch)
    with torch.no_grad():
        assert torch.equal(loaded.similarity(img2, txt2), ref)


def test_config_round_trip(model, name):
    cfg = json.loads(json.dumps(model.config))
    rebuilt = model_from_config(cfg, model.tokenizer)
    assert rebuilt.name == name and rebuilt.config == model.config
    state = model.state_dict()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state.items()}
    rebuilt.load_state_dict(state)  # strict


# --------------------------------------------------------------------------- CUDA
def _cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_and_aoq_step_equal_the_cpu(name, bert_folder, monkeypatch):
    """On the GPU: `similarity`, `pair_scores` and one batched AOQ step (loss, gradients)
    equal the CPU's to 1e-4, with every tensor of the step on the device. TF32 off (cuDNN's
    GRU uses it by default: 1e-3 relative, which is training noise, not a bug)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cpu = build(name, bert_folder).eval()
    gpu = build(name, bert_folder).eval().cuda()
    batch = inputs(cpu, seed=9)
    img, txt = encode(cpu, batch)
    gi, gt = encode(gpu, _cuda(batch))
    with torch.no_grad():
        s = gpu.similarity(gi, gt)
        assert s.device.type == "cuda"
        close(s.cpu(), cpu.similarity(img, txt), tol=1e-4, msg="similarity")
        close(gpu.pair_scores(gi, gt).cpu(), cpu.pair_scores(img, txt), tol=1e-4, msg="pair_scores")
    stacked = stacked_batch(cpu)
    out = []
    for m, b in ((_train_mode(build(name, bert_folder)), stacked),
                 (_train_mode(build(name, bert_folder)).cuda(), _cuda(stacked))):
        torch.manual_seed(0)
        loss, _ = quintuplet_loss(m, b, AOQSettings(loss="aoq"), "batched")
        loss.backward()
        out.append((loss.detach().cpu(), {n: p.grad.cpu() for n, p in m.named_parameters()
                                          if p.grad is not None}))
    (l_cpu, g_cpu), (l_gpu, g_gpu) = out
    assert torch.isfinite(l_gpu)
    close(l_gpu, l_cpu, tol=1e-4, msg="AOQ loss")
    assert g_gpu.keys() == g_cpu.keys()
    for n in g_cpu:
        close(g_gpu[n], g_cpu[n], tol=1e-3, msg=f"gradient of {n}")
