"""Checks every cross model's tests make: sub-shards score what the same rows and columns
of the full reference matrix hold (no dimension dropped), and two epochs through the
shared training loop give finite losses and a loadable cross checkpoint."""
from __future__ import annotations

import math

import torch

TOL = dict(rtol=1e-5, atol=1e-5)


def ragged_captions(g: torch.Generator, n: int, l: int, vocab: int):
    """(tokens (n, l), lengths): lengths in 1..l with the first l and the last 1, ids from
    4 (past the special tokens), zero padding as collate_pairs."""
    lengths = torch.randint(1, l + 1, (n,), generator=g)
    lengths[0], lengths[-1] = l, 1
    tokens = torch.zeros(n, l, dtype=torch.long)
    for k, m in enumerate(lengths.tolist()):
        tokens[k, :m] = torch.randint(4, vocab, (m,), generator=g)
    return tokens, lengths


def assert_sub_shards_match(model, img, txt, want: torch.Tensor, other_image: int) -> None:
    """raw_inputs puts the one-region image last and the one-word caption last;
    `other_image` is a second image scored alone against that caption (a model's own
    degenerate case, e.g. BFAN/SCAN's all-equal regions)."""
    r, w = slice(other_image, other_image + 1), slice(-1, None)
    for rows, cols in ((slice(3, 4), slice(None)), (slice(None), slice(2, 3)),
                       (slice(-1, None), w), (r, w), (slice(-1, None), slice(None)), (slice(None), w)):
        s = model.similarity(img[rows], txt[cols])
        assert s.shape == want[rows, cols].shape
        torch.testing.assert_close(s.double(), want[rows, cols], **TOL)


def train_two_epochs(name: str, data_dir, out_dir) -> list[float]:
    """Two epochs at the config's tiny widths (batch 16, lr 2e-3); the epochs' losses,
    after checking they are finite and the checkpoint reloads as a cross model."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.models import model_config
    from stages import train_base

    res = train_base.run(model=name, data_dir=data_dir, out_dir=out_dir,
                         model_options=model_config(name)["tiny"],
                         train_options={"epochs": 2, "batch_size": 16, "lr": 2e-3},
                         progress=False)
    header, *rows = (out_dir / "train_log.tsv").read_text().splitlines()
    losses = [float(dict(zip(header.split("\t"), r.split("\t")))["train_loss"]) for r in rows]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    model, _ = load_checkpoint(res["checkpoint"])
    assert model.kind == "cross" and model.name == name
    return losses
