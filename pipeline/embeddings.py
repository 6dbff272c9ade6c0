"""Encode every image and caption of a split with a model, batched, in eval mode."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from pipeline.progress import progress as progress_bar

from pipeline.data.datasets import CaptionDataset, ImageDataset, collate_captions, collate_images


@torch.no_grad()
def encode_images(model, split, *, batch_size: int = 128, device: str = "cpu",
                  progress: bool = False) -> np.ndarray:
    """(N_img, D) float32 embeddings of the split's unique images, in row order."""
    was_training = model.training
    model.eval()
    loader = DataLoader(ImageDataset(split), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_images)
    out = None
    for batch in progress_bar(loader, desc="encode images", disable=not progress, leave=False):
        emb = model.encode_image(batch["images"].to(device), batch["img_lengths"].to(device))
        emb = emb.float().cpu().numpy()
        if out is None:
            out = np.empty((len(loader.dataset), emb.shape[1]), dtype=np.float32)
        out[batch["img_index"].numpy()] = emb
    model.train(was_training)
    return out


@torch.no_grad()
def encode_captions(model, split, vocab, *, batch_size: int = 256, device: str = "cpu",
                    progress: bool = False) -> np.ndarray:
    """(N_cap, D) float32 embeddings of the split's captions, in file order."""
    was_training = model.training
    model.eval()
    loader = DataLoader(CaptionDataset(split, vocab), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_captions)
    out = None
    for batch in progress_bar(loader, desc="encode captions", disable=not progress, leave=False):
        emb = model.encode_text(batch["tokens"].to(device), batch["lengths"].to(device))
        emb = emb.float().cpu().numpy()
        if out is None:
            out = np.empty((len(loader.dataset), emb.shape[1]), dtype=np.float32)
        out[batch["index"].numpy()] = emb  # collate sorts by length: put rows back
    model.train(was_training)
    return out


def encode_split(model, split, vocab, *, batch_size: int = 128, device: str = "cpu",
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    img = encode_images(model, split, batch_size=batch_size, device=device, progress=progress)
    cap = encode_captions(model, split, vocab, batch_size=2 * batch_size, device=device,
                          progress=progress)
    return img, cap
