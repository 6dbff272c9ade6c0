"""The one interface every ITM model implements (SPEC §5).

Two kinds:
- "indep": image and text are embedded independently; the score is a dot product of
  L2-normalised embeddings, so embeddings can be indexed (FAISS, tiled top-K).
- "cross": the score needs both sides at once (cross attention); `similarity` scores a
  shard of (images x captions), `pair_scores` scores aligned pairs.

A batch (from pipeline.data.datasets.collate_pairs) is a dict:
  images (B, R, F) float32, img_lengths (B,) long  -- regions, zero-padded
  tokens (B, L) long, lengths (B,) long             -- caption ids, <pad>=0, sorted by length desc
  index (B,) long caption ids, img_index (B,) long image ids
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.losses.triplet import hinge_triplet_loss, same_image_mask
from pipeline.models.ghost_bn import bn_segments


class ITMModel(nn.Module):
    kind: str = "indep"
    name: str = ""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)  # the JSON-serialisable architecture config

    # --- encoders -----------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, img_lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- scores -------------------------------------------------------------------
    def similarity(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """(Ni, Nt) scores between encoded images and encoded captions."""
        return img @ txt.t()

    def pair_scores(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """(P,) scores of aligned pairs img[p], txt[p]."""
        return (img * txt).sum(dim=-1)

    # --- training -----------------------------------------------------------------
    def encode_batch(self, batch: dict[str, torch.Tensor], *,
                     segments: list[int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """Encode the N aligned pairs of a training batch: (img (N, D), txt (N, D),
        auxiliary loss or None, logs).

        `segments` (e.g. [B, B, B]) says that the batch is several sub-batches stacked for
        one forward pass: BatchNorm layers normalise each on its own (see ghost_bn), and
        auxiliary losses (VSRN's caption generation) use the first segment (the anchors)
        only. Models with auxiliary losses override this."""
        with bn_segments(segments):
            img = self.encode_image(batch["images"], batch["img_lengths"])
            txt = self.encode_text(batch["tokens"], batch["lengths"])
        return img, txt, None, {}

    def training_loss(self, batch: dict[str, torch.Tensor], *, max_violation: bool = True,
                      margin: float = 0.2, mask_same_image: bool = False
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge triplet loss of one batch (summed over the batch) plus the model's
        auxiliary losses, and scalar logs."""
        img, txt, aux, logs = self.encode_batch(batch)
        scores = self.similarity(img, txt)
        pos_mask = same_image_mask(batch["img_index"]) if mask_same_image else None
        loss = hinge_triplet_loss(scores, margin=margin, max_violation=max_violation,
                                  positive_mask=pos_mask)
        logs = {"triplet": float(loss.detach()), **logs}
        if aux is not None:
            loss = loss + aux
        return loss, logs

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; models with a pre-trained text encoder scale its lr."""
        return [{"params": [p for p in self.parameters() if p.requires_grad],
                 "lr": lr, "weight_decay": weight_decay}]
