"""Candidate-mining benchmark: every backend on the same embeddings and K, in one run.

Measures, on this machine and in this run:
- the machine's own fp32, fp16 and bf16 GEMM rates (torch.matmul of the tile shape the
  torch backend uses), so every figure is reported as a share of the measured bf16 rate;
- our torch backend (one tiled pass, both directions, exact) in each precision asked for
  (default: auto, fp32, fp16, bf16), with what ``auto`` chose, from which probe rates and
  predicted costs, and whether that is the fastest explicit precision of the run;
- our faiss backend (IndexFlatIP, one search per direction, exact);
- the reference scheme (AOQ's tools: one query at a time, GEMV + top-k), timed on a sample
  of queries and extrapolated to all of them;
- peak memory of each backend (each runs in its own subprocess): private memory (RssAnon,
  sampled) and RSS including file-backed pages (VmHWM); the torch backend runs as the mine
  stage does, memory-mapped inputs used in place and its growing arrays in scratch files,
  at two sizes to show that private memory does not grow with the number of queries
  (``torch-in-memory`` is the same pass with everything in private memory);
- the COCO-scale time (113,287 x 566,435 x 1024) extrapolated from each measured rate.

Usage:
    python benchmarks/mining.py                         # 20,000 x 100,000 x 1024, K 2000/400
    python benchmarks/mining.py --n-img 4000 --dim 256  # quicker
    python benchmarks/mining.py --n-img 10000 --backends torch   # the precision check only
Effective rate = 2 * N_img * N_cap * D / seconds (the one score matrix both directions share).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

COCO = (113_287, 566_435, 1024)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_embeddings(n_img: int, dim: int, seed: int, folder: Path) -> tuple[Path, Path]:
    """Unit embeddings with retrieval structure: each caption is its image plus noise."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_img, dim), dtype=np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    ip, cp = folder / f"img_{n_img}.npy", folder / f"cap_{n_img}.npy"
    np.save(ip, img)
    cap = np.lib.format.open_memmap(cp, mode="w+", dtype=np.float32, shape=(5 * n_img, dim))
    for s in range(0, n_img, 4096):
        e = min(n_img, s + 4096)
        block = np.repeat(img[s:e], 5, axis=0) + 1.2 / np.sqrt(dim) * rng.standard_normal(
            (5 * (e - s), dim), dtype=np.float32)
        cap[5 * s:5 * e] = block / np.linalg.norm(block, axis=1, keepdims=True)
    cap.flush()
    return ip, cp


def gemm_rates(dim: int, rows: int = 4096, cols: int = 8192, reps: int = 5,
               budget: float = 6.0, device: str = "cpu") -> dict:
    """GFLOP/s of one rows x cols x dim GEMM per precision (best of up to `reps` after a
    warm-up; a slow precision stops after `budget` seconds, at least one timed run)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        a = torch.randn(rows, dim, device=device).to(dtype)
        b = torch.randn(cols, dim, device=device).to(dtype)
        a @ b.t()
        sync()
        best, spent = float("inf"), 0.0
        for _ in range(reps):
            t = time.perf_counter()
            a @ b.t()
            sync()
            dt = time.perf_counter() - t
            best, spent = min(best, dt), spent + dt
            if spent > budget:
                break
        out[name] = 2.0 * rows * cols * dim / best / 1e9
    return out


# ----------------------------------------------------------------------- one backend
class PrivateMemory:
    """Peak private memory (RssAnon of /proc/self/status), sampled every 5 ms by a thread:
    what the process itself holds, without file-backed pages (memory-mapped inputs and
    scratch files) that the kernel can write back and evict."""

    def __init__(self):
        import threading

        self.peak, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.now())
            self.stop.wait(0.005)

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return max(self.peak, self.now())


def run_backend(backend: str, img_path: str, cap_path: str, k_i2t: int, k_t2i: int,
                sample: int, precision: str = "auto", device: str = "cpu") -> dict:
    """Runs in a subprocess: its peak memory is the backend's own."""
    import torch

    mem = PrivateMemory()
    img = np.load(img_path, mmap_mode="r")
    cap = np.load(cap_path, mmap_mode="r")
    n_img, n_cap = img.shape[0], cap.shape[0]
    scratch = Path(tempfile.mkdtemp(prefix="scratch_", dir=Path(img_path).parent))
    t = time.perf_counter()
    if backend == "torch":                 # as the mine stage runs it
        from pipeline.mining.knn_torch import mine_torch

        res = mine_torch(img, cap, k_i2t, k_t2i, precision=precision, device=device,
                         scratch=None if device.startswith("cuda") else scratch)
    elif backend == "torch-in-memory":
        from pipeline.mining.knn_torch import mine_torch

        res = mine_torch(np.array(img), np.array(cap), k_i2t, k_t2i, precision=precision,
                         device=device)
    elif backend == "torch-fp32":
        from pipeline.mining.knn_torch import mine_torch

        res = mine_torch(img, cap, k_i2t, k_t2i, precision="fp32", device=device)
    elif backend == "faiss":
        from pipeline.mining.knn_faiss import mine_faiss

        res = mine_faiss(img, cap, k_i2t, k_t2i, index="flat", use_gpu=device.startswith("cuda"))
    elif backend == "reference":
        out = reference_scheme(img, cap, k_i2t, k_t2i, sample, device)
        out["peak_private_gb"] = mem.close() / 1e9
        return out
    else:
        raise SystemExit(f"unknown backend {backend}")
    seconds = time.perf_counter() - t
    peak_private = mem.close()
    tag = f"{backend}-{precision}" if backend.startswith("torch") else backend
    np.save(Path(img_path).with_name(f"ids_{tag}_{n_img}_i2t.npy"), res.i2t)
    np.save(Path(img_path).with_name(f"ids_{tag}_{n_img}_t2i.npy"), res.t2i)
    shutil.rmtree(scratch)
    parts = {k: v for k, v in res.stats.items() if k.startswith("seconds_") or k == "keyed"}
    return {"seconds": seconds, "n_img": n_img, "n_cap": n_cap,
            "threads": torch.get_num_threads(), "precision": res.stats.get("precision"),
            "precision_choice": res.stats.get("precision_choice"), "parts": parts,
            "peak_private_gb": peak_private / 1e9}


def reference_scheme(img, cap, k_i2t, k_t2i, sample: int, device: str = "cpu") -> dict:
    """AOQ's tools: one query at a time, a GEMV against the whole gallery, positives set to
    -9999, top-k. Timed on `sample` queries per direction and extrapolated."""
    import torch

    img_t = torch.from_numpy(np.ascontiguousarray(img)).to(device)
    cap_t = torch.from_numpy(np.ascontiguousarray(cap)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n_img, n_cap = img_t.shape[0], cap_t.shape[0]
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in rng.choice(n_img, size=min(sample, n_img), replace=False):
        s = cap_t @ img_t[i]
        s[5 * i:5 * i + 5] = -9999
        torch.topk(s, k_i2t)
    sync()
    per_i2t = (time.perf_counter() - t) / min(sample, n_img)
    t = time.perf_counter()
    for j in rng.choice(n_cap, size=min(sample, n_cap), replace=False):
        s = img_t @ cap_t[j]
        s[j // 5] = -9999
        torch.topk(s, k_t2i)
    sync()
    per_t2i = (time.perf_counter() - t) / min(sample, n_cap)
    return {"seconds": per_i2t * n_img + per_t2i * n_cap, "sampled": int(sample),
            "n_img": n_img, "n_cap": n_cap, "threads": torch.get_num_threads()}


def in_subprocess(backend, img_path, cap_path, k_i2t, k_t2i, sample, precision,
                  device="cpu") -> dict:
    cmd = [sys.executable, __file__, "--worker", backend, "--img", str(img_path),
           "--cap", str(cap_path), "--k-i2t", str(k_i2t), "--k-t2i", str(k_t2i),
           "--sample", str(sample), "--precision", precision, "--device", device]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read()
    if status != 0:
        raise SystemExit(f"{backend} failed (status {status})")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_gb"] = usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux
    return res


# ----------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-img", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--k-i2t", type=int, default=2000)
    ap.add_argument("--k-t2i", type=int, default=400)
    ap.add_argument("--backends", default="torch,torch-in-memory,faiss,reference")
    ap.add_argument("--memory-sizes", default="", help="extra n_img values for the torch memory check")
    ap.add_argument("--sample", type=int, default=200, help="queries per direction for the reference")
    ap.add_argument("--precision", default="auto,fp32,fp16,bf16",
                    help="GEMM precision(s) of the torch backend, comma-separated: auto (the "
                         "cheapest predicted here), fp32, bf16, fp16; torch-in-memory and "
                         "--memory-sizes use the first")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (GEMM rates measured there too)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--img", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cap", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(run_backend(args.worker, args.img, args.cap, args.k_i2t, args.k_t2i,
                                     args.sample, args.precision, args.device)))
        return 0

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="itm_bench_"))
    n_img, dim = args.n_img, args.dim
    n_cap = 5 * n_img
    flop = 2.0 * n_img * n_cap * dim
    coco_flop = 2.0 * COCO[0] * COCO[1] * COCO[2]
    print(f"CPU: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f"; device {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else ""))
    print(f"size: {n_img} x {n_cap} x {dim}, K {args.k_i2t}/{args.k_t2i}")
    img_path, cap_path = make_embeddings(n_img, dim, args.seed, tmp)
    rates = gemm_rates(dim, device=args.device)
    print(f"GEMM (4096 x 8192 x {dim}): " + ", ".join(f"{p} {r:.0f} GFLOP/s" for p, r in rates.items()))
    precisions = [p for p in args.precision.split(",") if p]

    rows = []
    results = {}
    for backend in [b for b in args.backends.split(",") if b]:
        for prec in (precisions if backend == "torch" else precisions[:1]):
            r = in_subprocess(backend, img_path, cap_path, args.k_i2t, args.k_t2i, args.sample,
                              prec, args.device)
            name = f"{backend} ({prec})" if backend.startswith("torch") else backend
            if prec == "auto" and r.get("precision"):
                name = f"{backend} (auto -> {r['precision']})"
            results[name] = r
            if backend == "torch":
                results.setdefault("torch", r)
            rate = flop / r["seconds"] / 1e9
            rows.append((name, r["seconds"], rate, rate / rates["bf16"], r["peak_private_gb"],
                         r["peak_rss_gb"], coco_flop / (rate * 1e9) / 60))
            print(f"  {name}: {r['seconds']:.1f} s", flush=True)
    for size in [int(x) for x in args.memory_sizes.split(",") if x]:
        ip, cp = make_embeddings(size, dim, args.seed + 1, tmp)
        r = in_subprocess("torch", ip, cp, args.k_i2t, args.k_t2i, args.sample, precisions[0],
                          args.device)
        rate = 2.0 * size * 5 * size * dim / r["seconds"] / 1e9
        rows.append((f"torch ({r['precision']}) @ {size} images", r["seconds"], rate,
                     rate / rates["bf16"], r["peak_private_gb"], r["peak_rss_gb"], None))
    ids = sorted(tmp.glob(f"ids_*_{n_img}_i2t.npy"))
    same = None
    if len(ids) > 1:      # every backend and precision gives the same ids (all exact)
        def load(f, d):
            return np.load(f.with_name(f.name.replace("_i2t.npy", f"_{d}.npy")))
        same = all(np.array_equal(load(ids[0], d), load(f, d)) for f in ids[1:] for d in ("i2t", "t2i"))

    print()
    print("| backend | seconds | effective GFLOP/s | share of bf16 GEMM | peak private memory (GB) "
          "| peak RSS incl. file-backed (GB) | COCO-scale (min, extrapolated) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, sec, rate, share, private, rss, coco in rows:
        coco_s = f"{coco:.1f}" if coco is not None else ""
        print(f"| {name} | {sec:.1f} | {rate:.0f} | {share:.0%} | {private:.2f} | {rss:.2f} | {coco_s} |")
    for p in ("bf16", "fp16", "fp32"):
        print(f"| ({p} GEMM alone, this run) | {flop / rates[p] / 1e9:.1f} | {rates[p]:.0f} "
              f"| {rates[p] / rates['bf16']:.0%} | | | {coco_flop / rates[p] / 1e9 / 60:.1f} |")
    if same is not None:
        print(f"\nsame ids from every backend and precision (both directions): {same}")
    if "torch" in results and "faiss" in results:
        print(f"torch speed-up over faiss: {results['faiss']['seconds'] / results['torch']['seconds']:.2f}x")
    check = auto_check(results, rates)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "gemm": rates, "rows": rows,
                                               "same_ids": same, "auto": check,
                                               "results": results}, indent=2))
    return 0


def auto_check(results: dict, rates: dict) -> dict | None:
    """What `auto` chose and why, against the fastest explicit precision of this run."""
    auto = next((r for n, r in results.items() if n.startswith("torch (auto")), None)
    explicit = {n[len("torch ("):-1]: r for n, r in results.items()
                if n.startswith("torch (") and not n.startswith("torch (auto")}
    if auto is None:
        return None
    choice = auto.get("precision_choice") or {}
    print(f"\nauto chose {auto['precision']}: {choice.get('reason', '')}")
    probe = choice.get("rates")
    if probe:
        g = probe["gemm_gflops"]
        print("  probe ({:.2f} s): GEMM ".format(probe["probe_seconds"])
              + ", ".join(f"{p} {g[p]:.0f} GFLOP/s ({probe['gemm_rows'][p]} x {probe['gemm_cols']})"
                          for p in g)
              + f"; f64 {probe['f64_gflops']:.0f} GFLOP/s; key {probe['key_ns']:.0f} ns, "
                f"extract {probe['extract_ns']:.0f} ns, keep {probe.get('keep_ns', 0):.0f} ns per keyed entry; "
                f"rounding the inputs {probe.get('convert_ns', {}).get('bf16', 0):.0f} ns per element (bf16)")
        print("  | precision | band share | predicted s (GEMM + keys + fixed) | measured s "
              "| measured GEMM + keys s |")
        print("  |---|---:|---:|---:|---:|")
        for p, pr in choice["predicted_seconds"].items():
            m = explicit.get(p)
            meas = f"{m['seconds']:.1f}" if m else ""
            parts = f"{m['parts'].get('seconds_gemm', 0):.1f} + {m['parts'].get('seconds_keys', 0):.1f}" if m else ""
            print(f"  | {p} | {choice['shares'][p]:.4f} | {pr['total']:.1f} ({pr['gemm']:.1f} + "
                  f"{pr['keys']:.1f} + {pr['fixed']:.1f}) | {meas} | {parts} |")
    out = {"chosen": auto["precision"], "choice": choice, "gemm_rates": rates}
    if explicit:
        fastest = min(explicit, key=lambda p: explicit[p]["seconds"])
        out.update(fastest=fastest, match=fastest == auto["precision"])
        print(f"fastest explicit precision this run: {fastest} "
              f"({explicit[fastest]['seconds']:.1f} s); auto's choice matches: {out['match']}")
    return out


if __name__ == "__main__":
    sys.exit(main())
