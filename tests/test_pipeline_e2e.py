"""End to end: the real dvc.yaml on smoke-sized params, then a no-op second `dvc repro`,
and forced re-runs that leave every stage up to date (the same bytes)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "t2i_r1", "t2i_r5",
               "t2i_r10", "t2i_medr", "t2i_meanr", "rsum", "protocol"}


def _dvc(args, cwd):
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"],
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([os.path.join(bindir, "dvc"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_repro_smoke(tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copy(ROOT / "params.smoke.yaml", work / "params.yaml")
    # the stages' deps name the code they run (dvc.yaml)
    for code in ("configs", "pipeline", "stages", "cli"):
        shutil.copytree(ROOT / code, work / code,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    _dvc(["init", "-q"], work)
    out = _dvc(["repro"], work)
    runs = [f"{m}-{lo}" for m in ("vse_inf", "vsrn", "bfan") for lo in ("triplet", "aoq")]
    pretrained = ("vsrn", "bfan", "scan", "sgr", "saf")
    group = {r: "online" if r.endswith("-triplet") else "offline" for r in runs}
    for stage in ("check_params", "prepare", "train_base", "evaluate_base", "embed", "mine",
                  "report", "ensemble@sgraf", *(f"pretrain@{m}" for m in pretrained),
                  *(f"evaluate_pretrain@{m}" for m in pretrained),
                  *(f"finetune_{group[r]}@{r}" for r in runs),
                  *(f"evaluate_{group[r]}@{r}" for r in runs)):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((work / "artifacts/metrics/base_test.json").read_text())
    assert set(metrics) == METRIC_KEYS and metrics["protocol"] == "full"
    groups = json.loads((work / "artifacts/metrics/base_test_groups.json").read_text())
    assert {"family", "random", "pairwise"} <= set(groups)
    # embed -> mine: smoke params have 200 train images, K 20 / 5; name from artifacts/data
    import numpy as np
    import yaml

    smoke = yaml.safe_load((ROOT / "params.smoke.yaml").read_text())
    n_img, k1, k2 = smoke["prepare"]["n_train"], smoke["mine"]["k_i2t"], smoke["mine"]["k_t2i"]
    emb = json.loads((work / "artifacts/embeddings/embeddings.json").read_text())
    assert (emb["n_img"], emb["n_cap"]) == (n_img, 5 * n_img)
    assert np.load(work / "artifacts/embeddings/img_embs.npy", mmap_mode="r").shape == (n_img, emb["dim"])
    i2t = np.load(work / "artifacts/candidates/i2t_synthetic.npy")
    t2i = np.load(work / "artifacts/candidates/t2i_synthetic.npy")
    assert i2t.dtype == t2i.dtype == np.int32
    assert i2t.shape == (n_img, k1) and t2i.shape == (5 * n_img, k2)
    assert not (i2t // 5 == np.arange(n_img)[:, None]).any()          # own captions excluded
    assert not (t2i == np.arange(5 * n_img)[:, None] // 5).any()       # own image excluded
    mine = json.loads((work / "artifacts/metrics/mine.json").read_text())
    assert (mine["k_i2t"], mine["k_t2i"], mine["n_img"]) == (k1, k2, n_img)
    # finetune -> evaluate -> report: one row per run plus the two bases; AOQ logged its
    # weights; VSRN was fine-tuned from the pretrain stage's checkpoint
    report = (work / "artifacts/report/report.md").read_text()
    # header, base, the pretrained bases, the runs, the SGRAF ensemble (SGR + SAF)
    assert report.count("\n| ") == 1 + 1 + len(pretrained) + len(runs) + 1, report
    assert "| vsrn | (pretrain) |" in report and "| bfan | aoq |" in report
    assert "| ensemble sgraf | (mean of sgr + saf) |" in report
    ft_meta = json.loads((work / "artifacts/finetune/vsrn-aoq/checkpoint/config.json").read_text())
    assert "artifacts/pretrain/vsrn/checkpoint" in json.dumps(ft_meta)
    assert (work / "artifacts/report/recall.png").read_bytes()[:4] == b"\x89PNG"
    header = (work / "artifacts/finetune/vsrn-aoq/train_log.tsv").read_text().splitlines()[0]
    assert {"train_weight_negative", "train_caption"} <= set(header.split("\t"))
    assert (work / "dvc.lock").exists()
    # each run depends on its own base only, and a triplet run on no candidates
    lock = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    deps = {r: {d["path"] for d in lock[f"finetune_{group[r]}@{r}"]["deps"]} for r in runs}
    base = {"vse_inf": "artifacts/base/checkpoint", "vsrn": "artifacts/pretrain/vsrn/checkpoint",
            "bfan": "artifacts/pretrain/bfan/checkpoint"}
    for r in runs:
        model = r.split("-")[0]
        data_deps = {d for d in deps[r] if d.startswith(("artifacts/", "configs/"))}
        assert data_deps == {"artifacts/data", base[model], f"configs/models/{model}.yaml"} | (
            {"artifacts/candidates"} if group[r] == "offline" else set()), (r, deps[r])
        # and the code it runs: the AOQ family's loss only where it is used
        assert {"pipeline/models", "pipeline/scoring.py", "pipeline/training.py"} <= deps[r]
        assert ("pipeline/losses" in deps[r]) == (group[r] == "offline"), (r, deps[r])
    again = _dvc(["repro"], work)
    assert "Running stage" not in again, again
    # a change to the AOQ loss affects exactly the offline fine-tunes (and, through their
    # outputs, what reads them); the base, mining and triplet runs stay up to date
    aoq = work / "pipeline/losses/aoq.py"
    code = aoq.read_text()
    aoq.write_text(code + "\n# changed\n")
    status = _dvc(["status"], work)
    changed = {line.strip().rstrip(":") for line in status.splitlines()
               if line and not line[0].isspace() and line.rstrip().endswith(":")}
    assert changed == {f"finetune_offline@{r}" for r in runs if group[r] == "offline"}, status
    aoq.write_text(code)
    # identical inputs, identical bytes: forced re-runs of mining and of a fine-tune (whose
    # outputs the evaluate and report stages read) leave nothing to do
    _dvc(["repro", "-f", "-s", "mine", "finetune_offline@vse_inf-aoq"], work)
    assert "up to date" in _dvc(["status"], work)
    shown = _dvc(["metrics", "show"], work)
    assert "base_test.json" in shown and "rsum" in shown
    assert all(f"{r}.json" in shown for r in runs)
