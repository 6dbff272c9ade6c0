"""Offline-negative sampling, the one-pass quintuplet batch, and `itm-pipeline finetune`."""
import numpy as np
import pytest
import torch

from cli.main import main
from pipeline.data.datasets import PairDataset
from pipeline.data.offline import (OfflineNegativeDataset, collate_offline, default_offcandisize,
                                   split_segments)
from pipeline.data.precomp import open_split
from pipeline.data.vocab import Vocab
from pipeline.errors import InputError
from pipeline.finetuning import quintuplet_loss
from pipeline.losses.aoq import AOQSettings
from pipeline.mining.candidates import Candidates, write_candidates
from pipeline.models import create_model


def random_candidates(n_img: int, k_i2t: int, k_t2i: int, seed: int = 0) -> Candidates:
    rng = np.random.default_rng(seed)
    i2t = np.empty((n_img, k_i2t), np.int32)
    for i in range(n_img):
        pool = np.setdiff1d(np.arange(5 * n_img), np.arange(5 * i, 5 * i + 5))
        i2t[i] = rng.permutation(pool)[:k_i2t]
    t2i = np.empty((5 * n_img, k_t2i), np.int32)
    for j in range(5 * n_img):
        pool = np.setdiff1d(np.arange(n_img), [j // 5])
        t2i[j] = rng.permutation(pool)[:k_t2i]
    return Candidates(i2t, t2i)


@pytest.fixture(scope="module")
def cands_dir(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cands")
    write_candidates(out, "synthetic", random_candidates(100, 30, 8))
    return out


@pytest.fixture(scope="module")
def split_vocab(tiny_data):
    return open_split(tiny_data, "train"), Vocab.load(tiny_data / "vocab.json")


def _dataset(split_vocab, cands, k=20, seed=0, **kw):
    split, vocab = split_vocab
    pairs = PairDataset(split, vocab, train=True, seed=seed, **kw)
    return OfflineNegativeDataset(pairs, cands.i2t, cands.t2i, k)


def test_draws_follow_the_reference_formula(split_vocab):
    c = random_candidates(100, 30, 8, seed=1)
    ds = _dataset(split_vocab, c, k=20)
    ranks = []
    for j in range(0, 500, 7):
        n, t_neg, i_neg, i_prime, t_prime = ds.draw(j)
        assert 0 <= n < 20
        assert t_neg == c.i2t[j // 5, n]
        assert i_neg == c.t2i[j, n // 5]
        assert i_prime == t_neg // 5 and t_prime // 5 == i_neg
        ranks.append(n)
    assert len(set(ranks)) > 10  # uniform over [0, 20), not a fixed rank


def test_draws_are_seeded_per_epoch_and_caption(split_vocab):
    c = random_candidates(100, 30, 8, seed=1)
    a, b = _dataset(split_vocab, c), _dataset(split_vocab, c)
    assert [a.draw(j) for j in range(50)] == [b.draw(j) for j in range(50)]
    b.set_epoch(1)
    assert [a.draw(j) for j in range(50)] != [b.draw(j) for j in range(50)]
    other_seed = _dataset(split_vocab, c, seed=3)
    assert [a.draw(j) for j in range(50)] != [other_seed.draw(j) for j in range(50)]


def test_offcandisize_and_rows_are_checked(split_vocab):
    c = random_candidates(100, 30, 8)
    with pytest.raises(InputError, match="exceeds the i2t"):
        _dataset(split_vocab, c, k=31)
    with pytest.raises(InputError, match="t2i candidates"):
        _dataset(split_vocab, random_candidates(100, 30, 3), k=20)  # needs ranks [0, 4)
    with pytest.raises(InputError, match="training split"):
        _dataset(split_vocab, random_candidates(50, 30, 8), k=20)
    assert default_offcandisize(566_435) == 300 and default_offcandisize(25_000) == 13
    assert default_offcandisize(500) == 10


def test_collate_stacks_three_aligned_segments(split_vocab):
    ds = _dataset(split_vocab, random_candidates(100, 30, 8, seed=2), region_drop=0.2, token_aug=0.2)
    items = [ds[j] for j in (3, 40, 41, 77, 120, 499)]
    batch = collate_offline(items)
    b = batch["n_anchor"]
    assert b == 6 and batch["images"].shape[0] == 18 and batch["tokens"].shape[0] == 18
    lengths = batch["lengths"][:b]
    assert (lengths[:-1] >= lengths[1:]).all()  # slots sorted by anchor length
    for slot in range(b):
        j = int(batch["index"][slot])
        _, t_neg, i_neg, i_prime, t_prime = ds.draw(j)
        assert int(batch["img_index"][slot]) == j // 5
        assert (int(batch["index"][b + slot]), int(batch["img_index"][b + slot])) == (t_neg, i_neg)
        assert (int(batch["index"][2 * b + slot]), int(batch["img_index"][2 * b + slot])) == (t_prime, i_prime)
        assert bool(batch["accidental"][slot]) == (i_neg == t_neg // 5)
    parts = split_segments(batch)
    assert [p["images"].shape[0] for p in parts] == [6, 6, 6]
    assert torch.equal(parts[1]["index"], batch["index"][6:12])


def _equal_passes(model, batch, aoq):
    """Loss, gradients and BN running statistics: one batched pass vs three passes."""
    results = []
    for passes in ("batched", "three"):
        torch.manual_seed(0)
        m = model()
        m.train()
        loss, _ = quintuplet_loss(m, batch, aoq, passes)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        buffers = {n: b.clone() for n, b in m.named_buffers() if "running" in n or "num_batches" in n}
        results.append((loss.detach(), grads, buffers))
    (l1, g1, b1), (l3, g3, b3) = results
    assert torch.allclose(l1, l3, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g3.keys() and len(g1) > 0
    for n in g1:
        assert torch.allclose(g1[n], g3[n], rtol=1e-5, atol=1e-5), n
    assert b1.keys() == b3.keys()
    for n in b1:
        assert torch.allclose(b1[n].double(), b3[n].double(), rtol=1e-5, atol=1e-6), n
    return b1


def _batch(split_vocab, tiny_cands, **kw):
    ds = _dataset(split_vocab, tiny_cands, **kw)
    return collate_offline([ds[j] for j in range(0, 500, 31)])


@pytest.mark.parametrize("variant", ["aoq", "offquin"])
def test_batched_pass_equals_three_passes_vse_inf(split_vocab, variant):
    split, vocab = split_vocab
    batch = _batch(split_vocab, random_candidates(100, 30, 8, seed=4), region_drop=0.2)
    buffers = _equal_passes(lambda: create_model("vse_inf", img_dim=split.feature_dim,
                                                 vocab_size=len(vocab), embed_size=16, word_dim=8),
                            batch, AOQSettings(loss=variant))
    assert any("running_mean" in n for n in buffers)
    assert all(int(v) == 3 for n, v in buffers.items() if "num_batches" in n)  # three updates


def test_batched_pass_equals_three_passes_vsrn(split_vocab):
    from pipeline.models import list_models

    if "vsrn" not in list_models():
        pytest.skip("vsrn not registered")
    split, vocab = split_vocab
    batch = _batch(split_vocab, random_candidates(100, 30, 8, seed=5))
    opts = dict(embed_size=16, word_dim=8)
    from pipeline.models import model_config

    known = model_config("vsrn")["model"]
    for key, val in (("decoder_hidden", 16), ("decoder_word_dim", 8), ("attention_size", 16)):
        if key in known:
            opts[key] = val
    _equal_passes(lambda: create_model("vsrn", img_dim=split.feature_dim, vocab_size=len(vocab), **opts),
                  batch, AOQSettings(loss="aoq"))


# ------------------------------------------------------------------ command line
def _args(tiny_data, out, *extra):
    return ["finetune", "--quiet", "--model", "vse_inf", "--data", str(tiny_data), "--out", str(out),
            "--epochs", "1", "--batch-size", "16", "--model-option", "embed_size=16",
            "--model-option", "word_dim=8", *extra]


def test_finetune_cli_refuses_foreign_candidates(tiny_data, tmp_path, capsys):
    foreign = tmp_path / "dev_cands"
    write_candidates(foreign, "synthetic", random_candidates(25, 30, 8))  # the dev split's size
    rc = main(_args(tiny_data, tmp_path / "run", "--candidates", str(foreign)))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(foreign) in err
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_finetune_cli_refuses_aoq_without_max_violation(tiny_data, cands_dir, tmp_path, capsys):
    rc = main(_args(tiny_data, tmp_path / "run", "--candidates", str(cands_dir),
                    "--train-option", "max_violation=false"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "max-violation" in err
    rc = main(_args(tiny_data, tmp_path / "run", "--loss", "offtri"))
    assert rc == 2 and "--candidates" in capsys.readouterr().err


def test_finetune_cli_runs_aoq_with_refresh_and_logs(tiny_data, cands_dir, tmp_path):
    out = tmp_path / "run"
    rc = main(_args(tiny_data, out, "--candidates", str(cands_dir), "--epochs", "2",
                    "--refresh-every", "1", "--offcandisize", "15"))
    assert rc == 0
    header, *rows = (out / "train_log.tsv").read_text().splitlines()
    cols = header.split("\t")
    assert {"train_weight_negative", "train_off_it_active", "refreshed"} <= set(cols)
    refreshed = [r.split("\t")[cols.index("refreshed")] for r in rows]
    assert refreshed == ["1", "0"]  # after epoch 1; none after the last epoch
    assert (out / "refreshed" / "i2t_train.npy").is_file()
    assert (out / "checkpoint" / "config.json").is_file()


def test_finetune_resume_is_exact(tiny_data, cands_dir, tmp_path):
    from safetensors.torch import load_file

    from stages import finetune

    common = dict(model="vse_inf", data_dir=tiny_data, loss="aoq", candidates_dir=cands_dir,
                  model_options={"embed_size": 16, "word_dim": 8},
                  train_options={"epochs": 2, "batch_size": 16}, offcandisize=15,
                  refresh_every=1, progress=False)
    finetune.run(out_dir=tmp_path / "a", **common)
    finetune.run(out_dir=tmp_path / "b", stop_after_steps=40, **common)  # mid epoch 2
    finetune.run(out_dir=tmp_path / "b", resume=True, **common)
    a = load_file(str(tmp_path / "a" / "state" / "state.safetensors"))
    b = load_file(str(tmp_path / "b" / "state" / "state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
