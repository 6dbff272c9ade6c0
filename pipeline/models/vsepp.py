"""VSE++ (Faghri et al., BMVC 2018) on region features.

Image: FC(img_dim -> D) averaged over the valid regions (computed as the FC of the mean
region, which is the same affine map), L2 norm. Text: Embedding(vocab, word_dim) ->
GRU(word_dim -> D), the hidden state at the last valid token, L2 norm. Trained with the
max-violation hinge loss of the base class.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.models.base import ITMModel
from pipeline.models.features import Encoded
from pipeline.models.layers import l2norm, length_mask, xavier_linear_
from pipeline.models.registry import register_model
from pipeline.models.text import GRUTextEncoder


@register_model("vsepp")
class VSEPP(ITMModel):
    kind = "indep"

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        c = self.config
        embed = int(c["embed_size"])
        self.no_imgnorm = bool(c["no_imgnorm"])
        self.no_txtnorm = bool(c["no_txtnorm"])
        self.img_fc = xavier_linear_(nn.Linear(int(c["img_dim"]), embed))
        self.txt_rnn = GRUTextEncoder(c["vocab_size"], c["word_dim"], embed,
                                      num_layers=c["num_layers"], bidirectional=False)

    def encode_image(self, images: torch.Tensor, img_lengths: torch.Tensor) -> Encoded:
        lengths = img_lengths.to(device=images.device, dtype=torch.long)
        max_len = int(lengths.max())
        mask = length_mask(lengths, max_len).unsqueeze(-1).to(images.dtype)
        mean = (images[:, :max_len] * mask).sum(dim=1) / lengths.unsqueeze(1).to(images.dtype)
        emb = self.img_fc(mean)
        return Encoded(emb if self.no_imgnorm else l2norm(emb))

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        _, last = self.txt_rnn(tokens, lengths)
        return Encoded(last if self.no_txtnorm else l2norm(last))
