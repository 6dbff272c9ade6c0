"""VSRN at tiny sizes: encoders, padding, ghost-BN segments, the caption loss, training."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.errors import InputError
from pipeline.data.vocab import Vocab
from pipeline.losses.triplet import triplet_objective
from pipeline.models import Encoded, create_model, model_config, model_from_config
from pipeline.models.ghost_bn import SegmentBatchNorm1d, bn_segments
from pipeline.models.layers import length_mask
from pipeline.models.vsrn import VSRN, RsGCN, caption_cross_entropy
from pipeline.training import TrainSettings

IMG_DIM, EMBED, VOCAB = 16, 24, 40
SIZES = dict(embed_size=EMBED, word_dim=12, decoder_hidden=20, decoder_word_dim=10,
             decoder_att_dim=14)


def make(seed: int = 0, **kw) -> VSRN:
    """A tiny VSRN whose BatchNorm weights are random: with the reference's zero init
    every Rs_GCN block is the identity and the tests would not exercise it."""
    torch.manual_seed(seed)
    m = create_model("vsrn", img_dim=IMG_DIM, tokenizer=Vocab(f"w{i}" for i in range(VOCAB - 4)),
                     **{**SIZES, **kw})
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, SegmentBatchNorm1d):
                mod.weight.normal_()
                mod.bias.normal_()
    return m


def training_loss(m, batch, max_violation=True):
    return triplet_objective(m, batch, margin=0.2, max_violation=max_violation,
                             mask_same_image=False)


def make_batch(b: int = 6, r: int = 7, l: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img_lengths = torch.randint(2, r + 1, (b,), generator=g)
    img_lengths[0] = r
    images = torch.randn(b, r, IMG_DIM, generator=g) * length_mask(img_lengths, r).unsqueeze(-1)
    lengths = torch.randint(3, l + 1, (b,), generator=g)
    lengths[0] = l
    tokens = torch.randint(4, VOCAB, (b, l), generator=g) * length_mask(lengths, l)
    return {"images": images, "img_lengths": img_lengths, "tokens": tokens, "lengths": lengths,
            "index": torch.arange(b), "img_index": torch.arange(b)}


def cat_batches(parts: list[dict]) -> dict[str, torch.Tensor]:
    """Stack batches into one, padding the region and token axes to the longest."""
    r = max(p["images"].size(1) for p in parts)
    l = max(p["tokens"].size(1) for p in parts)
    pad = torch.nn.functional.pad
    out = {"images": torch.cat([pad(p["images"], (0, 0, 0, r - p["images"].size(1)))
                                for p in parts]),
           "tokens": torch.cat([pad(p["tokens"], (0, l - p["tokens"].size(1))) for p in parts])}
    for k in ("img_lengths", "lengths", "index", "img_index"):
        out[k] = torch.cat([p[k] for p in parts])
    return out


def bn_buffers(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in m.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# --- config -------------------------------------------------------------------------
def test_config_defaults_and_train_recipe():
    cfg = model_config("vsrn")
    m, t = cfg["model"], cfg["train"]
    assert m["embed_size"] == 2048 and m["word_dim"] == 300 and m["gcn_layers"] == 4
    assert m["fc_l2norm"] is True and m["final_bn"] is False and m["region_norm"] == "regions"
    assert m["decoder_hidden"] == 512 and m["decoder_word_dim"] == 300
    assert m["caption_loss_weight"] == 1.0
    s = TrainSettings.from_dict(t, "configs/models/vsrn.yaml")
    assert (s.optimizer, s.lr, s.weight_decay, s.epochs, s.lr_update) == ("adam", 2e-4, 0.0, 30, 15)
    assert (s.batch_size, s.grad_clip, s.margin, s.warmup_epochs) == (128, 2.0, 0.2, 0)
    assert s.max_violation and s.region_drop == 0.0 and s.token_aug == 0.0


def test_invalid_region_norm():
    with pytest.raises(InputError, match="region_norm"):
        make(region_norm="channels")


def test_final_bn_and_widths():
    assert make().img_bn is None
    m = make(final_bn=True, gcn_inter_channels=8)
    assert isinstance(m.img_bn, SegmentBatchNorm1d)
    assert m.gcn[0].theta.out_features == 8 and len(m.gcn) == 4
    assert make().gcn[0].theta.out_features == EMBED              # null = embed_size
    assert make().decoder.att.out_features == 14
    assert make(decoder_att_dim=None).decoder.att.out_features == 20  # null = decoder_hidden


# --- encoders -----------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"final_bn": True, "fc_l2norm": False},
                                {"region_norm": "features"}])
def test_shapes_and_unit_norm(kw):
    m = make(**kw).eval()
    b = make_batch()
    with torch.no_grad():
        img = m.encode_image(b["images"], b["img_lengths"]).data
        txt = m.encode_text(b["tokens"], b["lengths"]).data
    assert img.shape == (6, EMBED) and txt.shape == (6, EMBED)
    assert torch.allclose(img.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(6), atol=1e-5)
    assert m.similarity(Encoded(img), Encoded(txt)).shape == (6, 6)


def test_no_norm_options():
    m = make(no_imgnorm=True, no_txtnorm=True).eval()
    b = make_batch()
    with torch.no_grad():
        img = m.encode_image(b["images"], b["img_lengths"]).data
        txt = m.encode_text(b["tokens"], b["lengths"]).data
    assert not torch.allclose(img.norm(dim=1), torch.ones(6))
    assert not torch.allclose(txt.norm(dim=1), torch.ones(6))


def test_region_norm_axis():
    m = make(region_norm="regions").eval()
    b = make_batch()
    with torch.no_grad():
        feats, mask, _ = m.reason_regions(b["images"], b["img_lengths"])
    assert torch.allclose(feats.norm(dim=1), torch.ones(6, EMBED), atol=1e-5)   # per channel
    m = make(region_norm="features").eval()
    with torch.no_grad():
        feats, mask, _ = m.reason_regions(b["images"], b["img_lengths"])
    assert torch.allclose(feats.norm(dim=2), mask.float(), atol=1e-5)           # per region


def test_rs_gcn_starts_as_identity():
    torch.manual_seed(0)
    block = RsGCN(8, 6).train()
    x = torch.randn(3, 5, 8)
    mask = length_mask(torch.tensor([5, 3, 1]), 5)
    x = x * mask.unsqueeze(-1)
    assert torch.equal(block(x, mask), x)


def test_rs_gcn_without_mask_equals_an_all_valid_mask():
    """mask None (no padded image: the fast path) == a mask that is True everywhere,
    in the output and in every gradient, with trained-looking (non-zero) BN parameters."""
    torch.manual_seed(0)
    block = RsGCN(8, 6).train()
    nn.init.normal_(block.w[1].weight)
    nn.init.normal_(block.w[1].bias)
    x = torch.randn(3, 5, 8, requires_grad=True)
    grads = []
    for mask in (None, torch.ones(3, 5, dtype=torch.bool)):
        with bn_segments([1, 2]):
            y = block(x, mask)
        g = torch.autograd.grad((y * torch.arange(y.numel()).view_as(y).sin()).sum(),
                                [x, *block.parameters()])
        grads.append((y.detach(), g))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    m = make(final_bn=True, region_norm="features")
    m.train()
    training_loss(m, make_batch())         # move the running statistics off their init
    m.eval()
    save_checkpoint(tmp_path / "ckpt", m)
    m2, cfg = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(m2, VSRN) and m2.config == m.config
    assert model_from_config(json.loads(json.dumps(m.config)), m.tokenizer).config == m.config
    b = make_batch()
    with torch.no_grad():
        assert torch.equal(m.encode_image(b["images"], b["img_lengths"]).data,
                           m2.encode_image(b["images"], b["img_lengths"]).data)
        assert torch.equal(m.encode_text(b["tokens"], b["lengths"]).data,
                           m2.encode_text(b["tokens"], b["lengths"]).data)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("region_norm", ["regions", "features"])
def test_padding_invariance(train, region_norm):
    """Padded regions change nothing, whatever their values and however long the region
    axis: not R, not N, not the BatchNorm statistics, not the last GRU state, not the
    caption loss. Each image equals itself encoded alone, cut to its length (in training
    with one BN segment per image, so that BN normalises each image's own regions)."""
    m = make(region_norm=region_norm, decoder_dropout=0.0).train(train)
    b = make_batch()
    # junk in the padded regions of the shorter images and 4 more padded regions for all
    valid = length_mask(b["img_lengths"], 7).unsqueeze(-1)
    junk = torch.where(valid, b["images"], 50 * torch.randn(6, 7, IMG_DIM))
    padded = dict(b, images=torch.cat([junk, 50 * torch.randn(6, 4, IMG_DIM)], 1))
    with torch.no_grad():
        img, _, cap, _ = m.encode_batch(b)
        img_pad, _, cap_pad, _ = m.encode_batch(padded)
        img, img_pad = img.data, img_pad.data
        with bn_segments([1] * 6):
            img_seg = m.encode_image(padded["images"], padded["img_lengths"]).data
        alone = torch.cat([m.encode_image(b["images"][k:k + 1, :n], b["img_lengths"][k:k + 1]).data
                           for k, n in enumerate(b["img_lengths"].tolist())])
    assert torch.allclose(img_pad, img, atol=1e-5)
    assert torch.allclose(cap_pad, cap, atol=1e-5)
    assert torch.allclose(img_seg, alone, atol=1e-5)


# --- ghost BN segments --------------------------------------------------------------
def test_segments_equal_separate_passes():
    """One encode_batch over 3B items with segments [B, B, B] == three passes of B items:
    embeddings, the caption loss (anchors only) and every BN's running statistics."""
    ref = make(final_bn=True).train()
    batched = copy.deepcopy(ref)
    parts = [make_batch(b=5, r=r, l=l, seed=s) for r, l, s in ((6, 8, 1), (7, 5, 2), (4, 9, 3))]
    torch.manual_seed(123)                 # the decoder's dropout draws
    sep = [ref.encode_batch(parts[0])]
    with torch.no_grad():
        sep += [ref.encode_batch(p) for p in parts[1:]]
    torch.manual_seed(123)
    img, txt, cap, logs = batched.encode_batch(cat_batches(parts), segments=[5, 5, 5])
    torch.testing.assert_close(img.data, torch.cat([s[0].data for s in sep]), rtol=0, atol=1e-5)
    torch.testing.assert_close(txt.data, torch.cat([s[1].data for s in sep]), rtol=0, atol=1e-5)
    torch.testing.assert_close(cap, sep[0][2], rtol=0, atol=1e-5)
    assert logs["caption"] == pytest.approx(sep[0][3]["caption"], abs=1e-5)
    a, b = bn_buffers(ref), bn_buffers(batched)
    assert len(a) == 3 * (4 + 1)                        # 4 Rs_GCN BNs + the final BN
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)  # float32 sums
    assert int(a["img_bn.num_batches_tracked"]) == 3


# --- caption loss -------------------------------------------------------------------
def test_caption_loss_equals_direct_computation():
    m = make(decoder_dropout=0.0).train()
    b = make_batch()
    torch.manual_seed(0)
    _, _, cap, logs = m.encode_batch(b)
    with torch.no_grad():
        feats, mask, img_lengths = m.reason_regions(b["images"], b["img_lengths"])
        logits = m.decoder(feats, mask, img_lengths, b["tokens"][:, :-1])
    logp = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for i, n in enumerate(b["lengths"].tolist()):
        for t in range(n - 1):            # predict tokens 1 .. n-1 from tokens 0 .. n-2
            total -= float(logp[i, t, b["tokens"][i, t + 1]])
    expected = pytest.approx(total / 6, rel=1e-5)
    assert cap.item() == expected and logs["caption"] == expected
    assert caption_cross_entropy(logits, b["tokens"], b["lengths"]).item() == expected


def test_caption_loss_weight():
    b = make_batch()
    torch.manual_seed(0)
    _, _, full, logs = make(decoder_dropout=0.0).train().encode_batch(b)
    half_model = make(decoder_dropout=0.0, caption_loss_weight=0.5).train()
    _, _, half, logs_half = half_model.encode_batch(b)
    assert half.item() == pytest.approx(0.5 * full.item(), rel=1e-6)
    assert logs_half["caption"] == pytest.approx(logs["caption"])   # logged unweighted
    _, _, none, logs0 = make(caption_loss_weight=0.0).train().encode_batch(b)
    assert none is None and logs0 == {}


def test_decoder_matches_stepwise_reference():
    """The decoder's precomputed projections equal a plain step loop: attention Linear on
    [region state, decoder state], GRUCell on [word, context]."""
    m = make(decoder_dropout=0.0)
    dec = m.decoder
    b = make_batch()
    feats, mask, lengths = m.reason_regions(b["images"], b["img_lengths"])
    inputs = b["tokens"][:, :-1]
    with torch.no_grad():
        logits = dec(feats, mask, lengths, inputs)
        states, _ = dec.feat_rnn(dec.feat_fc(feats))
        h = states[torch.arange(6), lengths - 1]
        outs = []
        for t in range(inputs.size(1)):
            q = h.unsqueeze(1).expand(-1, states.size(1), -1)
            e = dec.att_score(torch.tanh(dec.att(torch.cat([states, q], -1)))).squeeze(-1)
            alpha = torch.softmax(e.masked_fill(~mask, float("-inf")), dim=1)
            ctx = (alpha.unsqueeze(-1) * states).sum(1)
            h = dec.cell(torch.cat([dec.embed(inputs[:, t]), ctx], -1), h)
            outs.append(dec.out(h))
    torch.testing.assert_close(logits, torch.stack(outs, 1), rtol=0, atol=1e-5)


# --- training -----------------------------------------------------------------------
def test_training_loss_gradients_reach_the_decoder():
    m = make().train()
    loss, logs = training_loss(m, make_batch())
    assert set(logs) == {"triplet", "caption"}
    assert loss.item() == pytest.approx(logs["triplet"] + logs["caption"], rel=1e-5)
    loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    for n, p in m.decoder.named_parameters():
        assert p.grad.abs().sum() > 0, n
    assert m.img_fc.weight.grad.abs().sum() > 0 and m.gcn[0].theta.weight.grad.abs().sum() > 0


def test_param_groups_list_each_parameter_once():
    m = make()
    ids = [id(p) for g in m.param_groups(2e-4, 0.0) for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in m.parameters()}
    assert {id(p) for p in m.decoder.parameters()} <= set(ids)


def test_optimizer_steps_reduce_loss():
    m = make().train()
    b = make_batch()
    opt = torch.optim.Adam(m.param_groups(1e-2, 0.0))
    losses = []
    for _ in range(8):
        torch.manual_seed(0)
        loss, _ = training_loss(m, b, max_violation=False)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 2.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
