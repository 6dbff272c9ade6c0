"""A naive transcription of the references' cross-attention scores (SCAN `func_attention`
+ `xattn_score_t2i` / `xattn_score_i2t`, BFAN `func_attention` + `focal_equal` /
`focal_prob` + `xattn_score`), one pair at a time, in float64, on the valid regions and
words only. Independent of pipeline.models.cross_attention: it is what the batched code
is tested against (tests/test_cross_models.py).

Deviations from the references, the ones our models make on purpose:
- l1norm / clipped_l1norm use the reference's own `l1norm` helper (its code calls an
  undefined `l1norm_d`);
- a focal gate that keeps no source keeps them all (the reference divides 0 by 0).
"""
from __future__ import annotations

import torch

EPS = 1e-8


def _l2norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + EPS)


def _l1norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / (x.abs().sum(dim=dim, keepdim=True) + EPS)


def _leaky(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, 0.1 * x)


def raw_norm(attn: torch.Tensor, kind: str) -> torch.Tensor:
    """attn (sourceL, queryL): normalise along the query axis (the reference's dim 2)."""
    if kind == "softmax":
        return torch.softmax(attn, dim=1)
    if kind == "l2norm":
        return _l2norm(attn, 1)
    if kind == "clipped_l2norm":
        return _l2norm(_leaky(attn), 1)
    if kind == "l1norm":
        return _l1norm(attn, 1)
    if kind == "clipped_l1norm":
        return _l1norm(_leaky(attn), 1)
    if kind == "clipped":
        return _leaky(attn)
    if kind == "no_norm":
        return attn
    raise ValueError(kind)


def focal_gate(attn: torch.Tensor, kind: str) -> torch.Tensor:
    """attn (queryL, sourceL) -> H (queryL, sourceL) of 0/1, the references' O(S^2) forms."""
    source_l = attn.size(1)
    if kind == "equal":
        func_f = attn * source_l - attn.sum(dim=1, keepdim=True)
    else:
        # F_i = sum_j (a_i - a_j) sqrt(a_j)
        func_f = ((attn.unsqueeze(2) - attn.unsqueeze(1)) * attn.sqrt().unsqueeze(1)).sum(2)
    gate = (func_f > 0).to(attn.dtype)
    for q in range(gate.size(0)):
        if gate[q].sum() == 0:       # all weights equal: keep every source
            gate[q] = 1.0
    return gate


def attend(query: torch.Tensor, context: torch.Tensor, lam: float, norm: str,
           focal: str | None) -> torch.Tensor:
    """query (queryL, d), context (sourceL, d) -> weighted context (queryL, d)."""
    attn = context @ query.t()                      # (sourceL, queryL)
    attn = raw_norm(attn, norm)
    attn = torch.softmax(attn.t() * lam, dim=1)     # (queryL, sourceL)
    if focal is not None:
        tmp = focal_gate(attn, focal) * attn
        attn = tmp / tmp.sum(dim=1, keepdim=True)
    return attn @ context


def cosine(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Row-wise, the references' `cosine_similarity(x1, x2, dim)` without the squeeze."""
    w12 = (x1 * x2).sum(dim=1)
    return w12 / (x1.norm(dim=1) * x2.norm(dim=1)).clamp(min=EPS)


def aggregate(row_sim: torch.Tensor, kind: str, lambda_lse: float) -> torch.Tensor:
    if kind == "lse":
        return torch.log(torch.exp(row_sim * lambda_lse).sum()) / lambda_lse
    if kind == "avg":
        return row_sim.mean()
    if kind == "max":
        return row_sim.max()
    if kind == "sum":
        return row_sim.sum()
    raise ValueError(kind)


def pair_score(regions: torch.Tensor, words: torch.Tensor, attentions: list[dict]) -> float:
    """One pair: regions (n_regions, d), words (n_words, d), valid rows only. Each
    attention: {direction, lambda_softmax, raw_norm, focal, aggregation, lambda_lse}; the
    score is their sum (BFAN: t2i + i2t)."""
    regions, words = regions.double(), words.double()
    total = 0.0
    for a in attentions:
        if a["direction"] == "t2i":
            ctx = attend(words, regions, a["lambda_softmax"], a["raw_norm"], a["focal"])
            row = cosine(words, ctx)
        else:
            ctx = attend(regions, words, a["lambda_softmax"], a["raw_norm"], a["focal"])
            row = cosine(regions, ctx)
        total += float(aggregate(row, a["aggregation"], a["lambda_lse"]))
    return total


def similarity(img_data, img_lengths, txt_data, txt_lengths, attentions) -> torch.Tensor:
    """(n_img, n_txt) float64, a Python loop over every pair."""
    out = torch.empty(len(img_lengths), len(txt_lengths), dtype=torch.float64)
    for i, r in enumerate(img_lengths.tolist()):
        for t, n in enumerate(txt_lengths.tolist()):
            out[i, t] = pair_score(img_data[i, :r], txt_data[t, :n], attentions)
    return out


def pair_scores(img_data, img_lengths, txt_data, txt_lengths, attentions) -> torch.Tensor:
    """(P,) float64 for aligned pairs p = (image p, caption p)."""
    return torch.tensor([pair_score(img_data[p, :int(img_lengths[p])],
                                    txt_data[p, :int(txt_lengths[p])], attentions)
                         for p in range(len(img_lengths))], dtype=torch.float64)
