"""`toy_cross`: a toy cross-attention model (kind "cross") for the interface tests.

It is one model file plus `toy_cross.yaml` beside it, found through the environment
variable ITM_PIPELINE_MODELS (pipeline.models.registry): no edit of the package.

Image: per-region Linear(img_dim -> D), each region L2-normalised; padding regions zero.
Text:  Embedding(vocab, word_dim) -> GRU(word_dim -> D), each word L2-normalised.
Both return sequences (`Encoded` with lengths).

Score (SCAN t2i-like): each valid word w_l of a caption attends over the valid regions
v_r of an image, a_lr = softmax_r(lambda * cos(w_l, v_r)) (padding regions masked out);
the attended context is c_l = sum_r a_lr v_r, and the score is the mean over the valid
words of cos(w_l, c_l). Since the words are unit vectors, w_l . c_l = sum_r a_lr cos(w_l, v_r).

The scores are computed in float64 and returned in the input dtype, so `similarity` over
any block of (images x captions) and `pair_scores` (a batched per-pair path) agree to the
float32 bit almost always: an evaluation through memory-bounded blocks then ranks exactly
like one full matrix. `similarity` walks the images in chunks so that no intermediate
exceeds about `_BUDGET` elements whatever the block size.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.base import ITMModel
from pipeline.models.features import Encoded
from pipeline.models.layers import l2norm, length_mask
from pipeline.models.registry import register_model
from pipeline.models.text import GRUTextEncoder

_BUDGET = 1 << 22   # elements of the largest intermediate of one similarity chunk


def _unit_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """l2norm of the valid rows of x (B, L, D), zero rows at padding. The padding is never
    normalised: the norm of a zero row has an infinite derivative (0 * inf = NaN
    gradients, although no score reads that row)."""
    m = mask.unsqueeze(-1)
    return torch.where(m, l2norm(torch.where(m, x, torch.ones_like(x))), torch.zeros_like(x))


@register_model("toy_cross")
class ToyCross(ITMModel):
    kind = "cross"
    score_block = (32, 128)

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        c = self.config
        embed = int(c["embed_size"])
        self.lam = float(c["lambda_softmax"])
        self.img_fc = nn.Linear(int(c["img_dim"]), embed)
        self.txt_rnn = GRUTextEncoder(c["vocab_size"], c["word_dim"], embed,
                                      num_layers=c["num_layers"], bidirectional=False)

    # --- encoders -----------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, img_lengths: torch.Tensor) -> Encoded:
        lengths = img_lengths.to(device=images.device, dtype=torch.long)
        width = int(lengths.max()) if lengths.numel() else 0
        regions = self.img_fc(images[:, :width])
        return Encoded(_unit_rows(regions, length_mask(lengths, width)), lengths)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        lengths = lengths.to(device=tokens.device, dtype=torch.long)
        words, _ = self.txt_rnn(tokens, lengths)   # (B, max_len, D), zero past each length
        return Encoded(_unit_rows(words, length_mask(lengths, words.size(1))), lengths)

    # --- scores -------------------------------------------------------------------
    @staticmethod
    def _valid(enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """(float64 data with padding positions set to 0, validity mask): whatever the
        padding holds, it never enters a score."""
        mask = enc.mask()
        data = torch.where(mask.unsqueeze(-1), enc.data.double(), 0.0)
        return data, mask

    def _attend(self, cos: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """softmax over the last (region) axis of lambda * cos, padding regions weighted 0."""
        # the dtype's lowest finite value, not -inf: an image without any valid region
        # gets all-zero weights instead of NaN (forward and backward)
        logits = (self.lam * cos).masked_fill(~region_mask, torch.finfo(cos.dtype).min)
        attn = torch.softmax(logits, dim=-1)
        return torch.where(region_mask, attn, 0.0)

    @staticmethod
    def _word_mean(cos: torch.Tensor, attn: torch.Tensor, ctx: torch.Tensor,
                   word_mask: torch.Tensor) -> torch.Tensor:
        """Mean over valid words of cos(w_l, c_l), w_l unit (or 0 at padding)."""
        dot = (attn * cos).sum(dim=-1)                       # w_l . c_l
        norm = ctx.pow(2).sum(dim=-1).add(1e-12).sqrt()      # |c_l| (|w_l| = 1)
        per_word = torch.where(word_mask, dot / norm, 0.0)
        return per_word.sum(dim=-1) / word_mask.sum(dim=-1).clamp(min=1)

    def similarity(self, img: Encoded, txt: Encoded) -> torch.Tensor:
        v, v_mask = self._valid(img)      # (Ni, R, D), (Ni, R)
        w, w_mask = self._valid(txt)      # (Nt, L, D), (Nt, L)
        n_img, n_txt = v.size(0), w.size(0)
        per_image = max(1, n_txt * w.size(1) * max(v.size(1), v.size(2)))
        step = max(1, _BUDGET // per_image)
        rows = []
        for a in range(0, n_img, step):
            vi, mi = v[a:a + step], v_mask[a:a + step]
            cos = torch.einsum("tld,ird->itlr", w, vi)                  # (i, Nt, L, R)
            attn = self._attend(cos, mi[:, None, None, :])
            ctx = torch.einsum("itlr,ird->itld", attn, vi)
            rows.append(self._word_mean(cos, attn, ctx, w_mask.unsqueeze(0)))
        out = torch.cat(rows) if rows else v.new_zeros((0, n_txt))
        return out.to(img.data.dtype)

    def pair_scores(self, img: Encoded, txt: Encoded) -> torch.Tensor:
        if len(img) != len(txt):
            raise ValueError(f"pair_scores needs aligned rows, got {len(img)} images and "
                             f"{len(txt)} captions")
        v, v_mask = self._valid(img)      # (P, R, D)
        w, w_mask = self._valid(txt)      # (P, L, D)
        cos = torch.einsum("pld,prd->plr", w, v)
        attn = self._attend(cos, v_mask[:, None, :])
        ctx = torch.einsum("plr,prd->pld", attn, v)
        return self._word_mean(cos, attn, ctx, w_mask).to(img.data.dtype)
