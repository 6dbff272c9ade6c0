"""`Encoded`: what a model's encoder returns and its scorer reads.

Either pooled vectors (N, D) (`lengths` None), or per-item sequences (N, L, D) of regions
or words with their valid lengths (N,): positions >= lengths[n] are padding. It slices,
concatenates and moves like a tensor, so callers (the losses, the scoring module) never
need to know which one a model produces.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    data: torch.Tensor
    lengths: torch.Tensor | None = None

    @property
    def pooled(self) -> bool:
        return self.lengths is None

    def __len__(self) -> int:
        return int(self.data.size(0))

    def __getitem__(self, rows) -> "Encoded":
        """Rows (a slice, index tensor or list: the batch axis is kept)."""
        if isinstance(rows, int):
            raise TypeError("index an Encoded with a slice or an index tensor (it keeps the batch axis)")
        if self.lengths is None:
            return Encoded(self.data[rows])
        lengths = self.lengths[rows]
        width = int(lengths.max()) if lengths.numel() else 0
        return Encoded(self.data[rows][:, :width], lengths)

    def mask(self) -> torch.Tensor:
        """(N, L) True at valid positions (sequences only)."""
        pos = torch.arange(self.data.size(1), device=self.data.device)
        return pos.unsqueeze(0) < self.lengths.to(self.data.device).unsqueeze(1)

    def to(self, device=None, dtype=None) -> "Encoded":
        lengths = None if self.lengths is None else self.lengths.to(device)
        return Encoded(self.data.to(device=device, dtype=dtype), lengths)

    def detach(self) -> "Encoded":
        return Encoded(self.data.detach(), self.lengths)

    @staticmethod
    def cat(parts: list["Encoded"]) -> "Encoded":
        """Rows of every part in order; sequences are zero-padded to the longest."""
        if parts[0].lengths is None:
            return Encoded(torch.cat([p.data for p in parts]))
        width = max(p.data.size(1) for p in parts)
        data = torch.cat([torch.nn.functional.pad(p.data, (0, 0, 0, width - p.data.size(1)))
                          for p in parts])
        return Encoded(data, torch.cat([p.lengths for p in parts]))
