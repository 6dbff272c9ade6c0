"""AOQ ablation on the embedded data set: triplet vs OffTri vs OffQuin vs AOQ (and AOQ with
candidate refresh every `--refresh-steps` optimizer steps, and triplet given AOQ's
wall-clock time), several seeds, per model.

Every run fine-tunes the same base checkpoint of its model with the same epochs and the
recipe of params.yaml (finetune.models.<model>.train, seed replaced), and is scored on the
test split (rsum, and rsum within the image's family: the siblings the
mined negatives come from). Step times are measured in the same process on the same
batches: triplet, AOQ in one batched pass, AOQ in the reference's three passes.

    python benchmarks/aoq_ablation.py --models vse_inf vsrn --seeds 0 1 2 --out artifacts/bench/aoq

A model whose params `init` is a checkpoint fine-tunes it; one with `init: scratch` (VSRN
in the default params) first gets a base of its own: `--base-epochs` triplet epochs of
the params' recipe (seed 0), which every variant then fine-tunes.

Prints a markdown table (paste it into the README) and writes results.json.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from mining import cpu_model  # noqa: E402  (benchmarks/mining.py: the same CPU label)

VARIANTS = ("triplet", "offtri", "offquin", "aoq", "aoq+refresh", "triplet (AOQ wall-clock)")


def finetune_and_score(model, base, data, candidates, loss, out, *, seed, epochs, train,
                       refresh_steps=0, model_options=None, init=None):
    from stages import evaluate, finetune

    t0 = time.perf_counter()
    finetune.run(model=model, data_dir=data, out_dir=out, loss=loss, candidates_dir=candidates,
                 init=init or base, model_options=model_options,
                 train_options={**train, "epochs": epochs, "seed": seed},
                 refresh_every_steps=refresh_steps, progress=False)
    seconds = time.perf_counter() - t0
    res = evaluate.run(checkpoint=Path(out) / "checkpoint", data_dir=data, split="test",
                       protocol="full", out_json=None, groups_json=None, device="cpu",
                       batch_size=256, progress=False)
    return {"rsum": res["metrics"]["rsum"], "family_rsum": res["groups"]["family"]["rsum"],
            "seconds": seconds}


def epoch_steps(model, data, train) -> int:
    """Optimizer steps of one epoch of the recipe."""
    from pipeline.data.precomp import open_split
    from stages.train_base import settings_for

    return open_split(data, "train").n_captions // settings_for(model, train).batch_size


def quarter_epoch_steps(model, data, train) -> int:
    """A quarter of an epoch's optimizer steps, rounded up: even a 1-epoch fine-tune
    refreshes its candidates a few times."""
    return max(1, math.ceil(epoch_steps(model, data, train) / 4))


def step_times(model_name, base, data, candidates, *, steps: int, batch_size: int,
               model_options=None, device: str = "cpu") -> dict:
    """Seconds per training step (forward + backward) on the same batches; base "scratch"
    times a new model built with model_options. On a GPU the batches are moved there
    before the clock starts (the loader's work is not a step's)."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.data.datasets import PairDataset, collate_pairs
    from pipeline.models import new_model
    from pipeline.data.offline import OfflineNegativeDataset, collate_offline, default_offcandisize
    from pipeline.data.precomp import open_split
    from pipeline.losses.aoq import AOQSettings, quintuplet_loss
    from pipeline.losses.triplet import triplet_objective
    from pipeline.mining.candidates import load_candidates

    split = open_split(data, "train")
    if base == "scratch":
        model = new_model(model_name, img_dim=split.feature_dim, data_dir=data,
                          **(model_options or {}))
    else:
        model, _ = load_checkpoint(base, data_dir=data)
    model.train().to(device)
    cands = load_candidates(candidates, n_images=split.n_images)
    pairs = PairDataset(split, model.tokenizer, train=True)
    off = OfflineNegativeDataset(pairs, cands.i2t, cands.t2i, default_offcandisize(split.n_captions))
    g = torch.Generator().manual_seed(0)
    idx = [torch.randperm(len(pairs), generator=g)[:batch_size].tolist() for _ in range(steps + 2)]
    def moved(batch):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    plain = [moved(collate_pairs([pairs[j] for j in b])) for b in idx]
    stacked = [moved(collate_offline([off[j] for j in b])) for b in idx]
    aoq = AOQSettings(loss="aoq")
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def timed(fn, batches):
        for b in batches[:2]:  # warm-up
            fn(b)[0].backward()
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        for b in batches[2:]:
            fn(b)[0].backward()
        sync()
        return (time.perf_counter() - t0) / steps

    out = {}
    for _ in range(2):  # interleave the variants twice, keep the faster of each
        for name, fn, batches in (
                ("triplet", lambda b: triplet_objective(model, b, margin=0.2, max_violation=True,
                                                        mask_same_image=False), plain),
                ("aoq_batched", lambda b: quintuplet_loss(model, b, aoq, "batched"), stacked),
                ("aoq_three_passes", lambda b: quintuplet_loss(model, b, aoq, "three"), stacked)):
            t = timed(fn, batches)
            out[name] = min(out.get(name, t), t)
    return out


def model_path(text: str) -> tuple[str, str]:
    model, sep, path = text.partition("=")
    if not (sep and model and path):
        raise argparse.ArgumentTypeError(f"expected MODEL=CHECKPOINT, got {text!r}")
    return model, path


def width_options(base, spec: dict, width: int) -> dict:
    """The base's model options (or the params' for a scratch base) at another embed width."""
    if base == "scratch":
        opts = dict(spec.get("model_options") or {})
    else:
        from pipeline.checkpoint import read_checkpoint_config

        opts = {k: v for k, v in read_checkpoint_config(base)["model"].items()
                if k not in ("name", "img_dim", "vocab_size")}
    return {**opts, "embed_size": int(width)}


def fmt(values):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="the finetune section gives the recipe")
    ap.add_argument("--models", nargs="+", default=["vse_inf", "vsrn"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="[default: the params' epochs]")
    ap.add_argument("--init", action="append", default=[], metavar="MODEL=CHECKPOINT", type=model_path,
                    help="fine-tune this base instead of the params' init (repeatable), e.g. "
                         "a longer pretrain of VSRN")
    ap.add_argument("--base-epochs", type=int, default=4,
                    help="triplet epochs of the base of an init: scratch model")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--step-steps", type=int, default=10, help="steps per step-time measurement")
    ap.add_argument("--refresh-steps", type=int, default=None,
                    help="aoq+refresh re-mines the candidates every N optimizer steps "
                         "[default: a quarter of an epoch, rounded up]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps-only", action="store_true", help="only the step-time measurement")
    ap.add_argument("--step-widths", type=int, nargs="+", default=[],
                    help="also time new models of the base's architecture at these embed "
                         "widths (how the batched / three-pass ratio depends on arithmetic)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where the step times are measured "
                                                  "(fine-tunes and scoring stay on the CPU)")
    ap.add_argument("--out", default="artifacts/bench/aoq")
    args = ap.parse_args(argv)
    inits = dict(args.init)
    torch.set_num_threads(args.threads)
    import yaml

    ft = yaml.safe_load(Path(args.params).read_text())["finetune"]
    data, candidates = ft.get("data", "artifacts/data"), ft.get("candidates", "artifacts/candidates")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"cpu": cpu_model(), "threads": args.threads, "seeds": args.seeds, "models": {},
                     "device": args.device}
    saved = out / "results.json"
    previous = json.loads(saved.read_text())["models"] if saved.is_file() else {}  # resume
    for model in args.models:
        spec = ft["models"][model]
        cands = spec.get("candidates", candidates)   # a model may mine with its own base
        train = dict(spec.get("train") or {})
        batch_size = int(train.get("batch_size", 128))
        epochs = args.epochs or int(train.get("epochs", 2))
        base = inits.get(model) or spec.get("init", "scratch")
        r = results["models"][model] = {"epochs": epochs, "base": base,
                                         "runs": {v: [] for v in args.variants}}
        prev = previous.get(model, {}).get("runs", {})
        if base == "scratch" and not args.steps_only:
            base_dir = out / model / "base"
            if not (base_dir / "checkpoint" / "config.json").is_file():
                finetune_and_score(model, None, data, cands, "triplet", base_dir, seed=0,
                                   epochs=args.base_epochs, train=train, init="scratch",
                                   model_options=spec.get("model_options"))
            base = str(base_dir / "checkpoint")
            r["base"] = f"{args.base_epochs} triplet epochs from scratch"
        r["step_seconds"] = previous.get(model, {}).get("step_seconds") or step_times(
            model, base, data, cands, steps=args.step_steps, batch_size=batch_size,
            model_options=spec.get("model_options"), device=args.device)
        print(model, "step seconds", r["step_seconds"], flush=True)
        if args.step_widths:
            r["step_seconds_by_width"] = {
                str(w): step_times(model, "scratch", data, cands, steps=args.step_steps,
                                   batch_size=batch_size, model_options=width_options(base, spec, w),
                                   device=args.device)
                for w in args.step_widths}
        if args.steps_only:
            continue
        for seed in args.seeds:
            done = {}
            for v in args.variants:
                kw = dict(seed=seed, epochs=epochs, train=train)
                shown_epochs = epochs
                if v == "aoq+refresh":
                    kw["refresh_steps"] = args.refresh_steps or quarter_epoch_steps(model, data, train)
                if v.startswith("triplet (AOQ"):
                    if "aoq" not in done or "triplet" not in done:
                        continue  # defined relative to those two
                    # from the step times of this run: wall-clock of whole runs is too noisy
                    # on a shared machine. The budget is in steps (max_steps cuts the last
                    # epoch), not whole epochs: BFAN's AOQ step is 1.2x triplet's
                    st = r["step_seconds"]
                    per_epoch = epoch_steps(model, data, train)
                    steps = round(epochs * per_epoch * st["aoq_batched"] / st["triplet"])
                    kw["epochs"] = max(epochs, math.ceil(steps / per_epoch))
                    kw["train"] = {**train, "max_steps": max(steps, epochs * per_epoch)}
                    shown_epochs = round(kw["train"]["max_steps"] / per_epoch, 2)
                loss = v.split("+")[0].split(" ")[0]
                earlier = [x for x in prev.get(v, []) if x.get("seed") == seed
                           and x.get("refresh_steps") == kw.get("refresh_steps")]
                if earlier:
                    done[v] = earlier[0]
                    r["runs"][v].append(earlier[0])
                    continue
                res = finetune_and_score(model, base, data, cands, loss,
                                         out / model / f"{v.replace(' ', '_')}-s{seed}", **kw)
                res.update(epochs=shown_epochs, seed=seed, refresh_steps=kw.get("refresh_steps"))
                done[v] = res
                r["runs"][v].append(res)
                print(f"{model} seed {seed} {v}: {res}", flush=True)
                (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = [f"CPU: {results['cpu']}, {results['threads']} threads; fine-tuned from the base "
             f"checkpoint of each model; seeds {results['seeds']} (mean ± std).", "",
             "| model | loss | test rsum | within-family rsum | epochs | minutes per run |",
             "|---|---|---:|---:|---:|---:|"]
    for model, r in results["models"].items():
        for v, runs in r["runs"].items():
            if runs:
                lines.append(f"| {model} | {v} | {fmt([x['rsum'] for x in runs])} | "
                             f"{fmt([x['family_rsum'] for x in runs])} | {runs[0]['epochs']} | "
                             f"{statistics.mean(x['seconds'] for x in runs) / 60:.1f} |")
    lines += ["", "| model | triplet step | AOQ step, one batched pass | AOQ step, three passes | "
                  "batched / three passes |", "|---|---:|---:|---:|---:|"]
    for model, r in results["models"].items():
        timed = [(model, r["step_seconds"])] + [
            (f"{model}, new model, embed width {w}", s)
            for w, s in r.get("step_seconds_by_width", {}).items()]
        for label, s in timed:
            lines.append(f"| {label} | {s['triplet']:.3f} s | {s['aoq_batched']:.3f} s "
                         f"({s['aoq_batched'] / s['triplet']:.2f}× triplet) | "
                         f"{s['aoq_three_passes']:.3f} s | "
                         f"{s['aoq_batched'] / s['aoq_three_passes']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
