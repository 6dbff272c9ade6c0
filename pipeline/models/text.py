"""Recurrent caption encoders over learned word embeddings (VSE++, VSE∞ BiGRU branch).

Captions come as padded id tensors (B, L) with their lengths; the RNN runs on a packed
sequence, so padding never enters the recurrence and the batch need not be sorted.
"""
from __future__ import annotations

import torch
from torch import nn


def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of (B, L, ...) inside its length; padding stays at the end."""
    b, l = x.shape[:2]
    t = torch.arange(l, device=x.device).unsqueeze(0).expand(b, l)
    n = lengths.to(x.device).unsqueeze(1)
    idx = torch.where(t < n, n - 1 - t, t)
    return x.gather(1, idx.view(b, l, *([1] * (x.dim() - 2))).expand_as(x))


class GRUTextEncoder(nn.Module):
    """Embedding(vocab, word_dim) -> Dropout(`dropout`, default 0) -> (Bi)GRU(word_dim -> hidden_size).

    `forward` returns the per-token states (B, max_len, hidden_size), the two directions
    averaged when bidirectional, and the last state of the top layer (B, hidden_size):
    for a unidirectional GRU that is the output at the last valid token; for a BiGRU it
    is the average of the forward direction's last and the backward direction's first.

    Why not nn.GRU on a packed sequence: on CPU its backward is ~2x slower than on a
    padded batch. Each direction is a unidirectional GRU over the right-padded batch;
    the backward direction reads every caption reversed within its length, so padding
    never enters a valid state and the result equals the packed BiGRU.
    """

    def __init__(self, vocab_size: int, word_dim: int, hidden_size: int, num_layers: int = 1,
                 bidirectional: bool = False, dropout: float = 0.0):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.bidirectional = bool(bidirectional)
        self.num_layers = int(num_layers)
        self.embed = nn.Embedding(int(vocab_size), int(word_dim))
        # SGRAF's word dropout; Identity at 0 so that the other models draw no random numbers
        self.embed_dropout = nn.Dropout(float(dropout)) if dropout else nn.Identity()
        dirs = 2 if self.bidirectional else 1
        self.fwd = nn.ModuleList()
        self.bwd = nn.ModuleList()
        for layer in range(self.num_layers):
            d_in = int(word_dim) if layer == 0 else dirs * self.hidden_size
            self.fwd.append(nn.GRU(d_in, self.hidden_size, batch_first=True))
            if self.bidirectional:
                self.bwd.append(nn.GRU(d_in, self.hidden_size, batch_first=True))
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = lengths.detach().to(tokens.device, torch.long)
        max_len = int(lengths.max())
        if max_len > tokens.size(1):
            raise ValueError(f"a caption length ({max_len}) exceeds the token axis ({tokens.size(1)})")
        x = self.embed_dropout(self.embed(tokens[:, :max_len]))
        last_pos = (lengths - 1).view(-1, 1, 1).expand(-1, 1, self.hidden_size)
        for layer in range(self.num_layers):
            out_f, _ = self.fwd[layer](x)
            if not self.bidirectional:
                x = out_f
                continue
            out_b, _ = self.bwd[layer](reverse_within_length(x, lengths))
            out_b = reverse_within_length(out_b, lengths)
            x = torch.cat([out_f, out_b], dim=-1)
        if self.bidirectional:
            out_f, out_b = x[..., :self.hidden_size], x[..., self.hidden_size:]
            last = (out_f.gather(1, last_pos).squeeze(1) + out_b[:, 0]) / 2
            out = (out_f + out_b) / 2
        else:
            out = x
            last = out.gather(1, last_pos).squeeze(1)
        # states past a caption's end are not meaningful: zero them like a packed RNN
        mask = (torch.arange(max_len, device=x.device).unsqueeze(0) < lengths.unsqueeze(1))
        return out * mask.unsqueeze(-1).to(out.dtype), last
