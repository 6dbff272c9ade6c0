"""VSE++ hinge (triplet) loss over a batch similarity matrix, and its training objective."""
from __future__ import annotations

import torch

from pipeline.errors import refuse_unknown
from pipeline.losses.registry import register_loss


def hinge_costs(scores: torch.Tensor, margin: float, positive_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The online hinge of every (anchor, negative) pair, shared by the triplet loss and the
    AOQ family: (cost_cap, cost_img, not_negative), (B, B) each. cost_cap[i, j] =
    [margin + S[i, j] - S[i, i]]+ (image anchor i, caption j), cost_img[i, j] =
    [margin + S[i, j] - S[j, j]]+ (caption anchor j, image i); both are 0 where
    not_negative (the diagonal, and positive_mask)."""
    b = scores.size(0)
    diag = scores.diagonal().view(b, 1)
    not_neg = torch.eye(b, dtype=torch.bool, device=scores.device)
    if positive_mask is not None:
        not_neg = not_neg | positive_mask
    cost_cap = (margin + scores - diag).clamp(min=0).masked_fill(not_neg, 0)
    cost_img = (margin + scores - diag.t()).clamp(min=0).masked_fill(not_neg, 0)
    return cost_cap, cost_img, not_neg


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
    cost_cap, cost_img, _ = hinge_costs(scores, margin, positive_mask)
    if max_violation:
        return cost_cap.max(dim=1).values.sum() + cost_img.max(dim=0).values.sum()
    return cost_cap.sum() + cost_img.sum()


def same_image_mask(img_index: torch.Tensor) -> torch.Tensor:
    """(B, B) True where two batch slots share an image (the diagonal included)."""
    return img_index.view(-1, 1) == img_index.view(1, -1)


def triplet_objective(model, batch, *, margin: float, max_violation: bool,
                      mask_same_image: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """The hinge triplet loss of one batch (summed) plus the model's auxiliary losses."""
    img, txt, aux, logs = model.encode_batch(batch)
    scores = model.similarity(img, txt)
    pos_mask = same_image_mask(batch["img_index"]) if mask_same_image else None
    loss = hinge_triplet_loss(scores, margin=margin, max_violation=max_violation,
                              positive_mask=pos_mask)
    logs = {"triplet": float(loss.detach()), **logs}
    if aux is not None:
        loss = loss + aux
    return loss, logs


def build_triplet(settings, options: dict, passes: str = "batched"):
    """VSE++ hinge; sums over negatives during the warm-up epochs."""
    refuse_unknown(options, (), "--loss triplet", "setting(s)")

    def objective(model, batch, *, epoch: int):
        return triplet_objective(
            model, batch, margin=settings.margin,
            max_violation=settings.max_violation and epoch >= settings.warmup_epochs,
            mask_same_image=settings.mask_same_image)

    return objective


register_loss("triplet", offline=False, help="online hardest negatives only", build=build_triplet)
