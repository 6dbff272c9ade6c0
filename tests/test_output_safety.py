"""Data safety through the CLI: no command deletes or overwrites what it did not write, a
full disk is one line with nothing left behind, and killed runs leave no workers or temps."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.main import main
from pipeline.io import IN_USE, STAMP, sweep_stale_temps, written_by


def snapshot(root: Path) -> dict:
    """Every entry under root: file bytes, symlink targets, folders (byte-identity checks)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", p.read_bytes())
    return out


def no_temps(*folders: Path) -> bool:
    return not [p for f in folders if f.exists() for p in f.rglob("*.tmp")]


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def source(tiny_data, tmp_path):
    """A user's precomp folder inside a user's projects folder, with files of their own."""
    parent = tmp_path / "projects"
    src = parent / "precomp"
    shutil.copytree(tiny_data, src)
    (src / "notes.txt").write_text("my notes\n")
    (parent / "thesis.tex").write_text("\\documentclass{article}\n")
    return src


# --------------------------------------------------------------------------- 1. outputs
@pytest.mark.parametrize("layout", ["same", "parent", "inside", "user_folder", "symlink_to_source",
                                    "symlink_to_user_folder"])
def test_prepare_data_never_touches_user_folders(source, tmp_path, capsys, layout):
    parent = source.parent
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("chapter 1\n")
    out = {"same": source, "parent": parent, "inside": source / "prepared", "user_folder": user,
           "symlink_to_source": tmp_path / "link", "symlink_to_user_folder": tmp_path / "link"}[layout]
    if layout == "symlink_to_source":
        out.symlink_to(source)
    elif layout == "symlink_to_user_folder":
        out.symlink_to(user)
    before = snapshot(tmp_path)
    rc = main(["prepare-data", "--dataset", "precomp", "--source", str(source), "--out", str(out)])
    assert rc == 2
    err = _err_line(capsys)
    assert ("input" in err) if layout in ("same", "parent", "inside", "symlink_to_source") \
        else "is not empty and was not written by prepare-data: choose a new folder" in err
    assert snapshot(tmp_path) == before


def test_prepare_data_reruns_into_its_own_output(source, tmp_path, capsys):
    out = tmp_path / "data"
    argv = ["prepare-data", "--dataset", "precomp", "--source", str(source), "--out", str(out)]
    assert main(argv) == 0 and main(argv) == 0          # as DVC does
    assert written_by(out) == "itm-pipeline prepare-data"
    assert (out / "train_ims.npy").resolve() == (source / "train_ims.npy").resolve()
    # another command's output is not prepare-data's to replace
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / STAMP).write_text('{"written_by": "itm-pipeline embed"}\n')
    (emb / "img_embs.npy").write_bytes(b"x")
    capsys.readouterr()
    assert main(["prepare-data", "--dataset", "precomp", "--source", str(source), "--out", str(emb)]) == 2
    assert "was not written by prepare-data" in _err_line(capsys)
    assert (emb / "img_embs.npy").read_bytes() == b"x"


@pytest.fixture(scope="module")
def mined(ckpt, tiny_data, tmp_path_factory):
    """Embeddings and candidates of tiny_data, and a metrics folder: inputs of later commands."""
    root = tmp_path_factory.mktemp("mined")
    assert main(["embed", "--quiet", "--checkpoint", str(ckpt), "--data", str(tiny_data),
                 "--out", str(root / "emb")]) == 0
    assert main(["mine-candidates", "--quiet", "--embeddings-dir", str(root / "emb"), "--out",
                 str(root / "cands"), "--name", "tiny", "--k-i2t", "10", "--k-t2i", "3"]) == 0
    metrics = root / "metrics"
    metrics.mkdir()
    for run in ("base_test", "vsepp-triplet"):
        assert main(["evaluate", "--quiet", "--checkpoint", str(ckpt), "--data", str(tiny_data),
                     "--json", str(metrics / f"{run}.json")]) == 0
    return root


def _commands(ckpt, data, mined, out):
    """argv of every command that writes an output folder, writing to `out`."""
    return {
        "prepare-data": ["prepare-data", "--quiet", "--n-train", "10", "--n-dev", "5", "--n-test", "5",
                         "--feature-dim", "4", "--out", str(out)],
        "train": ["train", "--quiet", "--model", "vsepp", "--data", str(data), "--epochs", "1",
                  "--batch-size", "16", "--model-option", "embed_size=8", "--model-option",
                  "word_dim=4", "--out", str(out)],
        "finetune": ["finetune", "--quiet", "--model", "vsepp", "--init", str(ckpt), "--data", str(data),
                     "--candidates", str(mined / "cands"), "--epochs", "1", "--batch-size", "16",
                     "--out", str(out)],
        "embed": ["embed", "--quiet", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out)],
        "mine-candidates": ["mine-candidates", "--quiet", "--embeddings-dir", str(mined / "emb"),
                            "--name", "tiny", "--k-i2t", "5", "--k-t2i", "2", "--out", str(out)],
        "report": ["report", "--metrics-dir", str(mined / "metrics"), "--run", "vsepp-triplet",
                   "--out", str(out)],
        "candidates-report": ["candidates-report", str(mined / "cands"), "--out", str(out)],
        "import-candidates": ["import-candidates", "--i2t", str(mined / "cands" / "i2t_tiny.npy"),
                              "--t2i", str(mined / "cands" / "t2i_tiny.npy"), "--out", str(out)],
    }


COMMANDS = ["prepare-data", "train", "finetune", "embed", "mine-candidates", "report", "candidates-report",
            "import-candidates"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_user_folder_and_reruns_into_its_own(command, ckpt, tiny_data, mined,
                                                                       tmp_path, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("chapter 1\n")
    before = snapshot(tmp_path)
    assert main(_commands(ckpt, tiny_data, mined, user)[command]) == 2
    assert f"is not empty and was not written by {command}: choose a new folder" in _err_line(capsys)
    assert snapshot(tmp_path) == before
    out = tmp_path / "out"
    argv = _commands(ckpt, tiny_data, mined, out)[command]
    assert main(argv) == 0, capsys.readouterr().err
    assert written_by(out) == f"itm-pipeline {command}"
    assert main(argv) == 0, capsys.readouterr().err       # into its own earlier output
    assert no_temps(tmp_path)


@pytest.mark.parametrize("command,where", [("embed", "data"), ("embed", "data_parent"),
                                           ("mine-candidates", "emb"), ("train", "data"),
                                           ("finetune", "cands"), ("report", "metrics"),
                                           ("import-candidates", "cands")])
def test_out_overlapping_an_input_is_refused(command, where, ckpt, tiny_data, mined, capsys):
    target = {"data": tiny_data, "data_parent": tiny_data.parent, "emb": mined / "emb",
              "cands": mined / "cands", "metrics": mined / "metrics"}[where]
    before = snapshot(target)
    assert main(_commands(ckpt, tiny_data, mined, target)[command]) == 2
    assert "input" in _err_line(capsys)
    assert snapshot(target) == before


# --------------------------------------------------------------------------- 3. full disk
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_in_embed_keeps_the_earlier_output(ckpt, tiny_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "emb"
    argv = ["embed", "--quiet", "--checkpoint", str(ckpt), "--data", str(tiny_data), "--out", str(out)]
    assert main(argv) == 0
    before = snapshot(tmp_path)
    monkeypatch.setattr(os, "posix_fallocate", _enospc)
    assert main(argv) == 2
    err = _err_line(capsys)
    assert "no space left on the device" in err and str(out / "img_embs.npy") in err
    assert snapshot(tmp_path) == before                     # earlier output intact, no temps


def test_full_disk_in_mining_and_checkpoints(ckpt, tiny_data, mined, tmp_path, capsys, monkeypatch):
    import pipeline.checkpoint as checkpoint
    import pipeline.mining.candidates as candidates

    out = tmp_path / "cands"
    argv = _commands(ckpt, tiny_data, mined, out)["mine-candidates"]
    assert main(argv) == 0
    before = snapshot(tmp_path)
    monkeypatch.setattr(candidates, "_write_npy", _enospc)
    assert main(argv) == 2
    assert "no space left on the device" in _err_line(capsys)
    assert snapshot(tmp_path) == before
    monkeypatch.setattr(checkpoint, "save_file", _enospc)
    run = tmp_path / "run"
    assert main(_commands(ckpt, tiny_data, mined, run)["train"]) == 2
    assert f"{run / 'checkpoint'}: no space left on the device" in _err_line(capsys)
    assert no_temps(tmp_path) and not (run / "checkpoint").exists()


def test_too_little_free_space_is_refused_before_writing(ckpt, tiny_data, mined, tmp_path, capsys,
                                                         monkeypatch):
    import shutil as sh

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1000))
    run = tmp_path / "run"
    assert main(_commands(ckpt, tiny_data, mined, run)["train"]) == 2
    err = _err_line(capsys)
    assert "not enough free space" in err and "needs" in err and "1000 bytes free" in err
    assert not (run / "checkpoint").exists() and no_temps(tmp_path)


@pytest.fixture
def small_fs(tmp_path):
    """A real 256 KiB file system (tmpfs), where the machine lets us mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("no mount here")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small file system here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_real_full_disk(small_fs, ckpt, tiny_data, capsys):
    assert main(["prepare-data", "--quiet", "--n-train", "100", "--n-dev", "25", "--n-test", "25",
                 "--feature-dim", "64", "--out", str(small_fs / "data")]) == 2
    assert "no space left on the device" in _err_line(capsys)
    assert list(small_fs.iterdir()) == []
    emb = small_fs / "emb"
    argv = ["embed", "--quiet", "--checkpoint", str(ckpt), "--data", str(tiny_data), "--out", str(emb)]
    assert main(argv) == 0
    before = snapshot(small_fs)
    free = shutil.disk_usage(small_fs).free
    (small_fs / "fill").write_bytes(b"\0" * (free - 4096))  # leave less than the embeddings need
    before["fill"] = ("file", (small_fs / "fill").read_bytes())
    assert main(argv) == 2
    assert "no space left on the device" in _err_line(capsys)
    assert snapshot(small_fs) == before


# --------------------------------------------------------------------------- 5. kills
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_of_dead_runs_are_swept(ckpt, tiny_data, tmp_path, capsys):
    out = tmp_path / "emb"
    argv = ["embed", "--quiet", "--checkpoint", str(ckpt), "--data", str(tiny_data), "--out", str(out)]
    assert main(argv) == 0
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [tmp_path / f".emb.~{dead}~abc.tmp", out / f".img_embs.npy.~{dead}~x1.tmp"]
        stale[0].mkdir()                        # a build folder as atomic_dir leaves it
        _mark(stale[0], "embed", dead)
        (stale[0] / "img_embs.npy").write_bytes(b"partial")
        stale[1].write_bytes(b"partial")
        busy = tmp_path / f".emb.~{live.pid}~def.tmp"
        busy.mkdir()
        _mark(busy, "embed", live.pid)
        theirs = tmp_path / ".emb.old"          # not named by this tool's rule: never touched
        theirs.write_text("x")
        assert main(argv) == 0
        assert not any(p.exists() for p in stale)
        assert busy.exists() and theirs.exists()
    finally:
        live.kill()
        live.wait()
    assert sweep_stale_temps(tmp_path) == 1 and not busy.exists()


def _mark(folder: Path, owner: str, pid: int, host: str | None = None, start=None) -> None:
    """An in-use marker as pipeline.io.mark_in_use writes it, for another process."""
    import json
    import socket

    (folder / IN_USE).write_text(json.dumps({"written_by": f"itm-pipeline {owner}", "pid": pid,
                                             "host": host or socket.gethostname(),
                                             "start": start}) + "\n")


_BUILDER = """
import sys, time
from pathlib import Path
from pipeline.io import atomic_dir
with atomic_dir(sys.argv[1], "mine-candidates") as tmp:   # as mine-candidates builds its output
    scratch = tmp / ".mine-scratch-abc"
    scratch.mkdir()
    (scratch / "i2t_ids-1.npy").write_bytes(b"partial")
    print(tmp, flush=True)
    time.sleep(60)
"""


def _builder(out: Path) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-c", _BUILDER, str(out)], env=env,
                         stdout=subprocess.PIPE, text=True)
    return p, Path(p.stdout.readline().strip())


def test_killed_mine_candidates_scratch_is_swept_only_when_ours_and_gone(mined, tmp_path, capsys):
    """A SIGKILLed mine-candidates leaves its build folder (with the .mine-scratch-* memmaps)
    beside the output; the next run into that output removes it. Kept: a live run's, one
    another host wrote (its pid means nothing here), and folders of similar names without
    the tool's marker; a marker whose pid now belongs to another process does not hold."""
    import shutil as sh

    out = tmp_path / "cands"
    argv = _commands(None, None, mined, out)["mine-candidates"]
    live, busy = _builder(out)
    killed, stale = _builder(out)                  # its sweep on entry leaves `busy` alone
    killed.kill()
    killed.wait()
    assert busy.exists() and (stale / ".mine-scratch-abc" / "i2t_ids-1.npy").exists()
    assert (stale / IN_USE).exists()
    try:
        elsewhere = tmp_path / f".cands.~{killed.pid}~host.tmp"    # a run on another host
        sh.copytree(stale, elsewhere)
        _mark(elsewhere, "mine-candidates", killed.pid, host="another-host")
        reused = tmp_path / f".cands.~{live.pid}~reused.tmp"       # its pid now someone else's
        sh.copytree(stale, reused)
        _mark(reused, "mine-candidates", live.pid, start=1)
        foreign = tmp_path / f".cands.~{killed.pid}~notes.tmp"     # the user's: no marker
        foreign.mkdir()
        (foreign / "notes.txt").write_text("mine\n")
        (tmp_path / ".mine-scratch-mine").mkdir()                  # the user's, similar name
        assert main(argv) == 0, capsys.readouterr().err
        assert not stale.exists() and not reused.exists()
        assert busy.exists() and elsewhere.exists() and (foreign / "notes.txt").read_text() == "mine\n"
        assert (tmp_path / ".mine-scratch-mine").is_dir()
        assert not (out / IN_USE).exists() and written_by(out) == "itm-pipeline mine-candidates"
    finally:
        live.kill()
        live.wait()
    assert main(argv) == 0, capsys.readouterr().err       # now the live one is gone too
    assert not busy.exists() and elsewhere.exists() and foreign.exists()


def _group_members(pgid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_dataloader_workers_die_with_a_killed_train(tiny_data, tmp_path):
    """SIGKILL of `train` mid-epoch: its DataLoader workers are gone at once (without the
    death signal they linger until torch's own watchdog notices, seconds later, or never)."""
    cmd = [sys.executable, "-m", "cli.main", "train", "--quiet", "--model", "vsepp", "--data",
           str(tiny_data), "--out", str(tmp_path / "run"), "--epochs", "2", "--batch-size", "16",
           "--model-option", "embed_size=8", "--model-option", "word_dim=4",
           "--train-option", "num_workers=2", "--crash-after-steps", "3"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL, err.decode()[-2000:]
    deadline = time.time() + 1.0
    while _group_members(p.pid) and time.time() < deadline:
        time.sleep(0.05)
    left = _group_members(p.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "DataLoader workers outlived the killed run"


_GRANDCHILD = """
import os, sys, time
from pipeline.processes import die_with_parent
parent = os.getpid()
child = os.fork()
if child == 0:
    if sys.argv[1] == "arm":
        die_with_parent(parent)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("arm", [True, False])
def test_die_with_parent(arm):
    """The mechanism the workers use: a child that armed it dies with its parent's SIGKILL;
    one that did not lives on (so the check can tell)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-c", _GRANDCHILD, "arm" if arm else "no"], env=env,
                         stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    time.sleep(0.2)                       # let the child arm it
    p.kill()
    p.wait()
    deadline = time.time() + 2.0
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert alive is not arm


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_trainer_workers_arm_the_death_signal():
    import ctypes
    import functools

    import torch
    from torch.utils.data import DataLoader, Dataset

    from pipeline.training import _worker_init

    class PdeathSig(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            sig = ctypes.c_int(0)
            ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)   # PR_GET_PDEATHSIG
            return torch.tensor(sig.value)

    loader = DataLoader(PdeathSig(), num_workers=1,
                        worker_init_fn=functools.partial(_worker_init, parent=os.getpid()))
    assert [int(b) for b in loader] == [signal.SIGKILL]


def test_hostile_leftovers(ckpt, tiny_data, mined, tmp_path, capsys):
    """Found by a hostile pass: user files shaped like temp names beside an output, a
    stamp that is a link, metrics files pointed at inputs, --out an existing file."""
    par = tmp_path / "par"
    par.mkdir()
    (par / ".notes.~99999~draft.tmp").write_text("mine\n")        # not this output's name
    before = snapshot(par)
    assert main(_commands(ckpt, tiny_data, mined, par / "new")["prepare-data"]) == 0
    assert {k: v for k, v in snapshot(par).items() if not k.startswith("new")} == before
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "keep.txt").write_text("x")
    (linked / STAMP).symlink_to(par / "new" / STAMP)           # borrowed stamp: not trusted
    assert main(_commands(ckpt, tiny_data, mined, linked)["prepare-data"]) == 2
    assert (linked / "keep.txt").read_text() == "x"
    capsys.readouterr()
    cfg = Path(ckpt) / "config.json"
    cfg_bytes = cfg.read_bytes()
    for argv in (["evaluate", "--quiet", "--checkpoint", str(ckpt), "--data", str(tiny_data),
                  "--json", str(cfg)],
                 ["evaluate", "--quiet", "--checkpoint", str(ckpt), "--data", str(tiny_data),
                  "--groups-json", str(tiny_data / "x.json")],
                 _commands(ckpt, tiny_data, mined, tmp_path / "c2")["mine-candidates"]
                 + ["--summary-json", str(mined / "emb" / "embeddings.json")]):
        assert main(argv) == 2
        assert "input" in _err_line(capsys)
    assert cfg.read_bytes() == cfg_bytes and not (tiny_data / "x.json").exists()
    (tmp_path / "afile").write_text("x")
    for cmd in ("prepare-data", "embed", "report"):
        assert main(_commands(ckpt, tiny_data, mined, tmp_path / "afile")[cmd]) == 2
        assert "exists and is not a folder" in _err_line(capsys)
    assert (tmp_path / "afile").read_text() == "x"
