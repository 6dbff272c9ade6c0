"""Candidate refresh during fine-tuning: re-mine the offline candidates with the model
being trained (the AOQ family's objective itself is in pipeline.losses.aoq).
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from pipeline.data.offline import OfflineNegativeDataset
from pipeline.scoring import mine_split, require_indexable

_STEP_DIR = re.compile(r"step-(\d{8})")


class CandidateRefresh:
    """Re-embeds the training split with the model being trained, re-mines the candidates
    (pipeline.mining, same K) and hands them to the dataset: every `every` epochs
    (`on_epoch_end`) or every `every_steps` optimizer steps (`on_step_end`), never after
    the last step. The refresh after global step s is written to
    `out_dir/refreshed/step-<s, 8 digits>/`; `start` (the Trainer's on_start) puts the
    newest one at or below the resumed step back into the dataset."""

    def __init__(self, dataset: OfflineNegativeDataset, split, model, k_i2t: int, k_t2i: int,
                 out_dir: str | Path, name: str, *, every: int = 0, every_steps: int = 0,
                 precision: str = "auto", batch_size: int = 256, source=None):
        # a cross model has no rows to mine with: refused before the first step
        require_indexable(model, source, "the candidate refresh mines with independent embeddings")
        self.dataset = dataset
        self.split = split
        self.every, self.every_steps = int(every), int(every_steps)
        self.k_i2t, self.k_t2i = int(k_i2t), int(k_t2i)
        self.folder = Path(out_dir) / "refreshed"
        self.name = name
        self.precision = precision
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
        from pipeline.mining.candidates import Candidates, write_candidates

        t0 = time.perf_counter()
        knn = mine_split(trainer.model, self.split, self.k_i2t, self.k_t2i, precision=self.precision,
                         device=str(trainer.device), batch_size=self.batch_size)
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
