"""The baselines as their own code ran them (issue 24): each recipe's numbers against the
reference code's, nnU-Net's augmentation rows against their formulas (batchgeneratorsv2),
nnU-Net's sampler, and Gaussian blending + mirroring against MONAI's sliding window."""

import json
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import data
import evaluate
import finetune
import pretrain
from training import UserError, process_batch

# -----------------------------------------------------------------------------
# Recipes


def test_pretraining_recipes_are_the_reference_numbers():
    w = pretrain.get_args(["--recipe", "wald"])  # nnssl BaseMAETrainer_BS8 / AbstractTrainer
    assert (
        w.mask_ratio_range,
        w.batch,
        w.batch_scope,
        w.patch,
        w.mask_token,
        w.lr,
        w.wd,
        w.optimizer,
        w.schedule,
        w.epochs,
        w.steps_per_epoch,
        w.grad_clip,
        w.aug,
    ) == ([0.75, 0.75], 8, "total", 160, 16, 1e-2, 3e-5, "sgd", "poly", 1000, 250, 12.0, "wald")
    # the SparK variant's ratio stays a flag
    assert pretrain.get_args(["--recipe", "wald", "--mask-ratio-range", "0.6", "0.9"]).mask_ratio_range == [0.6, 0.9]
    t = pretrain.get_args(["--recipe", "tang"])  # main.py defaults with --lrdecay, at AMAES's 128^3 / 100 epochs
    assert (
        t.lr,
        t.wd,
        t.warmup_steps,
        t.warmup_start,
        t.schedule,
        t.batch,
        t.crops_per_volume,
        t.batch_scope,
        t.dtype,
        t.patch,
        t.epochs,
        t.grad_clip,
    ) == (4e-4, 0.1, 500, 0.0, "cosine", 4, 2, "process", "fp16", 128, 100, 0.0)
    b1 = pretrain.get_args(["--recipe", "bsf1"])  # BrainSegFounder pretrain/README.md: --epochs 300 --lr 5e-4
    assert (
        b1.method,
        b1.arch,
        b1.lr,
        b1.wd,
        b1.schedule,
        b1.epochs,
        b1.steps,
        b1.patch,
        b1.batch,
        b1.crops_per_volume,
        b1.dtype,
    ) == ("swin_ssl", "swinunetr", 5e-4, 0.1, "constant", 300, 100_000, 96, 4, 2, "fp16")
    b2 = pretrain.get_args(["--recipe", "bsf2"])  # downstream/BraTS/ssl/launch.sh
    assert (
        b2.method,
        b2.arch,
        b2.lr,
        b2.wd,
        b2.schedule,
        b2.warmup_steps,
        b2.epochs,
        b2.steps,
        b2.patch,
        b2.batch,
        b2.crops_per_volume,
        b2.dtype,
    ) == ("swin_ssl", "swinunetr", 6e-6, 0.1, "cosine", 500, 100, 50_000, 96, 4, 2, "fp32")
    for r in pretrain.RECIPES:  # every recipe says how its batch counts
        assert pretrain.get_args(["--recipe", r]).batch_scope in ("process", "total")
    assert pretrain.lr_at(1234, 100_000, 0, 5e-4, schedule="constant") == 5e-4


def test_finetuning_recipe_wald_is_nnssls_trainer(tmp_path):
    s = finetune.get_args(["--recipe", "wald", "--pretrained", "none"])  # from scratch: nnU-Net's 1e-2
    assert (s.lr, s.batch, s.batch_scope, s.aug, s.sampler, s.fg_p, s.interp, s.blend, s.tta) == (
        1e-2,
        2,
        "total",
        "nnunet",
        "nnunet",
        0.33,
        "linear",
        "gaussian",
        True,
    )
    f = tmp_path / "enc.pt"
    f.write_bytes(b"x")
    p = finetune.get_args(["--recipe", "wald", "--pretrained", str(f)])  # PretrainedTrainer: 1e-3
    assert (p.lr, p.aug, p.warmup_epochs) == (1e-3, "nnunet", 50)
    assert finetune.get_args(["--recipe", "wald", "--pretrained", "none", "--lr", "3e-3"]).lr == 3e-3
    a = finetune.get_args(["--pretrained", "none"])  # AMAES: unchanged
    assert (a.lr, a.batch, a.batch_scope, a.aug, a.sampler, a.interp, a.blend, a.tta) == (
        1e-4,
        8,
        "process",
        "all",
        "yucca",
        "cubic",
        "sum",
        False,
    )


def test_batch_scope_and_precrop():
    assert (
        process_batch(8, "process", 4) == 8 and process_batch(8, "total", 4) == 2 and process_batch(8, "total", 1) == 8
    )
    with pytest.raises(UserError, match="--batch 8"):
        process_batch(8, "total", 3)
    # get_patch_size(patch, +-30 deg on each axis, scale 0.85): 257 for nnssl's 160
    assert data.initial_patch_size((160,) * 3) == (257,) * 3 and data.initial_patch_size((128,) * 3) == (205,) * 3


def test_wald_run_records_the_batch_scope(demo, tmp_path, capsys):
    run = tmp_path / "w"
    flags = [
        "--recipe",
        "wald",
        "--arch",
        "unet_b",
        "--patch",
        "32",
        "--batch",
        "2",
        "--workers",
        "0",
        "--quiet",
        "--val-fraction",
        "0",
        "--data",
        str(demo / "preprocessed"),
        "--out",
        str(run),
    ]
    assert pretrain.main(flags + ["--steps", "1"]) == 0
    args = json.loads((run / "args.json").read_text())
    assert (args["batch"], args["batch_scope"], args["mask_ratio_range"]) == (2, "total", [0.75, 0.75])
    assert "batch 2 in total over the processes" in capsys.readouterr().out
    # a run saved before --batch-scope existed read its batch per process, and continues so
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    del ck["args"]["batch_scope"]
    torch.save(ck, run / "ckpt.pt")
    assert pretrain.main(flags + ["--steps", "2", "--resume"]) == 0
    assert "(--batch 2 per process)" in capsys.readouterr().out


def test_crops_per_volume_share_a_case(demo):
    ds = data.PretrainDataset(demo / "preprocessed", patch=32, preset="none", crops=2)
    cases = [ds.pick(k)[0] for k in range(12)]
    assert all(cases[2 * j] == cases[2 * j + 1] for j in range(6))
    assert len(set(cases[::2])) == len(set(ds.cases))  # one pass: every volume once
    # nnssl's pre-crop for the wald preset: get_patch_size(32) / 0.85 = 51
    assert data.PretrainDataset(demo / "preprocessed", patch=32, preset="wald").region_size() == (51, 51, 51)


def test_tang_cutout_bounds_are_exclusive(monkeypatch):
    drawn = []
    real = torch.randint

    def spy(low, high, *a, **k):
        drawn.append((low, high))
        return real(low, high, *a, **k)

    monkeypatch.setattr(torch, "randint", spy)
    data.cutout(torch.zeros(1, 96, 96, 96), generator=torch.Generator().manual_seed(0))
    # numpy randint(0, h - tolr) and randint(tolr, int(0.25 h)): tolr = int(0.05 * 96) = 4, 0.25 * 96 = 24
    assert (0, 92) in drawn and (4, 24) in drawn and not any(h in (93, 25) for _, h in drawn)


# -----------------------------------------------------------------------------
# nnU-Net's augmentation (batchgeneratorsv2 as nnUNetTrainer.get_training_transforms sets it)


def test_nnunet_rows_fire_at_their_rates_and_ranges():
    n, ch = 6000, 2
    draws = [data.draw_params(0, k, "nnunet", ch, (32, 32, 32)) for k in range(n)]
    rate = lambda f: sum(map(f, draws)) / n  # noqa: E731
    tol = 3.5 * math.sqrt(0.25 / n)
    for row, p in (
        ("nn_noise", 0.1),
        ("nn_brightness", 0.15),
        ("nn_contrast", 0.15),
        ("nn_gamma_invert", 0.1),
        ("nn_gamma", 0.3),
    ):
        assert rate(lambda d: row in d["intensity"]) == pytest.approx(p, abs=tol), row
    # blur 0.2 then 0.5 per channel, low resolution 0.25 then 0.5 per channel: per channel 0.1 and 0.125
    assert rate(lambda d: d["intensity"].get("nn_blur", [None] * ch)[0] is not None) == pytest.approx(0.1, abs=tol)
    assert rate(lambda d: d["intensity"].get("nn_lowres", [None] * ch)[1] is not None) == pytest.approx(0.125, abs=tol)
    assert rate(lambda d: "rotation" in d["spatial"]) == pytest.approx(0.2, abs=tol)
    assert rate(lambda d: "scale" in d["spatial"]) == pytest.approx(0.2, abs=tol)
    assert rate(lambda d: d["spatial"]["mirror"][2]) == pytest.approx(0.5, abs=tol)
    assert not any("elastic" in d["spatial"] for d in draws)
    rot = np.array([d["spatial"]["rotation"] for d in draws if "rotation" in d["spatial"]])
    assert np.all(np.abs(rot) <= 30) and np.all(rot != 0)  # every axis, +-30 degrees
    sc = np.array([d["spatial"]["scale"] for d in draws if "scale" in d["spatial"]])
    assert sc.min() >= 0.7 and sc.max() <= 1.4 and np.mean(sc < 1) == pytest.approx(0.3 / 0.7, abs=0.06)  # U(0.7, 1.4)
    sig = np.array([d["intensity"]["nn_noise"] for d in draws if "nn_noise" in d["intensity"]])
    assert sig.min() >= 0 and sig.max() <= 0.1
    bl = np.array([s for d in draws for s in d["intensity"].get("nn_blur", []) if s is not None])
    assert bl.shape[1] == 3 and bl.min() >= 0.5 and bl.max() <= 1.0 and len(np.unique(bl[:, 0] - bl[:, 1])) > 1
    for row, lo, hi in (("nn_brightness", 0.75, 1.25), ("nn_contrast", 0.75, 1.25), ("nn_gamma", 0.7, 1.5)):
        v = np.array([x for d in draws for x in d["intensity"].get(row, [])])
        assert v.min() >= lo and v.max() <= hi and np.mean(v < 1) == pytest.approx(0.5, abs=0.06), row  # BGContrast
    lr = np.array([x for d in draws for x in d["intensity"].get("nn_lowres", []) if x is not None])
    assert lr.min() >= 0.5 and lr.max() <= 1.0


def test_wald_scales_are_batchgenerators_draws():
    sc = np.array(
        [
            d["spatial"]["scale"]
            for d in (data.draw_params(1, k, "wald", 1, (32,) * 3) for k in range(4000))
            if "scale" in d["spatial"]
        ]
    )
    assert (
        sc.min() >= 0.7 and sc.max() <= 1.4 and np.mean(sc < 1) == pytest.approx(0.5, abs=0.08)
    )  # below / above 1 with p 0.5


def _bgv2_kernel(sigma):  # batchgeneratorsv2 _build_kernel, truncate 6, written out
    n = sigma * 6 + 0.5
    k = round(n)
    if k % 2 == 0:
        k = k + 1 if n - k >= 0 else k - 1
    x = np.linspace(-(k - 1) / 2, (k - 1) / 2, k)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def test_nnunet_rows_against_their_formulas():
    rng = np.random.default_rng(0)
    x = rng.random((2, 20, 18, 16)).astype(np.float64)
    t = torch.from_numpy(x)
    # blur: separable, torch 'reflect' padding = scipy 'mirror'
    sig = [0.6, 0.8, 1.0]
    ref = x[0]
    for d, s in enumerate(sig):
        ref = ndi.correlate1d(ref, _bgv2_kernel(s), axis=d, mode="mirror")
    out = data.nn_blur(t.clone(), [sig, None])
    assert torch.allclose(out[0], torch.from_numpy(ref), atol=1e-10) and torch.equal(out[1], t[1])
    assert len(_bgv2_kernel(1.0)) == 7 and len(_bgv2_kernel(0.5)) == 3
    # brightness, contrast (preserve range)
    assert torch.allclose(data.nn_brightness(t.clone(), [0.8, 1.2]), t * torch.tensor([0.8, 1.2]).view(2, 1, 1, 1))
    c = x[1]
    ref = np.clip((c - c.mean()) * 1.2 + c.mean(), c.min(), c.max())
    assert np.allclose(data.nn_contrast(t.clone(), [0.9, 1.2])[1].numpy(), ref)
    # gamma with retained stats, inverted and not
    for inv in (False, True):
        y = -c if inv else c
        m, s = y.mean(), y.std(ddof=1)
        z = ((y - y.min()) / (y.max() - y.min())) ** 1.3 * (y.max() - y.min()) + y.min()
        z = (z - z.mean()) / z.std(ddof=1) * s + m
        f = data.nn_gamma_invert if inv else data.nn_gamma
        assert np.allclose(f(t.clone(), [0.8, 1.3])[1].numpy(), -z if inv else z)
    # low resolution: nearest-exact down (index floor((o + 0.5) n / m)), trilinear up (align_corners False)
    scale = 0.6
    small = [round(n * scale) for n in x.shape[1:]]
    ref = x[0]
    for d, m in enumerate(small):
        ref = np.take(
            ref, np.minimum(np.floor((np.arange(m) + 0.5) * x.shape[d + 1] / m).astype(int), x.shape[d + 1] - 1), axis=d
        )
    for d, n in enumerate(x.shape[1:]):
        m = ref.shape[d]
        pos = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0, None)
        i0 = np.minimum(np.floor(pos).astype(int), m - 1)
        i1 = np.minimum(i0 + 1, m - 1)
        w = (pos - i0).reshape([-1 if i == d else 1 for i in range(3)])
        ref = np.take(ref, i0, axis=d) * (1 - w) + np.take(ref, i1, axis=d) * w
    out = data.nn_lowres(t.clone(), [scale, None])
    assert np.allclose(out[0].numpy(), ref) and torch.equal(out[1], t[1])
    # noise: N(0, sigma) on every channel
    big = torch.zeros(2, 64, 64, 64)
    nz = data.nn_noise(big, 0.05, data.key_of(3))
    assert nz.mean().abs() < 1e-3 and nz.std().item() == pytest.approx(0.05, rel=0.02)
    assert not torch.equal(nz[0], nz[1])


def test_nnunet_rotation_and_scaling_against_batchgeneratorsv2s_affine():
    """batchgeneratorsv2 SpatialTransform (spatial.py l.120-246, create_affine_matrix_3d l.380-399):
    a centred grid times (Rz.Ry.Rx.S)^T, around the image centre, trilinear. The kit reads
    coordinates R^T p s with Yucca's R = Rx.Ry.Rz: bgv2's matrix with the angles negated, so
    with angles drawn U(-30, 30) the two are the same distribution. Reference: scipy
    map_coordinates (order 1) at bgv2's coordinates for the negated angles."""
    rng = np.random.default_rng(1)
    x = np.zeros((1, 31, 30, 29))
    x[0, 6:-6, 6:-6, 6:-6] = rng.random((19, 18, 17))  # 0 near the border: the padding modes agree
    ang, s, patch = np.deg2rad([20.0, -25.0, 12.0]), 1.2, (16, 16, 16)

    def rot(a, i, j):
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = np.cos(a), -np.sin(a), np.sin(a), np.cos(a)
        return m

    rx, ry, rz = rot(-ang[0], 1, 2), rot(-ang[1], 2, 0), rot(-ang[2], 0, 1)
    grid = np.stack(np.meshgrid(*[np.arange(p) - (p - 1) / 2 for p in patch], indexing="ij"), -1)  # (*P, 3)
    coords = grid @ (rz @ ry @ rx @ np.diag([s] * 3)).T + np.array([n / 2 - 0.5 for n in x.shape[1:]])
    ref = ndi.map_coordinates(x[0], np.moveaxis(coords, -1, 0), order=1, mode="constant", cval=0)
    out, _ = data.spatial(torch.from_numpy(x).float(), {"rotation": list(np.rad2deg(ang)), "scale": s}, patch, order=1)
    assert np.allclose(out[0].numpy(), ref, atol=1e-5)


def test_nnunet_spatial_without_a_transform_is_a_whole_voxel_centre_crop():
    x = torch.arange(2 * 9 * 8 * 7, dtype=torch.float32).view(2, 9, 8, 7)
    lab = (torch.arange(9 * 8 * 7) % 3).view(9, 8, 7)
    out, ol = data.spatial(x, {"_crop": True}, (4, 4, 4), label=lab)
    assert torch.equal(out, x[:, 2:6, 2:6, 1:5]) and torch.equal(ol, lab[2:6, 2:6, 1:5])  # floor(n / 2) - 2
    out, _ = data.spatial(x, {"_crop": True, "mirror": [True, False, True]}, (4, 4, 4))
    assert torch.equal(out, x[:, 2:6, 2:6, 1:5].flip([1, 3]))


def test_nnunet_preset_runs_through_both_drivers(demo):
    ds = data.SegDataset(demo / "preprocessed", patch=32, preset="nnunet", seed=0, sampler="nnunet", batch=2, order=1)
    assert ds.region_size() == (51, 51, 51)
    img, seg, k = ds[5]
    assert img.shape[1:] == (51, 51, 51)
    a, b = data.augment_batch(ds, img[None], torch.tensor([k]), labels=seg[None])
    assert a.shape[2:] == (32, 32, 32) and b.shape[1:] == (32, 32, 32)
    x, lab, info = ds.sample(5)
    assert x.shape[1:] == (32, 32, 32) and torch.allclose(x, a[0], atol=1e-4) and torch.equal(lab, b[0])


# -----------------------------------------------------------------------------
# nnU-Net's sampler


@pytest.mark.parametrize("batch, forced", [(2, [1]), (8, [5, 6, 7]), (3, [2]), (12, [8, 9, 10, 11])])
def test_nnunet_sampler_forces_the_last_third_of_each_batch(demo, batch, forced):
    ds = data.SegDataset(demo / "preprocessed", patch=32, preset="spatial", sampler="nnunet", batch=batch)
    for step in range(3):
        slots = [b for b in range(batch) if ds.forced(step * batch + b)]
        assert slots == forced  # round(B * (1 - 0.33)) onwards
    # a forced patch holds foreground: the box is centred on a labelled voxel
    for k in range(4 * batch):
        case, img, seg, fg, start = ds.crop(k)
        if ds.forced(k):
            assert fg is not None and (seg > 0).any()
            assert seg[tuple(int(v) - s for v, s in zip(fg, start))] > 0
        else:
            assert fg is None


def test_nnunet_sampler_share_under_ddp_equals_one_process(demo):
    # 2 processes x 1 sample = a total batch of 2: rank 1's slot is the forced one, as nnU-Net's DDP split
    ds = data.SegDataset(demo / "preprocessed", patch=32, sampler="nnunet", batch=2)
    sampler = [list(data.StepSampler(0, 4, 1, rank=r, world=2)) for r in range(2)]
    assert [ds.forced(k) for k in sampler[0]] == [False] * 4 and [ds.forced(k) for k in sampler[1]] == [True] * 4


# -----------------------------------------------------------------------------
# nnU-Net's predictor: Gaussian blending and mirroring


def test_gaussian_map_is_nnunets():
    w = evaluate.gaussian_weight((16, 12, 10), "cpu").double()
    tmp = np.zeros((16, 12, 10))
    tmp[8, 6, 5] = 1
    ref = ndi.gaussian_filter(tmp, [16 / 8, 12 / 8, 10 / 8], 0, mode="constant", cval=0)
    ref /= ref.max()
    ref[ref == 0] = ref[ref > 0].min()
    assert np.allclose(w.numpy(), ref, rtol=1e-5, atol=1e-7)
    assert evaluate.window_starts(200, 128, 0.5, "nnunet") == [0, 36, 72]
    assert evaluate.window_starts(200, 128, 0.5) == [0, 64, 72]


class _Positional(torch.nn.Module):
    """A model whose output depends on where a voxel sits in the window and on the
    input, not mirror-symmetric: blending weights and flips both matter."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        ramp = torch.linspace(0, 1, x.shape[2]).view(1, 1, -1, 1, 1)
        return self.conv(x) + ramp * torch.tensor([1.0, -2.0]).view(1, 2, 1, 1, 1)


def test_gaussian_blending_and_mirroring_against_monai(monkeypatch):
    """MONAI's sliding_window_inference blends as nnU-Net does (sum of w * logits over the
    windows, divided by the sum of w); its own Gaussian is centred at (p - 1) / 2, erf-
    integrated and floored at 1e-3, nnU-Net's (ours, test above) at p // 2 and sampled. So
    MONAI gets our map as its roi_weight_map; floored at 1e-3 on both sides, as MONAI floors it."""
    inferers = pytest.importorskip("monai.inferers")
    torch.manual_seed(0)
    model = _Positional().eval()
    x = torch.rand(1, 1, 32, 32, 32)
    # a 32^3 volume and 16^3 windows at overlap 0.5: MONAI, Yucca and nnU-Net all start windows at 0, 8, 16
    assert evaluate.window_starts(32, 16, 0.5) == evaluate.window_starts(32, 16, 0.5, "nnunet") == [0, 8, 16]
    w = evaluate.gaussian_weight((16,) * 3, "cpu").clamp(min=1e-3)
    monkeypatch.setattr(evaluate, "gaussian_weight", lambda patch, device: w)
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]  # nnU-Net: every subset of the axes (0, 1, 2)

    def mirrored(b):
        return sum(model(b.flip(d)).flip(d) if d else model(b) for d in flips) / 8

    with torch.no_grad():
        for tta, net in ((False, model), (True, mirrored)):
            ours = evaluate.sliding_window(model, x[0], 16, 0.5, "gaussian", tta)
            ref = inferers.sliding_window_inference(
                x, (16,) * 3, 4, net, overlap=0.5, mode="gaussian", roi_weight_map=w
            )[0]
            assert torch.allclose(ours, ref, atol=1e-5), tta
        assert (ours - evaluate.sliding_window(model, x[0], 16, 0.5, "sum", True) / 8).abs().max() > 1e-2  # not the sum


def test_evaluate_applies_the_recorded_predictor(demo, tmp_path, capsys, monkeypatch):
    seen = []

    def recorder(model, image, patch, overlap=0.5, blend="sum", tta=False, batch=4, autocast=None, steps="yucca"):
        seen.append((blend, tta, steps))  # what the windows would be run with; the logits themselves are tested above
        return torch.zeros((2, *image.shape[1:]))

    ft = tmp_path / "ft"
    assert (
        finetune.main(
            [
                "--recipe",
                "wald",
                "--arch",
                "unet_b",
                "--pretrained",
                "none",
                "--patch",
                "32",
                "--steps",
                "1",
                "--n-train",
                "2",
                "--workers",
                "0",
                "--quiet",
                "--data",
                str(demo / "preprocessed"),
                "--out",
                str(ft),
            ]
        )
        == 0
    )
    ck = torch.load(ft / "ckpt.pt", weights_only=True)
    assert ck["inference"] == {"blend": "gaussian", "tta": True, "steps": "nnunet", "overlap": 0.5}
    monkeypatch.setattr(evaluate, "sliding_window", recorder)
    assert evaluate.main(["--run", str(ft), "--data", str(demo / "preprocessed"), "--quiet"]) == 0
    m = json.loads((ft / "eval" / "metrics.json").read_text())
    assert m["settings"]["blend"] == "gaussian" and m["settings"]["tta"] is True
    assert set(seen) == {("gaussian", True, "nnunet")}
    seen.clear()
    assert (
        evaluate.main(
            [
                "--run",
                str(ft),
                "--data",
                str(demo / "preprocessed"),
                "--quiet",
                "--blend",
                "sum",
                "--no-tta",
                "--out",
                str(tmp_path / "e2"),
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert m["settings"]["blend"] == "sum" and m["settings"]["tta"] is False and set(seen) == {("sum", False, "nnunet")}
    assert "--blend sum given (the run recorded gaussian)" in capsys.readouterr().out
