"""The shared training loop: exact resume, checkpoints, warm-up, selection."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoint import load_checkpoint
from pipeline.errors import InputError
from pipeline.training import TrainSettings, epoch_batches, epoch_lr
from stages import train_base

MODEL_OPTS = {"embed_size": 16, "word_dim": 8}


def _train_opts(**kw):
    return {"epochs": 3, "batch_size": 16, "lr_update": 2, "seed": 3, **kw}


def _weights(run_dir):
    return load_file(str(run_dir / "state" / "state.safetensors"))


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ca = load_file(str(a / "checkpoint" / "model.safetensors"))
    cb = load_file(str(b / "checkpoint" / "model.safetensors"))
    for k in ca:
        assert torch.equal(ca[k], cb[k]), k


def _log_without_time(run_dir):
    # the wall times are in timings.json, not in the log
    return (run_dir / "train_log.tsv").read_text()


def test_resume_after_crash_is_exact(tiny_data, tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    train_base.run(model="vse_inf", data_dir=tiny_data, out_dir=full, model_options=MODEL_OPTS,
                   train_options=_train_opts(save_every_steps=4), progress=False)
    # 500 captions / 16 = 31 steps per epoch: stop in the middle of epoch 2, past a save at 40
    res = train_base.run(model="vse_inf", data_dir=tiny_data, out_dir=crashed,
                         model_options=MODEL_OPTS, train_options=_train_opts(save_every_steps=4),
                         progress=False, stop_after_steps=42)
    assert res == {"stopped_at_step": 42}
    state = json.loads((crashed / "state" / "trainer.json").read_text())
    assert (state["epoch"], state["step_in_epoch"]) == (1, 9)  # global step 40
    train_base.run(model="vse_inf", data_dir=tiny_data, out_dir=crashed, model_options=MODEL_OPTS,
                   train_options=_train_opts(save_every_steps=4), progress=False, resume=True)
    _assert_same_weights(full, crashed)
    assert _log_without_time(full) == _log_without_time(crashed)


def test_resume_after_sigkill_is_exact(tiny_data, tmp_path):
    """A real SIGKILL of the CLI process mid-epoch, then `train --resume`."""
    base = [sys.executable, "-m", "cli.main", "train", "--model", "vse_inf", "--data", str(tiny_data),
            "--epochs", "2", "--batch-size", "16", "--seed", "5", "--quiet",
            "--model-option", "embed_size=16", "--model-option", "word_dim=8",
            "--train-option", "save_every_steps=5", "--train-option", "lr_update=1"]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(base + ["--out", str(ref)], check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.run(base + ["--out", str(killed), "--crash-after-steps", "38"], env=env,
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((killed / "train_metrics.json").read_text())["epochs"] == 1
    proc = subprocess.run(base + ["--out", str(killed), "--resume"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "resuming at epoch 2, step 4" in proc.stdout + proc.stderr  # 35 = 31 + 4
    _assert_same_weights(ref, killed)


def test_identical_runs_write_identical_tracked_files(tiny_data, tmp_path):
    """The files dvc.yaml tracks (checkpoint, train_log.tsv, train_metrics.json) are the same
    bytes for the same inputs and seed; the wall times go to the untracked timings.json."""
    tracked = ("checkpoint/model.safetensors", "checkpoint/config.json", "checkpoint/vocab.json",
               "train_log.tsv", "train_metrics.json")
    runs = []
    for name in ("a", "b"):
        train_base.run(model="vse_inf", data_dir=tiny_data, out_dir=tmp_path / name,
                       model_options=MODEL_OPTS, train_options=_train_opts(epochs=2),
                       progress=False)
        runs.append({f: (tmp_path / name / f).read_bytes() for f in tracked})
    assert runs[0] == runs[1]
    timings = json.loads((tmp_path / "b" / "timings.json").read_text())
    assert [e["epoch"] for e in timings["epochs"]] == [1, 2] and timings["train_seconds"] >= 0
    assert "seconds" not in runs[0]["train_log.tsv"].decode()
    assert "train_seconds" not in json.loads(runs[0]["train_metrics.json"])


def test_checkpoint_round_trip_and_selection(tiny_data, tmp_path):
    out = tmp_path / "run"
    res = train_base.run(model="vsepp", data_dir=tiny_data, out_dir=out, model_options=MODEL_OPTS,
                         train_options={"epochs": 2, "batch_size": 16, "seed": 0}, progress=False)
    log = (out / "train_log.tsv").read_text().splitlines()
    assert log[0].split("\t")[0] == "epoch" and len(log) == 3
    rsums = [float(r.split("\t")[10]) for r in log[1:]]
    assert res["best_dev_rsum"] == pytest.approx(max(rsums), abs=1e-3)
    model, cfg = load_checkpoint(out / "checkpoint")
    assert cfg["model"]["name"] == "vsepp" and cfg["meta"]["epoch"] == res["best_epoch"]
    assert len(model.tokenizer) == cfg["model"]["vocab_size"]
    summary = json.loads((out / "train_metrics.json").read_text())
    assert summary["best_epoch"] == res["best_epoch"]


def test_lr_schedule_and_batches_are_pure():
    s = TrainSettings(lr=1.0, lr_update=2, lr_decay=0.1)
    assert [epoch_lr(s, e) for e in range(5)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    a, b = epoch_batches(100, 16, 0, 1), epoch_batches(100, 16, 0, 1)
    assert a == b and a != epoch_batches(100, 16, 0, 2)
    assert len(a) == 6 and all(len(x) == 16 for x in a)  # the incomplete batch is dropped
    assert len({i for x in a for i in x}) == 96


def test_bad_settings_are_refused():
    with pytest.raises(InputError, match="unknown training option"):
        TrainSettings.from_dict({"epochz": 3})
    with pytest.raises(InputError, match="epochs='many': must be an integer"):
        TrainSettings.from_dict({"epochs": "many"})
    with pytest.raises(InputError, match="epochs=1.5: must be an integer"):
        TrainSettings.from_dict({"epochs": 1.5})       # never truncated to 1
    assert TrainSettings.from_dict({"lr": 1}).lr == 1.0 and isinstance(TrainSettings.from_dict({"lr": 1}).lr, float)
    with pytest.raises(InputError, match="optimizer"):
        TrainSettings.from_dict({"optimizer": "sgd"})


def test_resume_with_other_settings_is_refused(tiny_data, tmp_path):
    out = tmp_path / "run"
    train_base.run(model="vse_inf", data_dir=tiny_data, out_dir=out, model_options=MODEL_OPTS,
                   train_options=_train_opts(epochs=1), progress=False)
    with pytest.raises(InputError, match="different training settings"):
        train_base.run(model="vse_inf", data_dir=tiny_data, out_dir=out, model_options=MODEL_OPTS,
                       train_options=_train_opts(epochs=1, lr=0.1), progress=False, resume=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_epoch(tiny_data, tmp_path):
    res = train_base.run(model="vse_inf", data_dir=tiny_data, out_dir=tmp_path / "gpu",
                         model_options=MODEL_OPTS, train_options=_train_opts(epochs=1),
                         device="cuda", progress=False)
    assert res["best_epoch"] == 1


def test_dev_images_validates_on_the_first_images(tiny_data, tmp_path, monkeypatch):
    """dev_images=N: the epoch's dev metrics are those of the first N dev images (and their
    5 N captions), scored as a split of their own."""
    import pipeline.training as training
    from pipeline.data.precomp import open_split
    from pipeline.scoring import encode_gallery

    seen = []
    real = training.encode_gallery

    def spy(model, split, **kw):
        seen.append((split.n_images, split.n_captions))
        return real(model, split, **kw)

    monkeypatch.setattr(training, "encode_gallery", spy)
    res = train_base.run(model="vsepp", data_dir=tiny_data, out_dir=tmp_path / "run",
                         model_options={"embed_size": 16, "word_dim": 8},
                         train_options={"epochs": 1, "batch_size": 16, "dev_images": 10},
                         progress=False)
    assert seen == [(10, 50)]
    dev = open_split(tiny_data, "dev")
    head = dev.head(10)
    assert head.captions == dev.captions[:50] and head.n_regions == dev.n_regions
    assert (head.image_rows([9]) == dev.image_rows([9])).all()
    model, _ = load_checkpoint(res["checkpoint"])
    rsum = encode_gallery(model, head).evaluate("full")["rsum"]
    assert res["best_dev_rsum"] == pytest.approx(rsum, abs=1e-6)
    assert dev.head(dev.n_images) is dev
    with pytest.raises(ValueError):
        dev.head(0)


def test_max_steps_ends_the_run_mid_epoch_and_resumes_exactly(tiny_data, tmp_path):
    """max_steps: 40 steps of 31-step epochs = epoch 1 and 9 steps of epoch 2, which ends
    there (dev evaluation, checkpoint); a crash inside the budget resumes to the same run;
    a budget past the last epoch changes nothing."""
    opts = _train_opts(save_every_steps=4, max_steps=40)
    a, b = tmp_path / "a", tmp_path / "b"
    train_base.run(model="vse_inf", data_dir=tiny_data, out_dir=a, model_options=MODEL_OPTS,
                   train_options=opts, progress=False)
    state = json.loads((a / "state" / "trainer.json").read_text())
    assert state["global_step"] == 40 and state["epoch"] == 2
    assert len((a / "train_log.tsv").read_text().splitlines()) == 1 + 2
    res = train_base.run(model="vse_inf", data_dir=tiny_data, out_dir=b, model_options=MODEL_OPTS,
                         train_options=opts, progress=False, stop_after_steps=38)
    assert res == {"stopped_at_step": 38}
    train_base.run(model="vse_inf", data_dir=tiny_data, out_dir=b, model_options=MODEL_OPTS,
                   train_options=opts, progress=False, resume=True)
    _assert_same_weights(a, b)
    assert _log_without_time(a) == _log_without_time(b)
    c, d = tmp_path / "c", tmp_path / "d"
    for out, extra in ((c, {}), (d, {"max_steps": 10_000})):
        train_base.run(model="vse_inf", data_dir=tiny_data, out_dir=out, model_options=MODEL_OPTS,
                       train_options=_train_opts(epochs=2, **extra), progress=False)
    _assert_same_weights(c, d)
    with pytest.raises(InputError, match="max_steps"):
        TrainSettings.from_dict({"max_steps": -1})
