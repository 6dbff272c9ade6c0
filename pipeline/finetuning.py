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

import re
import shutil
import time
from pathlib import Path

import torch

from pipeline.data.offline import OfflineNegativeDataset, split_segments
from pipeline.embeddings import encode_split
from pipeline.losses.aoq import AOQSettings, aoq_loss
from pipeline.losses.triplet import same_image_mask

PASSES = ("batched", "three")
_STEP_DIR = re.compile(r"step-(\d{8})")


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
    """Re-embeds the training split with the model being trained, re-mines the candidates
    (pipeline.mining, same K) and hands them to the dataset: every `every` epochs
    (`on_epoch_end`) or every `every_steps` optimizer steps (`on_step_end`), never after
    the last step. The refresh after global step s is written to
    `out_dir/refreshed/step-<s, 8 digits>/`; `start` (the Trainer's on_start) puts the
    newest one at or below the resumed step back into the dataset."""

    def __init__(self, dataset: OfflineNegativeDataset, split, vocab, k_i2t: int, k_t2i: int,
                 out_dir: str | Path, name: str, *, every: int = 0, every_steps: int = 0,
                 precision: str = "auto", device: str = "cpu", batch_size: int = 256):
        self.dataset = dataset
        self.split = split
        self.vocab = vocab
        self.every, self.every_steps = int(every), int(every_steps)
        self.k_i2t, self.k_t2i = int(k_i2t), int(k_t2i)
        self.folder = Path(out_dir) / "refreshed"
        self.name = name
        self.precision = precision
        self.device = device
        self.batch_size = batch_size

    def on_epoch_end(self, trainer) -> dict:
        done = trainer.epoch + 1
        if self.every and done % self.every == 0 and done < trainer.s.epochs:
            return self.refresh(trainer)
        return {"refreshed": 0, "refresh_seconds": 0.0}

    def on_step_end(self, trainer) -> dict | None:
        step = trainer.global_step
        if self.every_steps and step % self.every_steps == 0 and step < trainer.total_steps:
            return self.refresh(trainer)
        return None

    def refresh(self, trainer) -> dict:
        from pipeline.mining import mine_torch
        from pipeline.mining.candidates import Candidates, write_candidates

        t0 = time.perf_counter()
        img, cap = encode_split(trainer.model, self.split, self.vocab, batch_size=self.batch_size,
                                device=str(trainer.device))
        knn = mine_torch(img, cap, self.k_i2t, self.k_t2i, precision=self.precision,
                         device=self.device, progress=False)
        step = trainer.global_step
        meta = {"refreshed_after_step": step, "epoch": trainer.epoch + 1}
        write_candidates(self.folder / f"step-{step:08d}", self.name,
                         Candidates.from_knn(knn, meta=meta))
        self.dataset.i2t, self.dataset.t2i = knn.i2t, knn.t2i  # exact by construction: no re-read
        # the previous refresh stays: the last saved state may still predate this one
        for _, old in self.saved()[:-2]:
            shutil.rmtree(old)
        return {"refreshed": 1, "refresh_seconds": time.perf_counter() - t0}

    def saved(self) -> list[tuple[int, Path]]:
        """(step, folder) of the refreshes on disk, oldest first."""
        found = [(int(m.group(1)), d) for d in self.folder.glob("step-*")
                 if d.is_dir() and (m := _STEP_DIR.fullmatch(d.name))]
        return sorted(found)

    def start(self, trainer) -> None:
        """Use the candidates as they were at the (resumed) global step; refreshes past it
        come from a run that went further (or an earlier run in the same folder) and go."""
        from pipeline.mining.candidates import load_candidates

        saved = self.saved()
        keep = [d for step, d in saved if step <= trainer.global_step][-1:]
        for _, d in saved:
            if d not in keep:
                shutil.rmtree(d)
        if keep:
            c = load_candidates(keep[0], self.name, n_images=self.split.n_images, mmap=False)
            self.dataset.i2t, self.dataset.t2i = c.i2t, c.t2i
