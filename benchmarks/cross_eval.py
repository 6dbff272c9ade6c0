"""Cross-attention evaluation benchmark: the full matrix against the two-stage evaluation
(pipeline.evaluation.two_stage: an independent model's top K re-scored), in one run.

Part 1, the embedded test split (pipeline.data.synthetic, default 1,000 images x 5,000
captions): a first stage (vse_inf, trained --first-epochs on the split's train set) and a
cross model (BFAN at CPU widths, trained --cross-epochs: 0 = untrained, scores close to
random) scored both ways. Reported: wall time of the cross scoring + ranking (the encodings
are timed apart), rsum of each, the share of queries whose ground truth is in the
shortlist and of those whose cross-model top 10 is in it (the exactness condition of
R@1/5/10, docs/two_stage.md).

Part 2, a COCO-5K-sized gallery (5,000 images x 25,000 captions, 36 regions, ~12-word
captions), random encodings of the same untrained BFAN and first-stage rows with retrieval
structure (each caption its image plus noise, benchmarks/mining.py's generator): the
two-stage time measured whole; the full matrix extrapolated from timing --slice-rows image
rows against all captions (Gallery.block, the path `evaluate` takes); the references'
per-caption shard loop (benchmarks/cross_scoring.py) extrapolated from --loop-captions
captions against all images.

With --data / --first-checkpoint / --cross-checkpoint, part 1 scores trained models instead
(the default pipeline's: its base VSE model and its AOQ fine-tuned BFAN).

Usage:
    python benchmarks/cross_eval.py                   # ~5 minutes on 2 cores
    python benchmarks/cross_eval.py --skip-coco --k 50 100 200 --data artifacts/data \\
        --first-checkpoint artifacts/base/checkpoint \\
        --cross-checkpoint artifacts/finetune/bfan-aoq/checkpoint
    python benchmarks/cross_eval.py --n-test 500 --coco-images 2000   # quicker
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cross_scoring import CASES, encoded_shard, loop_scores  # noqa: E402
from mining import cpu_model  # noqa: E402
from pipeline.data.precomp import open_split  # noqa: E402
from pipeline.data.vocab import Vocab  # noqa: E402
from pipeline.evaluation.protocols import evaluate_sims  # noqa: E402
from pipeline.evaluation.two_stage import evaluate_two_stage, shortlist_mask  # noqa: E402
from pipeline.models import create_model, new_model  # noqa: E402
from pipeline.scoring import Gallery, encode_gallery  # noqa: E402

CROSS_WIDTHS = {"embed_size": 128, "word_dim": 64}


def _fmt(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def top10_inside(s1: np.ndarray, s2: np.ndarray, k: int) -> tuple[float, float]:
    """% of i2t / t2i queries whose cross-model top 10 (stable order) is inside the shortlist."""
    def share(a, b):
        sl = shortlist_mask(a, k)
        top = shortlist_mask(b, 10)
        return 100.0 * float(np.mean((~top | sl).all(axis=1)))
    return share(s1, s2), share(np.ascontiguousarray(s1.T), np.ascontiguousarray(s2.T))


def part_embedded(args, work: Path) -> list[str]:
    from pipeline.checkpoint import load_checkpoint
    from pipeline.data.synthetic import SyntheticConfig, generate
    from stages import train_base

    t_gen = t_first = 0.0
    if args.data:
        data = Path(args.data)
    else:
        data = work / "data"
        t = time.perf_counter()
        generate(data, SyntheticConfig(n_train=args.n_train, n_dev=100, n_test=args.n_test,
                                       feature_dim=args.feature_dim, seed=0), progress=False)
        t_gen = time.perf_counter() - t
    first_ckpt = args.first_checkpoint
    if first_ckpt is None:
        t = time.perf_counter()
        first_ckpt = train_base.run(model="vse_inf", data_dir=data, out_dir=work / "first",
                                    model_options={"embed_size": 128, "word_dim": 64},
                                    train_options={"epochs": args.first_epochs, "batch_size": 128,
                                                   "seed": 0}, progress=False)["checkpoint"]
        t_first = time.perf_counter() - t
        first_label = f"vse_inf, {args.first_epochs} epoch(s) on {args.n_train:,} train images"
    else:
        first_label = str(first_ckpt)
    if args.cross_checkpoint:
        cross, _ = load_checkpoint(args.cross_checkpoint, data_dir=data)
        cross_label = f"{cross.name} {args.cross_checkpoint}"
    elif args.cross_epochs:
        res = train_base.run(model="bfan", data_dir=data, out_dir=work / "cross",
                             model_options=CROSS_WIDTHS,
                             train_options={"epochs": args.cross_epochs, "batch_size": 64, "seed": 0},
                             progress=False)
        cross, _ = load_checkpoint(res["checkpoint"])
        cross_label = f"BFAN trained {args.cross_epochs} epoch(s), embed {CROSS_WIDTHS['embed_size']}"
    else:
        torch.manual_seed(0)
        cross = new_model("bfan", img_dim=open_split(data, "test").feature_dim, data_dir=data,
                          **CROSS_WIDTHS).eval()
        cross_label = f"BFAN UNTRAINED, embed {CROSS_WIDTHS['embed_size']}"
    indep, _ = load_checkpoint(first_ckpt, data_dir=data)
    split = open_split(data, "test")
    t = time.perf_counter()
    g1 = encode_gallery(indep, split, batch_size=128)
    img, cap = g1.rows()
    t_enc1 = time.perf_counter() - t
    t = time.perf_counter()
    gallery = encode_gallery(cross, split, batch_size=128)
    t_enc2 = time.perf_counter() - t

    t = time.perf_counter()
    s2 = gallery.matrix()
    full = evaluate_sims(s2, "full")
    t_full = time.perf_counter() - t
    first_only = evaluate_sims(img @ cap.T, "full")
    n, m = gallery.n_img, gallery.n_cap
    lines = [
        f"### Embedded test split: {n:,} images x {m:,} captions; cross model: {cross_label}; "
        f"first stage: {first_label}",
        "",
        f"setup (not in the times below): data {t_gen:.1f} s, first-stage training {t_first:.1f} s, "
        f"first-stage encoding {t_enc1:.1f} s, cross encoding {t_enc2:.1f} s",
        "",
        "| evaluation | cross scores | wall time | speed-up | rsum | rsum - full | i2t R@1 | t2i R@1 | "
        "GT in shortlist i2t / t2i | cross top-10 in shortlist i2t / t2i |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| first stage alone | 0 | - | - | {first_only['rsum']:.1f} | "
        f"{first_only['rsum'] - full['rsum']:+.2f} | "
        f"{first_only['i2t_r1']:.1f} | {first_only['t2i_r1']:.1f} | - | - |",
        f"| full cross matrix | {n * m:,} | {_fmt(t_full)} | 1.0x | {full['rsum']:.2f} | - | "
        f"{full['i2t_r1']:.1f} | {full['t2i_r1']:.1f} | - | - |",
    ]
    for k in args.k:
        t = time.perf_counter()
        two = evaluate_two_stage(gallery, img, cap, "full", k)
        t_two = time.perf_counter() - t
        cov_i, cov_t = top10_inside(img @ cap.T, s2, k)
        lines.append(
            f"| two-stage K={k} | {two['pairs_scored']:,} | {_fmt(t_two)} | {t_full / t_two:.1f}x | "
            f"{two['rsum']:.2f} | {two['rsum'] - full['rsum']:+.2f} | {two['i2t_r1']:.1f} | "
            f"{two['t2i_r1']:.1f} | "
            f"{two['gt_in_shortlist_i2t']:.1f}% / {two['gt_in_shortlist_t2i']:.1f}% | "
            f"{cov_i:.1f}% / {cov_t:.1f}% |")
    return lines + [""]


def structured_rows(n_img: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_img, dim), dtype=np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap = np.repeat(img, 5, axis=0) + 1.2 / np.sqrt(dim) * rng.standard_normal((5 * n_img, dim),
                                                                                dtype=np.float32)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    return img, cap


def part_coco(args) -> list[str]:
    n = args.coco_images
    vocab = Vocab(f"w{i}" for i in range(500))
    torch.manual_seed(0)
    model = create_model("bfan", img_dim=args.feature_dim, tokenizer=vocab, **CROSS_WIDTHS).eval()
    t = time.perf_counter()
    img_enc, cap_enc = encoded_shard(model, n, 5 * n, 36, 12, args.feature_dim, seed=1)
    t_enc = time.perf_counter() - t
    gallery = Gallery(model, img_enc, cap_enc)
    first_img, first_cap = structured_rows(n, 128, seed=2)

    t = time.perf_counter()
    two = evaluate_two_stage(gallery, first_img, first_cap, "full", args.k[0])
    t_two = time.perf_counter() - t

    rows = args.slice_rows
    gallery.block(0, 1, 0, 256)                     # warm-up
    t = time.perf_counter()
    gallery.block(0, rows, 0, 5 * n)
    t_slice = time.perf_counter() - t
    t_full = t_slice * n / rows

    ref = CASES["bfan equal"][2]
    m = args.loop_captions
    with torch.no_grad():
        t = time.perf_counter()
        loop_scores(img_enc.data, cap_enc.data[:m], cap_enc.lengths[:m], **ref)
        t_loop_slice = time.perf_counter() - t
    t_loop = t_loop_slice * 5 * n / m
    pairs = n * 5 * n
    return [
        f"### COCO-5K-sized gallery: {n:,} images x {5 * n:,} captions (untrained BFAN, embed "
        f"{CROSS_WIDTHS['embed_size']}, 36 regions, ~12-word captions; random encodings, "
        f"encoded in {t_enc:.1f} s)",
        "",
        "| evaluation | cross scores | wall time | how | speed-up vs full |",
        "|---|---:|---:|---|---:|",
        f"| references' per-caption loop | {pairs:,} | {_fmt(t_loop)} | extrapolated from {m} "
        f"captions x {n:,} images ({t_loop_slice:.1f} s) | {t_full / t_loop:.2f}x |",
        f"| full matrix (Gallery.block) | {pairs:,} | {_fmt(t_full)} | extrapolated from {rows} "
        f"images x {5 * n:,} captions ({t_slice:.1f} s) | 1.0x |",
        f"| two-stage K={args.k[0]} | {two['pairs_scored']:,} | {_fmt(t_two)} | measured whole "
        f"(first stage + re-scoring + ranks) | {t_full / t_two:.1f}x |",
        "",
        f"two-stage vs the references' loop: {t_loop / t_two:.0f}x",
        "",
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[100],
                    help="shortlist sizes (the COCO-sized part uses the first)")
    ap.add_argument("--data", help="an existing data folder (e.g. artifacts/data) instead of "
                                   "generating one")
    ap.add_argument("--first-checkpoint", help="the first stage: this indep checkpoint "
                                               "(e.g. artifacts/base/checkpoint) instead of training one")
    ap.add_argument("--cross-checkpoint", help="the cross model: this checkpoint (e.g. "
                                               "artifacts/finetune/bfan-aoq/checkpoint)")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--feature-dim", type=int, default=256)
    ap.add_argument("--first-epochs", type=int, default=3)
    ap.add_argument("--cross-epochs", type=int, default=0, help="0: an untrained BFAN")
    ap.add_argument("--coco-images", type=int, default=5000)
    ap.add_argument("--slice-rows", type=int, default=8)
    ap.add_argument("--loop-captions", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--skip-coco", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"BFAN float64 scores (its score dtype), K = {args.k}\n", flush=True)
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_embedded:
            lines += part_embedded(args, Path(tmp))
            print("\n".join(lines), flush=True)
    if not args.skip_coco:
        coco = part_coco(args)
        print("\n".join(coco), flush=True)


if __name__ == "__main__":
    main()
