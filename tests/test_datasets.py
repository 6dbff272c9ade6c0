"""Datasets and collate functions over tiny precomp folders."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.data.datasets import (CaptionDataset, ImageDataset, PairDataset, collate_captions,
                                    collate_images, collate_pairs)
from pipeline.data.precomp import open_split
from pipeline.data.vocab import Vocab, augment_tokens, build_vocab
from pipeline.errors import InputError

N_IMG, R, F = 6, 36, 8
WORDS = ["dog", "cat", "red", "blue", "man", "table", "grass", "ball", "small", "big"]


def _captions(n_img):
    rng = np.random.default_rng(1)
    # lengths vary (2..9 words) so sorting and padding are exercised
    return [" ".join(rng.choice(WORDS, size=2 + (j * 7) % 8)) for j in range(5 * n_img)]


@pytest.fixture
def data(tmp_path):
    feats = np.random.default_rng(0).standard_normal((N_IMG, R, F)).astype(np.float32)
    np.save(tmp_path / "train_ims.npy", feats)
    caps = _captions(N_IMG)
    (tmp_path / "train_caps.txt").write_text("\n".join(caps) + "\n")
    sp = open_split(tmp_path, "train")
    vocab = build_vocab(caps, threshold=1)
    return sp, vocab, feats, caps


def _same(a, b):
    return a["image"].shape == b["image"].shape and torch.equal(a["image"], b["image"]) \
        and torch.equal(a["tokens"], b["tokens"])


def test_item_fields_and_raw_features(data):
    sp, vocab, feats, caps = data
    ds = PairDataset(sp, vocab)
    assert len(ds) == 30
    it = ds[13]
    assert it["index"] == 13 and it["img_index"] == 2
    assert it["image"].dtype == torch.float32 and tuple(it["image"].shape) == (R, F)
    np.testing.assert_array_equal(it["image"].numpy(), feats[2])
    assert it["tokens"].tolist() == vocab.encode(caps[13])
    assert it["tokens"][0] == 1 and it["tokens"][-1] == 2
    with pytest.raises(IndexError):
        ds[30]


def test_no_augmentation_when_not_training(data):
    sp, vocab, feats, caps = data
    ds = PairDataset(sp, vocab, train=False, region_drop=0.5, token_aug=0.5, seed=3)
    for j in range(0, 30, 4):
        it = ds[j]
        np.testing.assert_array_equal(it["image"].numpy(), feats[j // 5])
        assert it["tokens"].tolist() == vocab.encode(caps[j])


def test_deterministic_per_seed_epoch_item(data):
    sp, vocab, _, _ = data
    kw = dict(train=True, region_drop=0.3, token_aug=0.4, seed=7)
    a, b = PairDataset(sp, vocab, **kw), PairDataset(sp, vocab, **kw)
    a.set_epoch(2)
    b.set_epoch(2)
    order = list(range(30))
    items_b = {j: b[j] for j in reversed(order)}   # access order does not matter
    for j in order:
        assert _same(a[j], items_b[j])
        assert _same(a[j], a[j])                    # nor repeated access
    # another epoch or another seed gives other draws
    c = PairDataset(sp, vocab, **kw)
    c.set_epoch(3)
    assert not all(_same(a[j], c[j]) for j in order)
    d = PairDataset(sp, vocab, **{**kw, "seed": 8})
    d.set_epoch(2)
    assert not all(_same(a[j], d[j]) for j in order)


def test_worker_count_does_not_change_batches(data):
    sp, vocab, _, _ = data
    ds = PairDataset(sp, vocab, train=True, region_drop=0.2, token_aug=0.2, seed=1)
    ds.set_epoch(1)
    kw = dict(batch_size=8, shuffle=False, collate_fn=collate_pairs)
    b0 = list(DataLoader(ds, num_workers=0, **kw))
    b2 = list(DataLoader(ds, num_workers=2, **kw))
    for x, y in zip(b0, b2):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_region_drop_keeps_at_least_one(data):
    sp, vocab, feats, _ = data
    ds = PairDataset(sp, vocab, train=True, region_drop=0.999, seed=0)
    counts = [ds[j]["image"].shape[0] for j in range(30)]
    assert min(counts) >= 1 and max(counts) < R
    ds = PairDataset(sp, vocab, train=True, region_drop=0.2, seed=0)
    it = ds[7]
    kept = it["image"].numpy()
    assert 0 < kept.shape[0] < R
    # kept rows are original regions, in their original order
    rows = [int(np.flatnonzero((feats[1] == r).all(1))[0]) for r in kept]
    assert rows == sorted(rows)
    assert abs(np.mean([ds[j]["image"].shape[0] for j in range(30)]) / R - 0.8) < 0.08


def test_token_aug_proportions():
    rng = np.random.default_rng(0)
    words = list(range(10, 20)) * 2000
    toks = [1, *words, 2]
    out = augment_tokens(toks, rng, 1.0, vocab_size=50, unk=3)
    assert out[0] == 1 and out[-1] == 2
    body = np.array(out[1:-1])
    n = len(words)
    unk = (body == 3).sum() / n
    rand = ((body != 3)).sum() / n                  # every word was hit: survivors are random ids
    deleted = 1 - len(body) / n
    assert abs(unk - 0.5) < 0.02 and abs(rand - 0.1) < 0.015 and abs(deleted - 0.4) < 0.02
    assert body[body != 3].min() >= 4 and body.max() < 50
    assert augment_tokens(toks, rng, 0.0, 50) == toks
    assert augment_tokens([1, 2], rng, 1.0, 50) == [1, 2]


def test_precaps_tokens(tmp_path):
    np.save(tmp_path / "train_ims.npy", np.zeros((1, 4, 3), np.float32))
    (tmp_path / "train_precaps.txt").write_text("5,6,7\n1,5,2\n4\n8,9\n6,\n")
    sp = open_split(tmp_path, "train")
    vocab = Vocab(["a", "b", "c", "d", "e", "f"])     # ids 4..9
    ds = CaptionDataset(sp, vocab)
    toks = [ds[j]["tokens"].tolist() for j in range(5)]
    assert toks == [[1, 5, 6, 7, 2], [1, 5, 2], [1, 4, 2], [1, 8, 9, 2], [1, 6, 2]]
    with pytest.raises(InputError, match="train_precaps.txt: line 1 has word id 7, but the vocab has 7 words"):
        PairDataset(sp, Vocab(["a", "b", "c"]))


def test_collate_pairs_sorts_and_pads(data):
    sp, vocab, _, caps = data
    ds = PairDataset(sp, vocab, train=True, region_drop=0.5, seed=0)
    items = [ds[j] for j in (0, 1, 2, 3, 9, 20)]
    batch = collate_pairs(items)
    lengths = batch["lengths"].tolist()
    assert lengths == sorted(lengths, reverse=True)
    assert batch["tokens"].shape == (6, max(lengths)) and batch["tokens"].dtype == torch.long
    assert batch["images"].dtype == torch.float32 and batch["images"].shape[1] == max(batch["img_lengths"])
    by_index = {it["index"]: it for it in items}
    for b, j in enumerate(batch["index"].tolist()):
        it = by_index[j]
        n, r = len(it["tokens"]), it["image"].shape[0]
        assert lengths[b] == n and batch["img_lengths"][b] == r
        assert torch.equal(batch["tokens"][b, :n], it["tokens"])
        assert (batch["tokens"][b, n:] == 0).all()
        assert torch.equal(batch["images"][b, :r], it["image"])
        assert (batch["images"][b, r:] == 0).all()
        assert batch["img_index"][b] == j // 5
    for k in ("img_lengths", "lengths", "index", "img_index"):
        assert batch[k].dtype == torch.long


def test_image_and_caption_datasets(data):
    sp, vocab, feats, caps = data
    ids = ImageDataset(sp)
    assert len(ids) == N_IMG
    batch = collate_images([ids[i] for i in (4, 1)])
    assert batch["img_index"].tolist() == [4, 1] and batch["img_lengths"].tolist() == [R, R]
    np.testing.assert_array_equal(batch["images"].numpy(), feats[[4, 1]])
    cds = CaptionDataset(sp, vocab)
    assert len(cds) == 30
    batch = collate_captions([cds[j] for j in range(8)])
    lengths = batch["lengths"].tolist()
    assert lengths == sorted(lengths, reverse=True)
    for b, j in enumerate(batch["index"].tolist()):
        enc = vocab.encode(caps[j])
        assert lengths[b] == len(enc)
        assert batch["tokens"][b, : len(enc)].tolist() == enc
        assert (batch["tokens"][b, len(enc):] == 0).all()


def test_repeated_rows_dataset(tmp_path):
    feats = np.random.default_rng(2).standard_normal((3, 5, 4)).astype(np.float32)
    np.save(tmp_path / "test_ims.npy", np.repeat(feats, 5, axis=0))
    (tmp_path / "test_caps.txt").write_text("\n".join(f"a dog {j}" for j in range(15)) + "\n")
    sp = open_split(tmp_path, "test")
    ds = PairDataset(sp, build_vocab(["a dog"], 1))
    it = ds[11]
    assert it["img_index"] == 2
    np.testing.assert_array_equal(it["image"].numpy(), feats[2])
    assert len(ImageDataset(sp)) == 3


def test_bad_augmentation_params(data):
    sp, vocab, _, _ = data
    with pytest.raises(InputError, match="region_drop"):
        PairDataset(sp, vocab, region_drop=1.0)
    with pytest.raises(InputError, match="token_aug"):
        PairDataset(sp, vocab, token_aug=-0.1)
