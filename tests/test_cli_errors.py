"""Bad input: one line on stderr naming the file, exit code 2, no partial artifact."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cli.main import main

CAPTIONS = ["a red car left of a small dog on a beach .", "a small dog to the right of a red car .",
            "on a beach a red car and a dog .", "a car is left of a dog .", "red car , small dog , beach ."]


@pytest.fixture
def good_data(tmp_path):
    d = tmp_path / "precomp"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("dev", 2)):
        np.save(d / f"{split}_ims.npy", rng.standard_normal((n, 36, 8)).astype(np.float32))
        (d / f"{split}_caps.txt").write_text("\n".join(CAPTIONS * n) + "\n")
    from pipeline.data.vocab import build_vocab
    build_vocab(CAPTIONS * 4, threshold=1).save(d / "vocab.json")
    return d


def _corrupt(d, kind):
    ims = d / "train_ims.npy"
    if kind == "missing":
        ims.unlink()
    elif kind == "four_captions":
        (d / "train_caps.txt").write_text("\n".join(CAPTIONS[:4] * 4) + "\n")
        return "train_caps.txt"
    elif kind == "nan":
        a = np.load(ims)
        a[2, 5, 3] = np.nan
        np.save(ims, a)
    elif kind == "inf":
        a = np.load(ims)
        a[1, 0, 0] = np.inf
        np.save(ims, a)
    elif kind == "wrong_shape":
        np.save(ims, np.zeros((4, 36 * 8), np.float32))
    elif kind == "corrupt":
        ims.write_bytes(b"\x93NUMPY garbage" + os.urandom(64))
    elif kind == "truncated":
        data = ims.read_bytes()
        ims.write_bytes(data[: len(data) // 2])
    elif kind == "empty_line":
        lines = CAPTIONS * 4
        lines[7] = ""
        (d / "train_caps.txt").write_text("\n".join(lines) + "\n")
        return "train_caps.txt"
    return "train_ims.npy"


BAD = ["missing", "four_captions", "nan", "inf", "wrong_shape", "corrupt", "truncated", "empty_line"]


@pytest.mark.parametrize("kind", BAD)
def test_validate_data_bad_input(good_data, kind, capsys):
    name = _corrupt(good_data, kind)
    rc = main(["validate-data", str(good_data), "--split", "train"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error:") and "\n" not in err and name in err, err


@pytest.mark.parametrize("kind", ["four_captions", "nan", "corrupt"])
def test_train_bad_input_leaves_no_artifact(good_data, tmp_path, kind, capsys):
    name = _corrupt(good_data, kind)
    out = tmp_path / "run"
    rc = main(["train", "--model", "vsepp", "--data", str(good_data), "--out", str(out),
               "--epochs", "1", "--batch-size", "4", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and name in err and "\n" not in err
    assert not (out / "checkpoint").exists()


def test_good_data_validates(good_data, capsys):
    assert main(["validate-data", str(good_data)]) == 0
    assert "train" in capsys.readouterr().out


def test_console_script_exit_code(good_data):
    """The installed `itm-pipeline` script itself: one line, exit 2, no traceback."""
    _corrupt(good_data, "nan")
    exe = shutil.which("itm-pipeline") or os.path.join(os.path.dirname(sys.executable), "itm-pipeline")
    proc = subprocess.run([exe, "validate-data", str(good_data)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train_ims.npy" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_model_and_bad_option(good_data, tmp_path, capsys):
    assert main(["train", "--model", "nope", "--data", str(good_data), "--out", str(tmp_path / "r")]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["train", "--model", "vsepp", "--data", str(good_data), "--out", str(tmp_path / "r"),
                 "--model-option", "embed_sise=3"]) == 2
    assert "embed_sise" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none"), "--data", str(good_data)]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("prepare-data", "train", "evaluate", "evaluate-sims", "validate-data"):
        assert cmd in out


@pytest.mark.parametrize("option", ["lr=nan", "lr=-1", "lr=0", "weight_decay=-0.1",
                                    "eval_batch_size=0", "num_workers=-1", "margin=inf",
                                    "no_such=1", "max_violation=maybe"])
def test_bad_training_option_values_are_one_line(tiny_data, tmp_path, capsys, option):
    from cli.main import main

    rc = main(["train", "--quiet", "--model", "vsepp", "--data", str(tiny_data),
               "--out", str(tmp_path / "run"), "--train-option", option])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and err.startswith("error: "), err
    assert option.split("=")[0] in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["mps", "meta", "cpu:1", "xpu", "cuda:x"])
def test_unsupported_devices_are_one_line(tiny_data, tmp_path, capsys, device):
    from cli.main import main

    rc = main(["train", "--quiet", "--model", "vsepp", "--data", str(tiny_data),
               "--out", str(tmp_path / "run"), "--device", device])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and device in err and "cpu, cuda" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,env", [(["--threads", "0", "models"], {}),
                                      (["models"], {"ITM_THREADS": "abc"}),
                                      (["train", "--no-such-flag"], {})])
def test_usage_errors_are_one_line(capsys, monkeypatch, argv, env):
    from cli.main import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: itm-pipeline") and "--help" in err, err


@pytest.mark.parametrize("key,value,expect", [
    ("embed_size", "abc", "must be an integer"), ("embed_size", -1, "must be >= 1"),
    ("embed_size", 0, "must be >= 1"), ("embed_size", 10**6, "parameters"),
    ("embed_size", 10**9, "parameters"),
    ("img_dim", "16", "must be an integer"), ("no_imgnorm", "maybe", "true or false"),
    ("name", ["vsepp"], "unknown model"), ("word_dim", 1.5, "must be an integer"),
    ("embed_size", 24, "has shape"),           # weights no longer match the config
])
def test_bad_checkpoint_config_is_one_line(ckpt, tiny_data, tmp_path, capsys, key, value, expect):
    """A checkpoint's config.json is validated by the model's schema before anything is
    built: a wrong type or range, a size that cannot fit in memory, weights of other
    shapes are one line naming the checkpoint (not configs/models/*.yaml), exit 2."""
    import json

    from cli.main import main

    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"][key] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    rc = main(["evaluate", "--checkpoint", str(bad), "--data", str(tiny_data), "--quiet",
               "--json", str(tmp_path / "m.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and expect in err and str(bad) in err, err
    assert "configs/models" not in err and not (tmp_path / "m.json").exists()


def test_diverging_training_is_one_line_and_keeps_the_state(tiny_data, tmp_path, capsys):
    """Features with huge finite values make the loss non-finite: one line naming the
    epoch and step, exit 2; the last saved state stays for --resume."""
    import json

    from cli.main import main
    from stages import train_base

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    out = tmp_path / "run"
    opts = {"embed_size": 16, "word_dim": 8}
    train = {"epochs": 1, "batch_size": 16, "save_every_steps": 5}
    assert train_base.run(model="vsepp", data_dir=data, out_dir=out, model_options=opts,
                          train_options=train, progress=False, stop_after_steps=10)
    state = (out / "state" / "state.safetensors").read_bytes()
    feats = np.load(data / "train_ims.npy")
    # finite, but the image FC overflows to inf (and the L2 norm to NaN)
    huge = (feats.astype(np.float64) * (3e38 / np.abs(feats).max())).astype(np.float32)
    assert np.isfinite(huge).all()
    np.save(data / "train_ims.npy", huge)
    rc = main(["train", "--quiet", "--model", "vsepp", "--data", str(data), "--out", str(out),
               "--epochs", "1", "--batch-size", "16", "--model-option", "embed_size=16",
               "--model-option", "word_dim=8", "--train-option", "save_every_steps=5", "--resume"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0, err
    assert "training diverged: non-finite loss at epoch 1, step 11" in err and str(out) in err, err
    assert (out / "state" / "state.safetensors").read_bytes() == state
    assert json.loads((out / "state" / "trainer.json").read_text())["global_step"] == 10
