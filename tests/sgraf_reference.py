"""A naive transcription of SGRAF's scores (Paranioar/SGRAF model.py: VisualSA, TextSA,
SCAN_attention, EncoderSimilarity, GraphReasoning, AttentionFiltration), written from the
formulas of REFERENCE_AUDIT §3: one image, one caption, one pair at a time, in float64, on
the valid regions and words only. It reads the model's parameters by name (a state dict)
and nothing of pipeline.models.sgraf: the batched code is tested against it
(tests/test_sgraf.py).

Inputs are the shared encoders' outputs (per-region / per-word unit vectors, the SCAN
lineage's, tested in tests/test_cross_models.py). Eval mode: every BN with its running
statistics. Train mode (`*_train`): the reference's batch statistics, computed by real
torch BatchNorm1d layers called the way the reference calls them (VisualSA once over the
batch of images; SAF once per caption over all images x its nodes).
"""
from __future__ import annotations

import torch

EPS = 1e-8


def _l2(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + EPS)


def _lin(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ p[f"{name}.weight"].double().t() + p[f"{name}.bias"].double()


def _bn_eval(p: dict, name: str, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x (..., C) channels last; running statistics."""
    rm, rv = p[f"{name}.running_mean"].double(), p[f"{name}.running_var"].double()
    return (x - rm) / (rv + eps).sqrt() * p[f"{name}.weight"].double() + p[f"{name}.bias"].double()


def _attend_pool(local: torch.Tensor, l_emb: torch.Tensor, g_emb: torch.Tensor, p: dict,
                 prefix: str) -> torch.Tensor:
    weights = torch.softmax(_lin(p, f"{prefix}.common", l_emb * g_emb)[:, 0], dim=0)
    return _l2((weights[:, None] * local).sum(0))


# --------------------------------------------------------------------------- global vectors
def image_global(p: dict, regions: torch.Tensor) -> torch.Tensor:
    """VisualSA, eval: regions (n, D) -> (D,). Slot k's BN channel is k."""
    regions = regions.double()
    n = regions.size(0)
    l_pre = _lin(p, "img_sa.local", regions)                        # (n, D)
    rm = p["img_sa.bn_local.running_mean"].double()[:n, None]
    rv = p["img_sa.bn_local.running_var"].double()[:n, None]
    w = p["img_sa.bn_local.weight"].double()[:n, None]
    b = p["img_sa.bn_local.bias"].double()[:n, None]
    l_emb = torch.tanh((l_pre - rm) / (rv + 1e-5).sqrt() * w + b)
    g_emb = torch.tanh(_bn_eval(p, "img_sa.bn_glob", _lin(p, "img_sa.glob", regions.mean(0))))
    return _attend_pool(regions, l_emb, g_emb, p, "img_sa")


def text_global(p: dict, words: torch.Tensor) -> torch.Tensor:
    """TextSA: words (L, D) -> (D,)."""
    words = words.double()
    l_emb = torch.tanh(_lin(p, "txt_sa.local", words))
    g_emb = torch.tanh(_lin(p, "txt_sa.glob", words.mean(0)))
    return _attend_pool(words, l_emb, g_emb, p, "txt_sa")


def image_global_train(p: dict, regions: torch.Tensor, bn_local, bn_glob) -> torch.Tensor:
    """VisualSA in train mode over a batch (B, num_regions, D) of full images (dropout
    off): the reference's Sequential(Linear, BatchNorm1d(num_regions), Tanh) on the 3-D
    tensor and Sequential(Linear, BatchNorm1d(D), Tanh) on the means. bn_* are torch
    BatchNorm1d layers in train mode (their running statistics update)."""
    regions = regions.double()
    l_emb = torch.tanh(bn_local(_lin(p, "img_sa.local", regions)))
    g_emb = torch.tanh(bn_glob(_lin(p, "img_sa.glob", regions.mean(1))))
    return torch.stack([_attend_pool(regions[i], l_emb[i], g_emb[i], p, "img_sa")
                        for i in range(regions.size(0))])


# --------------------------------------------------------------------------- one pair
def local_context(regions: torch.Tensor, words: torch.Tensor, lam: float) -> torch.Tensor:
    """SCAN_attention(query=words, context=regions, smooth=lam) -> (L, D) unit vectors."""
    attn = regions @ words.t()                                       # (R, L)
    attn = torch.where(attn > 0, attn, 0.1 * attn)
    attn = _l2(attn, 1)                                              # over the words
    attn = torch.softmax(attn.t() * lam, dim=1)                     # (L, R) over the regions
    return _l2(attn @ regions)


def nodes(p: dict, regions, words, img_glo, cap_glo, lam: float) -> torch.Tensor:
    """(L + 1, S): the global alignment, then one per word."""
    regions, words = regions.double(), words.double()
    ctx = local_context(regions, words, lam)
    loc = _l2(_lin(p, "sim_loc", (ctx - words).pow(2)))
    glo = _l2(_lin(p, "sim_glo", (img_glo.double() - cap_glo.double()).pow(2)))
    return torch.cat([glo[None], loc], 0)


def sgr_vector(p: dict, x: torch.Tensor, steps: int) -> torch.Tensor:
    for k in range(steps):
        q, kk = _lin(p, f"steps.{k}.query", x), _lin(p, f"steps.{k}.key", x)
        edges = torch.softmax(q @ kk.t(), dim=-1)
        x = torch.relu(_lin(p, f"steps.{k}.edge", edges @ x))
    return x[0]


def saf_vector(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x (N, S) nodes, z (N,) their BN'd gate logits."""
    a = torch.sigmoid(z)
    a = a / (a.abs().sum() + EPS)
    return _l2(a @ x)


def score(p: dict, vec: torch.Tensor) -> float:
    return float(torch.sigmoid(_lin(p, "sim_eval", vec))[0])


def pair_score(p: dict, kind: str, regions, words, img_glo, cap_glo, *, lam: float,
               steps: int = 3) -> float:
    """Eval mode, one pair; regions (n, D), words (L, D) valid rows only."""
    x = nodes(p, regions, words, img_glo, cap_glo, lam)
    if kind == "sgr":
        return score(p, sgr_vector(p, x, steps))
    z = _bn_eval(p, "filt_bn", _lin(p, "filt", x))[:, 0]
    return score(p, saf_vector(x, z))


# --------------------------------------------------------------------------- shards
def _split(img_data, img_lengths, txt_data, txt_lengths):
    regions = [img_data[i, :n].double() for i, n in enumerate(img_lengths.tolist())]
    words = [txt_data[t, :n].double() for t, n in enumerate(txt_lengths.tolist())]
    return regions, words


def similarity(p, kind, img_data, img_lengths, txt_data, txt_lengths, *, lam, steps=3):
    """(n_img, n_txt) float64, eval mode: a loop over every pair."""
    regions, words = _split(img_data, img_lengths, txt_data, txt_lengths)
    ig = [image_global(p, r) for r in regions]
    tg = [text_global(p, w) for w in words]
    out = torch.empty(len(regions), len(words), dtype=torch.float64)
    for i, r in enumerate(regions):
        for t, w in enumerate(words):
            out[i, t] = pair_score(p, kind, r, w, ig[i], tg[t], lam=lam, steps=steps)
    return out


def pair_scores(p, kind, img_data, img_lengths, txt_data, txt_lengths, *, lam, steps=3):
    """(P,) float64 for aligned pairs p = (image p, caption p), eval mode."""
    regions, words = _split(img_data, img_lengths, txt_data, txt_lengths)
    return torch.tensor([pair_score(p, kind, r, w, image_global(p, r), text_global(p, w),
                                    lam=lam, steps=steps)
                         for r, w in zip(regions, words)], dtype=torch.float64)


def saf_similarity_train(p, img_data, img_lengths, img_glo, txt_data, txt_lengths, bn, *, lam):
    """SAF in train mode, the reference's loop: for each caption (in order), its nodes with
    every image, z = Linear(nodes) as (n_img, 1, L + 1), one call of the train-mode torch
    BatchNorm1d(1) `bn` over them, then filtration. img_glo (n_img, D) given (VisualSA is
    checked on its own); text globals from TextSA (no BN)."""
    regions, words = _split(img_data, img_lengths, txt_data, txt_lengths)
    out = torch.empty(len(regions), len(words), dtype=torch.float64)
    for t, w in enumerate(words):
        cap_glo = text_global(p, w)
        x = torch.stack([nodes(p, r, w, img_glo[i], cap_glo, lam) for i, r in enumerate(regions)])
        z = bn(_lin(p, "filt", x).permute(0, 2, 1))[:, 0]             # (n_img, L + 1)
        for i in range(len(regions)):
            out[i, t] = score(p, saf_vector(x[i], z[i]))
    return out
