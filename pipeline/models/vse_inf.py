"""VSE∞ (Chen et al., "Learning the Best Pooling Strategy for Visual Semantic Embedding",
CVPR 2021), region-feature image side and BiGRU text side (the reference's `bigru` branch).

Image: per region FC(img_dim -> D) plus, for precomp_enc_type "basic", a residual
2-layer MLP(img_dim -> D/2 -> D, BatchNorm + ReLU) applied to the valid regions only;
GPO pooling over the valid regions; L2 norm.
Text: Embedding(vocab, word_dim) -> BiGRU(word_dim -> D), directions averaged; GPO over
the valid tokens; L2 norm.
Training tricks of the reference (random region drop, the sum-over-negatives warm-up
epoch) belong to the data pipeline and the training loop; `config["train"]` of the YAML
carries their defaults.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.models.base import ITMModel
from pipeline.models.features import Encoded
from pipeline.models.gpo import GPO
from pipeline.models.layers import MLP, apply_to_valid, l2norm, length_mask, xavier_linear_
from pipeline.models.registry import register_model
from pipeline.models.text import GRUTextEncoder

_ENC_TYPES = ("basic", "linear")
_TEXT_TYPES = ("bigru",)


@register_model("vse_inf")
class VSEInfinity(ITMModel):
    kind = "indep"

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        c = self.config
        src = "configs/models/vse_inf.yaml"
        if c["precomp_enc_type"] not in _ENC_TYPES:
            raise InputError(src, f"precomp_enc_type must be one of {_ENC_TYPES}, "
                                  f"got {c['precomp_enc_type']!r}")
        if c["text_enc_type"] not in _TEXT_TYPES:
            raise InputError(src, f"text_enc_type must be one of {_TEXT_TYPES}, "
                                  f"got {c['text_enc_type']!r}")
        img_dim, embed = int(c["img_dim"]), int(c["embed_size"])
        self.no_imgnorm = bool(c["no_imgnorm"])
        self.no_txtnorm = bool(c["no_txtnorm"])

        # image side
        self.img_fc = xavier_linear_(nn.Linear(img_dim, embed))
        self.img_mlp = (MLP(img_dim, embed // 2, embed, num_layers=2)
                        if c["precomp_enc_type"] == "basic" else None)
        self.img_gpo = GPO(c["gpo_d_pe"], c["gpo_d_hidden"], c["gpo_temperature"])

        # text side
        self.txt_rnn = GRUTextEncoder(c["vocab_size"], c["word_dim"], embed,
                                      num_layers=c["num_layers"], bidirectional=True)
        self.txt_gpo = GPO(c["gpo_d_pe"], c["gpo_d_hidden"], c["gpo_temperature"])

    def region_features(self, images: torch.Tensor, img_lengths: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-region embeddings (B, max_len, D) before pooling, and the lengths."""
        lengths = img_lengths.to(device=images.device, dtype=torch.long)
        max_len = int(lengths.max())
        images = images[:, :max_len]
        feats = self.img_fc(images)
        if self.img_mlp is not None:
            feats = feats + apply_to_valid(self.img_mlp, images, length_mask(lengths, max_len))
        return feats, lengths

    def encode_image(self, images: torch.Tensor, img_lengths: torch.Tensor) -> Encoded:
        feats, lengths = self.region_features(images, img_lengths)
        pooled, _ = self.img_gpo(feats, lengths)
        return Encoded(pooled if self.no_imgnorm else l2norm(pooled))

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        states, _ = self.txt_rnn(tokens, lengths)
        pooled, _ = self.txt_gpo(states, lengths.to(states.device))
        return Encoded(pooled if self.no_txtnorm else l2norm(pooled))
