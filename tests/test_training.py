"""training.py and the ways a run must never lose good work: injected non-finite
losses, gradients and weights, a truncated log (a full disk, for real: test_faults.py); user errors vs bugs;
portable preprocessing outputs; 4D inputs read once."""

import ast
import builtins
import json
import math
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import evaluate
import finetune
import preprocess
import pretrain
import training

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "unet_b", "--patch", "32", "--batch", "2", "--workers", "0", "--quiet", "--log-every", "1"]


def all_finite(path):
    ck = torch.load(path, weights_only=True)
    state = ck.get("model") or ck["encoder"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def checkpoints(run):
    return sorted(p for p in run.iterdir() if p.suffix == ".pt")


def rows(run):
    return [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def poison(monkeypatch, how, from_step):
    """Make pretrain.compute_loss misbehave from `from_step` on: a NaN loss, NaN
    gradients behind a finite loss, or a NaN weight (forward then NaN too)."""
    real = pretrain.compute_loss

    def wrapped(model, inp, target, a, key, autocast):
        step = key[1]
        if step >= from_step and how == "weight":
            with torch.no_grad():
                next(p for p in model.parameters() if p.dim() == 5).view(-1)[0] = float("nan")
        if step >= from_step and how == "grad":
            inner = model
            model = lambda x: NanGrad.apply(inner(x))  # noqa: E731
        loss, parts, out = real(model, inp, target, a, key, autocast)
        if step >= from_step and how == "loss":
            loss = loss * float("nan")
        return loss, parts, out

    monkeypatch.setattr(pretrain, "compute_loss", wrapped)


def narrow_unet(monkeypatch):
    """pretrain.py builds a U-Net B of width 4 instead of 32: the plumbing under test is the
    same at any width, a narrow network keeps the suite fast, and bf16 convolutions on a CPU
    without bf16 instructions are some 300x slower than fp32. oneDNN is switched off for these runs: torch 2.13's
    oneDNN bf16 convolution backward now and then returns NaN weight gradients from
    finite inputs (seen in 8 of 30 steps on an AVX512-bf16 CPU, ~8 % on an AVX2 one;
    Conv3d -> InstanceNorm3d -> LeakyReLU(inplace) -> Conv3d under CPU autocast shows it
    alone), which the guard rightly skips but which would make the skipped steps depend
    on the machine. ATen's own bf16 convolution has no such steps."""
    import models

    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)

    def build(arch, in_channels=1, mode="pretrain", **kw):
        enc = models.UNetEncoder(in_channels, 4)
        dec = models.UNetDecoder(enc.channels, in_channels, n_convs=1, skips=False)
        return models.EncoderDecoder(arch, mode, enc, dec, 16, in_channels, in_channels)

    monkeypatch.setattr(pretrain, "build_model", build)


@pytest.mark.parametrize("how,dtype", [("loss", "fp32"), ("grad", "bf16"), ("weight", "fp32"), ("loss", "bf16")])
def test_injected_non_finite_stops_with_finite_checkpoints_and_resumes(demo, tmp_path, monkeypatch, capsys, how, dtype):
    run = tmp_path / "run"
    args = TINY + [
        "--data",
        str(demo / "preprocessed"),
        "--out",
        str(run),
        "--steps",
        "10",
        "--steps-per-epoch",
        "3",
        "--ckpt-every",
        "2",
        "--max-bad-steps",
        "3",
        "--val-fraction",
        "0",
        "--dtype",
        dtype,
    ]
    narrow_unet(monkeypatch)
    poison(monkeypatch, how, from_step=4)
    assert pretrain.main(args) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # the named checkpoint exists, and every checkpoint on disk holds finite weights
    named = err.split("Resume from ")[1].split(" (step ")[0]
    step = int(err.split(" (step ")[1].split(",")[0])
    assert Path(named) == run / "ckpt.pt" and torch.load(named, weights_only=True)["step"] == step
    assert checkpoints(run) and all(all_finite(p) for p in checkpoints(run))
    skipped = [r["step"] for r in rows(run) if "skipped" in r]
    if how == "weight":  # the NaN weight made steps 4, 5 skip; the save at 6 was refused
        assert skipped == [4, 5] and step == 4 and "weights became non-finite" in err
    else:  # steps 4, 5, 6 skipped: the step-6 checkpoint holds the step-4 weights
        assert skipped == [4, 5, 6] and step == 6 and "3 steps in a row" in err
        a, b = (torch.load(run / n, weights_only=True)["model"] for n in ("ckpt.pt", "ckpt_prev.pt"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert "NaN" not in (run / "log.jsonl").read_text()
    # the cause removed, --resume from the named checkpoint finishes the run
    monkeypatch.undo()
    narrow_unet(monkeypatch)
    assert pretrain.main(["--out", str(run), "--resume", "--quiet"]) == 0
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["step"] == 10 and all_finite(run / "ckpt.pt")


def test_save_refuses_non_finite_weights_and_keeps_the_previous(tmp_path):
    good = {"model": {"w": torch.ones(3)}, "step": 1}
    training.save_checkpoint(good, tmp_path / "ckpt.pt")
    training.save_checkpoint(dict(good, step=2), tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt_prev.pt", weights_only=True)["step"] == 1
    with pytest.raises(training.StopRun, match="non-finite"):
        training.save_checkpoint({"model": {"w": torch.tensor([1.0, float("inf")])}, "step": 3}, tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    assert torch.load(tmp_path / "ckpt_prev.pt", weights_only=True)["step"] == 1


def test_truncated_log_line_then_resume(demo, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = TINY + [
        "--data",
        str(demo / "preprocessed"),
        "--out",
        str(run),
        "--steps",
        "4",
        "--ckpt-every",
        "2",
        "--val-fraction",
        "0",
    ]
    save = training.save_checkpoint

    def killed_after_step_2(obj, path, keep_prev=True):
        save(obj, path, keep_prev)
        if path.name == "encoder.pt" and obj["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", killed_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(args)
    monkeypatch.undo()
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # killed in the middle of a write
    assert pretrain.main(["--out", str(run), "--resume", "--quiet"]) == 0
    steps = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()]  # valid JSONL again
    assert steps == [1, 2, 3, 4]


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(demo, tmp_path, monkeypatch, capsys):
    assert pretrain.main(TINY + ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")]) == 2
    assert "no dataset.json" in capsys.readouterr().err

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(pretrain, "compute_loss", bug)
    with pytest.raises(ValueError, match="an internal bug"):
        pretrain.main(TINY + ["--data", str(demo / "preprocessed"), "--out", str(tmp_path / "b"), "--steps", "1"])


def test_json_never_holds_nan(tmp_path):
    preprocess.save_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32("nan")})
    text = (tmp_path / "x.json").read_text()
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": None} and "NaN" not in text
    training.append_log(tmp_path / "log.jsonl", {"step": 1, "loss": float("nan")})
    assert json.loads((tmp_path / "log.jsonl").read_text()) == {"step": 1, "loss": None}


def test_both_scripts_use_the_shared_module():
    """No function of training.py is defined again in a training script."""
    shared = {
        n.name
        for n in ast.parse((ROOT / "training.py").read_text()).body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef))
    }
    for script in ("pretrain.py", "finetune.py"):
        tree = ast.parse((ROOT / script).read_text())
        own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert not own & shared, (script, own & shared)
        used = {a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "training" for a in n.names}
        assert {"setup", "resume_or_start", "precision", "guarded_step", "save_all", "run_main"} <= used, script


# -----------------------------------------------------------------------------
# Portable outputs: meta holds resolved paths; a moved raw folder is named


def test_evaluate_from_another_folder_and_after_the_raw_folder_moved(demo, tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(demo / "raw", raw)
    monkeypatch.chdir(tmp_path)
    assert preprocess.main(["--input", "raw", "--output", "pre", "--workers", "1", "--quiet"]) == 0  # relative paths
    meta = json.loads(next((tmp_path / "pre" / "meta").iterdir()).read_text())
    assert all(Path(f).is_absolute() and Path(f).exists() for f in meta["source_files"] + [meta["source_label"]])
    # same fingerprint from an absolute --input: nothing is redone
    assert preprocess.run(raw, tmp_path / "pre", workers=1, quiet=True)[:2] == (0, 8)
    run = tmp_path / "ft"
    assert (
        finetune.main(
            TINY + ["--data", "pre", "--pretrained", "none", "--n-train", "2", "--steps", "1", "--out", str(run)]
        )
        == 0
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert evaluate.main(["--run", str(run), "--data", str(tmp_path / "pre"), "--quiet"]) == 0
    capsys.readouterr()
    raw.rename(tmp_path / "moved")
    assert (
        evaluate.main(["--run", str(run), "--data", str(tmp_path / "pre"), "--out", str(tmp_path / "e2"), "--quiet"])
        == 1
    )
    out = capsys.readouterr().out
    failed = [ln for ln in out.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 2 and all("not found" in ln and "--raw-root" in ln for ln in failed)
    assert (
        evaluate.main(
            [
                "--run",
                str(run),
                "--data",
                str(tmp_path / "pre"),
                "--out",
                str(tmp_path / "e3"),
                "--quiet",
                "--raw-root",
                str(tmp_path / "moved"),
            ]
        )
        == 0
    )
    assert len(json.loads((tmp_path / "e3" / "metrics.json").read_text())["cases"]) == 2


def test_a_4d_file_is_read_once(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    vols = np.zeros((24, 24, 24, 20), np.float32)
    vols[4:20, 4:20, 4:20] = rng.uniform(100, 200, (16, 16, 16, 20))
    f = tmp_path / "raw" / "fmri.nii.gz"
    f.parent.mkdir()
    nib.save(nib.Nifti1Image(vols, np.eye(4)), str(f))
    read = {"bytes": 0}
    real_open = builtins.open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def read(self, *a):
            b = self.fh.read(*a)
            read["bytes"] += len(b)
            return b

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def counting_open(file, mode="r", *a, **k):
        fh = real_open(file, mode, *a, **k)
        return Counting(fh) if str(file) == str(f) and "b" in mode and "r" in mode else fh

    monkeypatch.setattr(builtins, "open", counting_open)
    done, _, failed = preprocess.run(tmp_path / "raw", tmp_path / "out", workers=1, quiet=True)
    monkeypatch.undo()
    assert (done, failed) == (20, [])
    size = os.path.getsize(f)
    assert read["bytes"] < 1.5 * size, (read["bytes"], size)  # once (plus the header look-up), not 20 times
    first = np.load(tmp_path / "out" / "images" / "fmri_v000.npy")
    assert first.shape[0] == 1 and math.isfinite(float(first.max()))
