"""Pre-flight: the memory estimate against a measurement, and a run that cannot fit
stopping in one line, before any work, with settings that would fit."""
import re

import pytest
import torch

import pretrain
import training
from models import build_model


def measured(model, patch, batch):
    """The memory of a real step at this size, measured independently of the estimate's
    probe: the storages autograd keeps (saved-tensor hooks on the real forward), plus
    weights, gradients and AdamW's two moments counted from the parameters."""
    kept = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            kept[s.data_ptr()] = s.nbytes()
        return t
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(torch.rand(batch, 1, patch, patch, patch))
    y.float().mean().backward()
    model.zero_grad(set_to_none=True)
    n = sum(p.numel() for p in model.parameters())
    return sum(kept.values()) + 4 * n * 4  # weights, gradients, 2 AdamW moments: 4 bytes each


@pytest.mark.parametrize("arch", ["unet_b", "mednext_s"])
def test_estimate_within_25_percent_and_linear_in_batch(arch):
    model = build_model(arch, 1, mode="pretrain")
    for patch in (32, 48):
        est = training.estimate_memory(model, patch, 2)
        assert est["total"] == pytest.approx(measured(model, patch, 2), rel=0.25), (arch, patch)
    one, four = (training.estimate_memory(model, 48, b) for b in (1, 4))
    assert four["activations"] == pytest.approx(4 * one["activations"], rel=1e-6)
    assert four["weights"] == one["weights"] and four["optimizer"] == 2 * four["weights"]


def run(demo, tmp_path, *extra):
    return pretrain.main(["--data", str(demo / "preprocessed"), "--out", str(tmp_path / "r"), "--workers", "0", "--quiet", *extra])


def test_too_little_memory_stops_before_the_first_step_with_a_setting_that_fits(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "available_memory", lambda device: 12 * 2 ** 30)
    started = []
    monkeypatch.setattr(training, "make_loader", lambda *a, **k: started.append(1))
    assert run(demo, tmp_path, "--arch", "unet_xl") == 2  # the paper's 128^3 x 8 on a 12 GB machine
    err = capsys.readouterr().err
    assert not started and len(err.strip().splitlines()) == 1 and "pre-flight: RAM: the run needs about" in err
    setting = re.search(r"would fit: (.*?)(?: or |\s\()", err).group(1).split()
    kw = dict(zip(setting[::2], map(int, setting[1::2])))
    model = build_model("unet_xl", 1, mode="pretrain")
    est = training.estimate_memory(model, kw.get("--patch", 128), kw.get("--batch", 8))
    assert est["total"] <= 12 * 2 ** 30  # the suggestion fits by the estimate


def test_small_shm_and_full_disk(demo, tmp_path, monkeypatch, capsys):
    args = ["--patch", "32", "--batch", "2", "--steps", "1"]
    monkeypatch.setattr(training, "free_shm", lambda: 2 ** 20)  # Docker's default is 64 MB; here 1 MB
    assert pretrain.main(["--data", str(demo / "preprocessed"), "--out", str(tmp_path / "a"), "--workers", "2", "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert "pre-flight: /dev/shm: 2 DataLoader workers hold about 2 MB" in err and "1 MB are free" in err
    assert int(re.search(r"use --workers (\d+)", err).group(1)) < 2 and "--shm-size" in err
    monkeypatch.undo()
    monkeypatch.setattr(training, "free_disk", lambda path: 10 * 2 ** 20)
    assert run(demo, tmp_path, *args) == 2
    assert "pre-flight: disk: two checkpoints need about" in capsys.readouterr().err


def test_no_preflight_skips_it(demo, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "available_memory", lambda device: 1)
    assert run(demo, tmp_path, "--patch", "32", "--batch", "2", "--steps", "1") == 2
    assert run(demo, tmp_path, "--patch", "32", "--batch", "2", "--steps", "1", "--no-preflight") == 0
