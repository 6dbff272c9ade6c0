"""Independent full-sort reference for ranks and metrics, shared by the evaluation tests."""
from __future__ import annotations

import numpy as np


def ref_ranks(S):
    """Full stable argsort by descending score, per row (i2t) and per column (t2i)."""
    S = np.asarray(S)
    n, m = S.shape
    order = np.argsort(-S, axis=1, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.broadcast_to(np.arange(m), (n, m)), axis=1)
    own = 5 * np.arange(n)[:, None] + np.arange(5)[None, :]
    i2t = position[np.arange(n)[:, None], own].min(axis=1)
    order_t = np.argsort(-S.T, axis=1, kind="stable")  # (5n, n): images by descending score
    t2i = np.argmax(order_t == (np.arange(m) // 5)[:, None], axis=1)
    return i2t.astype(np.int64), t2i.astype(np.int64)


def ref_metrics(i2t, t2i):
    out = {}
    for name, r in (("i2t", np.asarray(i2t)), ("t2i", np.asarray(t2i))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * (np.count_nonzero(r < k) / r.size)
        s = np.sort(r)
        h = s.size // 2
        med = s[h] if s.size % 2 else (s[h - 1] + s[h]) / 2
        out[f"{name}_medr"] = float(np.floor(med) + 1)
        out[f"{name}_meanr"] = float(r.sum() / r.size + 1)
    out["rsum"] = (out["i2t_r1"] + out["i2t_r5"] + out["i2t_r10"]
                   + out["t2i_r1"] + out["t2i_r5"] + out["t2i_r10"])
    return out
