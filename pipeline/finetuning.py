"""AOQ fine-tuning: the objective over stacked quintuplet batches and candidate refresh.

One step encodes the anchors (i, t), the offline negatives (i~, t~) and their partners
(i', t') in ONE forward pass of 3B items (`passes="batched"`): BatchNorm layers normalise
each B-sized segment on their own (pipeline.models.ghost_bn), so the loss, the gradients and
the running statistics equal the reference's three passes (`passes="three"`, kept for the
equivalence test and the benchmark). Auxiliary losses (VSRN's caption generation) see the
anchors only. Independent and cross-attention models alike score the offline pairs with
`pair_scores`, the batch with `similarity`.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.data.offline import OfflineNegativeDataset, split_segments
from pipeline.embeddings import encode_split
from pipeline.losses.aoq import AOQSettings, aoq_loss
from pipeline.losses.triplet import same_image_mask

PASSES = ("batched", "three")


def encode_quintuplets(model, batch: dict, passes: str = "batched"):
    """(img (3B, D), txt (3B, D), auxiliary loss or None, logs) of a stacked batch."""
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
    return torch.cat(imgs), torch.cat(txts), aux, logs


def quintuplet_loss(model, batch: dict, aoq: AOQSettings, passes: str = "batched"):
    """The AOQ-family loss of one stacked batch plus the model's auxiliary loss."""
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


def make_objective(aoq: AOQSettings, passes: str = "batched"):
    """A Trainer objective for stacked batches (collate_offline)."""
    aoq.check()

    def objective(model, batch, *, epoch: int, settings):
        return quintuplet_loss(model, batch, aoq, passes)

    return objective


class CandidateRefresh:
    """Trainer `on_epoch_end` hook: every `every` epochs, re-embed the training split with
    the model being trained, re-mine the candidates (pipeline.mining) and hand them to the
    dataset. The new files go to `out_dir/refreshed` (a resumed run reloads them)."""

    def __init__(self, dataset: OfflineNegativeDataset, split, vocab, every: int, k_i2t: int,
                 k_t2i: int, out_dir: str | Path, name: str, *, precision: str = "auto",
                 device: str = "cpu", batch_size: int = 256):
        self.dataset = dataset
        self.split = split
        self.vocab = vocab
        self.every = int(every)
        self.k_i2t, self.k_t2i = int(k_i2t), int(k_t2i)
        self.folder = Path(out_dir) / "refreshed"
        self.name = name
        self.precision = precision
        self.device = device
        self.batch_size = batch_size

    def due(self, epochs_done: int, total: int) -> bool:
        return self.every > 0 and epochs_done % self.every == 0 and epochs_done < total

    def __call__(self, trainer) -> dict:
        done = trainer.epoch + 1
        if not self.due(done, trainer.s.epochs):
            return {"refreshed": 0}
        from pipeline.mining import mine_torch
        from pipeline.mining.candidates import Candidates, write_candidates

        t0 = time.perf_counter()
        img, cap = encode_split(trainer.model, self.split, self.vocab, batch_size=self.batch_size,
                                device=str(trainer.device))
        knn = mine_torch(img, cap, self.k_i2t, self.k_t2i, precision=self.precision,
                         device=self.device, progress=False)
        write_candidates(self.folder, self.name,
                         Candidates.from_knn(knn, meta={"refreshed_after_epoch": done}))
        self.dataset.i2t, self.dataset.t2i = knn.i2t, knn.t2i  # exact by construction: no re-read
        return {"refreshed": 1, "refresh_seconds": time.perf_counter() - t0}

    def load(self) -> bool:
        """Use the last refreshed candidates, if any (resume)."""
        from pipeline.mining.candidates import load_candidates

        if not (self.folder / f"i2t_{self.name}.npy").is_file():
            return False
        c = load_candidates(self.folder, self.name, n_images=self.split.n_images, mmap=False)
        self.dataset.i2t, self.dataset.t2i = c.i2t, c.t2i
        return True
