"""The one training loop shared by every model.

- Step LR decay, grad clipping, VSE∞-style warm-up (sum over negatives for
  `warmup_epochs`, then max-violation).
- Dev-split model selection by rsum (never the test split).
- Exact resume: the batch order of an epoch is a pure function of (seed, epoch), the
  data augmentation of a pair a pure function of (seed, epoch, caption index) and the LR a
  pure function of the epoch, so a run restored from its last state (weights, optimizer,
  torch RNG, position in the epoch) continues bit for bit like an uninterrupted one.
- Dev evaluation scores through pipeline.scoring (whatever the model's kind); the
  objective comes from the loss registry (pipeline.losses).
- Artifacts: `checkpoint/` (best dev rsum: safetensors + config.json + the tokenizer),
  `state/` (resume), `train_log.tsv` (per-epoch metrics for `dvc plots`),
  `train_metrics.json` (summary for `dvc metrics`), both free of wall times (the same
  bytes for the same inputs and seed), and `timings.json` (seconds per epoch, host;
  not DVC-tracked). All written atomically.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline.progress import progress

from pipeline.checkpoint import load_state_dict, save_checkpoint
from pipeline.data.datasets import PairDataset, collate_pairs
from pipeline.device import resolve_device
from pipeline.errors import InputError, refuse_unknown
from pipeline.losses.registry import Objective, get_loss
from pipeline.io import atomic_dir, require_free_space, write_json, write_text
from pipeline.processes import die_with_parent
from pipeline.scoring import encode_gallery
from pipeline.timings import FILE as TIMINGS_FILE, write_timings

LOG_COLUMNS = ["epoch", "lr", "max_violation", "train_loss", "dev_i2t_r1", "dev_i2t_r5",
               "dev_i2t_r10", "dev_t2i_r1", "dev_t2i_r5", "dev_t2i_r10", "dev_rsum"]
# wall times of a history row: in timings.json, not in the DVC-tracked train_log.tsv /
# train_metrics.json, which are the same bytes for the same inputs and seed
TIME_KEYS = ("seconds", "refresh_seconds")


@dataclass
class TrainSettings:
    epochs: int = 25
    batch_size: int = 128
    optimizer: str = "adamw"          # adam | adamw
    lr: float = 5e-4
    weight_decay: float = 1e-4
    lr_update: int = 15               # multiply the LR by lr_decay every lr_update epochs
    lr_decay: float = 0.1
    grad_clip: float = 2.0            # max grad norm; 0 disables
    margin: float = 0.2
    warmup_epochs: int = 0            # epochs summing over all negatives before max-violation
    max_violation: bool = True        # after warm-up
    mask_same_image: bool = False     # other captions of the anchor's image are not negatives
    region_drop: float = 0.0
    token_aug: float = 0.0
    seed: int = 0
    num_workers: int = 0
    save_every_steps: int = 0         # also save resume state every N steps (0: end of epoch only)
    eval_batch_size: int = 256
    dev_images: int = 0               # validate on the first N dev images (0: all; the
                                      # references use COCO's first 1,000)
    max_steps: int = 0                # stop after N optimizer steps in all (0: none); the
                                      # epoch it falls in ends there (dev evaluation, checkpoint)

    @classmethod
    def rules(cls) -> dict[str, dict]:
        """Each option's rule (pipeline.options): the type of its default and its range."""
        kinds = {bool: "bool", int: "int", float: "float", str: "str"}
        rules = {f.name: {"type": kinds[type(f.default)]} for f in dataclasses.fields(cls)}
        for name, low, strict in _RANGES:
            rules[name]["gt" if strict else "min"] = low
        rules["optimizer"]["choices"] = ("adam", "adamw")
        rules["region_drop"]["max"] = 0.99
        rules["token_aug"]["max"] = 1
        return rules

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "train settings") -> "TrainSettings":
        from pipeline.options import check_values

        known = {f.name: f for f in dataclasses.fields(cls)}
        refuse_unknown(values, known, source, "training option(s)")
        check_values(values, cls.rules(), source, "option ")
        # an int given for a float option is that float
        return cls(**{k: float(v) if known[k].type in ("float", float) else v for k, v in values.items()})


# (option, lower bound, bound excluded): what a run can train with
_RANGES = (("lr", 0, True), ("weight_decay", 0, False), ("lr_decay", 0, True),
           ("grad_clip", 0, False), ("margin", 0, False), ("warmup_epochs", 0, False),
           ("seed", 0, False), ("num_workers", 0, False), ("save_every_steps", 0, False),
           ("eval_batch_size", 1, False), ("epochs", 1, False), ("batch_size", 2, False),
           ("lr_update", 1, False), ("region_drop", 0, False), ("token_aug", 0, False),
           ("dev_images", 0, False), ("max_steps", 0, False))


def epoch_lr(settings: TrainSettings, epoch: int) -> float:
    return settings.lr * settings.lr_decay ** (epoch // settings.lr_update)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches of caption indices; a pure function of (seed, epoch). The last
    incomplete batch is dropped (a tiny batch makes the hardest-negative loss noisy)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    def __init__(self, model, train_split, dev_split, settings: TrainSettings,
                 out_dir: str | Path, *, device: str = "cpu", progress: bool = True,
                 objective: Objective | None = None, meta: dict | None = None,
                 dataset=None, collate_fn=collate_pairs,
                 on_epoch_end: Callable[["Trainer"], dict] | None = None,
                 on_step_end: Callable[["Trainer"], dict | None] | None = None,
                 on_start: Callable[["Trainer"], None] | None = None):
        """`objective` (default: the triplet loss of the registry) is called as
        objective(model, batch, epoch=e). `dataset` (default: a PairDataset of train_split
        read with the model's tokenizer) must offer set_epoch(epoch);
        `on_epoch_end(trainer)` runs after each epoch's evaluation and returns extra
        columns for that epoch's log row (e.g. a candidate refresh).
        `on_step_end(trainer)` runs after every optimizer step; a non-empty dict means it
        changed the dataset: the loader is rebuilt for the rest of the epoch, the state is
        saved, and the dict's numbers are summed into the epoch's log row.
        `on_start(trainer)` runs once before the first step, after a resume state was
        loaded (to restore what the state does not hold, e.g. refreshed candidates)."""
        self.model = model
        self.train_split = train_split
        self.dev_split = dev_split
        self.s = settings
        self.out = Path(out_dir)
        self.device = resolve_device(device)
        self.progress = progress
        self.objective = objective or get_loss("triplet").objective(settings)
        self.meta = dict(meta or {})
        self.model.to(self.device)
        groups = self.model.param_groups(settings.lr, settings.weight_decay)
        for g in groups:
            g.setdefault("lr_scale", g["lr"] / settings.lr if settings.lr else 1.0)
        opt_cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(groups, lr=settings.lr, weight_decay=settings.weight_decay)
        self.dataset = dataset if dataset is not None else PairDataset(
            train_split, model.tokenizer, train=True, region_drop=settings.region_drop,
            token_aug=settings.token_aug, seed=settings.seed)
        self.collate_fn = collate_fn
        self.on_epoch_end = on_epoch_end
        self.on_step_end = on_step_end
        self.on_start = on_start
        # position and bookkeeping
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.epoch_loss_sum = 0.0
        self.epoch_log_sums: dict[str, float] = {}  # the objective's logs, summed over the epoch
        self.epoch_hook_sums: dict[str, float] = {}  # on_step_end's numbers, summed over the epoch
        self.best_rsum = -math.inf
        self.best_epoch = -1
        self.history: list[dict] = []

    # ----------------------------------------------------------------- state
    @property
    def state_dir(self) -> Path:
        return self.out / "state"

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (every epoch drops its incomplete batch)."""
        steps = self.s.epochs * (len(self.dataset) // self.s.batch_size)
        return min(steps, self.s.max_steps) if self.s.max_steps else steps

    def save_state(self) -> None:
        opt = self.optimizer.state_dict()
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        scalars = {}
        for pid, st in opt["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{pid}.{k}"] = v
                else:
                    scalars[f"{pid}.{k}"] = v
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        trainer = {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_log_sums": self.epoch_log_sums, "epoch_hook_sums": self.epoch_hook_sums,
            "best_rsum": self.best_rsum if math.isfinite(self.best_rsum) else None,
            "best_epoch": self.best_epoch, "history": self.history,
            "settings": dataclasses.asdict(self.s), "model_config": self.model.config,
            "param_groups": opt["param_groups"], "optim_scalars": scalars,
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        require_free_space(self.out, sum(t.numel() * t.element_size() for t in tensors.values()),
                           "the resume state")
        with atomic_dir(self.state_dir, "train-state") as tmp:
            save_file(tensors, str(tmp / "state.safetensors"))
            (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1) + "\n")

    def load_state(self) -> bool:
        meta_path = self.state_dir / "trainer.json"
        if not meta_path.exists():
            return False
        try:
            trainer = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(meta_path, f"unreadable resume state ({e.__class__.__name__})") from None
        if trainer.get("model_config") != self.model.config:
            raise InputError(meta_path, "resume state was written for a different model config")
        saved = {k: v for k, v in trainer.get("settings", {}).items() if k != "num_workers"}
        now = {k: v for k, v in dataclasses.asdict(self.s).items() if k != "num_workers"}
        if saved != now:
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise InputError(meta_path, f"resume state has different training settings {diff}")
        tensors = load_state_dict(self.state_dir / "state.safetensors")
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v.to(self.device)
        for k, v in trainer["optim_scalars"].items():
            pid, name = k.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": trainer["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.epoch = trainer["epoch"]
        self.step_in_epoch = trainer["step_in_epoch"]
        self.global_step = trainer["global_step"]
        self.epoch_loss_sum = trainer["epoch_loss_sum"]
        self.epoch_log_sums = trainer.get("epoch_log_sums", {})
        self.epoch_hook_sums = trainer.get("epoch_hook_sums", {})
        self.best_rsum = trainer["best_rsum"] if trainer["best_rsum"] is not None else -math.inf
        self.best_epoch = trainer["best_epoch"]
        self.history = trainer["history"]
        return True

    # ----------------------------------------------------------------- evaluation
    def evaluate_dev(self) -> dict:
        dev = self.dev_split
        if 0 < self.s.dev_images < dev.n_images:
            dev = dev.head(self.s.dev_images)
        gallery = encode_gallery(self.model, dev, batch_size=self.s.eval_batch_size,
                                 device=str(self.device))
        return gallery.evaluate("full")

    # ----------------------------------------------------------------- logs
    def write_logs(self) -> None:
        extra = sorted({k for row in self.history for k in row} - set(LOG_COLUMNS) - set(TIME_KEYS))
        columns = LOG_COLUMNS + extra
        lines = ["\t".join(columns)]
        for row in self.history:
            lines.append("\t".join(_fmt(row.get(c)) for c in columns))
        write_text(self.out / "train_log.tsv", "\n".join(lines) + "\n")
        best = next((r for r in self.history if r["epoch"] == self.best_epoch), None)
        summary = {"best_epoch": self.best_epoch,
                   "best_dev_rsum": round(self.best_rsum, 4) if math.isfinite(self.best_rsum) else None,
                   "epochs": len(self.history)}
        if best:
            summary.update({k: best[k] for k in LOG_COLUMNS if k.startswith("dev_")})
        write_json(self.out / "train_metrics.json", summary)
        # rewritten from the history (restored on resume), so it covers every epoch
        write_timings(self.out / TIMINGS_FILE, "train", {
            "train_seconds": round(sum(r["seconds"] for r in self.history), 2),
            "epochs": [{"epoch": r["epoch"], **{k: r[k] for k in TIME_KEYS if k in r}}
                       for r in self.history]})

    # ----------------------------------------------------------------- loop
    def run(self, *, resume: bool = False, stop_after_steps: int | None = None,
            kill_after_steps: int | None = None) -> dict:
        """Train to the last epoch. stop_after_steps returns early and kill_after_steps
        SIGKILLs the process (both for resume tests)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume and self.load_state():
            tqdm.write(f"resuming at epoch {self.epoch + 1}, step {self.step_in_epoch}")
        else:
            torch.manual_seed(self.s.seed)
        if self.on_start is not None:
            self.on_start(self)
        s = self.s

        def budget_spent() -> bool:
            return bool(s.max_steps) and self.global_step >= s.max_steps

        while self.epoch < s.epochs and not budget_spent():
            t0 = time.perf_counter()
            lr = epoch_lr(s, self.epoch)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            self.dataset.set_epoch(self.epoch)
            batches = epoch_batches(len(self.dataset), s.batch_size, s.seed, self.epoch)
            if not batches:
                raise InputError(None, f"batch_size {s.batch_size} exceeds the {len(self.dataset)} training captions")
            self.model.train()
            bar = progress(total=len(batches), initial=self.step_in_epoch,
                           desc=f"epoch {self.epoch + 1}/{s.epochs}", disable=not self.progress)
            while self.step_in_epoch < len(batches) and not budget_spent():
                # a new loader after on_step_end changed the dataset: workers hold a copy of it
                loader = DataLoader(self.dataset, batch_sampler=batches[self.step_in_epoch:],
                                    collate_fn=self.collate_fn, num_workers=s.num_workers,
                                    generator=torch.Generator(),  # keep the global RNG untouched
                                    worker_init_fn=functools.partial(_worker_init, parent=os.getpid())
                                    if s.num_workers else None)
                for batch in loader:
                    loss, logs = self.objective(self.model, _to(batch, self.device),
                                                epoch=self.epoch)
                    if not torch.isfinite(loss):
                        bar.close()
                        # nothing of this step is applied; the state saved last stays for --resume
                        raise InputError(self.out, f"training diverged: non-finite loss at epoch "
                                         f"{self.epoch + 1}, step {self.step_in_epoch + 1} (likely: "
                                         "a learning rate too high, or features with huge values); "
                                         "the last saved state is kept for --resume")
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if s.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
                    self.optimizer.step()
                    self.step_in_epoch += 1
                    self.global_step += 1
                    self.epoch_loss_sum += float(loss.detach())
                    for k, v in logs.items():
                        self.epoch_log_sums[k] = self.epoch_log_sums.get(k, 0.0) + v
                    bar.update()
                    bar.set_postfix(loss=f"{self.epoch_loss_sum / self.step_in_epoch:.3f}",
                                    lr=f"{lr:.1e}")
                    changed = self._step_hook()
                    save_due = s.save_every_steps and self.global_step % s.save_every_steps == 0
                    # after a dataset change too: a resume must start from the new data
                    if (changed or save_due) and self.step_in_epoch < len(batches):
                        self.save_state()
                    if kill_after_steps is not None and self.global_step >= kill_after_steps:
                        os.kill(os.getpid(), signal.SIGKILL)
                    if stop_after_steps is not None and self.global_step >= stop_after_steps:
                        bar.close()
                        return {"stopped_at_step": self.global_step}
                    if changed or budget_spent():
                        break
            bar.close()
            steps_done = self.step_in_epoch     # < len(batches) when max_steps cut the epoch
            dev = self.evaluate_dev()
            row = {"epoch": self.epoch + 1, "lr": lr,
                   "max_violation": int(s.max_violation and self.epoch >= s.warmup_epochs),
                   "train_loss": self.epoch_loss_sum / max(steps_done, 1),
                   **{f"dev_{k}": v for k, v in dev.items() if k != "protocol"},
                   **{f"train_{k}": v / max(steps_done, 1) for k, v in self.epoch_log_sums.items()},
                   "seconds": time.perf_counter() - t0}
            if self.on_epoch_end is not None:
                row.update(self.on_epoch_end(self))
            for k, v in self.epoch_hook_sums.items():
                row[k] = row.get(k, 0) + v
            self.history.append(row)
            improved = dev["rsum"] > self.best_rsum
            if improved:
                self.best_rsum, self.best_epoch = dev["rsum"], self.epoch + 1
                save_checkpoint(self.out / "checkpoint", self.model,
                                {**self.meta, "epoch": self.epoch + 1, "dev_rsum": dev["rsum"],
                                 "train_settings": dataclasses.asdict(s)})
            tqdm.write(f"epoch {self.epoch + 1}: loss {row['train_loss']:.4f}  dev rsum "
                       f"{dev['rsum']:.1f} (R@1 i2t {dev['i2t_r1']:.1f} t2i {dev['t2i_r1']:.1f})"
                       f"{'  *best' if improved else ''}  {row['seconds']:.0f}s")
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_loss_sum = 0.0
            self.epoch_log_sums = {}
            self.epoch_hook_sums = {}
            self.write_logs()
            self.save_state()
        return {"best_epoch": self.best_epoch, "best_dev_rsum": self.best_rsum,
                "checkpoint": str(self.out / "checkpoint")}

    def _step_hook(self) -> bool:
        """Run on_step_end; True when it changed the dataset."""
        if self.on_step_end is None:
            return False
        out = self.on_step_end(self)
        self.model.train()  # the hook may have embedded with the model in eval mode
        for k, v in (out or {}).items():
            self.epoch_hook_sums[k] = self.epoch_hook_sums.get(k, 0) + v
        return bool(out)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _worker_init(_, parent: int):
    die_with_parent(parent)
    # forked workers must not oversubscribe the cores (and faiss/openmp can deadlock)
    torch.set_num_threads(1)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        pass
