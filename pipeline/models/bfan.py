"""BFAN (Liu et al., "Focus Your Attention: A Bidirectional Focal Attention Network for
Image-Text Matching", ACM MM 2019; CrossmodalGroup/BFAN).

Image: per-region FC + L2 (pipeline.models.region_encoder). Text: BiGRU, directions
averaged, per-word L2 (pipeline.models.word_encoder). Score of a pair:

    S(i, t) = t2i(i, t) + i2t(i, t)  in [-2, 2]

each direction being focal attention (pipeline.models.cross_attention): logits
LeakyReLU(0.1) + L2 over the query axis, softmax over the sources x `lambda_softmax` (20),
the focal gate `focal_type` (equal: a_s > 1/n; prob: a_s > sum a^1.5 / sum sqrt(a)),
renormalised, cosine of each query with its attended context, mean over the queries
(t2i: words attend over regions; i2t: regions attend over words). No BN, no dropout: a
pair's score does not depend on the batch.

Deliberate difference: the all-equal case (one-word captions in i2t, equal weights) that
is 0/0 = NaN in the reference keeps every source (the plain softmax weights).
The papers' and AOQ's reported BFAN is an ensemble of an `equal` and a `prob` model
(similarities averaged); each is trained on its own.
"""
from __future__ import annotations

from typing import Any

from pipeline.models.cross_attention import Attention, CrossAttentionModel
from pipeline.models.registry import register_model


@register_model("bfan")
class BFAN(CrossAttentionModel):
    def __init__(self, config: dict[str, Any]):
        c = config
        attn = dict(lambda_softmax=float(c["lambda_softmax"]), raw_norm="clipped_l2norm",
                    focal=c["focal_type"], aggregation="avg")
        super().__init__(config, [Attention("t2i", **attn), Attention("i2t", **attn)],
                         bidirectional=True)
