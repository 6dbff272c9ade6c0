"""The text side of the SCAN lineage (SCAN, BFAN, SGR/SAF): one vector per word.

    e_l = Embedding(V, word_dim)[token_l]    init U(-0.1, 0.1)
    e_l <- Dropout(p)(e_l)                   SGRAF only (p = 0.4); off by default
    h_l = (GRU_fwd(e)_l + GRU_bwd(e)_l) / 2  BiGRU, directions averaged (or a uni-GRU: h = GRU(e))
    h_l <- h_l / (|h_l| + 1e-8)              per word, unless `no_txtnorm`

The recurrence is pipeline.models.text.GRUTextEncoder (padding never enters a state; the
GRUs keep PyTorch's default init, as the references). Padding positions are zero rows;
the result is an `Encoded` sequence with the caption lengths.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.models.features import Encoded
from pipeline.models.layers import l2norm_valid, length_mask
from pipeline.models.text import GRUTextEncoder


class WordEncoder(nn.Module):
    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, *, num_layers: int = 1,
                 bidirectional: bool = True, dropout: float = 0.0, no_txtnorm: bool = False):
        super().__init__()
        self.rnn = GRUTextEncoder(vocab_size, word_dim, embed_size, num_layers=num_layers,
                                  bidirectional=bidirectional, dropout=dropout)
        self.no_txtnorm = bool(no_txtnorm)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        """tokens (B, L) padded, lengths (B,) -> Encoded (B, max length, D)."""
        lengths = lengths.to(device=tokens.device, dtype=torch.long)
        words, _ = self.rnn(tokens, lengths)          # zero past each length
        if self.no_txtnorm:
            return Encoded(words, lengths)
        return Encoded(l2norm_valid(words, length_mask(lengths, words.size(1))), lengths)
