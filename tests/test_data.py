"""data.py against independent expectations: scipy / skimage for the resampling and
the transform forms, hand counts for the geometry and the sampling, firing rates,
the two drivers against each other, masking, determinism, splits."""

import json

import numpy as np
import pytest
import torch
import torchio as tio
from scipy import ndimage

import data
from data import (
    INTENSITY_ROWS,
    PretrainDataset,
    SegDataset,
    StepSampler,
    draw_params,
    random_mask,
    select_few_shot,
    swin_ssl_views,
)


def write_dataset(root, images, labels=None):
    (root / "images").mkdir(parents=True)
    cases = []
    for i, img in enumerate(images):
        np.save(root / "images" / f"c{i}.npy", img.astype(np.float16))
        if labels is not None:
            (root / "labels").mkdir(exist_ok=True)
            np.save(root / "labels" / f"c{i}.npy", labels[i].astype(np.uint8))
        cases.append({"case": f"c{i}", "split": "train"})
    (root / "dataset.json").write_text(json.dumps({"cases": cases}))
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """4 cases of 40^3 (smooth texture above 0, air 0) with labels 0/1/2."""
    rng = np.random.default_rng(0)
    imgs, labs = [], []
    for _ in range(4):
        img = ndimage.gaussian_filter(rng.random((1, 40, 40, 40)), (0, 2, 2, 2))
        img[:, :3] = 0
        lab = np.zeros((40, 40, 40), np.uint8)
        lab[5:8, 30:33, 10:12] = 1
        lab[20:22, 20:22, 20:22] = 2
        imgs.append(img), labs.append(lab)
    return write_dataset(tmp_path_factory.mktemp("pre"), imgs, labs)


def binomial_ok(hits, n, p, z=4.5):
    return abs(hits - n * p) <= z * np.sqrt(n * p * (1 - p))


def yucca_coords(params, patch, region, key=0):
    """The authors' coordinates, written out independently: zero-centred grid, + the
    elastic displacement (scipy's gaussian_filter of U(-1, 1) noise, mode constant,
    times alpha, per axis; the noise fields are the kit's, drawn from `key`), rotated
    as coords^T . Rx Ry Rz, scaled, + region / 2 - 0.5."""
    g = np.stack(np.meshgrid(*[np.arange(p) - (p - 1) / 2 for p in patch], indexing="ij")).astype(float)
    if "elastic" in params:
        alpha, sigma = params["elastic"]
        for d in range(3):
            noise = data.uniform(data.key_of(key & data.M32, key >> 32, 10 + d), patch).double().numpy() * 2 - 1
            g[d] += ndimage.gaussian_filter(noise, sigma, mode="constant", cval=0.0) * alpha
    if "rotation" in params:
        ax, ay, az = np.deg2rad(params["rotation"])
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        g = np.dot(g.reshape(3, -1).T, rx @ ry @ rz).T.reshape(g.shape)
    g = g * params.get("scale", 1.0)
    return g + (np.array(region) / 2.0 - 0.5).reshape(3, 1, 1, 1)


# -----------------------------------------------------------------------------
# Resampling and geometry


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"scale": 0.93},
        {"scale": 1.5},
        {"rotation": [20.0, 0.0, -12.0]},
        {"rotation": [0.0, 25.0, 5.0], "scale": 1.08},
        {"elastic": [300.0, 6.0]},
        {"elastic": [250.0, 5.0], "rotation": [10.0, -5.0, 20.0], "scale": 0.95},
    ],
)
def test_spatial_equals_scipy_map_coordinates(params):
    """Fixed elastic / rotation / scale parameters: the kit's cubic resampling equals
    scipy's map_coordinates(order=3, mode='constant', cval=min, prefilter) at the
    authors' coordinates, to 1e-4 of the intensity range (a 45 x 40 x 47 region, 32^3
    patch; the elastic field filtered by scipy's gaussian_filter)."""
    vol = ndimage.gaussian_filter(np.random.default_rng(1).random((45, 40, 47)), 1.5)
    patch, key = (32, 32, 32), 0x1234_5678_9ABC
    coords = yucca_coords(params, patch, vol.shape, key)
    if "elastic" in params:  # the displacement is large enough to matter
        assert (
            np.abs(coords - yucca_coords({k: v for k, v in params.items() if k != "elastic"}, patch, vol.shape)).max()
            > 1
        )
    want = ndimage.map_coordinates(vol, coords, order=3, mode="constant", cval=vol.min())
    got, _ = data.spatial(torch.from_numpy(vol).float()[None], dict(params, _key=key), patch)
    assert np.abs(got[0].numpy() - want).max() <= 1e-4 * (vol.max() - vol.min())


def test_amaes_geometry_small_volume_centre_at_half_voxels(tmp_path):
    """Every side shorter than the region (45 for a 32 patch; 181 for 128): the whole
    volume, centred and padded with its minimum; with no spatial draw the target is
    the centre 32^3 read by cubic B-spline at the authors' coordinates -- integer
    positions + (45 - 1) / 2 - (32 - 1) / 2, i.e. half-voxels."""
    vol = ndimage.gaussian_filter(np.random.default_rng(2).random((1, 40, 36, 44)), (0, 2, 2, 2)) + 0.1
    ds = PretrainDataset(write_dataset(tmp_path, [vol]), patch=32, preset="spatial", seed=0)
    assert ds.region_size() == (45, 45, 45)
    vol = vol.astype(np.float16).astype(np.float64)
    padded = np.pad(vol[0], [((45 - n) // 2, 45 - n - (45 - n) // 2) for n in vol.shape[1:]], constant_values=vol.min())
    want = ndimage.map_coordinates(
        padded, yucca_coords({}, (32,) * 3, (45,) * 3), order=3, mode="constant", cval=vol.min()
    )
    want = np.clip(want, vol.min(), vol.max())  # pretraining clips to the input range
    k = next(k for k in range(200) if not ds.params(k)["spatial"])
    _, target, _ = ds.sample(k)
    assert np.abs(target[0].numpy() - want).max() < 1e-5
    assert not np.allclose(target[0].numpy(), padded[6:38, 6:38, 6:38], atol=1e-3)  # not a plain crop


def test_crop_starts_are_uniform(tmp_path):
    """Sides longer than the region: the start is uniform over [0, n - region] (amaes:
    region 45 of a 60-voxel axis -> 16 starts; mae: region = patch 32 -> 29 starts)."""
    vol = np.random.default_rng(3).random((1, 60, 50, 30)) + 0.1
    write_dataset(tmp_path, [vol])
    for preset, region, starts in (("all", 45, 16), ("none", 32, 29)):
        ds = PretrainDataset(tmp_path, patch=32, preset=preset, seed=0)
        seen = []
        for k in range(1600):
            rng = ds.pick(k)[1]
            seen.append(int(rng.integers(60 - region + 1)))  # sample k's rng draws axis 0's start first, then axis 1's
            if k < 3:  # the region: those starts on the long axes, the whole short axis centred and padded
                s1, pad = int(rng.integers(50 - region + 1)), (region - 30) // 2
                reg = ds.region(k)[1][0]
                want = vol.astype(np.float16)[0, seen[-1] : seen[-1] + region, s1 : s1 + region]
                assert np.array_equal(reg[:, :, pad : pad + 30], want) and (reg[:, :, :pad] == reg.min()).all()
        counts = np.bincount(seen, minlength=starts)
        assert len(counts) == starts and min(counts) > 0
        chi2 = ((counts - 1600 / starts) ** 2 / (1600 / starts)).sum()
        assert chi2 < starts + 5 * np.sqrt(2 * starts)  # uniform at ~5 sigma
    none = PretrainDataset(tmp_path, patch=32, preset="none", seed=0)
    inp, target, _ = none.sample(0)
    assert torch.equal(inp, target) and target.shape == (1, 32, 32, 32)  # mae: a plain crop, no resampling


def test_resize_equals_skimage():
    skimage_resize = pytest.importorskip("skimage.transform").resize
    x = ndimage.gaussian_filter(np.random.default_rng(4).random((21, 17, 12)), 1)
    for shape, mode in (((30, 11, 12), "mirror"), ((15, 20, 7), "edge")):
        want = skimage_resize(x, shape, order=3, mode="reflect" if mode == "mirror" else "edge", anti_aliasing=False)
        assert np.abs(data.resize(torch.from_numpy(x), shape, 3, mode).numpy() - want).max() < 1e-6
    lab = np.random.default_rng(5).integers(0, 4, (9, 8, 7)).astype(float)
    want = skimage_resize(lab, (13, 5, 7), order=0, mode="edge", anti_aliasing=False, preserve_range=True)
    assert np.array_equal(data.resize(torch.from_numpy(lab), (13, 5, 7), 0, "edge").numpy(), want)


# -----------------------------------------------------------------------------
# The recipe: firing rates, ranges and the authors' forms


def test_firing_rates_and_ranges():
    n, ch = 3000, 2
    draws = [draw_params(0, k, "all", ch, (32, 32, 32)) for k in range(n)]
    sp = [d["spatial"] for d in draws]
    assert binomial_ok(sum("elastic" in s for s in sp), n, 0.33)
    # a rotation fires with p 0.2, then each axis with p 0.66 (none of the three: no rotation)
    assert binomial_ok(sum("rotation" in s for s in sp), n, 0.2 * (1 - 0.34**3))
    assert binomial_ok(sum("scale" in s for s in sp), n, 0.2)
    axes = [a for s in sp if "rotation" in s for a in s["rotation"]]
    assert binomial_ok(sum(a != 0 for a in axes), len(axes), 0.66 / (1 - 0.34**3), z=5)
    assert all(-30 <= a <= 30 for a in axes) and all(0.9 <= s["scale"] <= 1.1 for s in sp if "scale" in s)
    assert all(200 <= s["elastic"][0] <= 600 and 20 <= s["elastic"][1] <= 30 for s in sp if "elastic" in s)
    it = [d["intensity"] for d in draws]
    per_channel = {
        "additive_noise": 0.2,
        "multiplicative_noise": 0.2,
        "ghosting": 0.2,
        "gibbs": 0.2,
        "bias_field": 0.33,
    }
    for row, p in per_channel.items():  # drawn per channel, as Yucca's transforms do
        hits = sum(v is not None for d in it if row in d for v in d[row])
        assert binomial_ok(hits, n * ch, p), row
    assert binomial_ok(sum("gamma" in d for d in it), n, 0.2)
    assert binomial_ok(sum("blur" in d for d in it), n, 0.2 * (1 - 0.5**ch))
    assert binomial_ok(sum("low_resolution" in d for d in it), n, 0.2 * (1 - 0.5**ch))
    for d in it:
        for a, r, axis in [v for v in d.get("ghosting", []) if v]:
            assert 0.85 <= a <= 0.95 and 2 <= r <= 10 and 0 <= axis <= 2
        for keep, axis in [v for v in d.get("gibbs", []) if v]:
            assert 96 <= keep <= 128
        for t in [v for v in d.get("low_resolution", []) if v]:
            assert all(16 <= s <= 32 for s in t)
    x = torch.rand(1, 32, 32, 32)  # no axis picked: the target is the shape and the channel stays as it is
    assert torch.equal(data.low_resolution(x.clone(), [[32, 32, 32]]), x)
    assert draw_params(0, 1, "none", 1, (32,) * 3)["spatial"] == {}
    assert all("elastic" not in draw_params(0, k, "spatial", 1, (32,) * 3)["spatial"] for k in range(300))


def test_intensity_forms_match_independent_implementations():
    rng = np.random.default_rng(6)
    x = rng.random((1, 20, 18, 16)).astype(np.float32) + 0.2
    t = torch.from_numpy(x)
    # ghosting: every r-th unshifted plane 0, r, ... (not the last) times alpha, |ifft|
    k = np.fft.fftn(x[0])
    k[0:-1:3] *= 0.9
    assert np.allclose(data.ghosting(t.clone(), [[0.9, 3, 0]])[0].numpy(), np.abs(np.fft.ifftn(k)), atol=1e-5)
    # gibbs (drawn axis 2): keep the central 12 of 16 shifted frequencies along axis 2
    k = np.fft.fftshift(np.fft.fftn(x[0]))
    k[:, :, : 8 - 6], k[:, :, 8 + 6 :] = 0, 0
    assert np.allclose(
        data.gibbs(t.clone(), [[12, 2]])[0].numpy(), np.abs(np.fft.ifftn(np.fft.ifftshift(k))), atol=1e-5
    )
    # bias field: x * (1 - sum (i - c)^2 / n^2)
    i = np.stack(np.meshgrid(*[np.arange(n) for n in x.shape[1:]], indexing="ij"))
    c = np.array([3, 9, 15]).reshape(3, 1, 1, 1)
    g = 1 - (((i - c) ** 2) / np.array(x.shape[1:]).reshape(3, 1, 1, 1) ** 2).sum(0)
    assert np.allclose(data.bias_field(t.clone(), [[3, 9, 15]])[0].numpy(), x[0] * g, atol=1e-6)
    # gamma as Yucca 1.1.7 runs it: the sample's range, epsilon 1 (its per_channel flag in that slot)
    lo, hi = x.min(), x.max()
    assert np.allclose(
        data.gamma(t.clone(), [1.7, False]).numpy(), ((x - lo) / (hi - lo + 1)) ** 1.7 * (hi - lo) + lo, atol=1e-6
    )
    assert np.allclose(
        data.gamma(t.clone(), [0.6, True]).numpy(),
        -((((-x) - (-hi)) / (hi - lo + 1)) ** 0.6 * (hi - lo) - hi),
        atol=1e-6,
    )
    # blur: scipy's gaussian_filter (mode reflect, truncate 4)
    assert np.allclose(data.blur(t.clone(), [0.8])[0].numpy(), ndimage.gaussian_filter(x[0], 0.8), atol=1e-6)
    # low resolution: skimage resize order 0 down, order 3 back, mode edge
    skimage_resize = pytest.importorskip("skimage.transform").resize
    small = skimage_resize(x[0].astype(float), (11, 18, 9), order=0, mode="edge", anti_aliasing=False)
    want = skimage_resize(small, x.shape[1:], order=3, mode="edge", anti_aliasing=False)
    assert np.allclose(data.low_resolution(t.clone(), [[11, 18, 9]])[0].numpy(), want, atol=1e-5)
    # additive / multiplicative noise: the right spread, reproducible from the key
    a = data.additive_noise(torch.zeros(1, 40, 40, 40), [0.5], key=7)
    assert abs(a.std().item() - 0.5) < 0.01 and torch.equal(
        a, data.additive_noise(torch.zeros(1, 40, 40, 40), [0.5], key=7)
    )
    m = data.multiplicative_noise(torch.full((1, 40, 40, 40), 2.0), [0.1], key=8)
    assert abs((m - 2).std().item() - 0.2) < 0.005


def test_counter_based_noise_is_the_same_numbers_everywhere():
    u = data.uniform(12345, (1000,))
    assert 0 < u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.03
    n = data.normal(99, (100_000,))
    assert abs(n.mean().item()) < 0.02 and abs(n.std().item() - 1) < 0.02
    # the hash against its definition (Wellons' lowbias32) in plain Python integers
    # the int32 tensor version (wrapping products, masked shifts) bit for bit, over the whole 32-bit range
    vals = [0, 1, 2**31 - 1, 2**31, 2**32 - 1] + np.random.default_rng(3).integers(0, 2**32, 2000).tolist()
    got = data._hash32(torch.tensor([v - 2**32 if v >= 2**31 else v for v in vals], dtype=torch.int32))
    assert [g & 0xFFFFFFFF for g in got.tolist()] == [_lowbias32(v) for v in vals]
    # number i of a long stream, across the CPU's blocks of 2^18, equals the formula in plain integers
    key = 0x9E3779B97F4A7C15
    long = data.uniform(key, (300_000,))
    for i in (0, 1, 2**18 - 1, 2**18, 299_999):
        h = _lowbias32(_lowbias32(i ^ (key & 0xFFFFFFFF)) ^ (key >> 32))
        assert long[i].item() == ((h >> 8) + 1) * 2.0**-24
    if torch.cuda.is_available():
        assert torch.equal(data.uniform(12345, (1000,), "cuda").cpu(), u)


def _lowbias32(x):  # the reference in plain Python integers
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


# -----------------------------------------------------------------------------
# Drivers: batched path and TorchIO path


def test_batched_and_torchio_drivers_give_the_same_sample(root):
    ds = PretrainDataset(root, patch=32, preset="all", seed=4)
    ks = list(range(24))
    inp, target = data.augment_batch(ds, torch.stack([ds[k][0] for k in ks]), torch.tensor(ks))
    fired = set()
    for i, k in enumerate(ks):
        a, b, info = ds.sample(k)
        fired |= set(info["intensity"]) | set(info["spatial"])
        scale = max(1e-6, b.abs().max().item())
        assert (inp[i] - a).abs().max().item() <= 1e-5 * scale and (target[i] - b).abs().max().item() <= 1e-5 * scale
    assert {"elastic", "rotation", "gamma", "ghosting"} & fired  # the comparison covered transformed samples
    seg = SegDataset(root, patch=32, preset="all", seed=2)
    items = [seg[k] for k in ks]
    img, lab = data.augment_batch(
        seg, torch.stack([i[0] for i in items]), torch.tensor(ks), labels=torch.stack([i[1] for i in items])
    )
    for i, k in enumerate(ks):
        a, b, _ = seg.sample(k)
        assert torch.allclose(img[i], a, atol=1e-5) and torch.equal(lab[i], b)


def test_torchio_transforms_compose_and_record_their_parameters():
    subject = tio.Subject(
        t1=tio.ScalarImage(tensor=torch.rand(1, 40, 40, 40)),
        seg=tio.LabelMap(tensor=(torch.rand(1, 40, 40, 40) > 0.7).long()),
    )
    torch.manual_seed(0)
    out = data.amaes_transforms((32, 32, 32))(subject)
    assert out["t1"].shape == out["seg"].shape == (1, 32, 32, 32)
    assert set(out["seg"].data.unique().tolist()) <= {0, 1}
    names = [type(h).__name__ for h in out.history]
    assert names and names[0] == "AmaesSpatial" and all(n in ("AmaesSpatial", "AmaesRow") for n in names)
    row = data.AmaesRow("ghosting", [[0.9, 3, 1]], key=5)
    again = tio.Compose([row, data.AmaesRow("gamma", [1.5, False], key=5)])(subject)
    assert [h.params for h in again.history] == [[[0.9, 3, 1]], [1.5, False]]  # the parameters, as applied
    with pytest.raises(ValueError, match="unknown row"):
        data.AmaesRow("sharpen", None, 0)


def test_target_is_before_intensity_and_none_is_a_plain_crop(root, monkeypatch):
    ds = PretrainDataset(root, patch=32, preset="all", seed=7)
    res = [ds.sample(k) for k in range(30)]
    assert any(r[2]["intensity"] for r in res) and any(not torch.equal(r[0], r[1]) for r in res)
    monkeypatch.setattr(data, "intensity", lambda x, params, key, clip=True: x)
    for k, (inp, target, info) in enumerate(res):
        assert torch.equal(ds.sample(k)[1], target)  # the target never saw the intensity rows
        if not info["intensity"]:
            assert torch.equal(inp, target)


# -----------------------------------------------------------------------------
# Finetuning: the authors' foreground sampling, image and label on one grid


def test_foreground_oversampling_places_the_voxel_anywhere_and_pools_classes(tmp_path):
    lab = np.zeros((60, 60, 60), np.uint8)
    lab[30, 30, 30:40] = 1  # 10 voxels of class 1
    lab[10:13, 40:50, 20:30] = 2  # 300 voxels of class 2
    img = (lab > 0) * 1.0 + 0.1
    ds = SegDataset(write_dataset(tmp_path, [img[None]], [lab]), patch=32, preset="none", fg_p=0.33, seed=0)
    classes, where, n = [], [], 1500
    for k in range(n):
        _, _, seg, fg, start = ds.crop(k)
        if fg is not None:
            classes.append(int(lab[tuple(fg)]))
            where.append([v - s for v, s in zip(fg, start)])
            # Yucca draws the start in [max(0, loc - P), min(loc, n - P)]: the voxel at 0..P, so
            # (at P, 1 time in P + 1 per axis) just outside the patch -- the authors' rule, kept
            assert all(0 <= w <= 32 for w in where[-1])
            if max(where[-1]) < 32:
                assert seg[tuple(where[-1])] == classes[-1]
    assert binomial_ok(len(classes), n, 0.33)
    # classes in proportion to the pooled locations (every 10th voxel of both classes)
    pooled = np.argwhere(lab > 0)[::10]
    assert binomial_ok(sum(c == 1 for c in classes), len(classes), np.mean(lab[tuple(pooled.T)] == 1))
    # the voxel's position inside the patch covers the patch, not only its centre
    where = np.array(where)
    assert where.min() <= 2 and where.max() >= 29
    centred = SegDataset(tmp_path, patch=32, preset="none", fg_p=1.0, seed=0, centre_fg=True)
    for k in range(20):  # ours: the voxel at the centre (16), unless the volume's edge is nearer
        _, _, seg, fg, start = centred.crop(k)
        pos = [v - s for v, s in zip(fg, start)]
        assert seg[tuple(pos)] == lab[tuple(fg)]
        assert all(p == 16 or v < 16 or v > 60 - 16 for p, v in zip(pos, fg))


def test_image_and_label_share_one_grid(tmp_path):
    """A volume whose image equals its binary label: after spatial draws the label
    patch has the image's geometry -- no repeated planes (the share of identical
    adjacent label planes matches the thresholded image's), and a rotation that
    leaves an axis alone gives an exact crop of the volume along that axis."""
    g = np.stack(np.meshgrid(*[np.arange(48)] * 3, indexing="ij"))
    blob = (np.sin(g[0] / 3.1) + np.cos(g[1] / 2.3) + np.sin(g[2] / 2.7 + g[0] / 9) > 0.6).astype(np.uint8)
    ds = SegDataset(write_dataset(tmp_path, [blob[None] * 1.0], [blob]), patch=32, preset="spatial", fg_p=0.5, seed=0)
    same_lab, same_img = [], []
    for k in range(200):
        p = ds.params(k)
        if not p["spatial"]:
            continue
        img, lab, _ = ds.sample(k)
        thr = (img[0] > 0.5).long()
        assert (thr == lab).float().mean() > 0.95
        for d in range(3):

            def eq(v, d=d):  # share of neighbouring slices along axis d that are equal
                return (
                    (v.narrow(d, 1, 31) == v.narrow(d, 0, 31)).all(dim=[i for i in range(3) if i != d]).float().mean()
                )

            same_lab.append(eq(lab).item()), same_img.append(eq(thr).item())
    assert same_lab and np.mean(same_lab) <= 1.3 * np.mean(same_img) + 0.02
    # rotation about axis 2 alone (Rz) keeps the axis-2 coordinates integers: an exact crop along it
    x = torch.from_numpy(blob[None] * 1.0).float()
    out, lab = data.spatial(
        x, {"rotation": [0.0, 0.0, 17.0], "_key": 0}, (32, 32, 32), label=torch.from_numpy(blob).long()
    )
    coords = data.spatial_coords({"rotation": [0.0, 0.0, 17.0]}, (32, 32, 32), [23.5] * 3, 0, "cpu")
    assert torch.allclose(coords[2], coords[2].round(), atol=1e-4)
    i, j = 10, 20
    x0, y0 = [int(np.floor(coords[d, i, j, 0].item() + 0.5)) for d in range(2)]
    z0 = int(round(coords[2, i, j, 0].item()))
    assert torch.equal(lab[i, j], torch.from_numpy(blob[x0, y0, z0 : z0 + 32]).long())


# -----------------------------------------------------------------------------
# Masking, sampling order, splits, SSL views


def test_mask_exact_and_token_aligned():
    x = torch.rand(3, 2, 32, 32, 16) + 1
    xm, m = random_mask(x, 0.6, 4, generator=torch.Generator().manual_seed(0))
    n_tok = 8 * 8 * 4
    assert ((~m).view(3, -1).sum(1) / 64).tolist() == [int(n_tok * 0.4)] * 3
    blocks = m.view(3, 1, 8, 4, 8, 4, 4, 4).permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(3, n_tok, 64)
    assert (blocks.all(-1) | (~blocks).all(-1)).all()  # each 4^3 block all-masked or all-kept
    assert (xm[m.expand_as(x)] == 0).all() and torch.equal(xm[~m.expand_as(x)], x[~m.expand_as(x)])
    assert not torch.equal(m[0], m[1])
    assert torch.equal(m, random_mask(x, 0.6, 4, generator=torch.Generator().manual_seed(0))[1])
    assert (~random_mask(torch.rand(1, 1, 128, 128, 128))[1]).sum() / 64 == 13107
    per_sample = random_mask(x, torch.tensor([0.5, 0.75, 0.6]), 4)[1]
    assert ((~per_sample).view(3, -1).sum(1) / 64).tolist() == [128, 64, int(n_tok * 0.4)]
    with pytest.raises(ValueError, match="not divisible by the mask token size 16"):
        random_mask(torch.rand(1, 1, 40, 40, 40), 0.75, 16)


def test_determinism_across_workers_ranks_and_resume(root):
    ds = PretrainDataset(root, patch=16, preset="all", seed=3, aug_on="workers")

    def batches(workers, rank):
        dl = torch.utils.data.DataLoader(
            ds, batch_size=2, sampler=StepSampler(0, 3, 2, rank=rank, world=2), num_workers=workers
        )
        return [b[0] for b in dl]

    a, b, c = batches(0, 0), batches(2, 0), batches(0, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    resumed = [
        x[0] for x in torch.utils.data.DataLoader(ds, batch_size=2, sampler=StepSampler(2, 1, 2, rank=0, world=2))
    ]
    assert torch.equal(resumed[0], a[2])


def test_few_shot_selection():
    cases = [f"case{i:02d}" for i in range(30)]
    a = select_few_shot(cases, 20, seed=0)
    assert a == select_few_shot(list(reversed(cases)), 20, seed=0) and len(set(a)) == 20 and a == sorted(a)
    assert a != select_few_shot(cases, 20, seed=1)
    assert select_few_shot(cases, "all", 0) == cases
    with pytest.raises(ValueError, match="train split has 30 cases"):
        select_few_shot(cases, 31, 0)


def test_swin_ssl_views():
    x = torch.rand(3, 1, 32, 32, 32)
    views, targets, labels = swin_ssl_views(x, torch.Generator().manual_seed(0))
    assert views.shape == targets.shape == (6, 1, 32, 32, 32) and labels.shape == (6,)
    for i in range(6):
        assert torch.equal(targets[i], torch.rot90(x[i % 3], int(labels[i]), dims=(2, 3)))
    assert 0 < (views != targets).float().mean().item() < 0.8


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run preprocess.py"):
        PretrainDataset(tmp_path)
    with pytest.raises(ValueError, match="--aug 'heavy'"):
        PretrainDataset(tmp_path, cases=["x"], preset="heavy")


def test_rows_are_the_papers():
    assert INTENSITY_ROWS == (
        "additive_noise",
        "blur",
        "multiplicative_noise",
        "ghosting",
        "gibbs",
        "low_resolution",
        "bias_field",
        "gamma",
    )
    r = data.RECIPE
    assert (r["elastic"], r["rotation"], r["rotation_axis"], r["scale"], r["bias_field"], r["gamma_invert"]) == (
        0.33,
        0.2,
        0.66,
        0.2,
        0.33,
        0.05,
    )
