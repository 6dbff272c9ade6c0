"""Generalized Pooling Operator (GPO) of VSE∞ (Chen et al., CVPR 2021).

The pooling weights depend only on the number of valid items n: the positions 0..n-1 are
encoded with sin/cos tables, run through a small BiGRU (directions averaged), mapped to
one score each, and turned into weights with a softmax at temperature 0.1. Each feature
dimension is sorted (descending) over the n valid items and pooled with those weights, so
the operator interpolates between max, mean and k-max pooling and ignores item order.

Because the weights only depend on n, the GRU runs once per distinct length in the batch.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.models.layers import length_mask, sinusoidal_encoding


class GPO(nn.Module):
    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1):
        super().__init__()
        self.d_pe = int(d_pe)
        self.d_hidden = int(d_hidden)
        self.temperature = float(temperature)
        self.gru = nn.GRU(self.d_pe, self.d_hidden, num_layers=1, batch_first=True,
                          bidirectional=True)
        self.linear = nn.Linear(self.d_hidden, 1, bias=False)
        # Position table cache: grown on demand, follows .to(device), not saved.
        self.register_buffer("_pe", sinusoidal_encoding(64, self.d_pe), persistent=False)

    def positional_encoding(self, length: int) -> torch.Tensor:
        """(length, d_pe) position table (cached)."""
        if self._pe.size(0) < length:
            new_len = max(length, 2 * self._pe.size(0))
            self._pe = sinusoidal_encoding(new_len, self.d_pe, device=self._pe.device,
                                           dtype=self._pe.dtype)
        return self._pe[:length]

    def pool_weights(self, lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        """(B, max_len) weights: softmax over positions < lengths[b], exactly 0 beyond."""
        lengths = lengths.to(torch.long)
        lengths_cpu = lengths.cpu()
        if int(lengths_cpu.min()) < 1:
            raise ValueError("GPO needs every length >= 1")
        if max_len is None:
            max_len = int(lengths_cpu.max())
        uniq, inverse = torch.unique(lengths_cpu, return_inverse=True)
        u_max = int(uniq.max())
        pe = self.positional_encoding(u_max).to(self.linear.weight.device)
        pes = pe.unsqueeze(0).expand(uniq.numel(), u_max, self.d_pe)
        packed = pack_padded_sequence(pes, uniq, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)
        out = (out[..., :self.d_hidden] + out[..., self.d_hidden:]) / 2
        scores = self.linear(out).squeeze(-1) / self.temperature        # (U, max_len)
        mask = length_mask(uniq.to(scores.device), max_len)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=1).to(scores.dtype)  # (U, max_len)
        return weights[inverse.to(weights.device)]

    def forward(self, features: torch.Tensor, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, L, D) with lengths (B,) -> pooled (B, D), weights (B, max_len)."""
        lengths = lengths.to(device=features.device, dtype=torch.long)
        max_len = int(lengths.max())
        if max_len > features.size(1):
            raise ValueError(f"a length ({max_len}) exceeds the feature axis ({features.size(1)})")
        weights = self.pool_weights(lengths, max_len)
        feats = features[:, :max_len]
        mask = length_mask(lengths, max_len).unsqueeze(-1)                # (B, L, 1)
        ordered = feats.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values
        ordered = ordered.masked_fill(~mask, 0)
        pooled = (ordered * weights.to(ordered.dtype).unsqueeze(-1)).sum(dim=1)
        return pooled, weights
