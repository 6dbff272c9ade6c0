"""SCAN (Lee et al., "Stacked Cross Attention for Image-Text Matching", ECCV 2018;
kuanghuei/SCAN).

Image: per-region FC + L2 (pipeline.models.region_encoder). Text: a GRU (`bi_gru`: the
BiGRU with directions averaged, as the README runs it; the reference's default is a
uni-GRU), per-word L2 (pipeline.models.word_encoder). Score of a pair: ONE direction
(pipeline.models.cross_attention), `direction`
    t2i: each word attends over the regions, aggregated over the words;
    i2t: each region attends over the words, aggregated over the regions;
with `raw_feature_norm` over the query axis, softmax over the sources x `lambda_softmax`,
cosine of each query with its attended context, and `aggregation`
    lse: (1/lambda_lse) log sum exp(lambda_lse cos)  in [max cos, max cos + ln(n)/lambda_lse]
    avg: the mean cosine, in [-1, 1];  max; sum.
The paper's best numbers average the similarities of a t2i and an i2t model.

Deliberate differences: `raw_feature_norm: l1norm | clipped_l1norm` work (the reference
calls an undefined function); the LSE subtracts its max (same value, no overflow).
"""
from __future__ import annotations

from typing import Any

import torch

from pipeline.models.cross_attention import Attention, CrossAttentionModel
from pipeline.models.registry import register_model


@register_model("scan")
class SCAN(CrossAttentionModel):
    # smooth in its inputs (no gate): float32 blocks agree with the full matrix to ~1e-7
    score_dtype = torch.float32

    def __init__(self, config: dict[str, Any]):
        c = config
        attn = Attention(c["direction"], lambda_softmax=float(c["lambda_softmax"]),
                         raw_norm=c["raw_feature_norm"], aggregation=c["aggregation"],
                         lambda_lse=float(c["lambda_lse"]))
        super().__init__(config, [attn], bidirectional=bool(c["bi_gru"]))
