"""The hostile-input probe (issue 19): many bad inputs through the CLI, each classified.

Not a pytest module (it takes minutes): run it by hand after a change to the checks,

    python tests/hostile_probe.py [WORKDIR]

and read the table it prints. Every case expects one line on stderr starting "error:",
exit 2, no traceback (a few expect success: marked "ok"). The outcome classes are the
ones the issue counted: one-line-2, traceback, no-file-named, multi-line, accepted (exit
0 where an error was expected), wrong-code.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from cli.main import main  # noqa: E402

CASES: list[tuple] = []   # family, label, argv, expect, env, names (one must be in the error)


def case(family, label, argv, expect="error", env=None, names=None):
    CASES.append((family, label, [str(a) for a in argv], expect, env or {}, names))


def run_case(argv, env):
    out, err = io.StringIO(), io.StringIO()
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:          # escaped main(): the real CLI prints a traceback
                traceback.print_exc(file=err)
                rc = "traceback"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, err.getvalue().strip()


def classify(rc, err, expect, names):
    if rc == "traceback" or "Traceback" in err:
        return "traceback"
    if expect == "ok":
        return "ok" if rc == 0 else f"refused-good({rc})"
    if rc == 0:
        return "accepted"
    if rc != 2:
        return "wrong-code"
    if "\n" in err or not err.startswith("error:"):
        return "multi-line"
    if names and not any(n in err for n in names):
        return "no-file-named"
    return "one-line-2"


def fixtures(w: Path) -> dict:
    """Tiny data, a checkpoint, embeddings and candidates (built once per work folder)."""
    fx = {"data": w / "data", "ckpt": w / "base" / "checkpoint", "emb": w / "emb", "cand": w / "cand"}
    if not fx["data"].exists():
        assert main(["prepare-data", "--out", fx["data"], "--n-train", "50", "--n-dev", "25",
                     "--n-test", "25", "--feature-dim", "16", "--quiet"]) == 0
    if not fx["ckpt"].exists():
        assert main(["train", "--quiet", "--model", "vsepp", "--data", fx["data"], "--out", w / "base",
                     "--epochs", "1", "--batch-size", "16", "--model-option", "embed_size=16",
                     "--model-option", "word_dim=8"]) == 0
    if not fx["emb"].exists():
        assert main(["embed", "--quiet", "--checkpoint", fx["ckpt"], "--data", fx["data"],
                     "--out", fx["emb"]]) == 0
    fx["cross"] = w / "cross" / "checkpoint"
    if not fx["cross"].exists():
        assert main(["train", "--quiet", "--model", "bfan", "--data", fx["data"], "--out", w / "cross",
                     "--epochs", "1", "--batch-size", "16", "--model-option", "embed_size=16",
                     "--model-option", "word_dim=8"]) == 0
    fx["other_vocab"] = w / "other" / "checkpoint"
    if not fx["other_vocab"].exists():      # trained on a data set of another vocabulary
        assert main(["prepare-data", "--out", w / "other_data", "--n-train", "50", "--n-dev", "25",
                     "--n-test", "25", "--feature-dim", "16", "--seed", "7", "--quiet"]) == 0
        vocab_a = (fx["data"] / "vocab.json").read_text()
        if (w / "other_data" / "vocab.json").read_text() == vocab_a:
            (w / "other_data" / "vocab.json").write_text(vocab_a.replace('"a"', '"a_"', 1))
        assert main(["train", "--quiet", "--model", "vsepp", "--data", w / "other_data", "--out",
                     w / "other", "--epochs", "1", "--batch-size", "16", "--model-option",
                     "embed_size=16", "--model-option", "word_dim=8"]) == 0
    if not fx["cand"].exists():
        assert main(["mine-candidates", "--quiet", "--embeddings-dir", fx["emb"], "--out", fx["cand"],
                     "--k-i2t", "20", "--k-t2i", "5", "--name", "t"]) == 0
    return {k: str(v) for k, v in fx.items()}


def variant_maker(root: Path, src: Path, out: dict):
    """variant(name, edit): a fresh copy of src under root/name, edited, recorded in out."""
    def variant(name, edit):
        d = root / name
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(src, d)
        edit(d)
        out[name] = d
    return variant


def bad_checkpoints(w: Path, ckpt: str) -> dict[str, Path]:
    """Copies of the checkpoint with one thing wrong each."""
    out = {}
    src = Path(ckpt)
    cfg = json.loads((src / "config.json").read_text())

    variant = variant_maker(w / "badckpt", src, out)

    def set_cfg(path, value):
        def edit(d):
            c = json.loads(json.dumps(cfg))
            node = c
            keys = path.split(".")
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = value
            (d / "config.json").write_text(json.dumps(c))
        return edit

    model_key = "model" if "model" in cfg else None
    arch = cfg.get("config") or cfg.get("arch") or cfg.get("model_config") or {}
    arch_key = next((k for k in ("config", "arch", "model_config") if k in cfg), None)
    for opt in ("embed_size", "vocab_size", "img_dim"):
        if arch_key and opt in arch:
            for label, val in (("str", "abc"), ("neg", -1), ("zero", 0), ("huge", 10 ** 9), ("float", 1.5),
                               ("bool", True), ("null", None)):
                variant(f"{opt}_{label}", set_cfg(f"{arch_key}.{opt}", val))
    if model_key:
        for label, val in (("list", ["vsepp"]), ("unknown", "nope"), ("int", 5)):
            variant(f"model_{label}", set_cfg(model_key, val))
    variant("config_not_json", lambda d: (d / "config.json").write_text("{not json"))
    variant("config_list", lambda d: (d / "config.json").write_text("[1, 2]"))
    variant("config_missing", lambda d: (d / "config.json").unlink())
    weights = next(src.glob("*.safetensors"))
    variant("weights_missing", lambda d: (d / weights.name).unlink())
    variant("weights_truncated", lambda d: (d / weights.name).write_bytes(weights.read_bytes()[:100]))
    variant("weights_garbage", lambda d: (d / weights.name).write_bytes(os.urandom(4096)))
    if arch_key and "embed_size" in arch:
        variant("shape_mismatch", set_cfg(f"{arch_key}.embed_size", int(arch["embed_size"]) * 2))
    variant("vocab_missing", lambda d: [p.unlink() for p in d.glob("vocab*.json")])
    variant("vocab_garbage", lambda d: [p.write_text("{]") for p in d.glob("vocab*.json")])
    return out


def build_cases(w: Path, fx: dict):
    data, ckpt, emb, cand = fx["data"], fx["ckpt"], fx["emb"], fx["cand"]
    afile = w / "a_file.txt"
    afile.write_text("not a folder\n")
    adir = w / "a_dir"
    adir.mkdir(exist_ok=True)
    binp = w / "binary.yaml"
    binp.write_bytes(b"\xff\xfe\x00garbage\x80\x81")

    def params(name, doc):
        p = w / "params" / f"{name}.yaml"
        p.parent.mkdir(exist_ok=True)
        import yaml
        p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
        return p

    tr = ["train", "--quiet", "--model", "vsepp", "--data", data, "--epochs", "1", "--batch-size", "8",
          "--model-option", "embed_size=8", "--model-option", "word_dim=4"]
    ev = ["evaluate", "--quiet", "--checkpoint", ckpt, "--data", data, "--split", "dev"]
    em = ["embed", "--quiet", "--checkpoint", ckpt, "--data", data, "--split", "dev"]
    mi = ["mine-candidates", "--quiet", "--embeddings-dir", emb, "--name", "p"]
    ft = ["finetune", "--quiet", "--model", "vsepp", "--init", ckpt, "--data", data, "--epochs", "1",
          "--batch-size", "8"]

    # -- global
    for v in ("0", "-1", "abc", "1.5"):
        case("global", f"--threads {v}", ["--threads", v, "list-models"])
        case("global", f"ITM_THREADS={v}", ["list-models"], env={"ITM_THREADS": v})
    case("global", "unknown command", ["nope"])

    # -- training options (CLI)
    n = [0]

    def out():
        n[0] += 1
        return w / "runs" / f"r{n[0]}"

    for flag, vals in (("--lr", ["nan", "-1", "0", "inf", "abc"]), ("--epochs", ["0", "-1", "abc"]),
                       ("--batch-size", ["0", "-1", "abc"]), ("--seed", ["-1", "abc"])):
        for v in vals:
            case("train-options", f"train {flag} {v}", tr + ["--out", out(), flag, v])
    for opt in ("weight_decay=-0.1", "eval_batch_size=0", "num_workers=-1", "margin=nan", "margin=inf",
                "grad_clip=-1", "lr_decay=0", "lr_update=0", "warmup_epochs=-1", "max_violation=maybe",
                "region_drop=1.5", "region_drop=-0.1", "token_aug=2", "optimizer=sgdx", "no_such=1",
                "batch_size=abc", "epochs=[1]", "save_every_steps=-1", "lr={a: 1}"):
        case("train-options", f"train --train-option {opt}", tr + ["--out", out(), "--train-option", opt])
    for opt in ("embed_size=abc", "embed_size=-1", "embed_size=0", "embed_size=1000000000",
                "embed_size=1.5", "word_dim=true", "no_imgnorm=maybe", "no_such=1", "=3", "embed_size",
                "num_layers=0"):
        case("model-options", f"train --model-option {opt}", tr + ["--out", out(), "--model-option", opt])
    # null: the option's default (as if not given)
    case("model-options", "train --model-option embed_size=null", tr + ["--out", out(), "--model-option",
                                                                       "embed_size=null"], expect="ok")
    case("train-options", "train --model nope", tr[:3] + ["nope"] + tr[4:] + ["--out", out()])
    case("train-options", "train --data missing", ["train", "--quiet", "--model", "vsepp", "--data",
                                                   w / "nodata", "--out", out()])
    case("train-options", "train --init garbage", tr + ["--out", out(), "--init", afile])

    # -- devices
    for dev in ("mps", "meta", "cuda:abc", "cuda:-1", "gpu", "cpu:0x", "xla", "cuda"):
        case("devices", f"train --device {dev}", tr + ["--out", out(), "--device", dev])
        case("devices", f"evaluate --device {dev}", ev + ["--device", dev])
        case("devices", f"embed --device {dev}", em + ["--out", out(), "--device", dev])
        case("devices", f"mine --device {dev}", mi + ["--out", out(), "--device", dev])
        case("devices", f"finetune --device {dev}", ft + ["--loss", "triplet", "--out", out(), "--device", dev])

    # -- output paths
    case("paths", "train --out file", tr + ["--out", afile], names=["a_file"])
    case("paths", "evaluate --json dir", ev + ["--json", adir], names=["a_dir"])
    case("paths", "evaluate --groups-json dir", ev + ["--groups-json", adir], names=["a_dir"])
    case("paths", "embed --out file", em + ["--out", afile], names=["a_file"])
    case("paths", "mine --out file", mi + ["--out", afile], names=["a_file"])
    case("paths", "mine --summary-json dir", mi + ["--out", out(), "--summary-json", adir], names=["a_dir"])
    case("paths", "finetune --out file", ft + ["--loss", "triplet", "--out", afile], names=["a_file"])
    case("paths", "prepare --out file", ["prepare-data", "--out", afile, "--n-train", "50"], names=["a_file"])
    case("paths", "evaluate --json onto data", ev + ["--json", Path(data) / "train_caps.txt"])
    case("paths", "embed --out = data", em + ["--out", data])
    case("paths", "mine --out = emb", mi + ["--out", emb])
    case("paths", "train --out = data", tr + ["--out", data])
    case("paths", "finetune --out = init", ft + ["--loss", "triplet", "--out", Path(ckpt).parent])

    # -- evaluate / embed / mine option values
    for v in ("0", "-1", "abc"):
        case("options", f"evaluate --batch-size {v}", ev + ["--batch-size", v])
        case("options", f"embed --batch-size {v}", em + ["--out", out(), "--batch-size", v])
        case("options", f"embed --block-rows {v}", em + ["--out", out(), "--block-rows", v])
        case("options", f"mine --k-i2t {v}", mi + ["--out", out(), "--k-i2t", v])
        case("options", f"mine --k-t2i {v}", mi + ["--out", out(), "--k-t2i", v])
        case("options", f"mine --row-block {v}", mi + ["--out", out(), "--row-block", v])
        case("options", f"mine --workers {v}", mi + ["--out", out(), "--workers", v])
    case("options", "evaluate --split nope", ev[:-1] + ["nope"])
    case("options", "evaluate --protocol x", ev + ["--protocol", "x"])
    case("options", "evaluate --protocol coco5k (too small)", ev + ["--protocol", "coco5k"])
    case("options", "evaluate --protocol f30k_1k (too small)", ev + ["--protocol", "f30k_1k"])
    case("options", "embed --split nope", em[:-1] + ["nope", "--out", out()])
    for flag, v in (("--relative-margin", "nan"), ("--relative-margin", "-1"), ("--relative-margin", "2"),
                    ("--absolute-margin", "nan"), ("--absolute-margin", "inf"), ("--range-min", "-1"),
                    ("--range-min", "100000"), ("--precision", "x"), ("--backend", "x"), ("--index", "x"),
                    ("--name", "../x"), ("--name", "a/b"), ("--name", ""), ("--name", "a b"),
                    ("--scheduler", "tcp://127.0.0.1:1"), ("--split", "nope")):
        case("options", f"mine {flag} {v}", mi + ["--out", out(), flag, v])
    case("options", "mine --index ivf --backend torch", mi + ["--out", out(), "--index", "ivf"])
    case("options", "mine no input", ["mine-candidates", "--quiet", "--out", out()])
    case("options", "mine both inputs", mi + ["--out", out(), "--img-embs", Path(emb) / "img_embs.npy"])
    case("options", "mine huge k (capped)", mi + ["--out", out(), "--k-i2t", "100000", "--k-t2i", "100000"],
         expect="ok")
    for flag, v in (("--offcandisize", "0"), ("--offcandisize", "-1"), ("--offcandisize", "abc"),
                    ("--refresh-every", "-1"), ("--refresh-every-steps", "-1"), ("--alpha", "nan"),
                    ("--alpha", "0"), ("--alpha", "-1"), ("--beta", "nan"), ("--beta", "inf"),
                    ("--offline-margin", "nan"), ("--offline-margin", "-1"), ("--passes", "x"), ("--lr", "nan")):
        case("options", f"finetune aoq {flag} {v}", ft + ["--loss", "aoq", "--candidates", cand,
                                                       "--out", out(), flag, v])
    case("options", "finetune both refresh", ft + ["--loss", "aoq", "--candidates", cand, "--out", out(),
                                                   "--refresh-every", "1", "--refresh-every-steps", "1"])
    case("options", "finetune aoq no candidates", ft + ["--loss", "aoq", "--out", out()])
    case("options", "finetune aoq candidates missing", ft + ["--loss", "aoq", "--candidates", w / "nocand",
                                                             "--out", out()])
    case("options", "finetune aoq candidates = file", ft + ["--loss", "aoq", "--candidates", afile,
                                                            "--out", out()])
    case("options", "finetune --init nope", ft[:5] + ["nope"] + ft[6:] + ["--loss", "triplet", "--out", out()])
    for v in ("0", "-5", "7", "abc"):
        case("options", f"prepare --n-train {v}", ["prepare-data", "--out", out(), "--n-train", v, "--quiet"])
        if v != "7":
            case("options", f"prepare --feature-dim {v}", ["prepare-data", "--out", out(), "--feature-dim", v,
                                                           "--n-train", "50", "--quiet"])
    case("options", "prepare --seed -1", ["prepare-data", "--out", out(), "--seed", "-1", "--n-train", "50",
                                          "--n-dev", "25", "--n-test", "25", "--quiet"])
    case("options", "prepare --feature-dim 7 (any width)", ["prepare-data", "--out", out(), "--feature-dim", "7",
                                                            "--n-train", "50", "--n-dev", "25", "--n-test", "25",
                                                            "--quiet"], expect="ok")
    case("options", "prepare precomp no source", ["prepare-data", "--dataset", "precomp", "--out", out()])
    case("options", "prepare precomp missing source", ["prepare-data", "--dataset", "precomp", "--source",
                                                       w / "nosrc", "--out", out()])

    # -- params files
    good_train = {"model": "vsepp", "data": data, "model_options": {"embed_size": 8, "word_dim": 4},
                  "train": {"epochs": 1, "batch_size": 8}}
    bad_train = {
        "model_options_str": {"model_options": "abc"}, "train_list": {"train": [1, 2]},
        "model_list": {"model": ["vsepp"]}, "model_int": {"model": 5},
        "no_imgnorm_maybe": {"model_options": {"embed_size": 8, "word_dim": 4, "no_imgnorm": "maybe"}},
        "lr_str": {"train": {"lr": "abc"}}, "lr_neg": {"train": {"lr": -1.0}},
        "epochs_float": {"train": {"epochs": 1.5}}, "unknown_key": {"modle": "vsepp"},
        "train_unknown": {"train": {"epochz": 1}}, "device_mps": {"device": "mps"},
        "device_int": {"device": 0}, "data_int": {"data": 5}, "init_list": {"init": [1]},
    }
    for label, over in bad_train.items():
        doc = {"train_base": {**good_train, **over}}
        case("params", f"train params {label}", ["train", "--quiet", "--out", out(), "--params",
                                                 params(f"train_{label}", doc)], names=["yaml"])
    case("params", "train params binary", ["train", "--out", out(), "--params", binp], names=["binary"])
    case("params", "train params yaml syntax", ["train", "--out", out(), "--params",
                                                params("syntax", "train_base: [a\n")], names=["syntax"])
    case("params", "train params not mapping", ["train", "--out", out(), "--params", params("list", "[1]\n")],
         names=["list"])
    case("params", "train params no section", ["train", "--out", out(), "--params",
                                               params("nosec", {"x": {}})], names=["nosec"])
    case("params", "train params missing file", ["train", "--out", out(), "--params", w / "none.yaml"],
         names=["none.yaml"])
    bad_eval = {"batch_size_0": {"batch_size": 0}, "batch_size_str": {"batch_size": "x"},
                "batch_size_neg": {"batch_size": -3}, "batch_size_list": {"batch_size": [1]},
                "split_int": {"split": 5}, "protocol_x": {"protocol": "x"}, "device_mps": {"device": "mps"},
                "unknown": {"splitt": "dev"}, "json_int": {"json": 5}}
    for label, over in bad_eval.items():
        doc = {"evaluate_base": {"checkpoint": ckpt, "data": data, "split": "dev", **over}}
        case("params", f"evaluate params {label}", ["evaluate", "--quiet", "--params",
                                                    params(f"eval_{label}", doc)], names=["yaml"])
    bad_embed = {"batch_size_0": {"batch_size": 0}, "batch_size_str": {"batch_size": "x"},
                 "split_int": {"split": 5}, "device_mps": {"device": "mps"}, "unknown": {"bsize": 1},
                 "block_rows_0": {"block_rows": 0}}
    for label, over in bad_embed.items():
        doc = {"embed": {"split": "dev", **over}}
        case("params", f"embed params {label}", em + ["--out", out(), "--params", params(f"embed_{label}", doc)],
             names=["yaml"])
    bad_mine = {"k_str": {"k_i2t": "abc"}, "k_0": {"k_i2t": 0}, "k_neg": {"k_t2i": -5}, "k_float": {"k_i2t": 1.5},
                "k_bool": {"k_i2t": True}, "precision_x": {"precision": "x"}, "backend_x": {"backend": "x"},
                "index_x": {"index": "x"}, "device_mps": {"device": "mps"}, "name_int": {"name": 5},
                "name_path": {"name": "../x"}, "unknown": {"kk": 1}, "k_null": {"k_i2t": None}}
    for label, over in bad_mine.items():
        doc = {"mine": {"k_i2t": 20, "k_t2i": 5, **over}}
        case("params", f"mine params {label}", mi + ["--out", out(), "--params", params(f"mine_{label}", doc)],
             names=["yaml"])
    ft_base = {"data": data, "candidates": cand, "models": {"vsepp": {"init": ckpt, "train": {"epochs": 1,
                                                                                             "batch_size": 8}}}}
    bad_ft = {"offcandisize_str": {"offcandisize": "abc"}, "offcandisize_0": {"offcandisize": 0},
              "passes_int": {"passes": 5}, "passes_x": {"passes": "x"}, "refresh_neg": {"refresh_every": -1},
              "refresh_str": {"refresh_every_steps": "x"}, "aoq_list": {"aoq": [1]},
              "aoq_alpha_str": {"aoq": {"alpha": "x"}}, "aoq_alpha_nan": {"aoq": {"alpha": float("nan")}},
              "aoq_unknown": {"aoq": {"alhpa": 1}}, "aoq_mask_maybe": {"aoq": {"mask_accidental_positives": "maybe"}},
              "models_list": {"models": [1]}, "model_train_list": {"models": {"vsepp": {"train": [1]}}},
              "unknown": {"offcandisise": 3}, "device_mps": {"device": "mps"}}
    for label, over in bad_ft.items():
        doc = {"finetune": {**ft_base, **over}}
        case("params", f"finetune params {label}", ["finetune", "--quiet", "--model", "vsepp", "--loss", "aoq",
                                                     "--out", out(), "--params", params(f"ft_{label}", doc)],
             names=["yaml"])
    bad_prep = {"n_train_str": {"n_train": "x"}, "n_train_0": {"n_train": 0}, "dataset_x": {"dataset": "x"},
                "unknown": {"n_trian": 50}, "feature_dim_neg": {"feature_dim": -1},
                "caption_mode_x": {"caption_mode": "x"}, "seed_str": {"seed": "x"}}
    for label, over in bad_prep.items():
        doc = {"prepare": {"n_train": 50, "n_dev": 25, "n_test": 25, "feature_dim": 16, **over}}
        case("params", f"prepare params {label}", ["prepare-data", "--quiet", "--out", out(), "--params",
                                                   params(f"prep_{label}", doc)], names=["yaml"])
    # check-params on the repository's params with one thing wrong
    import yaml
    repo = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    for label, edit in {
        "model_shell": lambda d: d["train_base"].__setitem__("model", "x;touch PWNED;#"),
        "model_unknown": lambda d: d["train_base"].__setitem__("model", "nope"),
        "runs_list": lambda d: d["finetune"].__setitem__("runs", [1]),
        "run_bad_loss": lambda d: d["finetune"]["runs"]["online"]["vse_inf-triplet"].__setitem__("loss", "x"),
        "run_init_mismatch": lambda d: d["finetune"]["runs"]["online"]["vse_inf-triplet"].__setitem__(
            "init", "artifacts/other"),
        "pretrain_models_str": lambda d: d["pretrain"].__setitem__("models", "vsrn"),
        "finetune_missing": lambda d: d.pop("finetune"),
        "mine_k_str": lambda d: d["mine"].__setitem__("k_i2t", "abc"),
        "embed_batch_0": lambda d: d["embed"].__setitem__("batch_size", 0),
        "evaluate_protocol_x": lambda d: d["evaluate_base"].__setitem__("protocol", "x"),
        "offcandisize_str": lambda d: d["finetune"].__setitem__("offcandisize", "x"),
        "passes_x": lambda d: d["finetune"].__setitem__("passes", "x"),
    }.items():
        doc = json.loads(json.dumps(repo))
        edit(doc)
        case("check-params", f"check-params {label}", ["check-params", "--params", params(f"cp_{label}", doc),
                                                       "--out", out()], names=["yaml"])
    case("check-params", "check-params binary", ["check-params", "--params", binp, "--out", out()])

    # -- checkpoint configs
    for label, d in bad_checkpoints(w, ckpt).items():
        if label == "vocab_missing":      # documented: the data folder's vocab is used instead
            case("checkpoints", "evaluate ckpt without its vocab (data's)", ["evaluate", "--quiet", "--checkpoint",
                                                                            d, "--data", data, "--split", "dev"],
                 expect="ok")
            continue
        case("checkpoints", f"evaluate ckpt {label}", ["evaluate", "--quiet", "--checkpoint", d, "--data", data,
                                                      "--split", "dev"], names=[str(d)])
        case("checkpoints", f"embed ckpt {label}", ["embed", "--quiet", "--checkpoint", d, "--data", data,
                                                   "--split", "dev", "--out", out()], names=[str(d)])
        case("checkpoints", f"finetune ckpt {label}", ["finetune", "--quiet", "--model", "vsepp", "--init", d,
                                                      "--data", data, "--loss", "triplet", "--epochs", "1",
                                                      "--out", out()], names=[str(d)])

    # -- cross-split data
    for label, make in data_variants(w, Path(data)).items():
        case("data", f"validate-data {label}", ["validate-data", make], names=[str(make)])
        case("data", f"prepare precomp {label}", ["prepare-data", "--dataset", "precomp", "--source", make,
                                                  "--out", out()], names=[str(make)])

    # -- sims / candidates files
    for label, f in array_variants(w).items():
        case("files", f"evaluate-sims {label}", ["evaluate-sims", "--sims", f], names=[f.name])
    # integer scores rank like any other finite scores
    case("files", "evaluate-sims integer scores", ["evaluate-sims", "--sims", w / "arr" / "int_ok.npy"], expect="ok")
    case("files", "evaluate-sims --chunk 0", ["evaluate-sims", "--sims", w / "arr" / "ok_sims.npy",
                                              "--chunk", "0"])
    case("files", "evaluate-sims --json dir", ["evaluate-sims", "--sims", w / "arr" / "ok_sims.npy",
                                               "--json", adir])
    for label, d in candidate_variants(w, Path(cand)).items():
        case("files", f"finetune candidates {label}", ft + ["--loss", "aoq", "--candidates", d, "--out", out()],
             names=[str(d)])
    for label, (i2t, t2i) in import_variants(w).items():
        case("files", f"import-candidates {label}", ["import-candidates", "--i2t", i2t, "--t2i", t2i,
                                                     "--out", out(), "--n-images", "50"],
             names=[Path(i2t).name, Path(t2i).name])
    for label, (i, c) in embedding_variants(w, Path(emb)).items():
        if label == "not_unit":     # dot-product scores of any finite rows are mined exactly
            case("files", "mine embeddings not unit", ["mine-candidates", "--quiet", "--img-embs", i,
                                                       "--cap-embs", c, "--out", w / "runs" / "notunit",
                                                       "--name", "e"], expect="ok")
            continue
        case("files", f"mine embeddings {label}", ["mine-candidates", "--quiet", "--img-embs", i, "--cap-embs", c,
                                                   "--out", out(), "--name", "e"],
             names=[Path(i).name, Path(c).name])
    # -- cross models: embedding, shortlists, ensembles, re-scoring, sims files
    cross, other = fx["cross"], fx["other_vocab"]
    cev = ["evaluate", "--quiet", "--checkpoint", cross, "--data", data, "--split", "test"]
    case("cross", "embed a cross checkpoint", ["embed", "--quiet", "--checkpoint", cross, "--data", data,
                                               "--out", out()], names=[str(cross)])
    case("cross", "mine --checkpoint cross", ["mine-candidates", "--quiet", "--checkpoint", cross,
                                              "--data", data, "--out", out()], names=[str(cross)])
    case("cross", "shortlist of the train split", cev + ["--shortlist", emb], names=[str(emb)])
    case("cross", "shortlist nowhere", cev + ["--shortlist", w / "noshort"])
    case("cross", "shortlist empty dir", cev + ["--shortlist", adir], names=["a_dir"])
    case("cross", "shortlist a cross checkpoint", cev + ["--shortlist", cross], names=[str(cross)])
    case("cross", "shortlist a file", cev + ["--shortlist", afile])
    case("cross", "shortlist-k 0", cev + ["--shortlist", ckpt, "--shortlist-k", "0"])
    case("cross", "shortlist-k alone", cev + ["--shortlist-k", "10"])
    case("cross", "shortlist with sims", cev + ["--shortlist", ckpt, "--sims", w / "runs" / "s.npy"])
    case("cross", "shortlist from an indep ckpt", cev + ["--shortlist", ckpt, "--shortlist-k", "10"],
         expect="ok")
    case("cross", "sims of another shape", cev + ["--sims", w / "arr" / "ok_sims.npy"],
         names=["ok_sims.npy"])
    case("cross", "sims onto the data", cev + ["--sims", Path(data) / "test_ims.npy"])
    case("cross", "ensemble of one", ["ensemble", "--quiet", "--data", data, cross])
    case("cross", "ensemble vocabularies differ", ["ensemble", "--quiet", "--data", data, ckpt, other],
         names=[str(other)])
    case("cross", "ensemble missing member", ["ensemble", "--quiet", "--data", data, ckpt, w / "nockpt"])
    case("cross", "ensemble bad weights", ["ensemble", "--quiet", "--data", data, "--weights", "1,x",
                                           ckpt, cross])
    case("cross", "ensemble negative weights", ["ensemble", "--quiet", "--data", data, "--weights",
                                                "-1,2", ckpt, cross])
    case("cross", "ensemble indep + cross", ["ensemble", "--quiet", "--data", data, ckpt, cross],
         expect="ok")
    rs = ["mine-candidates", "--quiet", "--embeddings-dir", emb, "--data", data, "--name", "r",
          "--k-i2t", "10", "--k-t2i", "2"]
    case("cross", "rescore nowhere", rs + ["--rescore", w / "nockpt", "--out", out()])
    case("cross", "rescore-k below k", rs + ["--rescore", cross, "--rescore-k", "5", "--out", out()])
    # the embed folder's metadata names its data folder and split
    case("cross", "rescore, data from the embeddings", ["mine-candidates", "--quiet", "--embeddings-dir",
                                                        emb, "--rescore", cross, "--out", out()],
         expect="ok")
    # a re-scorer reads the split with its own saved vocabulary, like a cross-data evaluation
    case("cross", "rescore other vocabulary", rs + ["--rescore", other, "--out", out()], expect="ok")
    case("cross", "rescore-k alone", rs + ["--rescore-k", "20", "--out", out()])
    case("cross", "rescore", rs + ["--rescore", cross, "--rescore-k", "20", "--out", out()], expect="ok")
    case("files", "report missing metrics dir", ["report", "--metrics-dir", w / "nometrics", "--out", out()])
    case("files", "candidates-report missing", ["candidates-report", w / "nocand"])


def data_variants(w: Path, data: Path) -> dict[str, Path]:
    out = {}

    variant = variant_maker(w / "datav", data, out)

    def npy(d, split, arr):
        np.save(d / f"{split}_ims.npy", arr)

    variant("dev_width", lambda d: npy(d, "dev", np.ones((25, 4, 8), np.float32)))
    variant("dev_missing", lambda d: (d / "dev_ims.npy").unlink())
    variant("train_one_caption_per_row", lambda d: npy(d, "train", np.random.default_rng(0).standard_normal(
        (250, 4, 16)).astype(np.float32)))
    variant("train_four_captions", lambda d: (d / "train_caps.txt").write_text(
        "\n".join((d / "train_caps.txt").read_text().splitlines()[:-1]) + "\n"))
    variant("train_nan", lambda d: npy(d, "train", np.full((50, 4, 16), np.nan, np.float32)))
    variant("train_int_dtype", lambda d: npy(d, "train", np.ones((50, 4, 16), np.int32)))
    variant("train_2d", lambda d: npy(d, "train", np.ones((50, 64), np.float32)))
    variant("train_truncated", lambda d: (d / "train_ims.npy").write_bytes((d / "train_ims.npy").read_bytes()[:500]))
    variant("train_pickle", lambda d: np.save(d / "train_ims.npy", np.array([{"a": 1}] * 50, dtype=object),
                                              allow_pickle=True))
    variant("graphs_mismatch", lambda d: (d / "train_graphs.jsonl").write_text(
        "".join((d / "train_graphs.jsonl").read_text().splitlines(keepends=True)[:10])))
    variant("vocab_garbage", lambda d: (d / "vocab.json").write_text("{]"))
    variant("caps_binary", lambda d: (d / "train_caps.txt").write_bytes(b"\xff\xfe" * 100))
    variant("caps_empty_line", lambda d: (d / "train_caps.txt").write_text(
        "\n".join([""] + (d / "train_caps.txt").read_text().splitlines()[1:]) + "\n"))

    def precaps_beyond(d):
        (d / "train_caps.txt").unlink()
        (d / "train_precaps.txt").write_text("\n".join(["4,5,999999"] * 250) + "\n")
    variant("precaps_beyond_vocab", precaps_beyond)

    def precaps_text(d):
        (d / "train_caps.txt").unlink()
        (d / "train_precaps.txt").write_text("\n".join(["a,b"] * 250) + "\n")
    variant("precaps_not_ids", precaps_text)
    variant("ids_count", lambda d: (d / "train_ids.txt").write_text("1\n2\n"))
    return out


def array_variants(w: Path) -> dict[str, Path]:
    d = w / "arr"
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {"ok_sims.npy": rng.standard_normal((10, 50)).astype(np.float32),
              "wrong_shape.npy": np.zeros((10, 49), np.float32), "one_d.npy": np.zeros(50, np.float32),
              "nan.npy": np.full((10, 50), np.nan, np.float32), "int_ok.npy": np.zeros((10, 50), np.int64),
              "strings.npy": np.array([["a"] * 50] * 10), "empty.npy": np.zeros((0, 0), np.float32)}
    for name, a in arrays.items():
        np.save(d / name, a)
    (d / "garbage.npy").write_bytes(os.urandom(300))
    (d / "pickle.npy").write_bytes(b"")
    np.save(d / "object.npy", np.array([None] * 10, dtype=object), allow_pickle=True)
    out = {p.stem: p for p in sorted(d.glob("*.npy")) if not p.stem.endswith("ok_sims") and "_ok" not in p.stem}
    return out


def candidate_variants(w: Path, cand: Path) -> dict[str, Path]:
    out = {}

    variant = variant_maker(w / "candv", cand, out)

    i2t = next(cand.glob("i2t_*.npy")).name
    t2i = next(cand.glob("t2i_*.npy")).name
    variant("i2t_float", lambda d: np.save(d / i2t, np.load(d / i2t).astype(np.float32) + 0.5))
    variant("i2t_out_of_range", lambda d: np.save(d / i2t, np.load(d / i2t) + 10 ** 6))
    variant("t2i_shape", lambda d: np.save(d / t2i, np.load(d / t2i)[:10]))
    variant("i2t_garbage", lambda d: (d / i2t).write_bytes(os.urandom(200)))
    variant("missing_t2i", lambda d: (d / t2i).unlink())
    variant("i2t_positive", lambda d: np.save(d / i2t, np.tile(np.arange(5)[None], (50, 4))[:, :20]))
    for pq in cand.glob("*.parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq_

        def strings(d, pq=pq):
            t = pq_.read_table(d / pq.name)
            cols = {c: (pa.array([str(x) for x in t[c].to_pylist()]) if "score" in c else t[c])
                    for c in t.column_names}
            pq_.write_table(pa.table(cols), d / pq.name)

        def floats(d, pq=pq):
            t = pq_.read_table(d / pq.name)
            cols = {c: (pa.array([float(x) + 0.5 for x in t[c].to_pylist()])
                        if ("id" in c or "cand" in c) and "score" not in c else t[c]) for c in t.column_names}
            pq_.write_table(pa.table(cols), d / pq.name)
        variant(f"{pq.stem}_string_scores", strings)
        variant(f"{pq.stem}_float_ids", floats)
    return out


def import_variants(w: Path) -> dict[str, tuple[Path, Path]]:
    d = w / "imp"
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    good_i = rng.integers(5, 250, (50, 30)).astype(np.int64)
    good_t = rng.integers(1, 50, (250, 8)).astype(np.int64)
    files = {"ok": (good_i, good_t), "float": (good_i.astype(np.float64) + 0.5, good_t),
             "neg": (good_i - 1000, good_t), "rows": (good_i[:10], good_t), "t2i_rows": (good_i, good_t[:7]),
             "big": (good_i + 10 ** 6, good_t), "one_d": (good_i[:, 0], good_t),
             "nan": (np.full((50, 30), np.nan), good_t)}
    out = {}
    for label, (a, b) in files.items():
        np.save(d / f"i2t_{label}.npy", a)
        np.save(d / f"t2i_{label}.npy", b)
        if label != "ok":
            out[label] = (d / f"i2t_{label}.npy", d / f"t2i_{label}.npy")
    return out


def embedding_variants(w: Path, emb: Path) -> dict[str, tuple[Path, Path]]:
    d = w / "embv"
    d.mkdir(exist_ok=True)
    img = np.load(emb / "img_embs.npy")
    cap = np.load(emb / "cap_embs.npy")
    variants = {"dim_mismatch": (img, cap[:, :8]), "count_mismatch": (img, cap[:100]),
                "nan": (np.full_like(img, np.nan), cap), "int": (img.astype(np.int32), cap),
                "one_d": (img[:, 0], cap), "not_unit": (img * 10, cap), "empty": (img[:0], cap[:0])}
    out = {}
    for label, (a, b) in variants.items():
        np.save(d / f"img_{label}.npy", a)
        np.save(d / f"cap_{label}.npy", b)
        out[label] = (d / f"img_{label}.npy", d / f"cap_{label}.npy")
    return out


def main_probe(argv):
    w = Path(argv[0] if argv else "/tmp/hostile_probe").resolve()
    w.mkdir(parents=True, exist_ok=True)
    fx = fixtures(w)
    build_cases(w, fx)
    results = Counter()
    by_family: dict[str, Counter] = {}
    bad = []
    for family, label, args, expect, env, names in CASES:
        rc, err = run_case(args, env)
        outcome = classify(rc, err, expect, names)
        results[outcome] += 1
        by_family.setdefault(family, Counter())[outcome] += 1
        if outcome not in ("one-line-2", "ok"):
            bad.append((family, label, outcome, rc, err.splitlines()[-1][:200] if err else ""))
    print(f"{len(CASES)} cases: " + ", ".join(f"{k} {v}" for k, v in results.most_common()))
    for fam, c in by_family.items():
        print(f"  {fam:14s} " + ", ".join(f"{k} {v}" for k, v in c.most_common()))
    for fam, label, outcome, rc, last in bad:
        print(f"[{outcome}] {fam}: {label} (rc {rc}): {last}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main_probe(sys.argv[1:]))
