"""Pre-flight: the memory estimate against a measurement, and a run that cannot fit
stopping in one line, before any work, with settings that would fit."""

import json
import re

import pytest
import torch

import pretrain
import training
from models import build_model


def measured(model, patch, batch, tmp):
    """The peak memory of a real training step at this size, independently of the
    estimate's probes: torch.profiler's allocator counter over one forward + loss +
    backward + AdamW step (after a warm-up step made the optimiser's moments), from
    which what was allocated before the step is taken out, plus the weights and
    moments that were."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, patch, patch, patch)

    def step():
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    prof.export_chrome_trace(str(tmp / "trace.json"))
    mem = [
        e["args"]
        for e in json.loads((tmp / "trace.json").read_text())["traceEvents"]
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0
    ]
    before = mem[0]["Total Allocated"] - mem[0]["Bytes"]  # the counter is process-wide
    n = sum(p.numel() for p in model.parameters())
    return max(m["Total Allocated"] for m in mem) - before + 3 * n * 4  # weights + two AdamW moments


# U-Net B and MedNeXt-S at 32^3 and 48^3, with and without activation checkpointing.
# (bf16 is left to the GPU: its convolutions on this CPU take minutes per probe.)
@pytest.mark.parametrize(
    "arch,patch,batch,ckpt",
    [
        ("unet_b", 32, 1, False),
        ("unet_b", 48, 1, False),
        ("unet_b", 48, 2, False),
        ("unet_b", 48, 2, True),
        ("mednext_s", 32, 2, False),
        ("mednext_s", 32, 2, True),
        ("mednext_s", 48, 1, False),
    ],
)
def test_estimate_within_25_percent_of_a_profiled_step(arch, patch, batch, ckpt, tmp_path):
    model = build_model(arch, 1, mode="pretrain", checkpointing=ckpt)
    est = training.estimate_memory(model, patch, batch, "fp32", ckpt)
    assert est["total"] == pytest.approx(measured(model, patch, batch, tmp_path), rel=0.25)


def test_estimate_is_linear_in_batch_and_leaves_the_model_as_it_was():
    model = build_model("unet_b", 1, mode="pretrain")
    one, four = (training.estimate_memory(model, 48, b) for b in (1, 4))
    assert four["activations"] == pytest.approx(4 * one["activations"], rel=1e-6)
    assert (
        four["weights"] == one["weights"]
        and four["optimizer"] == 2 * four["weights"]
        and four["fixed"] == one["fixed"] < 2**20
    )  # fp32: only the norms' per-channel statistics
    ck = training.estimate_memory(model, 48, 4, checkpointing=True)
    assert ck["activations"] < 0.9 * four["activations"]
    # the probe switches checkpointing while it measures: a run asked for it keeps it
    model.set_checkpointing(True).eval()
    training.estimate_memory(model, 48, 1)
    assert not model.training and all(m.checkpointing for m in model.modules() if hasattr(m, "checkpointing"))
    model.set_checkpointing(False)
    training.estimate_memory(model, 48, 1, checkpointing=True)
    assert not any(m.checkpointing for m in model.modules() if hasattr(m, "checkpointing"))


def test_bf16_keeps_half_width_maps_and_one_copy_of_the_weights():
    model = build_model("unet_b", 1, mode="pretrain")
    fp32, bf16 = (training.estimate_memory(model, 128, 8, d) for d in ("fp32", "bf16"))
    # autocast saves the convolutions' inputs in bf16 (2 of 4 bytes); the norms keep some fp32
    assert 0.45 < bf16["activations"] / fp32["activations"] < 0.8
    # the bf16 copies of the weights, once for the step, not per sample: 2 bytes each
    assert bf16["fixed"] == pytest.approx(2 * sum(p.numel() for p in model.parameters()), rel=0.01)


def run(demo, tmp_path, *extra):
    return pretrain.main(
        ["--data", str(demo / "preprocessed"), "--out", str(tmp_path / "r"), "--workers", "0", "--quiet", *extra]
    )


def test_too_little_memory_stops_before_the_first_step_with_a_setting_that_fits(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "available_memory", lambda device: 12 * 2**30)
    started = []
    monkeypatch.setattr(training, "make_loader", lambda *a, **k: started.append(1))
    assert run(demo, tmp_path, "--arch", "unet_xl") == 2  # the paper's 128^3 x 8 on a 12 GB machine
    err = capsys.readouterr().err
    assert not started and len(err.strip().splitlines()) == 1 and "pre-flight: RAM: the run needs about" in err
    setting = re.search(r"would fit: (.*?)(?: or |\s\()", err).group(1).split()
    kw = dict(zip(setting[::2], map(int, setting[1::2])))
    model = build_model("unet_xl", 1, mode="pretrain")
    est = training.estimate_memory(model, kw.get("--patch", 128), kw.get("--batch", 8))
    assert est["total"] <= 12 * 2**30  # the suggestion fits by the estimate


def test_small_shm_and_full_disk(demo, tmp_path, monkeypatch, capsys):
    args = ["--patch", "32", "--batch", "2", "--steps", "1"]
    monkeypatch.setattr(training, "free_shm", lambda: 2**20)  # Docker's default is 64 MB; here 1 MB
    assert (
        pretrain.main(
            ["--data", str(demo / "preprocessed"), "--out", str(tmp_path / "a"), "--workers", "2", "--quiet", *args]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "pre-flight: /dev/shm: 2 DataLoader workers hold about 2 MB" in err and "1 MB are free" in err
    assert int(re.search(r"use --workers (\d+)", err).group(1)) < 2 and "--shm-size" in err
    monkeypatch.undo()
    monkeypatch.setattr(training, "free_disk", lambda path: 10 * 2**20)
    assert run(demo, tmp_path, *args) == 2
    assert "pre-flight: disk: the checkpoints need about" in capsys.readouterr().err


def test_no_preflight_skips_it(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "available_memory", lambda device: 1)
    assert run(demo, tmp_path, "--patch", "32", "--batch", "2", "--steps", "1") == 2
    assert run(demo, tmp_path, "--patch", "32", "--batch", "2", "--steps", "1", "--no-preflight") == 0
