"""The papers' pretraining recipes (pretrain.py --recipe) and the finetuning
recipe of Wald et al., pinned to the published numbers; schedules against their
formulas; the BrainSegFounder two-stage chain at toy size."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

import data
import finetune
import pretrain


def test_recipes_resolve_to_the_published_numbers():
    a = pretrain.get_args([])
    assert (
        a.recipe,
        a.method,
        a.arch,
        a.optimizer,
        a.lr,
        a.wd,
        a.schedule,
        a.warmup_epochs,
        a.warmup_start,
        a.epochs,
        a.patch,
        a.batch,
        a.mask_ratio_range,
        a.mask_token,
        a.loss_on,
        a.aug,
        a.grad_clip,
    ) == (
        "amaes",
        "amaes",
        "unet_b",
        "adamw",
        1e-4,
        0.01,
        "cosine",
        5.0,
        1e-3,
        100,
        128,
        8,
        [0.6, 0.6],
        4,
        "all",
        "all",
        0.0,
    )
    t = pretrain.get_args(["--recipe", "tang"])
    assert (
        t.method,
        t.arch,
        t.optimizer,
        t.lr,
        t.wd,
        t.warmup_steps,
        t.warmup_start,
        t.schedule,
        t.dtype,
        t.patch,
        t.epochs,
    ) == ("swin_ssl", "swinunetr", "adamw", 4e-4, 0.1, 500, 0.0, "cosine", "fp16", 128, 100)
    w = pretrain.get_args(["--recipe", "wald"])
    assert (
        w.method,
        w.arch,
        w.optimizer,
        w.lr,
        w.wd,
        w.schedule,
        w.epochs,
        w.steps_per_epoch,
        w.batch,
        w.patch,
        w.grad_clip,
        w.mask_token,
        w.mask_ratio_range,
        w.loss_on,
        w.aug,
        w.dtype,
    ) == (
        "mae",
        "resenc_l",
        "sgd",
        1e-2,
        3e-5,
        "poly",
        1000,
        250,
        8,
        160,
        12.0,
        16,
        [0.75, 0.75],
        "masked",
        "wald",
        "fp16",
    )
    assert w.epochs * w.steps_per_epoch == 250_000
    # one flag overrides one number, the rest stays the recipe's
    o = pretrain.get_args(["--recipe", "wald", "--lr", "3e-3"])
    assert o.lr == 3e-3 and (o.optimizer, o.wd, o.grad_clip, o.patch) == ("sgd", 3e-5, 12.0, 160)
    assert pretrain.get_args(["--recipe", "wald", "--mask-ratio", "0.75"]).mask_ratio_range == [0.75, 0.75]
    assert pretrain.get_args(["--method", "mae"]).aug == "none"  # AMAES's plain-MAE ablation
    r = data.WALD
    assert (r["elastic"], r["rotation"], r["rotation_axis"], r["scale"], r["scale_range"], r["mirror"]) == (
        0,
        0.2,
        1.0,
        0.2,
        (0.7, 1.4),
        1.0,
    )


def test_tang_and_wald_schedules_follow_their_formulas():
    total, lr = 2000, 4e-4
    for s in (0, 250, 499):  # Tang: WarmupCosineSchedule, linear from 0 over 500 steps
        assert pretrain.lr_at(s, total, 500, lr, 0.0) == pytest.approx(lr * s / 500)
    for s in (500, 1200, 1999):  # then a half cosine to 0 at t_total
        assert pretrain.lr_at(s, total, 500, lr, 0.0) == pytest.approx(
            lr * 0.5 * (1 + math.cos(math.pi * (s - 500) / 1500))
        )
    for s in (0, 249, 250, 124_999, 249_999):  # Wald: PolyLR per epoch of 250 steps, 1000 epochs
        assert pretrain.lr_at(s, 250_000, 0, 1e-2, schedule="poly", steps_per_epoch=250) == pytest.approx(
            1e-2 * (1 - (s // 250) / 1000) ** 0.9
        )


def test_wald_optimiser_clip_and_per_batch_mask_ratio(demo, tmp_path, monkeypatch):
    clips, ratios = [], []
    real_clip, real_mask = torch.nn.utils.clip_grad_norm_, data.random_mask

    def clip(params, max_norm, *a, **k):
        clips.append(max_norm)
        return real_clip(params, max_norm, *a, **k)

    def mask(x, ratio=0.6, token=4, generator=None):
        ratios.append(float(ratio))
        return real_mask(x, ratio, token, generator)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(data, "random_mask", mask)
    seen = {}
    real_opt = pretrain.make_optimizer

    def spy(*args, **kw):
        seen["opt"] = real_opt(*args, **kw)
        return seen["opt"]

    monkeypatch.setattr(pretrain, "make_optimizer", spy)
    run = tmp_path / "wald"
    assert (
        pretrain.main(
            [
                "--recipe",
                "wald",
                "--arch",
                "unet_b",
                "--patch",
                "32",
                "--batch",
                "2",
                "--steps",
                "6",
                "--workers",
                "0",
                "--quiet",
                "--val-fraction",
                "0",
                "--data",
                str(demo / "preprocessed"),
                "--out",
                str(run),
                "--mask-ratio-range",
                "0.6",
                "0.9",
            ]
        )
        == 0
    )  # the SparK variant's per-batch ratio, as a flag
    g = seen["opt"].param_groups[0]
    assert (
        isinstance(seen["opt"], torch.optim.SGD)
        and g["momentum"] == 0.99
        and g["nesterov"]
        and g["weight_decay"] == 3e-5
    )
    assert clips == [12.0] * 6
    assert len(ratios) == 6 and all(0.6 <= r <= 0.9 for r in ratios) and len(set(ratios)) == 6  # one per batch
    args = json.loads((run / "args.json").read_text())
    assert args["loss_on"] == "masked" and args["aug"] == "wald" and args["dtype"] == "fp32"  # fp16 AMP only on GPUs


def test_masked_loss_ignores_visible_voxels():
    a = pretrain.get_args(["--recipe", "wald", "--arch", "unet_b", "--patch", "32"])
    target = torch.rand(2, 1, 32, 32, 32)

    def net(x):  # predicts the target exactly where masked (0), garbage where visible
        return torch.where(x == 0, target, torch.full_like(x, 9.0))

    loss, _, (masked, _, _) = pretrain.compute_loss(
        net, target.clone() + 1, target, a, (0, 0, 0), torch.autocast("cpu", enabled=False)
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and (masked == 0).any()


def channels_copy(src, dst, n, labelled=True):
    """A copy of a preprocessed dataset with each image repeated to n channels."""
    shutil.copytree(src, dst)
    for f in (dst / "images").iterdir():
        np.save(f, np.repeat(np.load(f), n, axis=0))
    ds = json.loads((dst / "dataset.json").read_text())
    ds["n_channels"] = n
    ds["channels"] = {str(i): f"ch{i}" for i in range(n)}
    if not labelled:
        ds["labelled"], ds["label_values"] = False, None
        shutil.rmtree(dst / "labels")
    (dst / "dataset.json").write_text(json.dumps(ds))
    return dst


@pytest.mark.slow
def test_brainsegfounder_two_stage_chain(demo, tmp_path, capsys):
    """Stage 1: SwinUNETR-SSL on a 2-channel (T1 + T2-FLAIR-like) cohort; stage 2: the
    same SSL on the task's 4-channel images, the stem and the reconstruction output
    re-initialised; then finetuning that loads the whole encoder."""
    two = channels_copy(demo / "preprocessed", tmp_path / "two", 2, labelled=False)
    four = channels_copy(demo / "preprocessed", tmp_path / "four", 4)
    ssl = ["--patch", "64", "--batch", "1", "--steps", "1", "--workers", "0", "--quiet", "--val-fraction", "0"]
    assert pretrain.main(["--recipe", "bsf1"] + ssl + ["--data", str(two), "--out", str(tmp_path / "stage1")]) == 0
    assert torch.load(tmp_path / "stage1" / "encoder.pt", weights_only=True)["in_channels"] == 2
    capsys.readouterr()
    assert (
        pretrain.main(
            ["--recipe", "bsf2"]
            + ssl
            + ["--data", str(four), "--init", str(tmp_path / "stage1" / "ckpt.pt"), "--out", str(tmp_path / "stage2")]
        )
        == 0
    )
    said = capsys.readouterr().out
    reinit = said.split("re-initialised")[1]
    assert (
        "encoder.patch_embed.proj.weight" in reinit and "decoder.conv.20.weight" in reinit
    )  # stem and output: 2 -> 4 channels
    assert "re-initialised 3:" in said  # nothing else
    capsys.readouterr()
    assert (
        finetune.main(
            [
                "--patch",
                "64",
                "--batch",
                "1",
                "--steps",
                "1",
                "--n-train",
                "2",
                "--workers",
                "0",
                "--quiet",
                "--data",
                str(four),
                "--pretrained",
                str(tmp_path / "stage2" / "encoder.pt"),
                "--out",
                str(tmp_path / "ft"),
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert "freshly initialised (4 input channels)" not in said and "encoder tensors loaded" in said


def test_wald_finetuning_recipe_and_schedule():
    a = finetune.get_args(["--recipe", "wald", "--pretrained", "none"])
    assert (
        a.optimizer,
        a.lr,
        a.wd,
        a.schedule,
        a.warmup_epochs,
        a.epochs,
        a.steps_per_epoch,
        a.batch,
        a.patch,
        a.dice_background,
        a.dice_smooth,
        a.grad_clip,
        a.tile_stem,
    ) == (
        "sgd",
        1e-2,
        3e-5,
        "warmup_poly",
        50,
        1000,
        250,
        2,
        160,
        "exclude",
        1e-5,
        12.0,
        True,
    )  # nnUNetTrainer clips at 12; PretrainedTrainer tiles the stem
    total = 1000 * 250  # from scratch lr 1e-2 (PretrainedTrainer, use_pretrained_weights False); 1e-3 with weights
    for e in (0, 25, 49):  # Lin_incr_LRScheduler: max_lr / 50 * (1 + epoch)
        assert finetune.lr_at(e * 250 + 3, 250, 1000, total, a) == pytest.approx(1e-2 / 50 * (1 + e))
    for e in (50, 400, 999):  # PolyLRScheduler_offset: (1 - (epoch - 50) / 950) ** 0.9
        assert finetune.lr_at(e * 250, 250, 1000, total, a) == pytest.approx(1e-2 * (1 - (e - 50) / 950) ** 0.9)
    b = finetune.get_args(["--pretrained", "none"])
    assert (b.optimizer, b.schedule, b.dice_background, b.grad_clip, b.tile_stem) == (
        "adamw",
        "cosine",
        "include",
        0.0,
        False,
    )
    assert finetune.get_args(["--recipe", "wald", "--pretrained", "none", "--no-tile-stem"]).tile_stem is False
    seg = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    seg[:, 2:5, 2:5, 2:5] = 1
    flat = torch.zeros(1, 2, 8, 8, 8)  # p = 0.5 everywhere: Dice of the foreground class only
    d1 = (2 * 0.5 * 27 + 1e-5) / (0.5 * 512 + 27 + 1e-5)
    assert finetune.seg_loss(flat, seg, "dice", 1e-5, background=False).item() == pytest.approx(1 - d1, rel=1e-5)
