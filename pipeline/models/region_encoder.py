"""The image side of the SCAN lineage (SCAN, BFAN, SGR/SAF): one vector per region.

    v_r = W x_r + b,  W ~ U(-a, a), a = sqrt(6 / (img_dim + D)) (Xavier-uniform), b = 0
    v_r <- v_r / (|v_r| + 1e-8)            per region, unless `no_imgnorm`

The references feed raw BUTD features in (their "already l2-normalized" comment is
wrong) and have no other image layer. Padding regions (positions >= the image's region
count) are zero rows and never normalised; the result is an `Encoded` sequence with the
region counts as lengths.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.models.features import Encoded
from pipeline.models.layers import l2norm_valid, length_mask, xavier_linear_


class RegionEncoder(nn.Module):
    def __init__(self, img_dim: int, embed_size: int, no_imgnorm: bool = False):
        super().__init__()
        self.fc = xavier_linear_(nn.Linear(int(img_dim), int(embed_size)))
        self.no_imgnorm = bool(no_imgnorm)

    def forward(self, images: torch.Tensor, img_lengths: torch.Tensor) -> Encoded:
        """images (B, R, F) zero-padded, img_lengths (B,) -> Encoded (B, max length, D)."""
        lengths = img_lengths.to(device=images.device, dtype=torch.long)
        width = int(lengths.max()) if lengths.numel() else 0
        mask = length_mask(lengths, width)
        regions = self.fc(images[:, :width])
        if self.no_imgnorm:   # the bias would make padding rows non-zero
            return Encoded(regions * mask.unsqueeze(-1).to(regions.dtype), lengths)
        return Encoded(l2norm_valid(regions, mask), lengths)
