"""SGR and SAF (pipeline.models.sgraf) against the naive per-pair float64 transcription of
the reference's formulas (tests/sgraf_reference.py): `similarity` and `pair_scores` in eval
mode to 1e-5 on ragged inputs (random biases and BN statistics, so that no term hides
behind a zero), one-image and one-caption shards, one-word captions; memory chunks change
no score; train mode: VisualSA's BN and SAF's per-caption-column BN (scores and running
statistics) against the reference's torch BatchNorm1d calls, the masked slot BN of ragged
images against one BN per slot, SAF's pair BN over all pairs; gradients; configs; one
training run through the shared loop."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sgraf_reference as ref
from cross_checks import assert_sub_shards_match, ragged_captions, train_two_epochs
from pipeline.data.vocab import Vocab
from pipeline.errors import InputError
from pipeline.models import create_model, model_config
from pipeline.models import sgraf

IMG_DIM, VOCAB, R = 16, 40, 6
TOL = dict(rtol=1e-5, atol=1e-5)
NAMES = ("sgr", "saf")


def build(name: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    model = create_model(name, img_dim=IMG_DIM, tokenizer=Vocab(f"w{i}" for i in range(VOCAB - 4)),
                         **{**model_config(name)["tiny"], "num_regions": R, **options})
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():   # no zero bias or identity BN to hide a term
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "bn" in n and n.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            elif n.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def raw_inputs(n_img: int, n_txt: int, seed: int, r: int = R, l: int = 8, full: bool = False) -> dict:
    """Region counts 1..r (r and 1 present unless `full`: all r) and caption lengths 1..l
    (l and 1 present), zero padding as collate_pairs."""
    g = torch.Generator().manual_seed(seed)
    img_lengths = torch.full((n_img,), r) if full else torch.randint(1, r + 1, (n_img,), generator=g)
    if not full:
        img_lengths[0], img_lengths[-1] = r, 1
    images = torch.zeros(n_img, r, IMG_DIM)
    for k, n in enumerate(img_lengths.tolist()):
        images[k, :n] = torch.randn(n, IMG_DIM, generator=g)
    tokens, lengths = ragged_captions(g, n_txt, l, VOCAB)
    return {"images": images, "img_lengths": img_lengths, "tokens": tokens, "lengths": lengths}


def encode(model, batch):
    return (model.encode_image(batch["images"], batch["img_lengths"]),
            model.encode_text(batch["tokens"], batch["lengths"]))


def shared_encodings(model, batch):
    """The shared encoders' outputs (regions, words): what the transcription starts from."""
    v = model.img_enc(batch["images"], batch["img_lengths"])
    w = model.txt_enc(batch["tokens"], batch["lengths"])
    return v.data, v.lengths, w.data, w.lengths


def settings(model) -> dict:
    c = model.config
    return dict(lam=c["lambda_softmax"], steps=c.get("sgr_step", 0))


@pytest.fixture(params=NAMES)
def name(request):
    return request.param


# --------------------------------------------------------------------------- eval transcription
def test_similarity_equals_the_transcription(name):
    model = build(name).eval()
    batch = raw_inputs(7, 9, seed=1)
    with torch.no_grad():
        img, txt = encode(model, batch)
        want = ref.similarity(params(model), name, *shared_encodings(model, batch), **settings(model))
        got = model.similarity(img, txt)
        assert got.shape == (7, 9) and got.dtype == torch.float32
        assert bool((got > 0).all()) and bool((got < 1).all())
        torch.testing.assert_close(got.double(), want, **TOL)
        assert_sub_shards_match(model, img, txt, want, other_image=0)


def test_pair_scores_equal_the_transcription(name):
    model = build(name).eval()
    batch = raw_inputs(7, 9, seed=2)
    with torch.no_grad():
        img, txt = encode(model, batch)
        vd, vl, wd, wl = shared_encodings(model, batch)
        i = torch.tensor([0, 6, 1, 3, 6, 1, 2, 5])
        j = torch.tensor([8, 8, 8, 0, 4, 2, 7, 1])
        want = ref.pair_scores(params(model), name, vd[i], vl[i], wd[j], wl[j], **settings(model))
        got = model.pair_scores(img[i], txt[j])
        assert got.shape == (8,)
        torch.testing.assert_close(got.double(), want, **TOL)
        one = model.pair_scores(img[6:7], txt[8:9])          # one pair: 1 region x 1 word
        assert one.shape == (1,)
        torch.testing.assert_close(one.double(), want[1:2], **TOL)
        torch.testing.assert_close(model.similarity(img[i], txt[j]).diagonal(), got, **TOL)


def test_chunks_and_length_groups_change_no_score(name, monkeypatch):
    model = build(name).eval()
    with torch.no_grad():
        img, txt = encode(model, raw_inputs(9, 11, seed=3))
        full = model.similarity(img, txt)
        pairs = model.pair_scores(img, txt[:9])
        for budget in (1, 300, 10**9):
            monkeypatch.setattr(sgraf, "BUDGET", budget)
            torch.testing.assert_close(model.similarity(img, txt), full, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(model.pair_scores(img, txt[:9]), pairs, rtol=1e-6, atol=1e-6)
        blocks = torch.cat([torch.cat([model.similarity(img[a:a + 4], txt[c:c + 3])
                                       for c in range(0, 11, 3)], 1) for a in range(0, 9, 4)])
        torch.testing.assert_close(blocks, full, rtol=1e-6, atol=1e-6)


def test_graph_steps_read_out_the_global_node():
    """The last step's node-0-only path equals the full step's row 0; Q K^T's rewrite gives
    the reference's edges."""
    step = sgraf.GraphReasoning(8)
    with torch.no_grad():
        for lin in (step.query, step.key, step.edge):
            lin.bias.normal_()
    x = torch.randn(3, 2, 5, 8)
    valid = torch.ones(3, 2, 5, dtype=torch.bool)
    full = step(x, valid)
    torch.testing.assert_close(step.root(x, valid), full[..., 0, :])
    edges = torch.softmax(step.query(x) @ step.key(x).transpose(-1, -2), -1)
    torch.testing.assert_close(full, torch.relu(step.edge(edges @ x)), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- train mode
def _reference_bn(bn: nn.BatchNorm1d) -> nn.BatchNorm1d:
    out = nn.BatchNorm1d(bn.num_features).double().train()
    out.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in bn.state_dict().items()})
    return out


def _close_bn(got: nn.BatchNorm1d, want: nn.BatchNorm1d):
    torch.testing.assert_close(got.running_mean.double(), want.running_mean, **TOL)
    torch.testing.assert_close(got.running_var.double(), want.running_var, **TOL)
    assert int(got.num_batches_tracked) == int(want.num_batches_tracked)


def test_saf_train_mode_bn_is_per_caption_column():
    """Dropout off, train mode, full images: VisualSA's BNs over the batch and SAF's BN once
    per caption over every image x its nodes (scores and running statistics) equal the
    reference's calls; pair_scores normalises over all pairs of the call."""
    model = build("saf", dropout=0.0, word_dropout=0.0).train()
    batch = raw_inputs(5, 7, seed=4, full=True)
    p = params(model)
    bn_local, bn_glob = _reference_bn(model.img_sa.bn_local), _reference_bn(model.img_sa.bn_glob)
    bn_filt = _reference_bn(model.filt_bn)
    with torch.no_grad():
        vd, vl, wd, wl = shared_encodings(model, batch)
        img, txt = encode(model, batch)
        img_glo = ref.image_global_train(p, vd, bn_local, bn_glob)
        torch.testing.assert_close(img.data[:, 0, model.embed_size:].double(), img_glo, **TOL)
        _close_bn(model.img_sa.bn_local, bn_local)
        _close_bn(model.img_sa.bn_glob, bn_glob)

        want = ref.saf_similarity_train(p, vd, vl, img_glo, wd, wl, bn_filt,
                                        lam=model.config["lambda_softmax"])
        got = model.similarity(img, txt)
        torch.testing.assert_close(got.double(), want, **TOL)
        _close_bn(model.filt_bn, bn_filt)
        # a shard split into chunks of one image gives the same columns (whole-column stats)
        model_b = copy.deepcopy(model)
        sgraf.BUDGET, saved = 1, sgraf.BUDGET
        try:
            torch.testing.assert_close(model_b.similarity(img, txt), model.similarity(img, txt))
        finally:
            sgraf.BUDGET = saved

        # pair_scores: one BN over the nodes of all pairs of the call
        bn_pairs = _reference_bn(model.filt_bn)
        regions = [vd[k, :int(vl[k])] for k in range(5)]
        words = [wd[k, :int(wl[k])] for k in range(5)]
        xs = [ref.nodes(p, regions[k], words[k], img_glo[k], ref.text_global(p, words[k]),
                        model.config["lambda_softmax"]) for k in range(5)]
        z = bn_pairs(torch.cat([ref._lin(p, "filt", x) for x in xs]).t()[None])[0, 0]
        zs = torch.split(z, [x.size(0) for x in xs])
        want_p = torch.tensor([ref.score(p, ref.saf_vector(x, zk)) for x, zk in zip(xs, zs)],
                              dtype=torch.float64)
        got_p = model.pair_scores(img[:5], txt[:5])
        torch.testing.assert_close(got_p.double(), want_p, **TOL)
        _close_bn(model.filt_bn, bn_pairs)


def test_slot_bn_of_ragged_images_is_one_bn_per_slot():
    """Train mode: each slot normalised over the images that have it (x the features),
    with ghost-BN segments; running statistics as one BN per slot and segment."""
    from pipeline.models.ghost_bn import bn_segments

    torch.manual_seed(0)
    bn = sgraf.SlotBatchNorm1d(4).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    lengths = torch.tensor([4, 2, 1, 3, 4, 1])
    valid = torch.arange(4)[None] < lengths[:, None]
    slots = [_reference_bn(_one_channel(bn, c)) for c in range(4)]
    with bn_segments([3, 3]):
        y = bn.double()(x, valid)
    for c in range(4):
        for seg in (slice(0, 3), slice(3, 6)):
            rows = valid[seg, c]
            if int(rows.sum()) == 0:
                continue
            want = slots[c](x[seg][rows, c][:, None])[:, 0]
            torch.testing.assert_close(y[seg][rows, c], want)
        torch.testing.assert_close(bn.running_mean[c:c + 1], slots[c].running_mean)
        torch.testing.assert_close(bn.running_var[c:c + 1], slots[c].running_var)


def _one_channel(bn: nn.BatchNorm1d, c: int) -> nn.BatchNorm1d:
    one = nn.BatchNorm1d(1)
    with torch.no_grad():
        one.weight.copy_(bn.weight[c:c + 1])
        one.bias.copy_(bn.bias[c:c + 1])
        one.running_mean.copy_(bn.running_mean[c:c + 1])
        one.running_var.copy_(bn.running_var[c:c + 1])
    return one


def test_too_many_regions_are_refused(name):
    model = build(name, num_regions=4).eval()
    with pytest.raises(InputError, match="num_regions"):
        encode(model, raw_inputs(3, 2, seed=5, r=6))


INVARIANT_BIASES = {"img_sa.local.bias", "img_sa.glob.bias", "img_sa.common.bias",
                    "txt_sa.common.bias", "filt.bias"}


def test_gradients_flow(name):
    """Train mode, ragged inputs incl. a one-region image and a one-word caption: finite
    gradients to every parameter, non-zero but for the biases the scores are invariant to
    (in the reference too): a bias before a train-mode BN (subtracted with the batch
    mean), VisualSA/TextSA's `common` bias (a shift of softmax logits), and SGR's key bias
    (a term constant along each row of the edge softmax; no gradient at all here)."""
    model = build(name).train()
    img, txt = encode(model, raw_inputs(4, 5, seed=6))
    s = model.similarity(img, txt)
    p = model.pair_scores(img[torch.tensor([3, 1, 3])], txt[torch.tensor([4, 4, 0])])
    assert torch.isfinite(s).all() and torch.isfinite(p).all()
    (s.relu().sum() + s.logsumexp(1).sum() + p.sum()).backward()
    for n, q in model.named_parameters():
        if n.startswith("steps.") and n.endswith("key.bias"):
            assert q.grad is None
            continue
        assert q.grad is not None and torch.isfinite(q.grad).all(), n
        if n not in INVARIANT_BIASES:
            assert bool(q.grad.abs().sum() > 0), n


def test_padding_widths_change_no_score(name):
    """Images padded past their regions in the raw batch, captions past their words."""
    model = build(name).eval()
    batch = raw_inputs(5, 6, seed=7)
    wide = dict(batch, images=torch.nn.functional.pad(batch["images"], (0, 0, 0, 3)),
                tokens=torch.nn.functional.pad(batch["tokens"], (0, 3)))
    with torch.no_grad():
        torch.testing.assert_close(model.similarity(*encode(model, wide)),
                                   model.similarity(*encode(model, batch)))


# --------------------------------------------------------------------------- configs
def test_configs_hold_the_reference_recipes():
    for name, epochs, lr_update in (("sgr", 40, 30), ("saf", 30, 20)):
        cfg = model_config(name)
        m = cfg["model"]
        assert (m["embed_size"], m["word_dim"], m["sim_dim"], m["lambda_softmax"], m["dropout"],
                m["word_dropout"], m["num_regions"]) == (1024, 300, 256, 9.0, 0.4, 0.4, 36)
        assert {k: cfg["train"][k] for k in ("optimizer", "lr", "epochs", "lr_update", "batch_size",
                                             "grad_clip", "margin", "max_violation", "warmup_epochs")} == \
            {"optimizer": "adam", "lr": 2e-4, "epochs": epochs, "lr_update": lr_update,
             "batch_size": 128, "grad_clip": 2.0, "margin": 0.2, "max_violation": True,
             "warmup_epochs": 0}
    assert model_config("sgr")["model"]["sgr_step"] == 3
    model = create_model("sgr", img_dim=IMG_DIM, tokenizer=Vocab(["a"]))
    assert len(model.steps) == 3 and model.img_sa.bn_local.num_features == 36
    assert model.txt_enc.rnn.embed_dropout.p == 0.4 and model.img_sa.dropout.p == 0.4
    bound = math.sqrt(6 / (1024 + 256))
    assert float(model.sim_loc.weight.detach().abs().max()) <= bound
    assert torch.equal(model.sim_loc.bias, torch.zeros(256))


@pytest.mark.parametrize("name, option, value", [
    ("sgr", "sgr_step", 0), ("sgr", "lambda_softmax", 0.0), ("saf", "dropout", 1.0),
    ("saf", "word_dropout", -0.1), ("saf", "num_regions", 0), ("sgr", "sim_dim", 0),
])
def test_bad_options_are_refused(name, option, value):
    with pytest.raises(InputError, match=option):
        create_model(name, img_dim=IMG_DIM, tokenizer=Vocab(["a"]), **{option: value})


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", NAMES)
def test_trains_through_the_shared_loop(name, tiny_data, tmp_path):
    """Two epochs on the tiny embedded data (36 regions): finite losses, a cross checkpoint
    (SGRAF's loss stays flat for many epochs: no decrease is asked for)."""
    train_two_epochs(name, tiny_data, tmp_path / "run")
