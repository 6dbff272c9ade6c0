"""The one interface every ITM model implements (SPEC §5).

A model owns
- its tokenizer (`self.tokenizer`, pipeline.data.tokens; the class attribute
  `tokenizer_class` says which kind it reads: the SCAN `Vocab` by default), set by the
  registry and saved inside its checkpoint folder;
- its encoders, which return `Encoded` (pooled vectors, or sequences with their lengths);
- its scorer: `similarity` over a shard of (images x captions) and `pair_scores` over
  aligned pairs, both on `Encoded`.

Two kinds:
- "indep": image and text are embedded independently into pooled vectors and the score
  is their dot product (the default scorer), so embeddings can be indexed (FAISS, the
  tiled top-K) and stored as 2-D rows (`embed`).
- "cross": the score needs both sides at once (cross attention over the encoders'
  sequences); pipeline.scoring scores memory-bounded blocks through `similarity`.

A batch (from pipeline.data.datasets.collate_pairs) is a dict:
  images (B, R, F) float32, img_lengths (B,) long  -- regions, zero-padded
  tokens (B, L) long, lengths (B,) long             -- caption ids, padded, sorted by length desc
  index (B,) long caption ids, img_index (B,) long image ids
Training objectives live in pipeline.losses (the registry); a model adds its auxiliary
losses (VSRN's caption generation) in `encode_batch`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.data.vocab import Vocab
from pipeline.models.features import Encoded
from pipeline.models.ghost_bn import bn_segments


class ITMModel(nn.Module):
    kind: str = "indep"
    name: str = ""
    tokenizer_class: type = Vocab
    # cross models: (images, captions) per `similarity` call when scoring a gallery
    score_block: tuple[int, int] = (64, 256)

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)  # the JSON-serialisable architecture config
        self.tokenizer = None       # set by the registry (pipeline.models.registry)

    # --- encoders -----------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, img_lengths: torch.Tensor) -> Encoded:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        raise NotImplementedError

    # --- scores -------------------------------------------------------------------
    def similarity(self, img: Encoded, txt: Encoded) -> torch.Tensor:
        """(Ni, Nt) scores between encoded images and encoded captions."""
        return img.data @ txt.data.t()

    def pair_scores(self, img: Encoded, txt: Encoded) -> torch.Tensor:
        """(P,) scores of aligned pairs img[p], txt[p]."""
        return (img.data * txt.data).sum(dim=-1)

    # --- training -----------------------------------------------------------------
    def encode_batch(self, batch: dict[str, torch.Tensor], *,
                     segments: list[int] | None = None
                     ) -> tuple[Encoded, Encoded, torch.Tensor | None, dict[str, float]]:
        """Encode the N aligned pairs of a training batch: (img, txt (N rows each),
        auxiliary loss or None, logs).

        `segments` (e.g. [B, B, B]) says that the batch is several sub-batches stacked for
        one forward pass: BatchNorm layers normalise each on its own (see ghost_bn), and
        auxiliary losses (VSRN's caption generation) use the first segment (the anchors)
        only. Models with auxiliary losses override this."""
        with bn_segments(segments):
            img = self.encode_image(batch["images"], batch["img_lengths"])
            txt = self.encode_text(batch["tokens"], batch["lengths"])
        return img, txt, None, {}

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; models with a pre-trained text encoder scale its lr."""
        return [{"params": [p for p in self.parameters() if p.requires_grad],
                 "lr": lr, "weight_decay": weight_decay}]
