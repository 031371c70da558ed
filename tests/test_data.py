"""data.py: augmentation probabilities and ranges, masking, sampling, determinism, splits."""
import json

import numpy as np
import pytest
import torch
from scipy import ndimage

import data
from data import (INTENSITY, PretrainDataset, SegDataset, StepSampler, intensity_augment, random_mask,
                  sample_patch, select_few_shot, spatial_params, swin_ssl_views)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A preprocessed-layout dataset made here: 4 cases of 40^3 with labels 0/1/2."""
    r = tmp_path_factory.mktemp("pre")
    (r / "images").mkdir(), (r / "labels").mkdir()
    rng = np.random.default_rng(0)
    cases = []
    for i in range(4):
        img = ndimage.gaussian_filter(rng.random((1, 40, 40, 40)), (0, 2, 2, 2)).astype(np.float16)
        lab = np.zeros((40, 40, 40), np.uint8)
        lab[5:8, 30:33, 10:12] = 1
        lab[20:22, 20:22, 20:22] = 2
        np.save(r / "images" / f"c{i}.npy", img), np.save(r / "labels" / f"c{i}.npy", lab)
        cases.append({"case": f"c{i}", "split": "train"})
    (r / "dataset.json").write_text(json.dumps({"cases": cases}))
    return r


def binomial_ok(hits, n, p, z=4.5):
    return abs(hits - n * p) <= z * np.sqrt(n * p * (1 - p))


def test_spatial_probabilities_and_ranges():
    rng = np.random.default_rng(1)
    n = 6000
    draws = [spatial_params(rng, "all") for _ in range(n)]
    assert binomial_ok(sum("elastic" in d for d in draws), n, 0.33)
    assert binomial_ok(sum("rotation" in d for d in draws), n, 0.2)
    assert binomial_ok(sum("scale" in d for d in draws), n, 0.2)
    axes = [a for d in draws if "rotation" in d for a in d["rotation"]]
    assert binomial_ok(sum(a != 0 for a in axes), len(axes), 0.66)
    assert all(-30 <= a <= 30 for a in axes)
    assert all(0.9 <= d["scale"] <= 1.1 for d in draws if "scale" in d)
    assert all(200 <= d["elastic"][0] <= 600 and 20 <= d["elastic"][1] <= 30 for d in draws if "elastic" in d)
    assert not any("elastic" in spatial_params(rng, "spatial") for _ in range(500))
    assert all(spatial_params(rng, "none") == {} for _ in range(100))


def test_intensity_probabilities_and_ranges():
    rng = np.random.default_rng(2)
    n = 1500
    counts = {name: 0 for name, _, _ in INTENSITY}
    x0 = torch.rand(1, 24, 24, 24)
    for _ in range(n):
        y, fired = intensity_augment(x0.clone(), rng)
        assert y.min() >= x0.min() - 1e-6 and y.max() <= x0.max() + 1e-6  # clipped to the input range
        for k, p in fired.items():
            counts[k] += 1
            if k in ("additive_noise", "multiplicative_noise"):
                assert 1e-4 <= p["sigma"] <= 1e-3
            elif k == "ghosting":
                assert 0.85 <= p["alpha"] <= 0.95 and 2 <= p["reps"] <= 10
            elif k == "gamma":
                assert 0.5 <= p["gamma"] <= 2
            elif k == "blur":
                assert all(s is None or 0 <= s <= 1 for s in p["sigma"])
            elif k == "low_resolution":
                assert all(z is None or 0.5 <= z[0] <= 1 for z in p["zoom"])
    for name, p, _ in INTENSITY:
        assert binomial_ok(counts[name], n, p), (name, counts[name])


def test_transform_forms():
    rng = np.random.default_rng(3)
    x = torch.rand(1, 16, 16, 16) + 0.5
    y, p = data.bias_field(x.clone(), rng)  # G = 1 at the centre voxel
    assert torch.isclose(y[(0, *p["centre"])], x[(0, *p["centre"])])
    y, p = data.gamma(x.clone(), np.random.default_rng(5))  # range kept, monotone
    assert torch.isclose(y.min(), x.min()) and torch.isclose(y.max(), x.max())
    r = np.random.default_rng(0)
    y, p = data.ghosting(x.clone(), r)
    assert not torch.allclose(y, x) and y.shape == x.shape


def test_none_is_identity_and_target_is_pre_intensity(root, monkeypatch):
    ds = PretrainDataset(root, patch=40, preset="none")
    for k in range(4):
        inp, target, info = ds.sample(k)
        assert torch.equal(inp, target)
        assert torch.equal(inp, torch.from_numpy(np.load(root / "images" / f"{info['case']}.npy").astype(np.float32)))
    full = PretrainDataset(root, patch=32, preset="all", seed=7)
    res = [full.sample(k) for k in range(30)]
    assert any(r[2]["intensity"] for r in res) and any(not torch.equal(r[0], r[1]) for r in res)
    monkeypatch.setattr(data, "intensity_augment", lambda x, rng: (x, {}))
    for k, (inp, target, info) in enumerate(res):
        assert torch.equal(full.sample(k)[1], target)  # the target never saw intensity augmentation
        if not info["intensity"]:
            assert torch.equal(inp, target)


def test_rotation_geometry_matches_rot90():
    vol = np.random.default_rng(4).random((1, 32, 32, 32)).astype(np.float32)
    out = sample_patch(vol, (16, 16, 16), (32, 32, 32), {"rotation": [0, 0, 90]}, None)
    ref = [torch.rot90(torch.from_numpy(vol), k, dims=(1, 2)) for k in (1, 3)]
    assert min((out - r).abs().max().item() for r in ref) < 1e-4


def test_elastic_field_keeps_the_authors_statistics():
    rng = np.random.default_rng(5)
    shape, alpha, sigma = (96, 96, 96), 400, 24
    ours = torch.stack([data.elastic_field(rng, shape, alpha, sigma) for _ in range(3)])
    full = np.stack([ndimage.gaussian_filter(rng.uniform(-1, 1, shape), sigma, mode="constant") * alpha for _ in range(9)])
    core = (slice(None), slice(None), slice(24, 72), slice(24, 72), slice(24, 72))  # away from the zero border
    assert ours[core].std().item() == pytest.approx(full[core[1:]].std(), rel=0.3)


def test_mask_exact_and_token_aligned():
    x = torch.rand(3, 2, 32, 32, 16) + 1
    g = torch.Generator().manual_seed(0)
    xm, m = random_mask(x, 0.6, 4, generator=g)
    n_tok = 8 * 8 * 4
    kept = (~m).view(3, -1).sum(1) / 64
    assert kept.tolist() == [int(n_tok * 0.4)] * 3
    blocks = m.view(3, 1, 8, 4, 8, 4, 4, 4).permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(3, n_tok, 64)
    assert (blocks.all(-1) | (~blocks).all(-1)).all()  # each 4^3 block all-masked or all-kept
    assert (xm[m.expand_as(x)] == 0).all() and torch.equal(xm[~m.expand_as(x)], x[~m.expand_as(x)])
    assert not torch.equal(m[0], m[1])
    xm2, m2 = random_mask(x, 0.6, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, m2)
    assert (~random_mask(torch.rand(1, 1, 128, 128, 128))[1]).sum() / 64 == 13107
    with pytest.raises(ValueError, match="not divisible by the mask token size 16"):
        random_mask(torch.rand(1, 1, 40, 40, 40), 0.75, 16)


def test_foreground_oversampling_and_label_values(root):
    ds = SegDataset(root, patch=16, preset="all", fg_p=0.33, seed=1)
    n = 400
    info = [ds.sample(k) for k in range(n)]
    assert binomial_ok(sum(i[2]["forced_fg"] for i in info), n, 0.33)
    for img, seg, meta in info:
        assert set(seg.unique().tolist()) <= {0, 1, 2}  # nearest: no interpolated labels
        if meta["forced_fg"] and not meta["spatial"]:
            assert seg.any()
    rotated = [(i, s) for i, s, m in info if m["spatial"] and s.any()]
    assert rotated


def test_determinism_across_workers_and_difference_across_ranks(root):
    ds = PretrainDataset(root, patch=16, preset="all", seed=3)

    def batches(workers, rank):
        dl = torch.utils.data.DataLoader(ds, batch_size=2, sampler=StepSampler(0, 3, 2, rank=rank, world=2),
                                         num_workers=workers)
        return [b[0] for b in dl]
    a, b, c = batches(0, 0), batches(2, 0), batches(0, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    # resume: starting at step 2 gives step 2 of the full run
    resumed = [x[0] for x in torch.utils.data.DataLoader(ds, batch_size=2, sampler=StepSampler(2, 1, 2, rank=0, world=2))]
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
    changed = (views != targets).float().mean().item()
    assert 0 < changed < 0.8


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run preprocess.py"):
        PretrainDataset(tmp_path)
    with pytest.raises(ValueError, match="--aug 'heavy'"):
        PretrainDataset(tmp_path, cases=["x"], preset="heavy")


def test_bench_data_runs(root, capsys):
    import bench
    assert bench.main(["data", "--data", str(root), "--patch", "16", "--batch", "2", "--samples", "2",
                       "--repeats", "1", "--workers", "1", "2"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert {r["bench"] for r in rows} >= {"data/all/1 process", "data/all/2 workers", "mask/batch 2"}
    assert all(r["median"] > 0 for r in rows)
    assert bench.main(["data", "--data", str(root / "nope"), "--patch", "16"]) == 2
