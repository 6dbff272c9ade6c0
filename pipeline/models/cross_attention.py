"""Cross-attention primitives of the SCAN lineage (SCAN, BFAN; SGR/SAF's local alignment),
batched over a shard of Ni images x Nt captions, and the base class of the models that
score with them.

One attention direction scores an image-caption pair from its query items q (the words
for "t2i", the regions for "i2t") attending over the source items s of the other side:

    d_qs  = q . s                                   raw dot products
    e_qs  = norm_q(d_qs)                            `raw_norm`, over the QUERY axis
    a_qs  = softmax_s(lambda * e_qs)                over the valid sources
    a_qs <- H_qs a_qs / sum_s H_qs a_qs             BFAN's focal gate H in {0, 1} (optional)
    c_q   = sum_s a_qs s                            attended context (raw source vectors)
    cos_q = q . c_q / max(|q| |c_q|, 1e-8)
    score = agg_q cos_q                             over the valid queries

raw_norm (each source's column of logits, over the valid queries; eps = 1e-8):
  clipped_l2norm (default): LeakyReLU(0.1) then x / (|x|_2 + eps);  l2norm: x / (|x|_2 + eps);
  clipped_l1norm / l1norm: the same with |x|_1 (the reference calls an undefined
  `l1norm_d` and crashes; its own `l1norm` helper is evidently what was meant, so the two
  options are implemented as that); softmax: softmax over the queries; clipped:
  LeakyReLU(0.1) only; no_norm.
Focal gates (BFAN), closed forms of the reference's O(S^2) sums, n = valid sources:
  equal: H_s = [a_s n > sum_s' a_s']                   (a_s > 1/n)
  prob:  H_s = [sum_s' (a_s - a_s') sqrt(a_s') > 0]    (a_s sum sqrt(a_s') > sum a_s'^1.5)
  When no source passes (all weights equal; always with one source, e.g. a one-word
  caption in i2t) the reference divides 0 by 0 (NaN); here every valid source is kept
  (H = 1), i.e. the plain softmax weights: nothing stands out, so nothing is filtered,
  and gradients keep flowing through the softmax (keeping only the argmax would cut them
  and pick an arbitrary source among equals). The gate itself has no gradient.
Aggregations over the valid queries: avg, sum, max, and lse = (1/l) log sum exp(l cos_q)
(l = `lambda_lse`, computed with the max subtracted; the reference does not subtract it).

Batched formulation. Since c_q is a weighted sum of the sources,
    q . c_q = sum_s a_qs d_qs        |c_q|^2 = a_q^T G a_q,  G = [s . s'] (the sources' Gram)
so a shard needs only the dot tensor d (Ni, Nt, L, R) (one GEMM, shared by both
directions) and one Gram matrix per item: no (Ni, Nt, L, D) context is ever built, and
the per-pair cost is O(L R (1 + R)) (t2i) instead of O(L R D). The cosine is invariant to
the scale of a_q, so the weights stay the softmax numerators e_qs (the focal thresholds
scale with them too) and only the (.., Q) denominator changes:
cos_q = e_q.d_q / max(|q| sqrt(e_q^T G e_q), eps sum_s e_qs), exactly the formula above. The images are walked in
chunks so that an intermediate of one chunk holds at most about `BUDGET` elements,
whatever the shard; no dimension is ever squeezed (one-image shards, one-word captions).
Precision: scores are returned in the input dtype and computed in the model's
`score_dtype` in eval mode and `train_dtype` (float32) in train mode. Float32 results of
a block differ from those of the full matrix by ~1e-7 (GEMM and reduction order), which a
smooth score (SCAN: float32) absorbs, but a hard focal gate does not: a one-region image
or a one-word caption normalises each logit over a single query to +-1 up to the 1e-8
eps, so that the sources' weights tie to within float32 rounding and the gate, hence the
score, flips with it (by up to ~0.3). BFAN therefore scores in float64 (the ties are
then resolved by the eps terms, ~1e-7 apart), and trains in float32 (no gradient crosses
the gate; a flip only changes which near-tied source a step uses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from pipeline.models.base import ITMModel
from pipeline.models.features import Encoded
from pipeline.models.layers import length_mask
from pipeline.models.region_encoder import RegionEncoder
from pipeline.models.word_encoder import WordEncoder

DIRECTIONS = ("t2i", "i2t")
RAW_NORMS = ("clipped_l2norm", "l2norm", "clipped_l1norm", "l1norm", "softmax", "clipped", "no_norm")
FOCAL_TYPES = ("equal", "prob")
AGGREGATIONS = ("avg", "lse", "max", "sum")
EPS = 1e-8
BUDGET = 1 << 19   # elements of the largest intermediate of one image chunk (2-4 MB: cache-sized;
                   # 1 << 21 was 25% slower on 2 cores)


@dataclass(frozen=True)
class Attention:
    """One attention direction and its settings (see the module docstring)."""
    direction: str
    lambda_softmax: float
    raw_norm: str = "clipped_l2norm"
    focal: str | None = None
    aggregation: str = "avg"
    lambda_lse: float = 6.0

    def __post_init__(self):
        for value, allowed, what in ((self.direction, DIRECTIONS, "direction"),
                                     (self.raw_norm, RAW_NORMS, "raw_feature_norm"),
                                     (self.focal, (None, *FOCAL_TYPES), "focal type"),
                                     (self.aggregation, AGGREGATIONS, "aggregation")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r} (known: {allowed})")
        if self.aggregation == "lse" and not self.lambda_lse > 0:
            raise ValueError(f"lambda_lse must be > 0, got {self.lambda_lse}")


# --------------------------------------------------------------------------- primitives
# Tensors of one direction are (B, N, Q, S): B the items owning the sources (their Gram
# matrices), N the other side, Q queries, S sources. Masks are broadcastable bool tensors.

def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a finite derivative at 0 (padding columns, rounding below zero)."""
    return x.clamp_min(torch.finfo(x.dtype).tiny).sqrt()


def masked_softmax(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax of x along `dim` over the positions where mask is True, 0 elsewhere (the
    dtype's lowest finite value, not -inf: an all-masked slice gives zeros, not NaN)."""
    return torch.where(mask, x.masked_fill(~mask, torch.finfo(x.dtype).min).softmax(dim), 0.0)


def raw_feature_norm(dots: torch.Tensor, q_mask: torch.Tensor, kind: str
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each source's logits normalised over the query axis (-2), as (x, scale): the logits
    are x * scale, scale (.., 1, S) or None (x itself), so that the caller fuses the scale
    into one pass. q_mask (.., Q, 1); padding queries hold zero dots, so they add nothing
    to the L1/L2 norms."""
    x = F.leaky_relu(dots, 0.1) if kind.startswith("clipped") else dots
    if kind.endswith("l2norm"):
        return x, 1.0 / (_safe_sqrt(x.square().sum(-2, keepdim=True)) + EPS)
    if kind.endswith("l1norm"):
        return x, 1.0 / (x.abs().sum(-2, keepdim=True) + EPS)
    if kind == "softmax":
        return masked_softmax(x, q_mask, dim=-2), None
    return x, None   # clipped, no_norm


def focal_threshold(weights: torch.Tensor, s_mask: torch.Tensor, kind: str,
                    peak: float | None = None) -> torch.Tensor:
    """(.., Q, 1) threshold t of the focal gate H_s = [a_s > t]: equal t = sum a / n;
    prob t = sum a^1.5 / sum sqrt(a); -inf (keep every source) where no weight exceeds it.
    peak: every row's largest weight when the caller knows it (one pass less)."""
    if kind == "equal":
        thr = weights.sum(-1, keepdim=True) / s_mask.sum(-1, keepdim=True).to(weights.dtype)
    else:
        root = weights.sqrt()
        thr = (weights * root).sum(-1, keepdim=True) / root.sum(-1, keepdim=True)
    top = weights.amax(-1, keepdim=True) if peak is None else peak
    return thr.masked_fill(top <= thr, float("-inf"))


def focal_gate(weights: torch.Tensor, s_mask: torch.Tensor, kind: str,
               peak: float | None = None) -> torch.Tensor:
    """BFAN's gate on weights proportional to a_qs (both thresholds scale with the weights):
    the sources that pass keep their weight, the others get 0; no source passing keeps
    them all (see the module docstring). The gate itself has no gradient."""
    with torch.no_grad():
        thr = focal_threshold(weights, s_mask, kind, peak)
    return torch.where(weights > thr, weights, 0.0)


def focal_refocus(weights: torch.Tensor, s_mask: torch.Tensor, kind: str) -> torch.Tensor:
    """BFAN: keep the sources whose weight passes the focal gate, renormalise; s_mask
    (.., 1, S). Padding sources have weight 0 and never pass."""
    kept = focal_gate(weights, s_mask, kind)
    return kept / kept.sum(-1, keepdim=True)


def attention_exp(dots: torch.Tensor, q_valid: torch.Tensor, s_valid: torch.Tensor,
                  att: Attention) -> torch.Tensor:
    """e_qs (B, N, Q, S), proportional to a_qs along S (the focal gate applied): the softmax
    numerators exp(logit - max logit), 0 at padding sources. q_valid (.., Q), s_valid (.., S)."""
    s_mask = s_valid.unsqueeze(-2)
    x, scale = raw_feature_norm(dots, q_valid.unsqueeze(-1), att.raw_norm)
    # padding sources: the lowest finite logit, so that their weight is exactly 0
    bias = x.new_zeros(s_mask.shape).masked_fill_(~s_mask, torch.finfo(x.dtype).min)
    if scale is None:
        logits = torch.add(bias, x, alpha=att.lambda_softmax)
    else:
        logits = torch.addcmul(bias, x, att.lambda_softmax * scale)
    e = (logits - logits.detach().amax(-1, keepdim=True)).exp_()
    # each row's largest numerator is exp(0) = 1 exactly
    return e if att.focal is None else focal_gate(e, s_mask, att.focal, peak=1.0)


def attention_weights(dots: torch.Tensor, q_valid: torch.Tensor, s_valid: torch.Tensor,
                      att: Attention) -> torch.Tensor:
    """a_qs (B, N, Q, S) from the dot products; q_valid (.., Q), s_valid (.., S)."""
    e = attention_exp(dots, q_valid, s_valid, att)
    return e / e.sum(-1, keepdim=True)


def context_norm(weights: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """|c_q| = sqrt(a_q^T G a_q) (B, N, Q) from weights (B, N, Q, S) and Grams (B, S, S)."""
    b, n, q, s = weights.shape
    wg = torch.bmm(weights.reshape(b, n * q, s), gram).view(b, n, q, s)
    return _safe_sqrt((wg * weights).sum(-1))


def aggregate(cos: torch.Tensor, q_valid: torch.Tensor, kind: str, lambda_lse: float) -> torch.Tensor:
    """(B, N, Q) per-query cosines -> (B, N), over the valid queries."""
    if kind == "avg":
        return torch.where(q_valid, cos, 0.0).sum(-1) / q_valid.sum(-1).to(cos.dtype)
    if kind == "sum":
        return torch.where(q_valid, cos, 0.0).sum(-1)
    low = torch.finfo(cos.dtype).min
    if kind == "max":
        return cos.masked_fill(~q_valid, low).amax(-1)
    return torch.logsumexp((lambda_lse * cos).masked_fill(~q_valid, low), -1) / lambda_lse


def direction_scores(dots: torch.Tensor, q_valid: torch.Tensor, s_valid: torch.Tensor,
                     q_norm: torch.Tensor, gram: torch.Tensor, att: Attention) -> torch.Tensor:
    """(B, N) scores of one direction. dots (B, N, Q, S); q_valid / q_norm broadcastable to
    (B, N, Q); s_valid to (B, N, S); gram (B, S, S) of the sources' owners."""
    # cos_q = q.c_q / max(|q| |c_q|, eps) is a ratio of terms linear in the weights: with
    # e = a * sum(e) it is (e.d) / max(|q| sqrt(e^T G e), eps * sum(e)), which spares the
    # (B, N, Q, S) normalisation passes (a third of the scoring time)
    e = attention_exp(dots, q_valid, s_valid, att)
    cos = (e * dots).sum(-1) / torch.maximum(q_norm * context_norm(e, gram), EPS * e.sum(-1))
    return aggregate(cos, q_valid, att.aggregation, att.lambda_lse)


# --------------------------------------------------------------------------- shards
@dataclass
class Items:
    """One side of a shard in the compute dtype: data (N, L, D) zero at padding, lengths
    (N,), valid (N, L), norms |x| (N, L) and Gram matrices (N, L, L)."""
    data: torch.Tensor
    lengths: torch.Tensor
    valid: torch.Tensor
    norm: torch.Tensor
    gram: torch.Tensor

    @classmethod
    def of(cls, enc: Encoded, dtype: torch.dtype) -> "Items":
        lengths = enc.lengths.to(enc.data.device)
        width = int(lengths.max()) if lengths.numel() else 0
        valid = length_mask(lengths, width)
        # whatever the padding holds (or how wide it is), it never enters a score
        data = torch.where(valid.unsqueeze(-1), enc.data[:, :width].to(dtype), 0.0)
        return cls(data, lengths, valid, _safe_sqrt(data.pow(2).sum(-1)),
                   data @ data.transpose(1, 2))

    def __len__(self) -> int:
        return self.data.size(0)

    def rows(self, a: int, b: int) -> "Items":
        return Items(self.data[a:b], self.lengths[a:b], self.valid[a:b], self.norm[a:b],
                     self.gram[a:b])

    def take(self, idx: torch.Tensor) -> "Items":
        """Rows idx, trimmed to their longest item."""
        lengths = self.lengths[idx]
        n = int(lengths.max())
        return Items(self.data[idx, :n], lengths, self.valid[idx, :n], self.norm[idx, :n],
                     self.gram[idx, :n, :n])


def length_groups(lengths: torch.Tensor, slack: float = 0.8) -> list[torch.Tensor]:
    """Indices grouped by length, longest first, every length of a group >= slack x its
    longest: a group padded to its longest wastes at most 1 - slack of the work (real
    shards mix 5- and 40-word captions)."""
    order = torch.argsort(lengths.cpu(), descending=True, stable=True)
    sizes = lengths.cpu()[order].tolist()
    groups, start = [], 0
    for k in range(1, len(sizes) + 1):
        if k == len(sizes) or sizes[k] < slack * sizes[start]:
            groups.append(order[start:k].to(lengths.device))
            start = k
    return groups


def _chunk(n_other: int, per_pair: int, budget: int) -> int:
    return max(1, budget // max(1, n_other * per_pair))


def _block_scores(v: Items, w: Items, attentions: Sequence[Attention]) -> torch.Tensor:
    """(len(v), len(w)) summed direction scores of every image of v with every caption of w."""
    (ni, r, d), (nt, l) = v.data.shape, w.data.shape[:2]
    # one GEMM for both directions, copied once into each direction's layout: sources
    # last, their owners (whose Grams the context norms multiply) first
    raw = (w.data.reshape(nt * l, d) @ v.data.reshape(ni * r, d).t()).view(nt, l, ni, r)
    total = 0.0
    for att in attentions:
        if att.direction == "t2i":    # (image, caption, word, region)
            dots = raw.permute(2, 0, 1, 3).contiguous()
            s = direction_scores(dots, w.valid[None], v.valid[:, None], w.norm[None], v.gram, att)
        else:                         # (caption, image, region, word)
            dots = raw.permute(0, 2, 3, 1).contiguous()
            s = direction_scores(dots, v.valid[None], w.valid[:, None], v.norm[None],
                                 w.gram, att).t()
        total = total + s
    return total


def shard_similarity(img: Encoded, txt: Encoded, attentions: Sequence[Attention], *,
                     dtype: torch.dtype = torch.float64, budget: int = BUDGET) -> torch.Tensor:
    """(Ni, Nt) sum over `attentions` of their direction scores, in img.data's dtype.
    Captions are scored in groups of similar length, images in chunks of at most `budget`
    elements per (images, captions, words, regions) intermediate."""
    v, w = Items.of(img, dtype), Items.of(txt, dtype)
    if len(v) == 0 or len(w) == 0:
        return img.data.new_zeros((len(v), len(w)))
    groups = length_groups(w.lengths)
    cols = []
    for idx in groups:
        wg = w.take(idx)
        step = _chunk(len(wg), wg.data.size(1) * v.data.size(1), budget)
        cols.append(torch.cat([_block_scores(v.rows(a, a + step), wg, attentions)
                               for a in range(0, len(v), step)]))
    order = torch.cat(groups)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return torch.cat(cols, 1).index_select(1, inverse).to(img.data.dtype)


def paired_similarity(img: Encoded, txt: Encoded, attentions: Sequence[Attention], *,
                      dtype: torch.dtype = torch.float64, budget: int = BUDGET) -> torch.Tensor:
    """(P,) scores of the aligned pairs img[p], txt[p] (the same formula, per pair)."""
    if len(img) != len(txt):
        raise ValueError(f"pair_scores needs aligned rows, got {len(img)} images and "
                         f"{len(txt)} captions")
    v, w = Items.of(img, dtype), Items.of(txt, dtype)
    if len(v) == 0:
        return img.data.new_zeros(0)
    r, l = v.data.size(1), w.data.size(1)
    step = _chunk(1, l * r + r * r + l * l, budget)
    rows = []
    for a in range(0, len(v), step):
        vp, wp = v.rows(a, a + step), w.rows(a, a + step)
        dots = torch.einsum("pld,prd->plr", wp.data, vp.data).unsqueeze(1)    # (P, 1, L, R)
        total = 0.0
        for att in attentions:
            if att.direction == "t2i":
                s = direction_scores(dots, wp.valid[:, None], vp.valid[:, None],
                                     wp.norm[:, None], vp.gram, att)
            else:
                s = direction_scores(dots.transpose(-1, -2).contiguous(), vp.valid[:, None],
                                     wp.valid[:, None], vp.norm[:, None], wp.gram, att)
            total = total + s[:, 0]
        rows.append(total)
    return torch.cat(rows).to(img.data.dtype)


# --------------------------------------------------------------------------- models
class CrossAttentionModel(ITMModel):
    """Region encoder + word encoder (pipeline.models.region_encoder / word_encoder), score
    = the sum of `self.attentions` directions. Config keys: img_dim, vocab_size,
    embed_size, word_dim, num_layers, no_imgnorm, no_txtnorm."""

    kind = "cross"
    # images x captions per `similarity` call of a gallery evaluation (the references'
    # 128 x 128 shards); memory is bounded inside the call whatever the block
    score_block = (128, 128)
    # the compute dtype of the scores in eval mode (evaluation, mining re-scores) and in
    # train mode (the B x B batch scores and the offline pairs, where rounding is harmless)
    score_dtype = torch.float64
    train_dtype = torch.float32

    def __init__(self, config: dict[str, Any], attentions: Sequence[Attention], *,
                 bidirectional: bool, word_dropout: float = 0.0):
        super().__init__(config)
        c = self.config
        self.attentions = tuple(attentions)
        self.img_enc = RegionEncoder(c["img_dim"], c["embed_size"], no_imgnorm=c["no_imgnorm"])
        self.txt_enc = WordEncoder(c["vocab_size"], c["word_dim"], c["embed_size"],
                                   num_layers=c["num_layers"], bidirectional=bidirectional,
                                   dropout=word_dropout, no_txtnorm=c["no_txtnorm"])

    def encode_image(self, images: torch.Tensor, img_lengths: torch.Tensor) -> Encoded:
        return self.img_enc(images, img_lengths)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        return self.txt_enc(tokens, lengths)

    def compute_dtype(self) -> torch.dtype:
        return self.train_dtype if self.training else self.score_dtype

    def similarity(self, img: Encoded, txt: Encoded) -> torch.Tensor:
        return shard_similarity(img, txt, self.attentions, dtype=self.compute_dtype())

    def pair_scores(self, img: Encoded, txt: Encoded) -> torch.Tensor:
        return paired_similarity(img, txt, self.attentions, dtype=self.compute_dtype())
