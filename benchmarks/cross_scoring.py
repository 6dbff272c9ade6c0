"""Cross-attention scoring benchmark: our batched `similarity` against the references'
per-caption loop (`xattn_score` of BFAN, `xattn_score_t2i` / `_i2t` of SCAN), same
encoded inputs, same widths, same run.

The loop is the references' scheme: for each caption of the shard, repeat it once per
image and run the attention over all images with bmm (float32, their dtype; their focal
`prob` gate with its O(S^2) bmm). Ours is `model.similarity` on the same `Encoded` shard,
in the model's score dtype (float64) and, for the record, in float32.
Pairs per second = pairs / seconds, best of --repeats rounds in which the three take
turns (the machine may be shared). The loop's cost is linear in the captions, so it is
timed on the first --loop-captions captions against every image of the shard; ours on the
whole shard. "max abs diff" compares ours (float64) with the loop on those captions: the
loop's float32 focal gates flip on near-tied weights (BFAN), so it can exceed 1e-5 there.

Usage:
    python benchmarks/cross_scoring.py                       # embed 256, 36 regions, 12 words, 128 x 128
    python benchmarks/cross_scoring.py --embed 1024 --shard 64
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mining import cpu_model  # noqa: E402  (benchmarks/mining.py: the same CPU label)
from pipeline.data.vocab import Vocab  # noqa: E402
from pipeline.models import Encoded, create_model  # noqa: E402

EPS = 1e-8


# --------------------------------------------------------------------------- the loop
def _l2(x, dim):
    return x / (x.pow(2).sum(dim, keepdim=True).sqrt() + EPS)


def _cos(a, b):
    return (a * b).sum(2) / (a.norm(dim=2) * b.norm(dim=2)).clamp(min=EPS)


def _loop_attention(query, context, lam, focal):
    """The references' func_attention: query (n, Q, d), context (n, S, d)."""
    attn = _l2(F.leaky_relu(torch.bmm(context, query.transpose(1, 2)), 0.1), 2)
    attn = torch.softmax(attn.transpose(1, 2) * lam, dim=2)                   # (n, Q, S)
    if focal == "equal":
        keep = (attn * attn.size(2) - attn.sum(2, keepdim=True)) > 0
    elif focal == "prob":
        n, q, s = attn.shape
        xi = attn.reshape(n * q, s, 1)
        xj = attn.reshape(n * q, 1, s)
        keep = (torch.bmm(xi, xj.sqrt()) - xj * xj.sqrt()).sum(-1).view(n, q, s) > 0
    if focal:
        attn = attn * keep
        attn = attn / attn.sum(2, keepdim=True)
    return torch.bmm(attn, context)


def _agg(sim, kind, lam_lse):
    if kind == "lse":
        return torch.log(torch.exp(sim * lam_lse).sum(1, keepdim=True)) / lam_lse
    return sim.mean(1, keepdim=True)


def loop_scores(images, captions, cap_lens, directions, lam, focal, agg, lam_lse):
    """(Ni, Nt), one caption at a time against every image of the shard."""
    cols = []
    n_img = images.size(0)
    for i in range(captions.size(0)):
        cap = captions[i, :int(cap_lens[i])].unsqueeze(0).repeat(n_img, 1, 1)
        total = 0
        if "t2i" in directions:
            total = total + _agg(_cos(cap, _loop_attention(cap, images, lam, focal)), agg, lam_lse)
        if "i2t" in directions:
            total = total + _agg(_cos(images, _loop_attention(images, cap, lam, focal)), agg, lam_lse)
        cols.append(total)
    return torch.cat(cols, 1)


# --------------------------------------------------------------------------- runs
CASES = {
    "bfan equal": ("bfan", {"focal_type": "equal"}, dict(directions=("t2i", "i2t"), lam=20.0,
                                                          focal="equal", agg="avg", lam_lse=0)),
    "bfan prob": ("bfan", {"focal_type": "prob"}, dict(directions=("t2i", "i2t"), lam=20.0,
                                                        focal="prob", agg="avg", lam_lse=0)),
    "scan t2i lse": ("scan", {"direction": "t2i", "aggregation": "lse"},
                     dict(directions=("t2i",), lam=9.0, focal=None, agg="lse", lam_lse=6.0)),
    "scan i2t avg": ("scan", {"direction": "i2t", "aggregation": "avg", "lambda_softmax": 4.0},
                     dict(directions=("i2t",), lam=4.0, focal=None, agg="avg", lam_lse=0)),
}


def interleaved_best(fns: dict, repeats: int, sync=lambda: None) -> tuple[dict, dict]:
    """Best wall time of each function over `repeats` rounds, the functions taking turns
    within a round (a busy shared machine slows them alike), and each one's last result.
    `sync`: waits for the device (torch.cuda.synchronize on a GPU)."""
    best, out = {k: float("inf") for k in fns}, {}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            out[k] = fn()
            sync()
            best[k] = min(best[k], time.perf_counter() - t)
    return best, out


def encoded_shard(model, n_img, n_cap, regions, words, img_dim, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, words - 4), words + 5, (n_cap,), generator=g)
    tokens = torch.randint(4, model.tokenizer.size, (n_cap, int(lengths.max())), generator=g)
    images = torch.randn(n_img, regions, img_dim, generator=g)
    with torch.no_grad():
        img = model.encode_image(images.to(device), torch.full((n_img,), regions, device=device))
        txt = model.encode_text(tokens.to(device), lengths.to(device))
    return img, txt


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--embed", type=int, default=256)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--words", type=int, default=12, help="mean caption length (+-4)")
    ap.add_argument("--shard", type=int, default=128, help="images = captions per shard")
    ap.add_argument("--img-dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-captions", type=int, default=32,
                    help="captions the loop scores against every image (its rate is per caption)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (loop and ours both there)")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = Vocab(f"w{i}" for i in range(500))
    n = args.shard
    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"embed {args.embed}, {args.regions} regions, ~{args.words}-word captions, "
          f"shard {n} x {n}, best of {args.repeats}"
          + (f"; device {torch.cuda.get_device_name(args.device)}" if gpu else ""))
    print("| model | per-caption loop (pairs/s) | ours, float64 (pairs/s) | ratio | "
          "ours, float32 (pairs/s) | ratio | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    m = min(n, args.loop_captions)
    for label, (name, options, ref) in CASES.items():
        torch.manual_seed(0)
        model = create_model(name, img_dim=args.img_dim, tokenizer=vocab, embed_size=args.embed,
                             word_dim=64, **options).eval().to(args.device)
        img, txt = encoded_shard(model, n, n, args.regions, args.words, args.img_dim, seed=1,
                                 device=args.device)
        model64 = copy.copy(model)
        model64.score_dtype = torch.float64
        model32 = copy.copy(model)
        model32.score_dtype = torch.float32
        with torch.no_grad():
            t, out = interleaved_best({
                "loop": lambda: loop_scores(img.data, txt.data[:m], txt.lengths[:m], **ref),
                "f64": lambda: model64.similarity(img, txt),
                "f32": lambda: model32.similarity(img, txt)}, args.repeats, sync)
        diff = float((out["f64"][:, :m] - out["loop"]).abs().max())
        loop, f64, f32 = n * m / t["loop"], n * n / t["f64"], n * n / t["f32"]
        print(f"| {label} | {loop:,.0f} | {f64:,.0f} | {f64 / loop:.1f}x | "
              f"{f32:,.0f} | {f32 / loop:.1f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
