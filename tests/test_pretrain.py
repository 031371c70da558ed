"""pretrain.py: schedule, learning, exact resume, DDP on CPU, methods, --init, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pretrain
import training
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "unet_b", "--patch", "32", "--batch", "2", "--workers", "0", "--quiet", "--log-every", "1"]


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_schedule_is_the_papers():
    total, warmup, lr = 1000, 50, 1e-4
    assert pretrain.lr_at(0, total, warmup, lr) == pytest.approx(lr * 1e-3)
    assert pretrain.lr_at(25, total, warmup, lr) == pytest.approx(lr * (1e-3 + (1 - 1e-3) * 0.5))
    assert pretrain.lr_at(warmup, total, warmup, lr) == pytest.approx(lr)
    assert pretrain.lr_at(warmup + 475, total, warmup, lr) == pytest.approx(lr / 2)
    assert pretrain.lr_at(total, total, warmup, lr) == pytest.approx(0, abs=1e-15)
    a = pretrain.get_args([])
    assert (a.patch, a.batch, a.lr, a.wd, a.epochs, a.warmup_epochs) == (128, 8, 1e-4, 0.01, 100, 5)
    assert (a.mask_ratio_range, a.mask_token, a.loss_on, a.aug, a.val_fraction) == ([0.6, 0.6], 4, "all", "all", 0.01)
    assert pretrain.get_args(["--method", "mae"]).aug == "none"


def test_loss_decreases_and_outputs(demo, tmp_path):
    run = tmp_path / "run"
    spe = ["--steps-per-epoch", "15"]  # two epoch ends (validation, checkpoint, samples), not fifteen
    assert pretrain.main(TINY + spe + ["--data", str(demo / "preprocessed"), "--out", str(run), "--steps", "30"]) == 0
    ls = losses(run)
    assert len(ls) == 30 and all(math.isfinite(x) for x in ls)
    assert sum(ls[-5:]) / 5 < 0.6 * sum(ls[:5]) / 5
    rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "samples_per_s", "data_wait", "peak_gb"} <= set(rows[0])
    assert any("val_loss" in r for r in rows)
    enc = torch.load(run / "encoder.pt", weights_only=True)
    assert enc["arch"] == "unet_b" and set(enc["encoder"]) == set(
        build_model("unet_b", mode="pretrain").encoder.state_dict()
    )
    names = sorted(p.name for p in (run / "samples").iterdir())
    assert any(n.endswith("_reconstruction.nii.gz") for n in names) and any(n.endswith("_input.nii.gz") for n in names)
    assert json.loads((run / "args.json").read_text())["steps"] == 30
    # a finished run is not overwritten by accident
    assert pretrain.main(TINY + ["--data", str(demo / "preprocessed"), "--out", str(run), "--steps", "30"]) == 2


def test_resume_is_exact(demo, tmp_path, monkeypatch):
    args = TINY + ["--data", str(demo / "preprocessed"), "--steps", "6", "--ckpt-every", "3", "--steps-per-epoch", "2"]
    assert pretrain.main(args + ["--out", str(tmp_path / "straight")]) == 0

    save = training.save_checkpoint

    def killed_after_step_3(
        obj, path, keep_prev=True
    ):  # the process dies right after the step-3 checkpoint (mid-epoch)
        save(obj, path, keep_prev)
        if path.name == "encoder.pt" and obj["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(args + ["--out", str(tmp_path / "split")])
    monkeypatch.setattr(training, "save_checkpoint", save)
    assert pretrain.main(["--out", str(tmp_path / "split"), "--resume", "--quiet"]) == 0

    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_ddp_two_processes_gloo(demo, tmp_path):
    run = tmp_path / "ddp"
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29533",
            str(ROOT / "tests" / "ddp_worker.py"),
        ]
        + TINY
        + ["--data", str(demo / "preprocessed"), "--out", str(run), "--steps", "3"]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = (torch.load(run / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["world"] == 2 and ck["step"] == 3
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
        assert torch.equal(w0[k], ck["model"][k]), k
    assert r.stdout.count("unet_b (pretrain)") == 1  # rank 0 alone prints


def test_mae_and_init(demo, tmp_path):
    base = TINY + ["--data", str(demo / "preprocessed"), "--steps", "2"]
    assert pretrain.main(base + ["--method", "mae", "--out", str(tmp_path / "mae")]) == 0
    assert json.loads((tmp_path / "mae" / "args.json").read_text())["aug"] == "none"
    assert (
        pretrain.main(
            base + ["--init", str(tmp_path / "mae" / "encoder.pt"), "--out", str(tmp_path / "init"), "--lr", "0"]
        )
        == 0
    )
    # lr 0: the encoder is exactly the one it started from
    a = torch.load(tmp_path / "mae" / "encoder.pt", weights_only=True)["encoder"]
    b = torch.load(tmp_path / "init" / "encoder.pt", weights_only=True)["encoder"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_reinitialises_what_does_not_fit(tmp_path):
    src = build_model("unet_b", in_channels=1, mode="pretrain")
    torch.save({"arch": "unet_b", "model": src.state_dict()}, tmp_path / "ckpt.pt")
    dst = build_model("unet_b", in_channels=2, mode="pretrain")  # a 2-channel second stage
    pre = training.load_pretrained_file(tmp_path / "ckpt.pt", "--init")
    fresh = pretrain.load_weights_by_name(dst, pre, tmp_path / "ckpt.pt")
    differ = sorted(k for k, v in dst.state_dict().items() if src.state_dict()[k].shape != v.shape)
    assert fresh == differ and len(differ) == 3  # stem weight, output weight and bias
    for k, v in dst.state_dict().items():
        if k not in fresh:
            assert torch.equal(v, src.state_dict()[k]), k
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(training.UserError, match="bad.pt"):
        training.load_pretrained_file(tmp_path / "bad.pt", "--init")
    torch.save(
        {"arch": "unet_xl", "encoder": build_model("unet_xl", mode="pretrain").encoder.state_dict()}, tmp_path / "xl.pt"
    )
    assert pretrain.main(["--init", str(tmp_path / "xl.pt"), "--arch", "unet_b", "--out", str(tmp_path / "r")]) == 2


@pytest.mark.slow
def test_swin_ssl_heads_all_get_gradient():
    torch.manual_seed(0)
    model = build_model("swinunetr", mode="pretrain")
    a = pretrain.get_args(["--arch", "swinunetr", "--method", "swin_ssl", "--patch", "64"])
    x = torch.rand(2, 1, 64, 64, 64)
    loss, parts, _ = pretrain.compute_loss(model, x, x, a, (0, 0, 0), torch.autocast("cpu", enabled=False))
    assert set(parts) == {"rot", "contrast", "rec"} and all(math.isfinite(v.item()) for v in parts.values())
    loss.backward()
    for head in (model.decoder.rotation_head, model.decoder.contrastive_head, model.decoder.conv, model.encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_nt_xent_prefers_matching_views():
    z = torch.randn(4, 8)
    same = pretrain.nt_xent(torch.cat([z, z]))
    shuffled = pretrain.nt_xent(torch.cat([z, z[[1, 2, 3, 0]]]))
    assert same < shuffled


@pytest.mark.slow
def test_swin_ssl_run(demo, tmp_path):
    args = [
        "--arch",
        "swinunetr",
        "--method",
        "swin_ssl",
        "--patch",
        "64",
        "--batch",
        "1",
        "--workers",
        "0",
        "--quiet",
        "--steps",
        "1",
        "--log-every",
        "1",
        "--data",
        str(demo / "preprocessed"),
        "--out",
        str(tmp_path / "ssl"),
        "--no-preflight",  # its measurement is one more SwinUNETR step at 64^3; test_preflight.py tests it
    ]
    assert pretrain.main(args) == 0
    row = json.loads((tmp_path / "ssl" / "log.jsonl").read_text().splitlines()[0])
    assert all(math.isfinite(row[k]) for k in ("loss", "rot", "contrast", "rec"))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--arch", "unet_q"], "invalid choice: 'unet_q'"),
        (["--patch", "48", "--mask-token", "5"], "not divisible by --mask-token 5"),
        (["--arch", "unet_b", "--method", "swin_ssl"], "use --arch swinunetr"),
        (["--patch", "40"], "multiple of 16"),
    ],
)
def test_bad_flags_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.get_args(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_bad_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert pretrain.main(TINY + ["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no dataset.json" in err and "Traceback" not in err


def test_non_finite_losses_skip_then_stop(demo, tmp_path, monkeypatch, capsys):
    real = pretrain.compute_loss
    calls = []

    def nan_from_step_2(model, inp, target, a, key, autocast):
        loss, parts, out = real(model, inp, target, a, key, autocast)
        calls.append(key)
        return (loss * float("nan") if key[1] >= 2 else loss), parts, out

    monkeypatch.setattr(pretrain, "compute_loss", nan_from_step_2)
    run = tmp_path / "nan"
    assert (
        pretrain.main(
            TINY
            + [
                "--data",
                str(demo / "preprocessed"),
                "--out",
                str(run),
                "--steps",
                "10",
                "--max-bad-steps",
                "3",
                "--val-fraction",
                "0",
            ]
        )
        == 1
    )
    assert "stopped at step 4: 3 steps in a row had a non-finite loss or gradients" in capsys.readouterr().err
    rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "skipped" in r] == [2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows if r.get("loss") is not None)
    assert [r["loss"] is None for r in rows if "lr" in r and "skipped" not in r] == [False, False, True, True]
