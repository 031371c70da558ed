"""finetune.py --recipe bsf: BrainSegFounder's BraTS finetuning as their code ran it
(lab-smile/BrainSegFounder at c58e9e6, downstream/BraTS/finetuning/): the numbers, the
schedule, the loss, the transforms and the predictor against the reference code and MONAI."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

import data
import evaluate
import finetune

monai = pytest.importorskip("monai")


def test_bsf_recipe_is_the_reference_numbers():
    a = finetune.get_args(["--recipe", "bsf", "--pretrained", "none"])
    assert a.patch == 128  # launch.sh --roi_x/y/z=128
    assert (a.batch, a.batch_scope) == (2, "process")  # launch.sh l.28; data_utils.py l.166-174: per process
    assert a.epochs == 300  # main_FinetuningSwinUNETR_4Channels.py l.48 (launch.sh leaves --max_epochs out)
    assert a.steps_per_epoch is None  # one pass over the training list: derived in train() from n-train
    assert (a.optimizer, a.lr, a.wd) == ("adamw", 1e-4, 1e-5)  # main l.259-260, launch.sh l.29, main l.53
    assert (a.schedule, a.warmup_epochs, a.eta_min) == ("warmup_cosine", 50, 0.0)  # main l.85-86, l.268-271
    assert a.dtype == "fp32"  # launch.sh --noamp, main l.108
    assert (a.loss, a.dice_smooth, a.dice_background) == ("dice", 1e-5, "include")  # main l.218 DiceLoss defaults
    # data_utils.py l.122-133; main l.161-177 and l.189 (a fresh patch embedding, nothing tiled)
    assert (a.aug, a.sampler, a.grad_clip, a.tile_stem) == ("bsf", "bsf", 0.0, False)
    assert (a.val_every, a.val_cases, a.overlap) == (5, 0, 0.5)  # launch.sh --val_every=5, main l.84 (validation)
    assert (a.blend, a.tta, a.infer_overlap) == ("mean", False, 0.6)  # test.py l.31, l.87-93 (mode "constant")
    assert finetune.get_args(["--recipe", "bsf", "--pretrained", "none", "--dtype", "bf16"]).dtype == "bf16"
    assert finetune.get_args(["--pretrained", "none"]).dtype == "auto"  # amaes unchanged


class _RefScheduler(torch.optim.lr_scheduler.LRScheduler):
    """BrainSegFounder's LinearWarmupCosineAnnealingLR (optimizers/lr_scheduler.py l.20-82), the
    chainable form their scheduler.step() runs, written out."""

    def __init__(self, optimizer, warmup_epochs, max_epochs, warmup_start_lr=0.0, eta_min=0.0):
        self.warmup_epochs, self.max_epochs = warmup_epochs, max_epochs
        self.warmup_start_lr, self.eta_min = warmup_start_lr, eta_min
        super().__init__(optimizer, -1)

    def get_lr(self):
        e, w, m = self.last_epoch, self.warmup_epochs, self.max_epochs
        if e == 0:
            return [self.warmup_start_lr] * len(self.base_lrs)
        if e < w:
            return [
                g["lr"] + (b - self.warmup_start_lr) / (w - 1)
                for b, g in zip(self.base_lrs, self.optimizer.param_groups)
            ]
        if e == w:
            return self.base_lrs
        if (e - 1 - m) % (2 * (m - w)) == 0:
            return [
                g["lr"] + (b - self.eta_min) * (1 - math.cos(math.pi / (m - w))) / 2
                for b, g in zip(self.base_lrs, self.optimizer.param_groups)
            ]
        return [
            (1 + math.cos(math.pi * (e - w) / (m - w)))
            / (1 + math.cos(math.pi * (e - w - 1) / (m - w)))
            * (g["lr"] - self.eta_min)
            + self.eta_min
            for g in self.optimizer.param_groups
        ]


def test_warmup_cosine_is_their_scheduler():
    a = finetune.get_args(["--recipe", "bsf", "--pretrained", "none"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=a.lr)
    ref = _RefScheduler(opt, 50, 300)
    spe = 10  # 20 cases, batch 2
    for e in range(300):  # their trainer: one epoch at the scheduler's lr, then scheduler.step() (trainer.py l.225-226)
        want = opt.param_groups[0]["lr"]
        for s in (e * spe, e * spe + spe - 1):  # constant within the epoch
            assert finetune.lr_at(s, spe, 300, 300 * spe, a) == pytest.approx(want, rel=1e-9, abs=1e-15), e
        opt.step()
        ref.step()
    assert finetune.lr_at(0, spe, 300, 3000, a) == 0.0 and finetune.lr_at(490, spe, 300, 3000, a) == pytest.approx(a.lr)
    # --steps: a shorter run keeps the shape (warm-up shrinks in proportion, W = 1 trains the first epoch at 0)
    assert finetune.lr_at(0, 1, 300, 2, a) == 0.0 and finetune.lr_at(1, 1, 300, 2, a) == pytest.approx(a.lr)


def test_dice_loss_is_monais():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 8) * 3
    regions = (torch.rand(2, 3, 8, 8, 8) < 0.3).float()
    regions[1, 2] = 0  # an empty region: MONAI's smooth_nr / smooth_dr 1e-5 decide it
    ref = monai.losses.DiceLoss(to_onehot_y=False, sigmoid=True)(logits, regions)  # main l.218
    ours = finetune.seg_loss(logits, regions, "dice", 1e-5, True, regions=True)
    assert torch.allclose(ours, ref, atol=1e-6)
    # a dataset without regions: softmax classes, the same Dice over the one-hot classes, background included
    seg = torch.randint(0, 3, (2, 8, 8, 8))
    ref = monai.losses.DiceLoss(to_onehot_y=True, softmax=True)(logits, seg[:, None])
    assert torch.allclose(finetune.seg_loss(logits, seg, "dice", 1e-5, True), ref, atol=1e-6)


def test_bsf_rows_fire_as_their_transforms():
    draws = [data.draw_params(0, k, "bsf", 4, (32,) * 3) for k in range(4000)]
    mirror = np.array([d["spatial"]["mirror"] for d in draws])  # RandFlipd(prob=0.5) on each axis, data_utils l.128-130
    assert mirror.shape == (4000, 3) and np.all(np.abs(mirror.mean(0) - 0.5) < 0.03)
    assert all(set(d["spatial"]) == {"_crop", "mirror"} for d in draws)  # no rotation, no scaling
    f = np.array([d["intensity"]["bsf_scale"] for d in draws])  # prob=1.0: every sample, one number for all channels
    o = np.array([d["intensity"]["bsf_shift"] for d in draws])
    assert f.min() >= -0.1 and f.max() <= 0.1 and abs(f.mean()) < 0.005
    assert np.std(f) == pytest.approx(0.2 / 12**0.5, rel=0.05)  # uniform, not a few values
    assert o.min() >= -0.1 and o.max() <= 0.1 and abs(o.mean()) < 0.005
    # each against MONAI's transform on its own draw
    x = torch.rand(4, 6, 7, 8)
    t = monai.transforms.RandScaleIntensity(factors=0.1, prob=1.0)
    t.set_random_state(3)
    got = t(x)
    assert torch.allclose(torch.as_tensor(got), data.bsf_scale(x, t.factor), atol=1e-6)
    t = monai.transforms.RandShiftIntensity(offsets=0.1, prob=1.0)
    t.set_random_state(3)
    got = t(x)
    assert torch.allclose(torch.as_tensor(got), data.bsf_shift(x, t._offset), atol=1e-6)
    # the whole sample: flips (labels too), then x (1 + f) + o, nothing clipped
    p = dict(draws[7], clip=False)
    lab = torch.randint(0, 3, (32, 32, 32))
    img = torch.rand(4, 32, 32, 32)
    out, lo = data.augment_sample(img, p, (32,) * 3, label=lab)
    dims = [d + 1 for d, m in enumerate(p["spatial"]["mirror"]) if m]
    want = img.flip(dims) * (1 + p["intensity"]["bsf_scale"]) + p["intensity"]["bsf_shift"]
    assert torch.allclose(out, want, atol=1e-6) and torch.equal(lo, lab.flip([d - 1 for d in dims]))


def test_bsf_sampler_is_cropforeground_then_randspatialcrop(demo):
    ds = data.SegDataset(demo / "preprocessed", patch=32, preset="bsf", seed=0, sampler="bsf", fg_p=0.33)
    crop = monai.transforms.CropForeground(select_fn=lambda v: v > 0, k_divisible=32)  # data_utils l.122-124
    for k in range(12):
        case, img, seg, fg, start = ds.crop(k)
        vol = np.asarray(ds.image(case), dtype=np.float32)
        box = np.asarray(crop(torch.from_numpy(vol)))  # (C, N0, N1, N2), each N a multiple of 32
        lo = np.argwhere(np.any(vol > 0, 0)).min(0)
        n = np.argwhere(np.any(vol > 0, 0)).max(0) + 1 - lo
        # the start inside the box: the box begins floor((N - n) / 2) before the non-zero voxels
        off = [s - (int(a) - (-(-int(m) // 32) * 32 - int(m)) // 2) for s, a, m in zip(start, lo, n)]
        assert all(0 <= u <= b - 32 for u, b in zip(off, box.shape[1:])) and fg is None  # no foreground forcing
        assert np.array_equal(img, box[:, off[0] : off[0] + 32, off[1] : off[1] + 32, off[2] : off[2] + 32]), k


class _Positional(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + torch.linspace(0, 1, x.shape[2]).view(1, 1, -1, 1, 1)


def test_mean_blending_is_monais_constant_mode():
    inferers = pytest.importorskip("monai.inferers")
    torch.manual_seed(0)
    model = _Positional().eval()
    x = torch.rand(1, 1, 40, 12, 33)  # one axis shorter than the window: padded as MONAI pads (d // 2 before)
    with torch.no_grad():
        for overlap in (0.5, 0.6):  # validation (main l.84), test (test.py l.31)
            ours = evaluate.sliding_window(model, x[0], 16, overlap, "mean")
            ref = inferers.sliding_window_inference(x, (16,) * 3, 4, model, overlap=overlap, mode="constant")[0]
            assert torch.allclose(ours, ref, atol=1e-5), overlap


def test_bsf_end_to_end_and_evaluate_reads_it(demo, tmp_path):
    data_dir = tmp_path / "pre"
    shutil.copytree(demo / "preprocessed", data_dir)
    ds = json.loads((data_dir / "dataset.json").read_text())
    fg = [v for v in ds["label_values"] if v]
    ds["training_regions"] = {"all": fg, "first": fg[:1]}  # sigmoid regions, as BraTS's TC / WT / ET
    ds["regions_class_order"] = [fg[-1], fg[0]]
    (data_dir / "dataset.json").write_text(json.dumps(ds))
    out = tmp_path / "ft"
    assert (
        finetune.main(
            [
                "--recipe",
                "bsf",
                "--arch",
                "unet_b",
                "--pretrained",
                "none",
                "--patch",
                "32",
                "--steps",
                "2",
                "--n-train",
                "2",
                "--workers",
                "0",
                "--quiet",
                "--data",
                str(data_dir),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    args = json.loads((out / "args.json").read_text())
    assert (args["steps_per_epoch"], args["batch"], args["dtype"], args["loss"], args["aug"], args["schedule"]) == (
        1,
        2,
        "fp32",
        "dice",
        "bsf",
        "warmup_cosine",
    )  # 2 cases / batch 2 = one step per epoch
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["n_outputs"] == 2 and ck["inference"] == {"blend": "mean", "tta": False, "steps": "yucca", "overlap": 0.6}
    assert evaluate.main(["--run", str(out), "--quiet", "--no-pictures"]) == 0
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert m["settings"] == {"overlap": 0.6, "blend": "mean", "tta": False}
