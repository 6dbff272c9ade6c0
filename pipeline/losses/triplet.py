"""VSE++ hinge (triplet) loss over a batch similarity matrix."""
from __future__ import annotations

import torch


def hinge_triplet_loss(
    scores: torch.Tensor,
    margin: float = 0.2,
    max_violation: bool = True,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over the batch of the image- and caption-anchored hinge costs.

    scores: (B, B), scores[i, j] = S(image of pair i, caption of pair j); the diagonal holds
    the positives. max_violation=True keeps only the hardest negative per anchor (VSE++);
    False sums over all negatives (VSE∞'s warm-up). positive_mask (B, B, bool) marks extra
    pairs that are not negatives (e.g. another caption of the same image); the diagonal
    is always masked.
    """
    b = scores.size(0)
    diag = scores.diagonal().view(b, 1)
    cost_cap = (margin + scores - diag).clamp(min=0)        # image anchor i vs caption j
    cost_img = (margin + scores - diag.t()).clamp(min=0)    # caption anchor j vs image i
    mask = torch.eye(b, dtype=torch.bool, device=scores.device)
    if positive_mask is not None:
        mask = mask | positive_mask
    cost_cap = cost_cap.masked_fill(mask, 0)
    cost_img = cost_img.masked_fill(mask, 0)
    if max_violation:
        return cost_cap.max(dim=1).values.sum() + cost_img.max(dim=0).values.sum()
    return cost_cap.sum() + cost_img.sum()


def same_image_mask(img_index: torch.Tensor) -> torch.Tensor:
    """(B, B) True where two batch slots share an image (the diagonal included)."""
    return img_index.view(-1, 1) == img_index.view(1, -1)
