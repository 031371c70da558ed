"""Faults as a cluster user meets them, each real (a signal, a second process, a file
size limit, kill -9, a truncated file), never a mocked library call: SIGTERM saves the
step reached and exits 3; one run per folder; a full disk is one line with the old
checkpoint intact; nothing a killed process left survives the next start."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import evaluate
import finetune
import pretrain
import training

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "unet_b", "--patch", "32", "--batch", "2", "--workers", "0", "--quiet", "--log-every", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def launch(*argv, module=None):
    """A script (or `python -c` code) in its own session, so a test can signal its whole process group."""
    cmd = [sys.executable, *map(str, argv)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def script(*argv, timeout=300):
    """Run a script to its end (same environment as launch)."""
    return subprocess.run(
        [sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def wait_for(pred, proc=None, timeout=180):
    t = time.time()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} first: {proc.communicate()[1][-3000:]}")
        assert time.time() - t < timeout, "timed out"
        time.sleep(0.05)


def logged(run):
    """The complete log lines so far (a line being written is left out)."""
    try:
        text = (run / "log.jsonl").read_text()
    except FileNotFoundError:
        return []
    out = []
    for ln in text.splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            pass
    return out


def lines(err):
    return [ln for ln in err.strip().splitlines() if ln.strip()]


def same_weights(a, b):
    a, b = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(run):
    return [(r["step"], r["loss"]) for r in logged(run) if "loss" in r]


# -----------------------------------------------------------------------------
# Signals


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_resume_equals_a_straight_run(demo, tmp_path):
    """SIGTERM to the process group, as a scheduler sends it: the DataLoader worker
    leaves it to the main process, which saves the step reached."""
    data = demo / "preprocessed"
    args = [x if x != "0" else "1" for x in TINY] + [
        "--data",
        data,
        "--steps",
        "8",
        "--steps-per-epoch",
        "100",
        "--val-fraction",
        "0",
        "--ckpt-every",
        "1000",
    ]
    run = tmp_path / "stopped"
    p = launch(ROOT / "pretrain.py", *args, "--out", run)
    wait_for(lambda: len(logged(run)) >= 3, p)
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == training.EXIT_SIGNAL == 3, err[-3000:]
    assert len(lines(err)) == 1 and "Traceback" not in err, err
    step = int(err.split("at step ")[1].split()[0])
    assert 3 <= step < 8 and "resume with: python pretrain.py --out" in err
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == step  # mid-epoch, far from --ckpt-every
    assert logged(run)[-1] == {"step": step, "stopped": "SIGTERM"}
    # both in subprocesses with the same thread count as the interrupted part, so the float sums match
    assert script("pretrain.py", "--out", run, "--resume", "--quiet").returncode == 0
    assert script("pretrain.py", *args, "--out", tmp_path / "straight").returncode == 0
    assert losses(run) == losses(tmp_path / "straight")
    assert same_weights(run / "ckpt.pt", tmp_path / "straight" / "ckpt.pt")


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_with_workers_and_finetune_epoch_checkpoints(demo, tmp_path):
    """Ctrl-C reaches the DataLoader workers too: they ignore it, the main process
    saves the step reached. finetune.py checkpoints each epoch end."""
    run = tmp_path / "ft"
    args = [x if x != "0" else "1" for x in TINY] + [
        "--data",
        demo / "preprocessed",
        "--pretrained",
        "none",
        "--n-train",
        "2",
        "--steps",
        "40",
        "--steps-per-epoch",
        "2",
        "--ckpt-every",
        "1000",
        "--out",
        run,
    ]
    p = launch(ROOT / "finetune.py", *args)
    wait_for(lambda: (run / "ckpt.pt").exists() and len(logged(run)) >= 3, p)
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] % 2 == 0  # an epoch end, not --ckpt-every
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3 and len(lines(err)) == 1 and "stopped by SIGINT at step" in err, err[-3000:]
    step = int(err.split("at step ")[1].split()[0])
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == step


@pytest.mark.slow
def test_sigterm_under_torchrun_two_processes(demo, tmp_path):
    """SIGTERM to the whole job (a scheduler signals torchrun and its workers; torchrun
    forwards it too): both ranks stop at the same step, rank 0 saves it and says so
    once; each worker exits 3 (torchrun itself exits 1 whatever its workers' codes)."""
    run = tmp_path / "ddp"
    args = TINY + [
        "--data",
        demo / "preprocessed",
        "--steps",
        "12",
        "--steps-per-epoch",
        "100",
        "--val-fraction",
        "0",
        "--out",
        run,
    ]
    p = launch("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", ROOT / "pretrain.py", *args)
    wait_for(lambda: len(logged(run)) >= 2, p)
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    said = [ln for ln in err.splitlines() if "stopped by SIGTERM at step" in ln]
    assert len(said) == 1 and "torchrun --nproc_per_node=2 pretrain.py" in said[0], err[-3000:]
    step = int(said[0].split("at step ")[1].split()[0])
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["step"] == step < 12 and ck["world"] == 2
    assert logged(run)[-1] == {"step": step, "stopped": "SIGTERM"}
    assert (
        'pretrain.py", line' not in err and 'training.py", line' not in err
    )  # no traceback of ours (torchrun prints its own)


@pytest.mark.slow
def test_sigterm_to_torchrun_workers_reports_exit_3(demo, tmp_path):
    """A signal to the workers alone: torchrun reports each worker's exit code 3."""
    run = tmp_path / "ddp"
    args = TINY + [
        "--data",
        demo / "preprocessed",
        "--steps",
        "8",
        "--steps-per-epoch",
        "100",
        "--val-fraction",
        "0",
        "--out",
        run,
    ]
    p = launch("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29542", ROOT / "pretrain.py", *args)
    wait_for(lambda: len(logged(run)) >= 2, p)
    for pid in children(p.pid):
        os.kill(pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "exitcode  : 3" in err, err[-3000:]
    step = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    assert logged(run)[-1] == {"step": step, "stopped": "SIGTERM"}
    # resumed under torchrun, it finishes
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29543",
            str(ROOT / "pretrain.py"),
            "--out",
            str(run),
            "--resume",
            "--quiet",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 8


def children(pid):
    """Direct children of `pid` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


# -----------------------------------------------------------------------------
# One run per folder


@pytest.mark.slow
def test_one_run_per_folder_and_a_killed_runs_lock_is_taken_over(demo, tmp_path, capsys):
    run = tmp_path / "run"
    args = TINY + [
        "--data",
        demo / "preprocessed",
        "--steps",
        "8",
        "--steps-per-epoch",
        "100",
        "--val-fraction",
        "0",
        "--ckpt-every",
        "3",
        "--out",
        run,
    ]
    p = launch(ROOT / "pretrain.py", *args)
    wait_for(lambda: (run / "ckpt.pt").exists(), p)
    # a second run (README's rerun with --resume) and an evaluation into the folder in use: one line, exit 2
    assert pretrain.main(["--out", str(run), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(lines(err)) == 1 and f"is in use by run pretrain.py (host {os.uname().nodename}, pid {p.pid}" in err, err
    assert p.poll() is None  # the first run goes on, untouched
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    # its lock is left, but no process holds it: the resume takes it over and finishes the run
    assert (run / ".lock").exists()
    assert pretrain.main(["--out", str(run), "--resume", "--quiet"]) == 0
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 8
    assert [r["step"] for r in logged(run) if "loss" in r] == list(range(1, 9))  # each step once


# -----------------------------------------------------------------------------
# A full disk, for real: a file size limit (RLIMIT_FSIZE) set in the run's process after
# its first checkpoint, so the kernel refuses the next large write (EFBIG) as it would a
# write to a full disk (ENOSPC); torch.save, gzip and np.save see a real failed write.

LIMITED = """
import resource, signal, sys
import pretrain, training
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of the process being killed
real = training.save_checkpoint

def save(state, path, keep_prev=True):
    real(state, path, keep_prev)
    if path.name == "encoder.pt":  # after the first complete checkpoint: no file may grow past 16 kB
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
training.save_checkpoint = save
sys.exit(pretrain.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("during", ["checkpoint", "sample"])
def test_full_disk_for_real(demo, tmp_path, during):
    run = tmp_path / "run"
    val = (
        ["--val-fraction", "0.2"] if during == "sample" else ["--val-fraction", "0"]
    )  # samples are written at validation
    r = script(
        "-c",
        LIMITED,
        *TINY,
        "--data",
        demo / "preprocessed",
        "--steps",
        "4",
        "--steps-per-epoch",
        "2",
        *val,
        "--out",
        run,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    said = lines(r.stderr)
    assert len(said) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    # torch.save's zip writer reports the failed write as "unexpected pos", gzip's write as EFBIG
    name, why = (
        ("ckpt.pt", "the write failed: torch.save says unexpected pos")
        if during == "checkpoint"
        else ("samples/step0000004_input.nii.gz", "File too large")
    )
    assert f"could not write {run / name} ({why}" in said[0] and " free there); free space on that disk" in said[0], (
        said
    )
    assert "stopped at step 4" in said[0] and f"Resume from {run / 'ckpt.pt'} (step 2" in said[0]
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 2  # the previous checkpoint, intact
    assert not list(run.rglob(".*.tmp"))  # no temporary file left


# -----------------------------------------------------------------------------
# kill -9 in the middle of a save


@pytest.mark.slow
def test_kill_9_during_a_save(demo, tmp_path):
    run = tmp_path / "run"
    args = TINY + [
        "--data",
        demo / "preprocessed",
        "--steps",
        "4",
        "--steps-per-epoch",
        "100",
        "--val-fraction",
        "0",
        "--ckpt-every",
        "1",
        "--out",
        run,
    ]
    p = launch(ROOT / "pretrain.py", *args)
    wait_for(lambda: (run / "ckpt.pt").exists() and list(run.glob(".ckpt.pt.*.tmp")), p)  # the second save under way
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert list(run.glob(".*.tmp"))  # what the kill left
    assert training.loads(run / "ckpt.pt") and (
        not (run / "ckpt_prev.pt").exists() or training.loads(run / "ckpt_prev.pt")
    )
    assert pretrain.main(["--out", str(run), "--resume", "--quiet"]) == 0
    assert not list(run.rglob(".*.tmp"))
    assert training.loads(run / "ckpt_prev.pt") and torch.load(run / "ckpt.pt", weights_only=True)["step"] == 4


def test_a_cut_ckpt_is_never_rotated_over_the_good_previous(tmp_path):
    """After a kill left ckpt.pt cut short, resume uses ckpt_prev.pt; the next save
    replaces the broken ckpt.pt and keeps the good ckpt_prev.pt."""
    good = {"model": {"w": torch.ones(3)}, "step": 1}
    training.save_checkpoint(good, tmp_path / "ckpt.pt")
    training.save_checkpoint(dict(good, step=2), tmp_path / "ckpt.pt")
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    path, ck = training.find_checkpoint(tmp_path)
    assert path.name == "ckpt_prev.pt" and ck["step"] == 1
    training.save_checkpoint(dict(good, step=3), tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt_prev.pt", weights_only=True)["step"] == 1
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3


# -----------------------------------------------------------------------------
# Data faults


def test_a_truncated_npy_is_named_before_the_first_step(demo, tmp_path, capsys):
    import shutil

    import preprocess

    pre = tmp_path / "pre"
    shutil.copytree(demo / "preprocessed", pre)
    case = sorted(c["case"] for c in json.loads((pre / "dataset.json").read_text())["cases"] if c["split"] == "train")[
        1
    ]
    f = pre / "images" / f"{case}.npy"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a copy cut short
    run = tmp_path / "ft"
    args = TINY + ["--data", str(pre), "--pretrained", "none", "--n-train", "all", "--steps", "2", "--out", str(run)]
    assert finetune.main(args) == 2
    err = capsys.readouterr().err
    assert len(lines(err)) == 1 and f"{f} is truncated" in err and "rerun preprocess.py" in err, err
    assert not (run / "log.jsonl").exists() and not (run / "ckpt.pt").exists()  # not one step
    # a file that breaks after the check (checked out of the way here) is named too, from a DataLoader worker
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune.data, "check_cases", lambda *a, **k: None)
        one_worker = [x if x != "0" else "1" for x in args[:-4]]  # without --steps 2 --out
        assert (
            finetune.main(one_worker + ["--steps", "3", "--out", str(tmp_path / "ft2")]) == 2
        )  # 6 samples: every case
    err = capsys.readouterr().err
    assert len(lines(err)) == 1 and f"{f} cannot be read" in err and "Traceback" not in err, err
    # as the line says: preprocessing again redoes that case (and only it), then the run starts
    assert preprocess.run(demo / "raw", pre, workers=1, quiet=True)[:2] == (1, 7)
    assert finetune.main(args) == 0


# -----------------------------------------------------------------------------
# evaluate.py

HOLD = (
    "import sys, time, training; training.lock_folder(sys.argv[1], 'evaluation'); "
    "print('held', flush=True); time.sleep(120)"
)


@pytest.mark.slow
def test_evaluate_killed_midway_redoes_only_the_missing_cases(demo, tmp_path, capsys):
    ft = tmp_path / "ft"
    assert (
        finetune.main(
            TINY
            + [
                "--data",
                str(demo / "preprocessed"),
                "--pretrained",
                "none",
                "--n-train",
                "2",
                "--steps",
                "1",
                "--out",
                str(ft),
            ]
        )
        == 0
    )
    base = ["--run", str(ft), "--data", str(demo / "preprocessed"), "--quiet"]
    ev = ft / "eval"
    assert evaluate.main(base) == 0 and (ev / "metrics.json").exists()
    # changed settings (--tta), killed after its first case: no metrics.json, neither old nor partial
    p = launch(ROOT / "evaluate.py", *base, "--tta")
    wait_for(lambda: len(list((ev / "predictions").glob("*.json"))) == 1, p)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (ev / "metrics.json").exists()
    first = next((ev / "predictions").glob("*.json"))
    stamp = first.stat().st_mtime_ns, (ev / "predictions" / f"{first.stem}.nii.gz").stat().st_mtime_ns
    capsys.readouterr()
    # the rerun does the missing case only, then writes the whole metrics.json
    assert evaluate.main(base + ["--tta"]) == 0
    assert "1 case(s) already done" in capsys.readouterr().out
    assert stamp == (first.stat().st_mtime_ns, (ev / "predictions" / f"{first.stem}.nii.gz").stat().st_mtime_ns)
    m = json.loads((ev / "metrics.json").read_text())
    assert len(m["cases"]) == 2 and m["settings"]["tta"] and not m["failed"]
    # a second evaluation into a folder in use: one line, exit 2
    holder = launch("-c", HOLD, ev)
    assert holder.stdout.readline().strip() == "held"
    assert evaluate.main(base) == 2
    err = capsys.readouterr().err
    assert len(lines(err)) == 1 and "is in use by evaluation" in err and f"pid {holder.pid}" in err, err
    holder.kill()
    holder.wait()


# -----------------------------------------------------------------------------
# No process outlives its run


def alive(pid):
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def test_kill_9_of_preprocess_leaves_no_worker(demo, tmp_path):
    p = launch(
        ROOT / "preprocess.py", "--input", demo / "raw", "--output", tmp_path / "pre", "--workers", "2", "--quiet"
    )
    wait_for(lambda: len(children(p.pid)) >= 2, p, timeout=60)
    workers = children(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    t = time.time()
    while any(alive(w) for w in workers) and time.time() - t < 10:
        time.sleep(0.1)
    survivors = [w for w in workers if alive(w)]
    for w in survivors:  # a failing test leaves nothing running either
        os.kill(w, signal.SIGKILL)
    assert not survivors


def test_preflight_disk_need_counts_the_checkpoints_already_there(tmp_path, monkeypatch):
    """A save's peak is three checkpoints (_prev, current, new); on resume those on disk
    count, so a folder with room for one more is not refused."""
    from types import SimpleNamespace

    import models

    model = models.build_model("unet_b", in_channels=1, mode="pretrain")
    a = SimpleNamespace(no_preflight=False, patch=32, batch=2, dtype="fp32", checkpointing=False, workers=0)
    ctx = SimpleNamespace(device=torch.device("cpu"), cuda=False, world=1, say=print)
    est = training.estimate_memory(model, 32, 2)
    ckpt = 2 * est["weights"] + est["optimizer"]
    monkeypatch.setattr(training, "available_memory", lambda device: None)
    monkeypatch.setattr(training, "free_disk", lambda path: int(1.5 * ckpt))
    with pytest.raises(training.UserError, match="disk: the checkpoints need about"):
        training.preflight(model, a, ctx, tmp_path, 1)
    for name in ("ckpt.pt", "ckpt_prev.pt"):  # a run to resume (sparse files of a checkpoint's size)
        with open(tmp_path / name, "wb") as f:
            f.truncate(ckpt)
    training.preflight(model, a, ctx, tmp_path, 1)
