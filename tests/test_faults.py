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

import numpy as np
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
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def script(*argv, timeout=300):
    """Run a script to its end (same environment as launch)."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


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

def test_sigterm_saves_the_step_reached_and_resume_equals_a_straight_run(demo, tmp_path):
    data = demo / "preprocessed"
    args = TINY + ["--data", data, "--steps", "12", "--steps-per-epoch", "100", "--val-fraction", "0", "--ckpt-every", "1000"]
    run = tmp_path / "stopped"
    p = launch(ROOT / "pretrain.py", *args, "--out", run)
    wait_for(lambda: len(logged(run)) >= 3, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == training.EXIT_SIGNAL == 3, err[-3000:]
    assert len(lines(err)) == 1 and "Traceback" not in err, err
    step = int(err.split("at step ")[1].split()[0])
    assert 3 <= step < 12 and "resume with: python pretrain.py --out" in err
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == step  # mid-epoch, far from --ckpt-every
    assert logged(run)[-1] == {"step": step, "stopped": "SIGTERM"}
    # both in subprocesses with the same thread count as the interrupted part, so the float sums match
    assert script("pretrain.py", "--out", run, "--resume", "--quiet").returncode == 0
    assert script("pretrain.py", *args, "--out", tmp_path / "straight").returncode == 0
    assert losses(run) == losses(tmp_path / "straight")
    assert same_weights(run / "ckpt.pt", tmp_path / "straight" / "ckpt.pt")


def test_ctrl_c_to_the_process_group_with_workers_and_finetune_epoch_checkpoints(demo, tmp_path):
    """Ctrl-C reaches the DataLoader workers too: they leave it to the main process,
    which saves the step reached. finetune.py checkpoints each epoch end."""
    run = tmp_path / "ft"
    args = [x if x != "0" else "1" for x in TINY] + ["--data", demo / "preprocessed", "--pretrained", "none",
                        "--n-train", "2", "--steps", "40", "--steps-per-epoch", "2", "--ckpt-every", "1000", "--out", run]
    p = launch(ROOT / "finetune.py", *args)
    wait_for(lambda: (run / "ckpt.pt").exists() and len(logged(run)) >= 3, p)
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] % 2 == 0  # an epoch end, not --ckpt-every
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3 and len(lines(err)) == 1 and "stopped by SIGINT at step" in err, err[-3000:]
    step = int(err.split("at step ")[1].split()[0])
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == step


def test_sigterm_under_torchrun_two_processes(demo, tmp_path):
    """SIGTERM to the whole job (a scheduler signals torchrun and its workers; torchrun
    forwards it too): both ranks stop at the same step, rank 0 saves it and says so
    once; each worker exits 3 (torchrun itself exits 1 whatever its workers' codes)."""
    run = tmp_path / "ddp"
    args = TINY + ["--data", demo / "preprocessed", "--steps", "30", "--steps-per-epoch", "100", "--val-fraction", "0",
                   "--out", run]
    p = launch("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", ROOT / "pretrain.py", *args)
    wait_for(lambda: len(logged(run)) >= 2, p)
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    said = [ln for ln in err.splitlines() if "stopped by SIGTERM at step" in ln]
    assert len(said) == 1 and "torchrun --nproc_per_node=2 pretrain.py" in said[0], err[-3000:]
    step = int(said[0].split("at step ")[1].split()[0])
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["step"] == step < 30 and ck["world"] == 2
    assert logged(run)[-1] == {"step": step, "stopped": "SIGTERM"}
    assert "pretrain.py\", line" not in err and "training.py\", line" not in err  # no traceback of ours (torchrun prints its own)


def test_sigterm_to_torchrun_workers_reports_exit_3(demo, tmp_path):
    """A signal to the workers alone: torchrun reports each worker's exit code 3."""
    run = tmp_path / "ddp"
    args = TINY + ["--data", demo / "preprocessed", "--steps", "30", "--steps-per-epoch", "100", "--val-fraction", "0",
                   "--out", run]
    p = launch("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29542", ROOT / "pretrain.py", *args)
    wait_for(lambda: len(logged(run)) >= 2, p)
    for pid in children(p.pid):
        os.kill(pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "exitcode  : 3" in err, err[-3000:]
    step = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    assert logged(run)[-1] == {"step": step, "stopped": "SIGTERM"}
    # resumed under torchrun, it finishes
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29543",
                        str(ROOT / "pretrain.py"), "--out", str(run), "--resume", "--quiet"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 30


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
