"""The Adaptive Offline Quintuplet loss (Chen et al., AOQ) and the paper's ablations (SPEC §4).

With S the (B, B) batch score matrix (row = image of slot b, column = caption of slot b),
S+ its diagonal, S_on_i2t / S_on_t2i the hardest online negative score of each image /
caption anchor, and the aligned offline scores

    s_it = S(i_b, t~_b)   s_ti = S(i~_b, t_b)   s_nn = S(i~_b, t~_b)   s_pp = S(i'_b, t'_b),

    L = sum_b  w_c [g + S_on_i2t - S+]+ + w_i [g + S_on_t2i - S+]+
             + [g' + s_it - S+]+ + [g' + s_ti - S+]+ + [g' + s_nn - S+]+ + [g' + s_pp - S+]+
    w_c = beta - (s_it - S_on_i2t) / alpha,   w_i = beta - (s_ti - S_on_t2i) / alpha.

Variants: `triplet` (online terms, weights 1), `offtri` (+ the two anchored offline terms),
`offquin` (all six, weights 1), `aoq` (all six, adaptive weights). As in the reference the
weights are neither detached nor clamped: w_c passes a gradient of -h/alpha to s_it (h the
online hinge), pushing that offline negative up, and turns negative once
s_it - S_on_i2t > alpha * beta. The share of negative weights is returned for logging.
`detach_weights` (not the reference) stops that gradient: the weights then only rescale
the online terms.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pipeline.errors import InputError, refuse_unknown
from pipeline.losses.registry import get_loss, register_loss
from pipeline.losses.triplet import hinge_costs, same_image_mask

PASSES = ("batched", "three")


@dataclass(frozen=True)
class AOQSettings:
    loss: str = "aoq"
    margin: float = 0.2            # online margin g
    offline_margin: float = 0.0    # offline margin g'
    alpha: float = 0.3
    beta: float = 1.5
    max_violation: bool = True
    mask_same_image: bool = False          # other captions of the anchor's image are not online negatives
    mask_accidental_positives: bool = True  # drop the (i~, t~), (i', t') terms when i~ == t~ // 5
    detach_weights: bool = False   # ours: stop the weights' gradient (the reference keeps it)

    def check(self, source="loss") -> "AOQSettings":
        get_loss(self.loss, source)
        if self.loss == "aoq" and not self.max_violation:
            raise InputError(source, "the aoq loss needs max-violation (its adaptive weights are "
                                     "defined per hardest negative); drop --no-max-violation")
        from pipeline.options import check_values

        check_values({k: getattr(self, k) for k in AOQ_RULES}, AOQ_RULES, source)
        return self


# the settings a params file or the CLI may give (the rest come from the loss and training),
# with their rules (pipeline.options; params.yaml's finetune.aoq is checked by them too)
AOQ_RULES = {"offline_margin": {"type": "float", "min": 0}, "alpha": {"type": "float", "gt": 0},
             "beta": {"type": "float"}, "mask_accidental_positives": {"type": "bool"},
             "detach_weights": {"type": "bool"}}
AOQ_OPTIONS = tuple(AOQ_RULES)


def online_hardest(scores: torch.Tensor, negative_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hardest online negative score per image anchor (row max) and per caption anchor
    (column max) over the entries where negative_mask is True."""
    masked = scores.masked_fill(~negative_mask, float("-inf"))
    rows, cols = masked.max(dim=1).values, masked.max(dim=0).values
    # an anchor without negatives (tiny batches) has a zero online hinge: any finite value will do
    pos = scores.diagonal()
    return torch.where(rows.isfinite(), rows, pos), torch.where(cols.isfinite(), cols, pos)


def aoq_loss(scores: torch.Tensor, s_it: torch.Tensor, s_ti: torch.Tensor, s_nn: torch.Tensor,
             s_pp: torch.Tensor, settings: AOQSettings, *, positive_mask: torch.Tensor | None = None,
             accidental: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss summed over the batch, and logs (term sums, weight statistics, the share of
    anchors each offline term is active for).

    positive_mask (B, B) marks extra non-negatives of the online terms (the diagonal always
    is); accidental (B,) marks slots whose two quintuplet pairs are true pairs."""
    s = settings
    pos = scores.diagonal()
    cost_cap, cost_img, not_neg = hinge_costs(scores, s.margin, positive_mask)
    neg = ~not_neg
    if s.max_violation:
        on_i2t, on_t2i = cost_cap.max(dim=1).values, cost_img.max(dim=0).values
    else:
        on_i2t, on_t2i = cost_cap.sum(dim=1), cost_img.sum(dim=0)

    logs: dict[str, float] = {}
    if s.loss == "aoq":
        hard_i2t, hard_t2i = online_hardest(scores, neg)
        w_c = s.beta - (s_it - hard_i2t) / s.alpha
        w_i = s.beta - (s_ti - hard_t2i) / s.alpha
        if s.detach_weights:
            w_c, w_i = w_c.detach(), w_i.detach()
        on_i2t, on_t2i = w_c * on_i2t, w_i * on_t2i
        w = torch.cat([w_c, w_i]).detach()
        logs.update(weight_mean=float(w.mean()), weight_negative=float((w < 0).float().mean()))
    loss_online = on_i2t.sum() + on_t2i.sum()
    logs["online"] = float(loss_online.detach())
    if s.loss == "triplet":
        return loss_online, logs

    terms = {"off_it": s_it, "off_ti": s_ti}
    if s.loss in ("offquin", "aoq"):
        terms.update(off_nn=s_nn, off_pp=s_pp)
    loss = loss_online
    for name, x in terms.items():
        hinge = (s.offline_margin + x - pos).clamp(min=0)
        if name in ("off_nn", "off_pp") and s.mask_accidental_positives and accidental is not None:
            hinge = hinge.masked_fill(accidental.to(hinge.device), 0)
        loss = loss + hinge.sum()
        logs[name] = float(hinge.detach().sum())
        logs[f"{name}_active"] = float((hinge.detach() > 0).float().mean())
    return loss, logs


# --- the objective over stacked quintuplet batches (pipeline.data.offline.collate_offline) ---
def encode_quintuplets(model, batch: dict, passes: str = "batched"):
    """(img, txt (3B rows each), auxiliary loss or None, logs) of a stacked batch.

    "batched": ONE forward pass of the 3B items; BatchNorm layers normalise each B-sized
    segment on their own (pipeline.models.ghost_bn), so the loss, the gradients and the
    running statistics equal the reference's three passes ("three", kept for the
    equivalence test and the benchmark). Auxiliary losses see the anchors only."""
    from pipeline.data.offline import split_segments
    from pipeline.models.features import Encoded

    b = batch["n_anchor"]
    if passes == "batched":
        return model.encode_batch(batch, segments=[b, b, b])
    if passes != "three":
        raise ValueError(f"passes must be one of {PASSES}, got {passes!r}")
    anchors, *offline = split_segments(batch)
    img, txt, aux, logs = model.encode_batch(anchors)
    imgs, txts = [img], [txt]
    for part in offline:
        imgs.append(model.encode_image(part["images"], part["img_lengths"]))
        txts.append(model.encode_text(part["tokens"], part["lengths"]))
    return Encoded.cat(imgs), Encoded.cat(txts), aux, logs


def quintuplet_loss(model, batch: dict, aoq: AOQSettings, passes: str = "batched"):
    """The AOQ-family loss of one stacked batch plus the model's auxiliary loss. Every
    model scores the batch with `similarity` and the offline pairs with `pair_scores`."""
    b = batch["n_anchor"]
    img, txt, aux, logs = encode_quintuplets(model, batch, passes)
    a_img, n_img, p_img = img[:b], img[b:2 * b], img[2 * b:]
    a_txt, n_txt, p_txt = txt[:b], txt[b:2 * b], txt[2 * b:]
    scores = model.similarity(a_img, a_txt)
    pos_mask = same_image_mask(batch["img_index"][:b]) if aoq.mask_same_image else None
    loss, loss_logs = aoq_loss(
        scores, model.pair_scores(a_img, n_txt), model.pair_scores(n_img, a_txt),
        model.pair_scores(n_img, n_txt), model.pair_scores(p_img, p_txt), aoq,
        positive_mask=pos_mask, accidental=batch.get("accidental"))
    logs = {**loss_logs, **logs}
    if aux is not None:
        loss = loss + aux
    return loss, logs


def _builder(name: str):
    def build(settings, options: dict, passes: str = "batched"):
        refuse_unknown(options, AOQ_OPTIONS, "finetune.aoq", "AOQ setting(s)")
        if passes not in PASSES:
            raise InputError("--passes", f"must be one of {PASSES}, got {passes!r}")
        aoq = AOQSettings(loss=name, margin=settings.margin, max_violation=settings.max_violation,
                          mask_same_image=settings.mask_same_image, **options).check("--loss")
        if name == "aoq" and settings.warmup_epochs > 0:
            raise InputError("--loss", "the aoq loss needs max-violation from the first step; "
                                       "set warmup_epochs=0")

        def objective(model, batch, *, epoch: int):
            return quintuplet_loss(model, batch, aoq, passes)

        objective.record = {"aoq": dataclasses.asdict(aoq)}
        return objective

    return build


register_loss("offtri", offline=True, help="+ the two offline negatives", build=_builder("offtri"))
register_loss("offquin", offline=True, help="+ the two offline pairs", build=_builder("offquin"))
register_loss("aoq", offline=True, help="offquin with adaptive weights", build=_builder("aoq"))
