"""Recurrent caption encoders over learned word embeddings (VSE++, VSE∞ BiGRU branch).

Captions come as padded id tensors (B, L) with their lengths; the RNN runs on a packed
sequence, so padding never enters the recurrence and the batch need not be sorted.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class GRUTextEncoder(nn.Module):
    """Embedding(vocab, word_dim) -> (Bi)GRU(word_dim -> hidden_size).

    `forward` returns the per-token states (B, max_len, hidden_size), the two directions
    averaged when bidirectional, and the last state of the top layer (B, hidden_size):
    for a unidirectional GRU that is the output at the last valid token; for a BiGRU it
    is the average of the forward direction's last and the backward direction's first.
    """

    def __init__(self, vocab_size: int, word_dim: int, hidden_size: int, num_layers: int = 1,
                 bidirectional: bool = False):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.bidirectional = bool(bidirectional)
        self.embed = nn.Embedding(int(vocab_size), int(word_dim))
        self.rnn = nn.GRU(int(word_dim), self.hidden_size, int(num_layers), batch_first=True,
                          bidirectional=self.bidirectional)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        lengths_cpu = lengths.detach().to("cpu", torch.long)
        max_len = int(lengths_cpu.max())
        if max_len > tokens.size(1):
            raise ValueError(f"a caption length ({max_len}) exceeds the token axis ({tokens.size(1)})")
        x = self.embed(tokens[:, :max_len])
        packed = pack_padded_sequence(x, lengths_cpu, batch_first=True, enforce_sorted=False)
        out, h_n = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)
        if self.bidirectional:
            out = (out[..., :self.hidden_size] + out[..., self.hidden_size:]) / 2
            last = (h_n[-2] + h_n[-1]) / 2
        else:
            last = h_n[-1]
        return out, last
