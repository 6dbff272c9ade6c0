"""SGR and SAF (Diao et al., "Similarity Reasoning and Filtration for Image-Text
Matching", AAAI 2021; Paranioar/SGRAF), as two cross models on one base.

Encoders (the SCAN lineage's, pipeline.models.region_encoder / word_encoder): regions
v_r = L2(FC(x_r)); words w_l = L2(BiGRU averaged(Dropout(`word_dropout`)(Embed(token)))).
Global vectors, computed by the encoders (every Linear here Xavier-uniform, bias 0):

    VisualSA  l_r = Drop(tanh(BN_slots(A v_r)))      BN_slots = BatchNorm1d(num_regions): one
              g   = Drop(tanh(BN_D(G mean_r v_r)))   channel per region SLOT, stats over the
              a_r = softmax_r(c . (l_r * g))         images x the D features (as the reference)
              img_glo = L2(sum_r a_r v_r)            raw regions, not l_r
    TextSA    the same without the BNs, per caption, over its words -> cap_glo

Similarity vectors of a pair, `sim_dim` S (256):
    c_l   = L2(sum_r a_lr v_r),  a_lr = SCAN t2i attention (clipped_l2norm over the words,
            softmax over the regions x `lambda_softmax` 9; pipeline.models.cross_attention)
    n_0   = L2(W_glo (img_glo - cap_glo)^2),   n_l = L2(W_loc (c_l - w_l)^2),  l = 1..L
SGR: `sgr_step` graph steps, separate weights, x <- ReLU(W_k(E x)), E = softmax_row(Q_k(x)
K_k(x)^T) (no sqrt(S) scaling), read out node 0: v = x_0.
SAF: z_n = BN_1(f . x_n + b), a = sigmoid(z) / (sum_n sigmoid(z_n) + 1e-8), v = L2(sum_n a_n x_n).
Score = sigmoid(e . v + b_e) in (0, 1).

Encodings: `Encoded` sequences (regions / words, their true lengths) whose feature axis is
2D wide: [:D] the regions or words (zero at padding), [D:] zero except at position 0 (always
valid), which holds the global vector. The global vectors are thus made where their
BatchNorm sees exactly the encoded images (and ghost-BN segments, pipeline.models.ghost_bn),
and travel through slicing, concatenation, galleries and checkpoints like any sequence.

Batching: `similarity` scores a shard with tensor ops over (images x captions x nodes):
captions grouped by length (`length_groups`), images in chunks of about BUDGET elements per
(images, captions, nodes, features) intermediate; `pair_scores` does the same per aligned
pair. Padding words are graph nodes that no softmax, sum or statistic reads. SGR's
Q K^T is computed as (x (W_q^T W_k) + W_k^T b_q) x^T: the terms the reference adds that
are constant along a row cancel in the row softmax, so this is the same E with one S x S
GEMM instead of two; the last step computes node 0 only (the only one read out). K's
bias therefore gets no gradient (in the reference its gradient is 0 up to rounding: it
only shifts each row of the softmax); the parameter is kept, so the layout matches the
reference's three Linear layers per step.

BatchNorm semantics.
- eval: every BN uses its running statistics, so a pair's score is independent of the
  shard, of the chunks and of the other pairs (exact sharding, as the reference's eval).
- train, VisualSA (encode_image): batch statistics over the encoded images, per ghost-BN
  segment (stacked AOQ batches normalise like separate passes). BN_slots needs each image's
  regions in slots 0..n-1: an image with fewer than `num_regions` regions (ragged
  batches, region drop) enters the statistics of its valid slots only (masked BN; with
  every image at num_regions regions this is exactly BatchNorm1d(num_regions)); an image
  with MORE regions is refused (no BN channel for those slots): set num_regions.
- train, SAF's BN_1 (similarity): the reference scores one caption at a time against all
  images of the batch, so BN_1 normalises, per caption, over all images x its L+1 nodes
  and updates its running statistics once per caption, in caption order. `similarity`
  reproduces both (per-caption-column statistics over every image of the call, whatever
  the chunks; running statistics updated caption by caption).
- train, SAF's BN_1 (pair_scores, AOQ's offline pairs; the reference has no such call):
  each caption appears once, so the per-column statistic would be one pair's L+1 nodes
  (a 2-value BN for a one-word caption: nearly binary a, meaningless); instead one BN over
  all pairs x their valid nodes of the call, one running update per call (a batch
  statistic of the same population of pair nodes, as in similarity).
- SAF's BN is a SegmentBatchNorm1d (its parameters, buffers and state-dict keys), but its
  batch is made of pairs, not of encoded samples: it never reads `bn_segments`. Nothing
  needs it to: pipeline.losses.aoq.quintuplet_loss encodes inside the segments context
  (encode_batch) and scores outside it, one call per AOQ segment (the anchors' B x B
  `similarity`, each offline pair vector its own `pair_scores` call), which is exactly what
  separate passes do.
Dropout (word 0.4, VisualSA/TextSA 0.4) lives in the encoders; the similarity path has none.

Deliberate differences: no `.squeeze()` (one-image shards, one-word captions keep their
axes); the reference's means over all 36 region slots are means over the valid regions
(the same when every image has 36).
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import InputError
from pipeline.models.cross_attention import (BUDGET, Attention, CrossAttentionModel, Items,
                                             attention_weights, length_groups, masked_softmax)
from pipeline.models.features import Encoded
from pipeline.models.ghost_bn import SegmentBatchNorm1d, current_segments
from pipeline.models.layers import l2norm, length_mask, xavier_linear_
from pipeline.models.registry import register_model

L1_EPS = 1e-8


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) in x's dtype (the scores' compute dtype may differ from the parameters')."""
    w, b = layer.weight, layer.bias
    if w.dtype != x.dtype:
        w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
    return F.linear(x, w, b)


class _UnitRows(torch.autograd.Function):
    """y = x / (|x| + 1e-8) along the last axis (layers.l2norm's convention) with a
    hand-written backward: gx = (g - y (g . y) d / |x|) / d, d = |x| + 1e-8. About half the
    passes of autograd's over the (images x captions x nodes x S) tensors, which dominate
    the step time on a CPU."""

    @staticmethod
    def forward(ctx, x):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        denom = norm + 1e-8
        y = x / denom
        ctx.save_for_backward(y, norm, denom)
        return y

    @staticmethod
    def backward(ctx, g):
        y, norm, denom = ctx.saved_tensors
        coef = (g * y).sum(-1, keepdim=True) * (denom / norm.clamp_min(torch.finfo(norm.dtype).tiny))
        return torch.addcmul(g, y, coef, value=-1.0) / denom


def _unit(x: torch.Tensor) -> torch.Tensor:
    return _UnitRows.apply(x)


def _xavier(n_in: int, n_out: int) -> nn.Linear:
    return xavier_linear_(nn.Linear(int(n_in), int(n_out)))


# --------------------------------------------------------------------------- BN pieces
class SlotBatchNorm1d(SegmentBatchNorm1d):
    """BatchNorm1d(num_regions) over (B, num_regions, D), with a (B, num_regions) mask of the
    valid slots: in training, each slot's statistics are over the images that have it
    (x its D features), per ghost-BN segment; a fully valid batch takes the plain
    (segmented) BatchNorm path. Running statistics: unbiased variance, one update per
    segment, slots no image of the segment has are left alone."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is None or not self.training or bool(valid.all()):
            return super().forward(x)
        seg = current_segments() or (x.size(0),)
        if sum(seg) != x.size(0):
            raise ValueError(f"BN segments {seg} do not cover the batch of {x.size(0)}")
        parts = []
        for xs, ms in zip(torch.split(x, list(seg)), torch.split(valid, list(seg))):
            m = ms.unsqueeze(-1).to(x.dtype)                       # (n, C, 1)
            count = m.sum(0).squeeze(-1) * x.size(-1)               # (C,)
            have = count > 0
            denom = count.clamp_min(1)
            mean = (xs * m).sum((0, 2)) / denom
            var = ((xs - mean[:, None]).pow(2) * m).sum((0, 2)) / denom
            mean, var = torch.where(have, mean, 0.0), torch.where(have, var, 1.0)
            y = (xs - mean[:, None]) * torch.rsqrt(var[:, None] + self.eps)
            parts.append(y * self.weight[:, None] + self.bias[:, None])
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                mom = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                       else self.momentum)
                unbiased = var * count / (count - 1).clamp_min(1)
                keep = have & (count > 1)
                self.running_mean.copy_(torch.where(keep, (1 - mom) * self.running_mean + mom * mean,
                                                    self.running_mean))
                self.running_var.copy_(torch.where(keep, (1 - mom) * self.running_var + mom * unbiased,
                                                   self.running_var))
        return torch.cat(parts)


def _bn_update_sequence(bn: nn.BatchNorm1d, means: list[float], variances: list[float]) -> None:
    """The running statistics of a 1-channel BN after one training call per value, in order."""
    rm, rv = float(bn.running_mean[0]), float(bn.running_var[0])
    count = int(bn.num_batches_tracked)
    for m, v in zip(means, variances):
        count += 1
        mom = 1.0 / count if bn.momentum is None else bn.momentum
        rm, rv = (1 - mom) * rm + mom * m, (1 - mom) * rv + mom * v
    bn.running_mean.fill_(rm)
    bn.running_var.fill_(rv)
    bn.num_batches_tracked.fill_(count)


# --------------------------------------------------------------------------- global vectors
class SelfAttentionPool(nn.Module):
    """VisualSA (`num_regions` set: the two BNs) or TextSA (None: no BN) over a padded
    sequence x (B, W, D) with its valid mask (B, W) -> (B, D) unit global vectors."""

    def __init__(self, dim: int, dropout: float, num_regions: int | None = None):
        super().__init__()
        self.local = _xavier(dim, dim)
        self.glob = _xavier(dim, dim)
        self.common = _xavier(dim, 1)
        self.dropout = nn.Dropout(float(dropout))
        self.num_regions = num_regions
        if num_regions is not None:
            self.bn_local = SlotBatchNorm1d(int(num_regions))
            self.bn_glob = SegmentBatchNorm1d(int(dim))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        m = valid.unsqueeze(-1).to(x.dtype)
        mean = (x * m).sum(1) / m.sum(1)
        l_emb, g_emb = self.local(x), self.glob(mean)
        if self.num_regions is not None:
            l_emb, g_emb = self.bn_local(l_emb, valid), self.bn_glob(g_emb)
        l_emb = self.dropout(torch.tanh(l_emb))
        g_emb = self.dropout(torch.tanh(g_emb))
        logits = self.common(l_emb * g_emb.unsqueeze(1))[..., 0]
        weights = masked_softmax(logits, valid, -1)
        return l2norm((weights.unsqueeze(-1) * x).sum(1))


def _pack(seq: torch.Tensor, glo: torch.Tensor) -> torch.Tensor:
    """(N, W, 2D): the sequence, and the global vector at position 0 of the second half."""
    extra = F.pad(glo.unsqueeze(1), (0, 0, 0, seq.size(1) - 1))
    return torch.cat([seq, extra], -1)


# --------------------------------------------------------------------------- reasoning
class GraphReasoning(nn.Module):
    """One SGR step over the nodes x (..., N, S) with node mask (..., N)."""

    def __init__(self, sim_dim: int):
        super().__init__()
        self.query = _xavier(sim_dim, sim_dim)
        self.key = _xavier(sim_dim, sim_dim)
        self.edge = _xavier(sim_dim, sim_dim)

    def _left(self, x: torch.Tensor) -> torch.Tensor:
        """y with y_i . x_j = Q(x_i) . K(x_j) up to a term constant in j."""
        wq, wk, bq = self.query.weight, self.key.weight, self.query.bias
        a = (wq.t() @ wk).to(x.dtype)
        return torch.addmm((wk.t() @ bq).to(x.dtype), x.reshape(-1, x.size(-1)), a).view_as(x)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        logits = self._left(x) @ x.transpose(-1, -2)                   # (..., N, N)
        edges = masked_softmax(logits, valid.unsqueeze(-2), -1)
        return torch.relu(_linear(self.edge, edges @ x))

    def root(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """forward(x, valid)[..., 0, :] alone."""
        y0 = self._left(x[..., :1, :])                                 # (..., 1, S)
        logits = y0 @ x.transpose(-1, -2)                              # (..., 1, N)
        edges = masked_softmax(logits, valid.unsqueeze(-2), -1)
        return torch.relu(_linear(self.edge, (edges @ x)[..., 0, :]))


# --------------------------------------------------------------------------- the base
class SGRAFBase(CrossAttentionModel):
    """Encoders, global vectors and similarity vectors shared by SGR and SAF; subclasses
    turn the nodes of a chunk into scores (`_score_nodes`)."""

    # smooth in its inputs: float32 blocks agree with the full matrix to ~1e-7
    score_dtype = torch.float32

    def __init__(self, config: dict[str, Any]):
        c = config
        att = Attention("t2i", lambda_softmax=float(c["lambda_softmax"]), raw_norm="clipped_l2norm")
        super().__init__(config, [att], bidirectional=True, word_dropout=float(c["word_dropout"]))
        d, s = int(c["embed_size"]), int(c["sim_dim"])
        self.embed_size, self.num_regions = d, int(c["num_regions"])
        self.img_sa = SelfAttentionPool(d, c["dropout"], num_regions=self.num_regions)
        self.txt_sa = SelfAttentionPool(d, c["dropout"])
        self.sim_loc = _xavier(d, s)
        self.sim_glo = _xavier(d, s)
        self.sim_eval = _xavier(s, 1)

    # --- encoders ---------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, img_lengths: torch.Tensor) -> Encoded:
        enc = self.img_enc(images, img_lengths)
        width = enc.data.size(1)
        if width > self.num_regions:
            raise InputError("num_regions", f"{self.name}: an image has {width} regions, the model "
                             f"has num_regions={self.num_regions} (VisualSA's BatchNorm1d has one "
                             f"channel per region slot); build it with num_regions={width}")
        regions = F.pad(enc.data, (0, 0, 0, self.num_regions - width))
        glo = self.img_sa(regions, length_mask(enc.lengths, self.num_regions))
        return Encoded(_pack(enc.data, glo), enc.lengths)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        enc = self.txt_enc(tokens, lengths)
        glo = self.txt_sa(enc.data, length_mask(enc.lengths, enc.data.size(1)))
        return Encoded(_pack(enc.data, glo), enc.lengths)

    def _unpack(self, enc: Encoded, dtype: torch.dtype) -> tuple[Items, torch.Tensor]:
        d = self.embed_size
        if enc.data.size(-1) != 2 * d:
            raise ValueError(f"{self.name} scores its own encodings (feature width {2 * d}), "
                             f"got width {enc.data.size(-1)}")
        return (Items.of(Encoded(enc.data[..., :d], enc.lengths), dtype),
                enc.data[:, 0, d:].to(dtype))

    # --- similarity vectors -----------------------------------------------------------
    def _nodes(self, context: torch.Tensor, words: torch.Tensor, img_glo: torch.Tensor,
               cap_glo: torch.Tensor) -> torch.Tensor:
        """(A, B, L+1, S) nodes from the attended contexts (A, B, L, D), the words
        (broadcastable), the global vectors (A, 1 | B, D) and (1 | A, B, D)."""
        loc = _unit(_linear(self.sim_loc, (_unit(context) - words).square()))
        glo = _unit(_linear(self.sim_glo, (img_glo - cap_glo).square()))
        return torch.cat([glo.unsqueeze(2), loc], 2)

    def _shard_nodes(self, v: Items, v_glo: torch.Tensor, w: Items, w_glo: torch.Tensor
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(nodes (ni, nt, L+1, S), node mask (1, nt, L+1)) per chunk of images."""
        (ni, r, d), (nt, l) = v.data.shape, w.data.shape[:2]
        per_pair = (l + 1) * max(d, int(self.config["sim_dim"]), r)
        step = max(1, BUDGET // max(1, nt * per_pair))
        node_valid = torch.cat([w.valid.new_ones(nt, 1), w.valid], 1).unsqueeze(0)
        for a in range(0, ni, step):
            vc = v.rows(a, a + step)
            n = len(vc)
            raw = (w.data.reshape(nt * l, d) @ vc.data.reshape(n * r, d).t()).view(nt, l, n, r)
            dots = raw.permute(2, 0, 1, 3).contiguous()              # (image, caption, word, region)
            weights = attention_weights(dots, w.valid[None], vc.valid[:, None], self.attentions[0])
            context = torch.bmm(weights.view(n, nt * l, r), vc.data).view(n, nt, l, d)
            yield (self._nodes(context, w.data[None], v_glo[a:a + n, None], w_glo[None]),
                   node_valid)

    def _pair_nodes(self, v: Items, v_glo: torch.Tensor, w: Items, w_glo: torch.Tensor
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(nodes (P, 1, L+1, S), node mask (P, 1, L+1)) per chunk of aligned pairs."""
        (p, r, d), l = v.data.shape, w.data.size(1)
        step = max(1, BUDGET // ((l + 1) * max(d, int(self.config["sim_dim"]), r)))
        for a in range(0, p, step):
            vc, wc = v.rows(a, a + step), w.rows(a, a + step)
            n = len(vc)
            dots = torch.einsum("pld,prd->plr", wc.data, vc.data).unsqueeze(1)   # (P, 1, L, R)
            weights = attention_weights(dots, wc.valid[:, None], vc.valid[:, None],
                                        self.attentions[0])
            context = torch.bmm(weights.view(n, l, r), vc.data).view(n, 1, l, d)
            node_valid = torch.cat([wc.valid.new_ones(n, 1), wc.valid], 1).unsqueeze(1)
            yield (self._nodes(context, wc.data[:, None], v_glo[a:a + n, None],
                               w_glo[a:a + n, None]), node_valid)

    def _score(self, vec: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(_linear(self.sim_eval, vec)[..., 0])

    def _score_nodes(self, chunks, columns: bool, stats: list) -> torch.Tensor:
        """(A, B) scores of the nodes of every chunk, concatenated along A. `columns`: the
        chunks are images x captions of one shard (True) or aligned pairs (False); `stats`
        collects what _finish_columns needs after the whole shard."""
        raise NotImplementedError

    # --- scores -----------------------------------------------------------------------
    def similarity(self, img: Encoded, txt: Encoded) -> torch.Tensor:
        dtype = self.compute_dtype()
        (v, v_glo), (w, w_glo) = self._unpack(img, dtype), self._unpack(txt, dtype)
        if len(v) == 0 or len(w) == 0:
            return img.data.new_zeros((len(v), len(w)))
        groups = length_groups(w.lengths)
        stats: list = []
        cols = [self._score_nodes(self._shard_nodes(v, v_glo, w.take(idx), w_glo[idx]), True, stats)
                for idx in groups]
        order = torch.cat(groups)
        self._finish_columns(stats, order)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return torch.cat(cols, 1).index_select(1, inverse).to(img.data.dtype)

    def pair_scores(self, img: Encoded, txt: Encoded) -> torch.Tensor:
        if len(img) != len(txt):
            raise ValueError(f"pair_scores needs aligned rows, got {len(img)} images and "
                             f"{len(txt)} captions")
        dtype = self.compute_dtype()
        (v, v_glo), (w, w_glo) = self._unpack(img, dtype), self._unpack(txt, dtype)
        if len(v) == 0:
            return img.data.new_zeros(0)
        return self._score_nodes(self._pair_nodes(v, v_glo, w, w_glo), False, [])[:, 0].to(img.data.dtype)

    def _finish_columns(self, stats: list, order: torch.Tensor) -> None:
        """After a similarity call: `stats` from _score_nodes, `order` the captions of its
        column groups."""


@register_model("sgr")
class SGR(SGRAFBase):
    """Similarity graph reasoning: `sgr_step` steps, score read at the global node."""

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.steps = nn.ModuleList(GraphReasoning(int(config["sim_dim"]))
                                   for _ in range(int(config["sgr_step"])))

    def _score_nodes(self, chunks, columns: bool, stats: list) -> torch.Tensor:
        out = []
        for x, valid in chunks:
            for step in self.steps[:-1]:
                x = step(x, valid)
            out.append(self._score(self.steps[-1].root(x, valid)))
        return torch.cat(out)


@register_model("saf")
class SAF(SGRAFBase):
    """Similarity attention filtration: BN'd sigmoid gates, L1 over the nodes."""

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.filt = _xavier(int(config["sim_dim"]), 1)
        self.filt_bn = SegmentBatchNorm1d(1)

    def _gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self.filt, x)[..., 0]                           # (A, B, N)

    def _filter(self, x: torch.Tensor, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Scores from the nodes and their BN'd gate logits."""
        gate = torch.where(valid, torch.sigmoid(z), 0.0)
        a = gate / (gate.sum(-1, keepdim=True) + L1_EPS)
        return self._score(_unit((a.unsqueeze(-2) @ x)[..., 0, :]))

    def _affine(self, z: torch.Tensor, mean, var) -> torch.Tensor:
        bn = self.filt_bn
        w, b = bn.weight.to(z.dtype), bn.bias.to(z.dtype)
        return (z - mean) * torch.rsqrt(var + bn.eps) * w + b

    def _score_nodes(self, chunks, columns: bool, stats: list) -> torch.Tensor:
        bn = self.filt_bn
        if not bn.training:
            rm, rv = bn.running_mean.to(self.compute_dtype()), bn.running_var.to(self.compute_dtype())
            return torch.cat([self._filter(x, self._affine(self._gate_logits(x), rm, rv), valid)
                              for x, valid in chunks])
        parts = [(x, self._gate_logits(x), valid) for x, valid in chunks]
        z_all = torch.cat([z for _, z, _ in parts])                     # (A, B, N)
        m = parts[0][2].expand_as(z_all) if columns else torch.cat([v for *_, v in parts])
        m = m.to(z_all.dtype)
        dims = (0, 2) if columns else (0, 1, 2)
        count = m.sum(dims, keepdim=True)
        mean = (z_all * m).sum(dims, keepdim=True) / count
        var = ((z_all - mean).pow(2) * m).sum(dims, keepdim=True) / count
        out = []
        for x, z, valid in parts:
            out.append(self._filter(x, self._affine(z, mean, var), valid))
        with torch.no_grad():
            unbiased = (var * count / (count - 1)).flatten()
            if columns:   # one reference BN call per caption, applied in caption order
                stats.append((mean.flatten(), unbiased))   # by _finish_columns
            else:         # one BN call over all pairs
                _bn_update_sequence(bn, [float(mean)], [float(unbiased)])
        return torch.cat(out)

    def _finish_columns(self, stats: list, order: torch.Tensor) -> None:
        if not stats:
            return
        means = torch.cat([m for m, _ in stats])
        variances = torch.cat([v for _, v in stats])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        with torch.no_grad():
            _bn_update_sequence(self.filt_bn, means[inverse].tolist(), variances[inverse].tolist())
