"""Offline-negative sampling, the one-pass quintuplet batch, and `itm-pipeline finetune`."""
import json
from pathlib import Path

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
from pipeline.losses.aoq import AOQSettings, quintuplet_loss
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
                                                 tokenizer=vocab, embed_size=16, word_dim=8),
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
    _equal_passes(lambda: create_model("vsrn", img_dim=split.feature_dim, tokenizer=vocab, **opts),
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
    assert (out / "refreshed" / "step-00000031" / "i2t_train.npy").is_file()  # 500 // 16 steps
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


# ------------------------------------------------------------------ refresh within an epoch
STEP_REFRESH = dict(model="vse_inf", loss="aoq", model_options={"embed_size": 16, "word_dim": 8},
                    offcandisize=15, refresh_every_steps=10, progress=False)


def _log_column(out, name):
    header, *rows = (out / "train_log.tsv").read_text().splitlines()
    i = header.split("\t").index(name)
    return [r.split("\t")[i] for r in rows]


def _timings(out):
    """Per-epoch wall times: timings.json, not the DVC-tracked train_log.tsv."""
    assert "seconds" not in (out / "train_log.tsv").read_text().splitlines()[0].split("\t")
    return json.loads((out / "timings.json").read_text())["epochs"]


def _state(out):
    from safetensors.torch import load_file

    return load_file(str(out / "state" / "state.safetensors"))


def _assert_same_state(a, b):
    wa, wb = _state(a), _state(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_step_refresh_logs_folders_and_worker_loaders(tiny_data, cands_dir, tmp_path):
    from stages import finetune

    assert main(_args(tiny_data, tmp_path / "a", "--candidates", str(cands_dir),
                      "--offcandisize", "15", "--refresh-every-steps", "10")) == 0
    # 31 steps: refreshes after steps 10, 20 and 30; the oldest folder is pruned
    assert _log_column(tmp_path / "a", "refreshed") == ["3"]
    assert float(_timings(tmp_path / "a")[0]["refresh_seconds"]) > 0
    assert sorted(p.name for p in (tmp_path / "a" / "refreshed").iterdir()) == [
        "step-00000020", "step-00000030"]
    # a worker process holds a copy of the dataset: only a rebuilt loader sees the refresh
    finetune.run(out_dir=tmp_path / "w", data_dir=tiny_data, candidates_dir=cands_dir,
                 train_options={"epochs": 1, "batch_size": 16, "num_workers": 1}, **STEP_REFRESH)
    _assert_same_state(tmp_path / "a", tmp_path / "w")


def test_step_refresh_skips_the_last_step_and_logs_zero(tiny_data, cands_dir, tmp_path):
    from stages import finetune

    finetune.run(out_dir=tmp_path / "r", data_dir=tiny_data, candidates_dir=cands_dir,
                 train_options={"epochs": 2, "batch_size": 16},
                 **{**STEP_REFRESH, "refresh_every_steps": 31})  # the end of each epoch
    assert _log_column(tmp_path / "r", "refreshed") == ["1", "0"]
    assert _timings(tmp_path / "r")[1]["refresh_seconds"] == 0
    assert [p.name for p in (tmp_path / "r" / "refreshed").iterdir()] == ["step-00000031"]


def test_step_refresh_mines_the_model_of_that_step(tiny_data, cands_dir, split_vocab, tmp_path):
    from pipeline.mining import mine_torch
    from pipeline.scoring import encode_gallery
    from pipeline.mining.candidates import load_candidates
    from stages import finetune

    out = tmp_path / "run"
    res = finetune.run(out_dir=out, data_dir=tiny_data, candidates_dir=cands_dir,
                       train_options={"epochs": 1, "batch_size": 16}, stop_after_steps=10,
                       **STEP_REFRESH)
    assert res == {"stopped_at_step": 10}
    state = json.loads((out / "state" / "trainer.json").read_text())
    assert state["global_step"] == 10  # saved right after the refresh
    split, vocab = split_vocab
    model = create_model("vse_inf", img_dim=split.feature_dim, tokenizer=vocab,
                         embed_size=16, word_dim=8)
    model.load_state_dict({k[6:]: v for k, v in _state(out).items() if k.startswith("model.")})
    img, cap = encode_gallery(model, split, batch_size=256).rows()
    knn = mine_torch(img, cap, 30, 8)
    got = load_candidates(out / "refreshed" / "step-00000010", "train", n_images=100)  # validates
    assert np.array_equal(got.i2t, knn.i2t) and np.array_equal(got.t2i, knn.t2i)
    before = load_candidates(cands_dir, n_images=100)
    assert not np.array_equal(got.i2t, before.i2t)
    assert got.meta["refreshed_after_step"] == 10


def test_step_refresh_resume_is_exact(tiny_data, cands_dir, tmp_path):
    """Stops right after a refresh, and between two (the state of step 42, the candidates
    of step 40), with a stale folder past the state; every resume ends like the full run."""
    import shutil

    from stages import finetune

    common = dict(STEP_REFRESH, data_dir=tiny_data, candidates_dir=cands_dir,
                  train_options={"epochs": 2, "batch_size": 16, "save_every_steps": 7})
    full = tmp_path / "full"
    finetune.run(out_dir=full, **common)
    assert _log_column(full, "refreshed") == ["3", "3"]  # 10 20 30 | 40 50 60 of 62
    for stop in (10, 47):
        out = tmp_path / f"stop{stop}"
        finetune.run(out_dir=out, stop_after_steps=stop, **common)
        if stop == 47:
            assert json.loads((out / "state" / "trainer.json").read_text())["global_step"] == 42
            shutil.copytree(out / "refreshed" / "step-00000030", out / "refreshed" / "step-00000045")
        finetune.run(out_dir=out, resume=True, **common)
        _assert_same_state(full, out)
        assert _log_column(out, "refreshed") == ["3", "3"]
        assert _log_column(out, "train_loss") == _log_column(full, "train_loss")
        assert sorted(p.name for p in (out / "refreshed").iterdir()) == [
            "step-00000050", "step-00000060"]


def test_finetune_cli_refuses_both_refresh_options(tiny_data, cands_dir, tmp_path, capsys):
    rc = main(_args(tiny_data, tmp_path / "run", "--candidates", str(cands_dir),
                    "--refresh-every", "1", "--refresh-every-steps", "10"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--refresh-every-steps" in err
    rc = main(_args(tiny_data, tmp_path / "run", "--loss", "triplet", "--refresh-every-steps", "10"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "no candidates" in err
    assert not (tmp_path / "run").exists()


def test_ablation_refreshes_every_quarter_epoch(tiny_data, cands_dir, tmp_path, monkeypatch):
    """benchmarks/aoq_ablation.py's aoq+refresh, with training and scoring stubbed out."""
    import yaml

    from stages import evaluate, finetune

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import aoq_ablation

    calls = []
    monkeypatch.setattr(finetune, "run", lambda **kw: calls.append(kw))
    monkeypatch.setattr(evaluate, "run", lambda **kw: {"metrics": {"rsum": 1.0},
                                                       "groups": {"family": {"rsum": 1.0}}})
    monkeypatch.setattr(aoq_ablation, "step_times", lambda *a, **kw: {
        "triplet": 1.0, "aoq_batched": 1.0, "aoq_three_passes": 1.0})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"finetune": {
        "data": str(tiny_data), "candidates": str(cands_dir),
        "models": {"vse_inf": {"init": "base/checkpoint", "train": {"batch_size": 16}}}}}))
    args = ["--params", str(params), "--models", "vse_inf", "--seeds", "0", "--threads", "1",
            "--variants", "aoq", "aoq+refresh", "--out", str(tmp_path / "bench")]
    assert aoq_ablation.main(args) == 0
    assert [c["refresh_every_steps"] for c in calls] == [0, 8]  # ceil((500 // 16) / 4)
    assert aoq_ablation.main(args + ["--refresh-steps", "5"]) == 0  # not the cached run
    assert [c["refresh_every_steps"] for c in calls[2:]] == [5]


def test_ablation_per_model_init_candidates_and_widths(tiny_data, cands_dir, tmp_path,
                                                       monkeypatch):
    """--init MODEL=CHECKPOINT replaces the params' base, a model's own `candidates` folder
    replaces the section's, and --step-widths times new models at those embed widths."""
    import yaml

    from stages import evaluate, finetune

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import aoq_ablation

    calls, timed = [], []
    monkeypatch.setattr(finetune, "run", lambda **kw: calls.append(kw))
    monkeypatch.setattr(evaluate, "run", lambda **kw: {"metrics": {"rsum": 1.0},
                                                       "groups": {"family": {"rsum": 1.0}}})

    def step_times(model, base, data, candidates, **kw):
        timed.append((base, candidates, kw.get("model_options")))
        return {"triplet": 1.0, "aoq_batched": 0.9, "aoq_three_passes": 1.0}

    monkeypatch.setattr(aoq_ablation, "step_times", step_times)
    params = tmp_path / "params.yaml"
    own = tmp_path / "own-candidates"
    params.write_text(yaml.safe_dump({"finetune": {
        "data": str(tiny_data), "candidates": "elsewhere",
        "models": {"vse_inf": {"init": "base/checkpoint", "candidates": str(own),
                               "train": {"batch_size": 16}}}}}))
    monkeypatch.setattr(aoq_ablation, "width_options", lambda base, spec, w: {"embed_size": w})
    out = tmp_path / "bench"
    assert aoq_ablation.main(["--params", str(params), "--models", "vse_inf", "--seeds", "0",
                              "--threads", "1", "--variants", "aoq", "--step-widths", "16",
                              "--init", "vse_inf=longer/checkpoint", "--out", str(out)]) == 0
    assert [(c["init"], c["candidates_dir"]) for c in calls] == [("longer/checkpoint", str(own))]
    assert timed == [("longer/checkpoint", str(own), None), ("scratch", str(own), {"embed_size": 16})]
    saved = json.loads((out / "results.json").read_text())["models"]["vse_inf"]
    assert saved["base"] == "longer/checkpoint" and "16" in saved["step_seconds_by_width"]


def test_ablation_width_options_keep_the_checkpoint_architecture(tmp_path, monkeypatch):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.models import create_model

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import aoq_ablation

    net = create_model("vsrn", img_dim=8, tokenizer=Vocab(f"w{i}" for i in range(16)), embed_size=16, word_dim=6,
                       decoder_hidden=10, decoder_word_dim=4)
    save_checkpoint(tmp_path / "ckpt", net)
    opts = aoq_ablation.width_options(str(tmp_path / "ckpt"), {}, 32)
    assert opts["embed_size"] == 32 and opts["decoder_hidden"] == 10 and "img_dim" not in opts
    rebuilt = create_model("vsrn", img_dim=8, tokenizer=Vocab(f"w{i}" for i in range(16)), **opts)
    assert rebuilt.config == {**net.config, "embed_size": 32}
    assert aoq_ablation.width_options("scratch", {"model_options": {"word_dim": 6}}, 8) == {
        "word_dim": 6, "embed_size": 8}
