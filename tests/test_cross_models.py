"""BFAN and SCAN (pipeline.models.bfan / scan, their shared blocks region_encoder,
word_encoder and cross_attention) against the naive per-pair float64 transcription of the
references' formulas (tests/cross_reference.py): `similarity` and `pair_scores` to 1e-5
on ragged inputs, one-image and one-caption shards, one-word captions, one-region images
and all-equal attention weights; finite gradients there; memory chunks and caption
length groups change no score; bad options are refused; both train through the shared
loop."""
from __future__ import annotations

import math

import pytest
import torch

import cross_reference as ref
from cross_checks import assert_sub_shards_match, ragged_captions, train_two_epochs
from pipeline.data.vocab import Vocab
from pipeline.errors import InputError
from pipeline.models import Encoded, create_model, model_config
from pipeline.models import cross_attention as ca
from pipeline.models.region_encoder import RegionEncoder
from pipeline.models.word_encoder import WordEncoder

IMG_DIM, VOCAB = 16, 40
TOL = dict(rtol=1e-5, atol=1e-5)

VARIANTS = {
    "bfan-equal": ("bfan", {"focal_type": "equal"}),
    "bfan-prob": ("bfan", {"focal_type": "prob"}),
    "scan-t2i-lse": ("scan", {"direction": "t2i", "aggregation": "lse"}),
    "scan-t2i-avg": ("scan", {"direction": "t2i", "aggregation": "avg"}),
    "scan-i2t-lse": ("scan", {"direction": "i2t", "aggregation": "lse", "lambda_softmax": 4.0,
                              "lambda_lse": 20.0}),
    "scan-i2t-avg": ("scan", {"direction": "i2t", "aggregation": "avg", "lambda_softmax": 4.0}),
    # the other raw_feature_norm and aggregation options
    "scan-t2i-max-clipped_l1norm": ("scan", {"aggregation": "max", "raw_feature_norm": "clipped_l1norm"}),
    "scan-i2t-sum-l1norm": ("scan", {"direction": "i2t", "aggregation": "sum", "raw_feature_norm": "l1norm"}),
    "scan-t2i-avg-softmax": ("scan", {"aggregation": "avg", "raw_feature_norm": "softmax"}),
    "scan-i2t-lse-softmax": ("scan", {"direction": "i2t", "raw_feature_norm": "softmax"}),
    "scan-t2i-lse-l2norm": ("scan", {"raw_feature_norm": "l2norm"}),
    "scan-i2t-max-clipped": ("scan", {"direction": "i2t", "aggregation": "max", "raw_feature_norm": "clipped"}),
    "scan-t2i-sum-no_norm": ("scan", {"aggregation": "sum", "raw_feature_norm": "no_norm"}),
    "scan-unigru": ("scan", {"bi_gru": False}),
}


def build(variant: str, seed: int = 0):
    name, options = VARIANTS[variant]
    torch.manual_seed(seed)
    return create_model(name, img_dim=IMG_DIM, tokenizer=Vocab(f"w{i}" for i in range(VOCAB - 4)),
                        **{**model_config(name)["tiny"], **options})


def reference_attentions(model) -> list[dict]:
    """The transcription's settings, read from the config (not from the model's code)."""
    c = model.config
    if c["name"] == "bfan":
        return [dict(direction=d, lambda_softmax=c["lambda_softmax"], raw_norm="clipped_l2norm",
                     focal=c["focal_type"], aggregation="avg", lambda_lse=1.0) for d in ("t2i", "i2t")]
    return [dict(direction=c["direction"], lambda_softmax=c["lambda_softmax"],
                 raw_norm=c["raw_feature_norm"], focal=None, aggregation=c["aggregation"],
                 lambda_lse=c["lambda_lse"])]


def raw_inputs(n_img: int, n_txt: int, seed: int, r: int = 6, l: int = 8) -> dict:
    """Ragged region counts 1..r and caption lengths 1..l (both ends present); image 1 has
    identical regions (all-equal attention weights), zero padding as collate_pairs."""
    g = torch.Generator().manual_seed(seed)
    img_lengths = torch.randint(1, r + 1, (n_img,), generator=g)
    img_lengths[0], img_lengths[-1] = r, 1
    images = torch.zeros(n_img, r, IMG_DIM)
    for k, n in enumerate(img_lengths.tolist()):
        images[k, :n] = torch.randn(n, IMG_DIM, generator=g)
    if n_img > 2:
        img_lengths[1] = 4
        images[1, :4] = torch.randn(IMG_DIM, generator=g)
    tokens, lengths = ragged_captions(g, n_txt, l, VOCAB)
    return {"images": images, "img_lengths": img_lengths, "tokens": tokens, "lengths": lengths}


def encode(model, batch) -> tuple[Encoded, Encoded]:
    return (model.encode_image(batch["images"], batch["img_lengths"]),
            model.encode_text(batch["tokens"], batch["lengths"]))


def transcribed(model, img: Encoded, txt: Encoded) -> torch.Tensor:
    return ref.similarity(img.data, img.lengths, txt.data, txt.lengths, reference_attentions(model))


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param


# --------------------------------------------------------------------------- transcription
def test_similarity_equals_the_transcription(variant):
    model = build(variant).eval()
    with torch.no_grad():
        img, txt = encode(model, raw_inputs(7, 9, seed=1))
        want = transcribed(model, img, txt)
        got = model.similarity(img, txt)
        assert got.shape == (7, 9) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, **TOL)
        assert_sub_shards_match(model, img, txt, want, other_image=1)


def test_pair_scores_equal_the_transcription(variant):
    model = build(variant).eval()
    with torch.no_grad():
        img, txt = encode(model, raw_inputs(7, 9, seed=2))
        i = torch.tensor([0, 6, 1, 3, 6, 1, 2, 5])
        j = torch.tensor([8, 8, 8, 0, 4, 2, 7, 1])
        want = ref.pair_scores(img[i].data, img[i].lengths, txt[j].data, txt[j].lengths,
                               reference_attentions(model))
        got = model.pair_scores(img[i], txt[j])
        assert got.shape == (8,)
        torch.testing.assert_close(got.double(), want, **TOL)
        one = model.pair_scores(img[6:7], txt[8:9])          # one pair: 1 region x 1 word
        assert one.shape == (1,)
        torch.testing.assert_close(one.double(), want[1:2], **TOL)


def test_chunks_and_length_groups_change_no_score(variant):
    """Any memory budget (1 image per chunk .. all at once) and any caption grouping give
    the full matrix; a shard of blocks equals it too."""
    model = build(variant).eval()
    with torch.no_grad():
        img, txt = encode(model, raw_inputs(9, 11, seed=3))
        full = model.similarity(img, txt)
        dtype = model.compute_dtype()
        for budget in (1, 200, 10**9):
            got = ca.shard_similarity(img, txt, model.attentions, dtype=dtype, budget=budget)
            torch.testing.assert_close(got, full, rtol=1e-6, atol=1e-6)
            pairs = ca.paired_similarity(img, txt[:9], model.attentions, dtype=dtype, budget=budget)
            torch.testing.assert_close(pairs, full[:, :9].diagonal(), rtol=1e-6, atol=1e-6)
        blocks = torch.cat([torch.cat([model.similarity(img[a:a + 4], txt[c:c + 3])
                                       for c in range(0, 11, 3)], 1) for a in range(0, 9, 4)])
        torch.testing.assert_close(blocks, full, rtol=1e-6, atol=1e-6)


def test_length_groups_bound_the_padding():
    lengths = torch.tensor([5, 40, 12, 11, 39, 5, 6, 10])
    groups = ca.length_groups(lengths)
    assert sorted(torch.cat(groups).tolist()) == list(range(8))
    for g in groups:
        sizes = lengths[g]
        assert int(sizes.min()) >= 0.8 * int(sizes.max())
    assert [lengths[g].tolist() for g in groups] == [[40, 39], [12, 11, 10], [6, 5, 5]]


# --------------------------------------------------------------------------- degenerate cases
def test_gradients_are_finite_in_the_degenerate_cases(variant):
    """Train mode: a one-region image, an image of identical regions (all weights equal,
    the reference's 0/0) and a one-word caption; hinge-like loss over the shard and pairs."""
    model = build(variant).train()
    batch = raw_inputs(4, 5, seed=4)
    img, txt = encode(model, batch)
    s = model.similarity(img, txt)
    p = model.pair_scores(img[torch.tensor([3, 1, 3])], txt[torch.tensor([4, 4, 0])])
    assert torch.isfinite(s).all() and torch.isfinite(p).all()
    (s.relu().sum() + s.logsumexp(1).sum() + p.sum()).backward()
    grads = {n: q.grad for n, q in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert any(bool(g.abs().sum() > 0) for g in grads.values())


@pytest.mark.parametrize("kind", ["equal", "prob"])
def test_focal_gate_keeps_every_source_when_none_stands_out(kind):
    """All-equal weights (and one source) keep the plain weights, no NaN; otherwise the
    closed-form gates keep exactly the sources the references' sums keep."""
    mask = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    equal = torch.full((1, 1, 1, 4), 0.25)
    assert torch.equal(ca.focal_refocus(equal, mask, kind), equal)
    one = torch.ones(1, 1, 1, 1)
    assert torch.equal(ca.focal_refocus(one, torch.ones_like(one, dtype=torch.bool), kind), one)
    g = torch.Generator().manual_seed(0)
    w = torch.softmax(3 * torch.randn(50, 7, generator=g, dtype=torch.float64), -1)
    padded = torch.cat([w, torch.zeros(50, 2, dtype=torch.float64)], 1).view(1, 50, 1, 9)
    s_mask = (torch.arange(9) < 7).view(1, 1, 1, 9)
    got = ca.focal_refocus(padded, s_mask, kind).view(50, 9)
    want = ref.focal_gate(w, kind) * w
    torch.testing.assert_close(got, torch.cat([want / want.sum(1, keepdim=True),
                                               torch.zeros(50, 2, dtype=torch.float64)], 1))


def test_score_ranges():
    """BFAN = t2i + i2t means of cosines in [-2, 2]; SCAN avg in [-1, 1]; LSE between the
    largest cosine and that plus ln(n)/lambda_lse."""
    with torch.no_grad():
        for variant, low, high in (("bfan-equal", -2, 2), ("scan-t2i-avg", -1, 1),
                                   ("scan-t2i-lse", -1, 1 + math.log(8) / 6)):
            model = build(variant).eval()
            s = model.similarity(*encode(model, raw_inputs(6, 8, seed=5)))
            assert bool((s >= low).all()) and bool((s <= high).all()), variant


# --------------------------------------------------------------------------- encoders
def test_region_encoder_is_xavier_fc_with_unit_regions_and_zero_padding():
    torch.manual_seed(0)
    enc = RegionEncoder(2048, 1024)
    bound = math.sqrt(6 / (2048 + 1024))
    w = enc.fc.weight
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
    assert torch.equal(enc.fc.bias, torch.zeros(1024))
    small = RegionEncoder(IMG_DIM, 8)
    batch = raw_inputs(5, 2, seed=6)
    out = small(batch["images"], batch["img_lengths"])
    mask = out.mask()
    norms = out.data.norm(dim=-1)
    torch.testing.assert_close(norms[mask], torch.ones(int(mask.sum())))
    assert torch.equal(out.data[~mask], torch.zeros(int((~mask).sum()), 8))
    raw = RegionEncoder(IMG_DIM, 8, no_imgnorm=True)
    torch.nn.init.constant_(raw.fc.bias, 1.0)
    out = raw(batch["images"], batch["img_lengths"])
    assert torch.equal(out.data[~mask], torch.zeros(int((~mask).sum()), 8))


def test_word_encoder_gives_unit_words_and_zero_padding():
    torch.manual_seed(0)
    enc = WordEncoder(VOCAB, 8, 12, dropout=0.4).eval()
    assert float(enc.rnn.embed.weight.abs().max()) <= 0.1
    batch = raw_inputs(2, 6, seed=7)
    out = enc(batch["tokens"], batch["lengths"])
    mask = out.mask()
    torch.testing.assert_close(out.data.norm(dim=-1)[mask], torch.ones(int(mask.sum())))
    assert torch.equal(out.data[~mask], torch.zeros(int((~mask).sum()), 12))
    again = enc(batch["tokens"], batch["lengths"])           # eval: no dropout
    assert torch.equal(again.data, out.data)
    assert isinstance(enc.rnn.embed_dropout, torch.nn.Dropout)
    assert isinstance(WordEncoder(VOCAB, 8, 12).rnn.embed_dropout, torch.nn.Identity)


# --------------------------------------------------------------------------- configs
def test_configs_hold_the_reference_recipes():
    bfan = model_config("bfan")
    assert bfan["model"]["lambda_softmax"] == 20.0 and bfan["model"]["focal_type"] == "equal"
    assert bfan["model"]["embed_size"] == 1024 and bfan["model"]["word_dim"] == 300
    assert {k: bfan["train"][k] for k in ("optimizer", "lr", "epochs", "lr_update", "batch_size",
                                          "grad_clip", "margin", "max_violation")} == \
        {"optimizer": "adam", "lr": 2e-4, "epochs": 15, "lr_update": 15, "batch_size": 128,
         "grad_clip": 2.0, "margin": 0.2, "max_violation": True}
    scan = model_config("scan")["model"]
    assert (scan["direction"], scan["aggregation"], scan["lambda_lse"], scan["lambda_softmax"],
            scan["raw_feature_norm"], scan["bi_gru"]) == ("t2i", "lse", 6.0, 9.0, "clipped_l2norm", True)
    assert model_config("scan")["train"]["epochs"] == 30


@pytest.mark.parametrize("name, option, value", [
    ("bfan", "focal_type", "none"), ("bfan", "lambda_softmax", 0.0), ("bfan", "lambda_softmax", "20"),
    ("scan", "direction", "both"), ("scan", "aggregation", "LogSumExp"),
    ("scan", "raw_feature_norm", "l1norm_d"), ("scan", "lambda_lse", 0.0),
    ("scan", "lambda_softmax", -4.0), ("scan", "bi_gru", "yes"), ("scan", "embed_size", 0),
])
def test_bad_options_are_refused(name, option, value):
    with pytest.raises(InputError, match=option):
        create_model(name, img_dim=IMG_DIM, tokenizer=Vocab(["a"]), **{option: value})


def test_attention_refuses_unknown_settings():
    with pytest.raises(ValueError, match="raw_feature_norm"):
        ca.Attention("t2i", 9.0, raw_norm="l1norm_d")
    with pytest.raises(ValueError, match="direction"):
        ca.Attention("both", 9.0)


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["bfan", "scan"])
def test_trains_through_the_shared_loop(name, tiny_data, tmp_path):
    """Two epochs on the tiny embedded data: finite, decreasing loss; a cross checkpoint."""
    losses = train_two_epochs(name, tiny_data, tmp_path / "run")
    assert losses[1] < losses[0]
