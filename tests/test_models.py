"""Model registry, VSE∞ (GPO) and VSE++ at tiny sizes."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.data.vocab import Vocab
from pipeline.losses.triplet import triplet_objective
from pipeline.models import Encoded, create_model, list_models, model_config, model_from_config
from pipeline.models.base import ITMModel
from pipeline.models.ghost_bn import SegmentBatchNorm1d, bn_segments
from pipeline.models.gpo import GPO
from pipeline.models.layers import MLP, apply_to_valid, length_mask, sinusoidal_encoding

IMG_DIM, EMBED, VOCAB = 16, 32, 50
SIZES = dict(embed_size=EMBED, word_dim=12)
MODELS = ["vse_inf", "vsepp"]


def vocab_of_size(n: int) -> Vocab:
    return Vocab(f"w{i}" for i in range(n - 4))


def make(name: str, seed: int = 0, **kw) -> ITMModel:
    torch.manual_seed(seed)
    return create_model(name, img_dim=IMG_DIM, tokenizer=vocab_of_size(VOCAB), **{**SIZES, **kw})


def training_loss(m, batch, max_violation=True):
    return triplet_objective(m, batch, margin=0.2, max_violation=max_violation,
                             mask_same_image=False)


def make_batch(b: int = 6, r: int = 7, l: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img_lengths = torch.randint(2, r + 1, (b,), generator=g)
    img_lengths[0] = r
    images = torch.randn(b, r, IMG_DIM, generator=g)
    images *= length_mask(img_lengths, r).unsqueeze(-1)
    lengths = torch.sort(torch.randint(3, l + 1, (b,), generator=g), descending=True).values
    lengths[0] = l
    tokens = torch.randint(4, VOCAB, (b, l), generator=g) * length_mask(lengths, l)
    return {"images": images, "img_lengths": img_lengths, "tokens": tokens, "lengths": lengths,
            "index": torch.arange(b), "img_index": torch.arange(b)}


# --- registry -----------------------------------------------------------------------
def test_registry_lists_and_configs():
    assert {"vse_inf", "vsepp"} <= set(list_models())
    cfg = model_config("vse_inf")
    assert cfg["model"]["embed_size"] == 1024 and cfg["model"]["precomp_enc_type"] == "basic"
    assert cfg["train"]["optimizer"] == "adamw" and cfg["train"]["warmup_epochs"] == 1
    for name in MODELS:
        train = model_config(name)["train"]
        for key in ("lr", "weight_decay", "lr_decay", "grad_clip", "margin", "region_drop",
                    "token_aug"):
            assert isinstance(train[key], (int, float)), (name, key)   # not "5e-4" strings
    cfg["model"]["embed_size"] = 1
    assert model_config("vse_inf")["model"]["embed_size"] == 1024      # a copy


@pytest.mark.parametrize("name", MODELS)
def test_create_model_config(name):
    m = make(name)
    assert isinstance(m, ITMModel) and m.kind == "indep" and m.name == name
    assert m.config["name"] == name and m.config["img_dim"] == IMG_DIM
    assert m.config["vocab_size"] == VOCAB and m.config["embed_size"] == EMBED
    assert set(model_config(name)["model"]) <= set(m.config)


def test_registry_errors():
    with pytest.raises(InputError, match=r"unknown model 'nope' \(known: .*vse_inf"):
        create_model("nope", img_dim=4, tokenizer=vocab_of_size(10))
    with pytest.raises(InputError, match=r"configs/models/vsepp.yaml: unknown model option 'bogus'"):
        create_model("vsepp", img_dim=4, tokenizer=vocab_of_size(10), bogus=1)
    with pytest.raises(InputError):
        model_from_config({"img_dim": 4}, vocab_of_size(10))
    with pytest.raises(InputError, match="precomp_enc_type"):
        make("vse_inf", precomp_enc_type="resnet")


@pytest.mark.parametrize("name", MODELS)
def test_model_from_config_round_trip(name):
    m = make(name, seed=0).eval()
    m2 = model_from_config(json.loads(json.dumps(m.config)), m.tokenizer)   # as saved in config.json
    m2.load_state_dict(m.state_dict())
    m2.eval()
    assert m2.config == m.config
    b = make_batch()
    with torch.no_grad():
        assert torch.equal(m.encode_image(b["images"], b["img_lengths"]).data,
                           m2.encode_image(b["images"], b["img_lengths"]).data)
        assert torch.equal(m.encode_text(b["tokens"], b["lengths"]).data,
                           m2.encode_text(b["tokens"], b["lengths"]).data)


# --- layers and GPO -----------------------------------------------------------------
def test_sinusoidal_encoding():
    pe = sinusoidal_encoding(5, 8)
    assert pe.shape == (5, 8)
    assert torch.allclose(pe[0, 0::2], torch.zeros(4)) and torch.allclose(pe[0, 1::2], torch.ones(4))
    assert torch.allclose(pe[3, 0], torch.sin(torch.tensor(3.0)))


def test_apply_to_valid_ignores_padding_in_batchnorm():
    torch.manual_seed(0)
    mlp = MLP(6, 4, 5).train()
    x = torch.randn(3, 4, 6)
    mask = length_mask(torch.tensor([4, 2, 1]), 4)
    y = apply_to_valid(mlp, x, mask)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    x2 = torch.cat([x, 100 * torch.randn(3, 3, 6)], dim=1)     # junk in the padded rows
    y2 = apply_to_valid(mlp, x2, length_mask(torch.tensor([4, 2, 1]), 7))
    assert torch.allclose(y2[:, :4], y, atol=1e-6)
    assert torch.allclose(y[mask], mlp(x[mask]), atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape,segments", [((60, 7), [20, 25, 15]), ((30, 5, 4), [10, 10, 10])])
def test_segment_batchnorm_equals_one_batchnorm_per_segment(shape, segments, momentum):
    """Segments normalised in one call == one nn.BatchNorm1d call per segment: output,
    the gradients of input, weight and bias, and the running statistics and counter."""
    torch.manual_seed(0)
    seg_bn = SegmentBatchNorm1d(shape[1], momentum=momentum)
    nn.init.normal_(seg_bn.weight)
    nn.init.normal_(seg_bn.bias)
    plain = nn.BatchNorm1d(shape[1], momentum=momentum)
    plain.load_state_dict(seg_bn.state_dict())
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(*shape)
    for _ in range(2):      # twice: the second call starts from updated running statistics
        with bn_segments(segments):
            y = seg_bn(x)
        y_ref = torch.cat([plain(part) for part in torch.split(x_ref, segments)])
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
        (y * grad).sum().backward()
        (y_ref * grad).sum().backward()
    for a, b in ((x.grad, x_ref.grad), (seg_bn.weight.grad, plain.weight.grad),
                 (seg_bn.bias.grad, plain.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for key, val in plain.state_dict().items():
        torch.testing.assert_close(seg_bn.state_dict()[key], val, rtol=0, atol=1e-6, msg=key)
    assert int(seg_bn.num_batches_tracked) == 2 * len(segments)


def test_segment_batchnorm_gradcheck():
    torch.manual_seed(0)
    bn = SegmentBatchNorm1d(3).double()
    nn.init.normal_(bn.weight)
    x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    with bn_segments([4, 5, 3]):
        assert torch.autograd.gradcheck(
            lambda x, w, b: torch.func.functional_call(bn, {"weight": w, "bias": b}, (x,)),
            (x, bn.weight.detach().requires_grad_(), bn.bias.detach().requires_grad_()))


def test_gpo_weights():
    torch.manual_seed(0)
    gpo = GPO(8, 8)
    lengths = torch.tensor([5, 1, 3, 5])
    w = gpo.pool_weights(lengths)
    assert w.shape == (4, 5)
    assert torch.allclose(w.sum(1), torch.ones(4), atol=1e-6)
    assert torch.equal(w[~length_mask(lengths, 5)], torch.zeros(6))
    assert torch.equal(w[0], w[3])                     # weights depend on the length only
    assert torch.allclose(w[2, :3], gpo.pool_weights(torch.tensor([3]))[0], atol=1e-6)
    gpo.positional_encoding(200)                         # the cache grows on demand
    assert gpo.pool_weights(torch.tensor([150])).shape == (1, 150)


def test_gpo_single_position_and_sorting():
    torch.manual_seed(0)
    gpo = GPO(8, 8)
    feats = torch.randn(2, 4, 6)
    pooled, _ = gpo(feats, torch.tensor([1, 4]))
    assert torch.allclose(pooled[0], feats[0, 0])
    perm = feats[:, torch.randperm(4)]
    pooled_perm, _ = gpo(perm, torch.tensor([4, 4]))
    pooled_all, _ = gpo(feats, torch.tensor([4, 4]))
    assert torch.allclose(pooled_perm, pooled_all, atol=1e-6)
    # between min and max of the valid values, per dimension
    assert (pooled_all <= feats.max(1).values + 1e-6).all()
    assert (pooled_all >= feats.min(1).values - 1e-6).all()


# --- encoders -----------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_shapes_unit_norm_and_similarity(name):
    m = make(name).eval()
    b = make_batch()
    with torch.no_grad():
        img = m.encode_image(b["images"], b["img_lengths"]).data
        txt = m.encode_text(b["tokens"], b["lengths"]).data
    assert img.shape == (6, EMBED) and txt.shape == (6, EMBED)
    assert torch.allclose(img.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(6), atol=1e-5)
    sims = m.similarity(Encoded(img), Encoded(txt))
    assert sims.shape == (6, 6)
    assert torch.allclose(sims[2, 4], img[2] @ txt[4])
    assert torch.allclose(m.pair_scores(Encoded(img), Encoded(txt)), sims.diagonal(), atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_no_norm_options(name):
    m = make(name, no_imgnorm=True, no_txtnorm=True).eval()
    b = make_batch()
    with torch.no_grad():
        img = m.encode_image(b["images"], b["img_lengths"]).data
        txt = m.encode_text(b["tokens"], b["lengths"]).data
    assert not torch.allclose(img.norm(dim=1), torch.ones(6))
    assert not torch.allclose(txt.norm(dim=1), torch.ones(6))


@pytest.mark.parametrize("name", MODELS)
def test_padding_invariance(name):
    m = make(name).eval()
    b = make_batch()
    with torch.no_grad():
        img = m.encode_image(b["images"], b["img_lengths"]).data
        txt = m.encode_text(b["tokens"], b["lengths"]).data
        # one item alone, cut to its length
        k = 3
        n_r, n_t = int(b["img_lengths"][k]), int(b["lengths"][k])
        img_alone = m.encode_image(b["images"][k:k + 1, :n_r], b["img_lengths"][k:k + 1]).data
        txt_alone = m.encode_text(b["tokens"][k:k + 1, :n_t], b["lengths"][k:k + 1]).data
        # the whole batch with extra zero regions / pad tokens
        img_pad = m.encode_image(torch.cat([b["images"], torch.zeros(6, 5, IMG_DIM)], 1),
                                 b["img_lengths"]).data
        txt_pad = m.encode_text(torch.cat([b["tokens"], torch.zeros(6, 4, dtype=torch.long)], 1),
                                b["lengths"]).data
    assert torch.allclose(img_alone[0], img[k], atol=1e-5)
    assert torch.allclose(txt_alone[0], txt[k], atol=1e-5)
    assert torch.allclose(img_pad, img, atol=1e-6)
    assert torch.allclose(txt_pad, txt, atol=1e-6)


def test_vse_inf_padding_invariance_in_training_mode():
    """BatchNorm statistics come from the valid regions only."""
    m = make("vse_inf").train()
    b = make_batch()
    with torch.no_grad():
        img = m.encode_image(b["images"], b["img_lengths"]).data
        img_pad = m.encode_image(torch.cat([b["images"], torch.randn(6, 5, IMG_DIM)], 1),
                                 b["img_lengths"]).data
    assert torch.allclose(img_pad, img, atol=1e-5)


def test_vse_inf_region_order_invariance():
    m = make("vse_inf").eval()
    b = make_batch()
    images = b["images"].clone()
    for i, n in enumerate(b["img_lengths"].tolist()):
        images[i, :n] = images[i, torch.randperm(n)]
    with torch.no_grad():
        a = m.encode_image(b["images"], b["img_lengths"]).data
        p = m.encode_image(images, b["img_lengths"]).data
    assert torch.allclose(a, p, atol=1e-5)


def test_unsorted_caption_lengths():
    m = make("vse_inf").eval()
    b = make_batch()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        txt = m.encode_text(b["tokens"], b["lengths"]).data
        txt_p = m.encode_text(b["tokens"][perm], b["lengths"][perm]).data
    assert torch.allclose(txt_p, txt[perm], atol=1e-5)


# --- training -----------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("max_violation", [True, False])
def test_training_loss_and_gradients(name, max_violation):
    m = make(name).train()
    loss, logs = training_loss(m, make_batch(), max_violation=max_violation)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    assert logs["triplet"] == pytest.approx(loss.item())
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert sum(len(g["params"]) for g in m.param_groups(1e-3, 0.0)) == len(list(m.parameters()))


@pytest.mark.parametrize("name", MODELS)
def test_optimizer_steps_reduce_loss(name):
    m = make(name).train()
    b = make_batch()
    opt = torch.optim.Adam(m.param_groups(3e-3, 0.0))
    losses = []
    for _ in range(8):
        loss, _ = training_loss(m, b, max_violation=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", MODELS)
def test_training_step_cuda(name):
    m = make(name).cuda().train()
    b = {k: v.cuda() for k, v in make_batch().items()}
    opt = torch.optim.AdamW(m.param_groups(1e-3, 1e-4))
    loss, _ = training_loss(m, b)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 2.0)
    opt.step()
    assert torch.isfinite(loss)
    m.eval()
    with torch.no_grad():
        img = m.encode_image(b["images"], b["img_lengths"]).data
        txt = m.encode_text(b["tokens"], b["lengths"]).data
    assert img.device.type == "cuda" and txt.device.type == "cuda"
    cpu = model_from_config(m.config, m.tokenizer)
    cpu.load_state_dict({k: v.cpu() for k, v in m.state_dict().items()})
    cpu.eval()
    with torch.no_grad():
        img_cpu = cpu.encode_image(b["images"].cpu(), b["img_lengths"].cpu()).data
    assert torch.allclose(img.cpu(), img_cpu, atol=1e-4)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_text_encoder_equals_packed_nn_gru(bidirectional, num_layers):
    """The padded per-direction GRUs equal torch's packed (Bi)GRU with the same weights."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    from pipeline.models.text import GRUTextEncoder

    torch.manual_seed(0)
    enc = GRUTextEncoder(50, 8, 16, num_layers, bidirectional)
    ref = torch.nn.GRU(8, 16, num_layers, batch_first=True, bidirectional=bidirectional)
    with torch.no_grad():
        for layer in range(num_layers):
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(ref, f"{n}_l{layer}").copy_(getattr(enc.fwd[layer], f"{n}_l0"))
                if bidirectional:
                    getattr(ref, f"{n}_l{layer}_reverse").copy_(getattr(enc.bwd[layer], f"{n}_l0"))
    lengths = torch.tensor([9, 3, 5, 1, 9, 7])
    tokens = torch.randint(4, 50, (6, 9))
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
    out, last = enc(tokens, lengths)
    packed = pack_padded_sequence(enc.embed(tokens), lengths, batch_first=True, enforce_sorted=False)
    o, h = ref(packed)
    o, _ = pad_packed_sequence(o, batch_first=True)
    if bidirectional:
        o, h_last = (o[..., :16] + o[..., 16:]) / 2, (h[-2] + h[-1]) / 2
    else:
        h_last = h[-1]
    torch.testing.assert_close(out, o, rtol=0, atol=1e-6)
    torch.testing.assert_close(last, h_last, rtol=0, atol=1e-6)


def _model_file(folder, stem: str, name: str, body: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.py").write_text(
        "from pipeline.models.vsepp import VSEPP\n"
        "from pipeline.models.registry import register_model\n"
        f"{body}\n"
        f"@register_model({name!r})\nclass M(VSEPP):\n    pass\n")
    (folder / f"{name}.yaml").write_text("model: {embed_size: 8, word_dim: 4, num_layers: 1, "
                                         "no_imgnorm: false, no_txtnorm: false}\n")


def test_discovery_of_model_folders(tmp_path, monkeypatch):
    """Models outside the package: found in every ITM_PIPELINE_MODELS folder (the same file
    name in two folders included), their YAML beside them; a module that fails to import
    is one InputError naming it, and is retried (not left half-imported)."""
    from pipeline.models import registry

    _model_file(tmp_path / "a", "extra", "extra_a")
    _model_file(tmp_path / "b", "extra", "extra_b")
    monkeypatch.setenv(registry.ENV_PATH, f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    registry.discover.cache_clear()
    assert {"extra_a", "extra_b"} <= set(list_models())
    m = create_model("extra_b", img_dim=4, tokenizer=vocab_of_size(10))
    assert m.config["embed_size"] == 8
    _model_file(tmp_path / "c", "broken", "extra_c", body="raise RuntimeError('oops')")
    monkeypatch.setenv(registry.ENV_PATH, str(tmp_path / "c"))
    registry.discover.cache_clear()
    for _ in range(2):
        with pytest.raises(InputError, match=r"broken.py: model module failed to import "
                                             r"\(RuntimeError: oops\)"):
            registry.discover()
    monkeypatch.setenv(registry.ENV_PATH, str(tmp_path / "missing"))
    registry.discover.cache_clear()
    with pytest.raises(InputError, match="names a folder that does not exist"):
        registry.discover()
    monkeypatch.undo()
    registry.discover.cache_clear()
    registry.discover()
