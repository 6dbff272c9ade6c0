"""VSRN (Li et al., "Visual Semantic Reasoning for Image-Text Matching", ICCV 2019).

Image: per-region FC(img_dim -> D) (Xavier-uniform, zero bias); optionally (`fc_l2norm`)
L2-normalised; `gcn_layers` (4) Rs_GCN blocks of relation reasoning
    R = θ(V)ᵀ φ(V) / N,  V* = W(R g(V)) + V
with θ, φ, g per-region linear maps to `gcn_inter_channels` (the reference's 1x1 Conv1d,
same initialisation), N the number of valid regions and W a linear map back followed by a
BatchNorm whose weight and bias start at zero (every block starts as the identity); the
reasoned regions are L2-normalised and a GRU (D -> D) reads them in order: its state after
the last valid region is the image embedding, optionally (`final_bn`) batch-normalised,
then L2-normalised.
Text: Embedding(vocab, word_dim) -> GRU(word_dim -> D), the state at the last valid token,
L2 norm.
Caption generation (training only): an S2VT-style decoder reads the reasoned regions
(FC -> dropout -> GRU), starts from the region GRU's last valid state and, teacher-forced,
attends over the region states at every step (additive attention on [region state,
decoder state]); its input is [word embedding, attention context] with dropout. The loss
is the token cross-entropy summed over the valid targets and divided by the number of
captions, computed on the anchors only (`encode_batch`), times `caption_loss_weight`.

Reference details kept:
- Its l2norm normalises dim 1, which for the (B, regions, D) tensors is the REGION axis:
  each channel is normalised over the image's regions (for the FC features and for the
  reasoned features). `region_norm: regions` reproduces this; `features` normalises each
  region vector instead.
- COCO vs Flickr30K (the reference's `f30k_precomp` branch): COCO L2-normalises the FC
  region features (`fc_l2norm: true`); F30K does not and adds a BatchNorm on the image
  embedding before the final L2 norm (`fc_l2norm: false`, `final_bn: true`), and decays the
  lr at epoch 10 instead of 15.
Deliberate differences:
- The reference's optimizer lists the captioning parameters twice (decoder, encoder and
  the caption model that contains both), so Adam steps them twice per iteration and the
  gradient clipping counts them twice; here every parameter is in one group, once.
- Its caption mask also covers the first position after <end>, training the decoder to
  predict <pad>; here padding is masked, and captions are not truncated to 60 tokens.
- Padded regions (real data may have fewer than 36) are excluded everywhere: from R and
  its N, from the BatchNorm statistics, from the attention, and the GRUs' last valid
  states are used. Every BatchNorm honours `ghost_bn.bn_segments`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import InputError
from pipeline.models.base import ITMModel
from pipeline.models.features import Encoded
from pipeline.models.ghost_bn import SegmentBatchNorm1d, bn_segments
from pipeline.models.layers import apply_to_valid, l2norm, length_mask, xavier_linear_
from pipeline.models.registry import register_model
from pipeline.models.text import GRUTextEncoder

_REGION_NORMS = ("regions", "features")


def last_valid(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L, H) -> (B, H): the state at position lengths[b] - 1."""
    idx = (lengths - 1).view(-1, 1, 1).expand(-1, 1, states.size(-1))
    return states.gather(1, idx).squeeze(1)


def caption_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
                          ) -> torch.Tensor:
    """Teacher-forced caption loss: logits (B, T, V) predict tokens[:, 1:T+1]; the target
    at step t is valid when t + 1 < lengths[b]. Summed over valid targets, divided by B."""
    t = logits.size(1)
    valid = length_mask(lengths.to(logits.device) - 1, t)
    targets = tokens[:, 1:t + 1]
    return F.cross_entropy(logits[valid], targets[valid], reduction="sum") / tokens.size(0)


def _gru_update(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One GRU step from the input and hidden projections (torch's gate order r, z, n)."""
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


class RsGCN(nn.Module):
    """One Rs_GCN block on channels-last region features (B, L, C) with zero padded rows."""

    def __init__(self, channels: int, inter_channels: int):
        super().__init__()
        self.theta = nn.Linear(channels, inter_channels)
        self.phi = nn.Linear(channels, inter_channels)
        self.g = nn.Linear(channels, inter_channels)
        self.w = nn.Sequential(nn.Linear(inter_channels, channels), SegmentBatchNorm1d(channels))
        nn.init.zeros_(self.w[1].weight)
        nn.init.zeros_(self.w[1].bias)

    def forward(self, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """mask None: every region is valid (no masking work at all)."""
        # θ, φ and g read the same input: one GEMM of 3 x inter_channels columns (the
        # same parameters, so checkpoints keep their keys)
        w = torch.cat([self.theta.weight, self.phi.weight, self.g.weight])
        b = torch.cat([self.theta.bias, self.phi.bias, self.g.bias])
        theta, phi, g = F.linear(v, w, b).split(self.theta.out_features, dim=-1)
        if mask is None:
            n_valid = v.size(1)
        else:  # padded regions get no column of R (φ is the bias there, not zero)
            phi = phi * mask.unsqueeze(-1).to(v.dtype)
            n_valid = mask.sum(dim=1).to(v.dtype).view(-1, 1, 1)
        y = torch.bmm(theta, phi.transpose(1, 2)) / n_valid @ g
        # W's BatchNorm sees the valid rows only; padded rows stay zero
        return v + apply_to_valid(self.w, y, mask)


class CaptionDecoder(nn.Module):
    """S2VT-style attention GRU decoder (teacher forcing only)."""

    def __init__(self, vocab_size: int, feat_dim: int, hidden: int, word_dim: int,
                 att_dim: int, dropout: float):
        super().__init__()
        self.hidden = int(hidden)
        self.word_dim = int(word_dim)
        self.feat_fc = nn.Linear(feat_dim, hidden)
        self.feat_rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.att = nn.Linear(2 * hidden, att_dim)      # on [region state, decoder state]
        self.att_score = nn.Linear(att_dim, 1, bias=False)
        self.cell = nn.GRUCell(word_dim + hidden, hidden)  # input [word, context]
        self.out = nn.Linear(hidden, vocab_size)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_normal_(self.feat_fc.weight)
        nn.init.xavier_normal_(self.out.weight)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor,
                inputs: torch.Tensor) -> torch.Tensor:
        """Regions feats (B, L, F) with validity mask (B, L) and lengths (B,), input tokens
        (B, T) -> next-token logits (B, T, vocab)."""
        states, _ = self.feat_rnn(self.dropout(self.feat_fc(feats)))
        h = last_valid(states, lengths)
        # Everything that does not depend on the decoder state is computed once for all
        # steps: the attention keys and the word part of the GRU input projection. Dropout
        # on [word, context] is elementwise, so it splits into the two parts.
        w_keys, w_query = self.att.weight.split(self.hidden, dim=1)
        keys = F.linear(states, w_keys, self.att.bias)
        w_word, w_ctx = self.cell.weight_ih.split([self.word_dim, self.hidden], dim=1)
        words = F.linear(self.dropout(self.embed(inputs)), w_word, self.cell.bias_ih)
        outputs = []
        for word in words.unbind(dim=1):   # one backward node, not a full-size zero grad per step
            energy = self.att_score(torch.tanh(keys + F.linear(h, w_query).unsqueeze(1)))
            alpha = energy.squeeze(-1).masked_fill(~mask, float("-inf")).softmax(dim=1)
            context = torch.bmm(alpha.unsqueeze(1), states).squeeze(1)
            gi = word + F.linear(self.dropout(context), w_ctx)
            h = _gru_update(gi, F.linear(h, self.cell.weight_hh, self.cell.bias_hh), h)
            outputs.append(h)
        return self.out(torch.stack(outputs, dim=1))


@register_model("vsrn")
class VSRN(ITMModel):
    kind = "indep"

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        c = self.config
        src = "configs/models/vsrn.yaml"
        if c["region_norm"] not in _REGION_NORMS:
            raise InputError(src, f"region_norm must be one of {_REGION_NORMS}, "
                                  f"got {c['region_norm']!r}")
        embed = int(c["embed_size"])
        inter = int(c["gcn_inter_channels"] or embed)
        dec_hidden = int(c["decoder_hidden"])
        self.norm_dim = 1 if c["region_norm"] == "regions" else -1
        self.fc_l2norm = bool(c["fc_l2norm"])
        self.no_imgnorm = bool(c["no_imgnorm"])
        self.no_txtnorm = bool(c["no_txtnorm"])
        self.caption_loss_weight = float(c["caption_loss_weight"])

        # image side
        self.img_fc = xavier_linear_(nn.Linear(int(c["img_dim"]), embed))
        self.gcn = nn.ModuleList(RsGCN(embed, inter) for _ in range(int(c["gcn_layers"])))
        self.img_rnn = nn.GRU(embed, embed, batch_first=True)
        self.img_bn = SegmentBatchNorm1d(embed) if c["final_bn"] else None

        # text side
        self.txt_rnn = GRUTextEncoder(c["vocab_size"], c["word_dim"], embed,
                                      num_layers=c["num_layers"], bidirectional=False)

        # caption generation (training only)
        self.decoder = CaptionDecoder(c["vocab_size"], embed, dec_hidden, c["decoder_word_dim"],
                                      int(c["decoder_att_dim"] or dec_hidden),
                                      float(c["decoder_dropout"]))

    # --- image side ---------------------------------------------------------------
    def reason_regions(self, images: torch.Tensor, img_lengths: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """GCN-reasoned, L2-normalised regions (B, L, D) (padded rows zero), their mask
        (B, L) and lengths (B,), L = the longest image of the batch."""
        lengths = img_lengths.to(device=images.device, dtype=torch.long)
        mask = length_mask(lengths)
        x = self.img_fc(images[:, :mask.size(1)])
        padded = not bool(mask.all())   # e.g. 36 regions everywhere: no masking work
        if padded:
            x = x * mask.unsqueeze(-1).to(images.dtype)
        if self.fc_l2norm:
            x = l2norm(x, dim=self.norm_dim)
        for block in self.gcn:
            x = block(x, mask if padded else None)
        return l2norm(x, dim=self.norm_dim), mask, lengths

    def embed_regions(self, feats: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        states, _ = self.img_rnn(feats)
        emb = last_valid(states, lengths)
        if self.img_bn is not None:
            emb = self.img_bn(emb)
        return Encoded(emb if self.no_imgnorm else l2norm(emb))

    def encode_image(self, images: torch.Tensor, img_lengths: torch.Tensor) -> Encoded:
        feats, _, lengths = self.reason_regions(images, img_lengths)
        return self.embed_regions(feats, lengths)

    # --- text side ----------------------------------------------------------------
    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        _, last = self.txt_rnn(tokens, lengths)
        return Encoded(last if self.no_txtnorm else l2norm(last))

    # --- training -----------------------------------------------------------------
    def caption_loss(self, feats: torch.Tensor, mask: torch.Tensor, img_lengths: torch.Tensor,
                     tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Unweighted caption-generation loss of captions tokens (B, L) (<start> ... <end>)
        given their images' reasoned regions."""
        lengths = lengths.to(device=tokens.device, dtype=torch.long)
        n_regions, n_tokens = int(img_lengths.max()), int(lengths.max())
        logits = self.decoder(feats[:, :n_regions], mask[:, :n_regions], img_lengths,
                              tokens[:, :n_tokens - 1])
        return caption_cross_entropy(logits, tokens[:, :n_tokens], lengths)

    def encode_batch(self, batch: dict[str, torch.Tensor], *,
                     segments: list[int] | None = None
                     ) -> tuple[Encoded, Encoded, torch.Tensor | None, dict[str, float]]:
        with bn_segments(segments):
            feats, mask, img_lengths = self.reason_regions(batch["images"], batch["img_lengths"])
            img = self.embed_regions(feats, img_lengths)
            txt = self.encode_text(batch["tokens"], batch["lengths"])
        if self.caption_loss_weight == 0:
            return img, txt, None, {}
        n = segments[0] if segments is not None else len(img)   # the anchors
        loss = self.caption_loss(feats[:n], mask[:n], img_lengths[:n], batch["tokens"][:n],
                                 batch["lengths"][:n])
        return img, txt, self.caption_loss_weight * loss, {"caption": float(loss.detach())}
