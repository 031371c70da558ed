"""evaluate.py: metrics against hand-computed values, sliding-window exactness."""

import math

import numpy as np
import pytest
import torch

import evaluate
from evaluate import label_metrics, sliding_window, window_starts


def test_dice_and_friends_by_hand():
    ref = np.zeros((10, 10, 10), bool)
    ref[2:6, 2:6, 2:6] = True  # 64 voxels
    pred = np.roll(ref, 1, axis=0)  # overlap 3 x 4 x 4 = 48
    m = label_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(2 * 48 / 128)
    assert m["jaccard"] == pytest.approx(48 / 80)
    assert m["sensitivity"] == pytest.approx(48 / 64) and m["precision"] == pytest.approx(48 / 64)
    assert m["avd_percent"] == 0
    grown = ref.copy()
    grown[6, 2:6, 2:6] = True  # 80 voxels, all 64 reference voxels found
    m = label_metrics(grown, ref, (2.0, 1.0, 1.0))
    assert m["sensitivity"] == 1 and m["precision"] == pytest.approx(64 / 80)
    assert m["avd_percent"] == pytest.approx(25) and m["ref_ml"] == pytest.approx(64 * 2 / 1000)


def test_empty_cases_are_nan_where_undefined():
    empty = np.zeros((8, 8, 8), bool)
    m = label_metrics(empty, empty, (1, 1, 1))
    assert all(math.isnan(m[k]) for k in ("dice", "jaccard", "sensitivity", "precision", "hd95_mm", "avd_percent"))
    one = empty.copy()
    one[3, 3, 3] = True
    m = label_metrics(empty, one, (1, 1, 1))  # missed lesion
    assert m["dice"] == 0 and m["sensitivity"] == 0 and math.isnan(m["precision"]) and math.isnan(m["hd95_mm"])
    m = label_metrics(one, empty, (1, 1, 1))  # false positive only
    assert m["dice"] == 0 and math.isnan(m["sensitivity"]) and m["precision"] == 0


def test_hd95_in_mm_with_anisotropic_spacing():
    ref = np.zeros((30, 12, 12), bool)
    ref[2:22, 5, 5] = True  # a line of 20 voxels
    pred = np.roll(ref, 1, axis=1)  # the same line one voxel over along y
    assert evaluate.hd95(pred, ref, (1.0, 3.0, 1.0)) == pytest.approx(3.0)
    assert evaluate.hd95(pred, ref, (1.0, 0.5, 1.0)) == pytest.approx(0.5)
    a = np.zeros((12, 12, 12), bool)
    b = a.copy()
    a[2, 2, 2], b[5, 2, 2] = True, True
    assert evaluate.hd95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert evaluate.hd95(ref, ref, (1, 1, 1)) == 0


def test_summary_uses_nanmean_and_counts():
    rows = [
        {"case": c, "metrics": {"1": dict.fromkeys(evaluate.METRICS, v)}}
        for c, v in (("a", 0.5), ("b", float("nan")), ("c", 1.0))
    ]
    s = evaluate.summarise(rows, [1])["1"]["dice"]
    assert (
        s["mean"] == pytest.approx(0.75)
        and s["n"] == 2
        and s["nan_excluded"] == 1
        and s["median"] == pytest.approx(0.75)
    )


def test_window_starts_are_yuccas():
    """Yucca's get_steps_for_sliding_window, written out by hand: steps of patch/2 from 0
    while a window ends before the volume, then one flush with the end."""
    assert window_starts(200, 128, 0.5) == [0, 64, 72]
    assert window_starts(128, 128, 0.5) == [0]
    assert window_starts(251, 64, 0.5) == [0, 32, 64, 96, 128, 160, 187]
    assert window_starts(256, 128, 0.5) == [0, 64, 128]
    assert window_starts(129, 128, 0.5) == [0, 1]
    assert window_starts(100, 32, 0.25) == [0, 24, 48, 68]  # floor(32 * 0.75) = 24


def test_sliding_window_equals_one_forward_when_the_window_covers_the_volume():
    from models import build_model

    torch.manual_seed(0)
    model = build_model("unet_b", 1, 3).eval()
    x = torch.rand(1, 32, 32, 32)
    with torch.no_grad():
        full = model(x[None])[0]
    assert torch.equal(sliding_window(model, x, 32), full)
    # a smaller volume is padded with background, centred (Yucca's pad_to_size: 12 -> 6 before, 6 after;
    # 13 -> 6 before, 7 after), then cropped back
    small = x[:, :20, :19]
    with torch.no_grad():
        ref = model(torch.nn.functional.pad(small, (0, 0, 6, 7, 6, 6))[None])[0, :, 6:26, 6:25]
    assert torch.equal(sliding_window(model, small, 32), ref)


@pytest.mark.parametrize("blend, tta", [("sum", False), ("gaussian", False), ("sum", True)])
def test_stitching_is_exact_for_a_pointwise_model(blend, tta):
    """A 1x1x1 convolution gives the same logits wherever the window lies: Gaussian
    blending (a weighted mean) reproduces the whole-volume output; "sum" gives it times
    the number of windows over each voxel, as Yucca's canvas += out, whose windows are
    counted here with the step rule written out (numpy arange, as Yucca)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 1)
    x = torch.rand(2, 45, 38, 70)
    patch = (16, 16, 32)
    got = sliding_window(conv, x, patch, 0.5, blend, tta, batch=3)
    count = torch.zeros(x.shape[1:])
    steps = []
    for n, p in zip(x.shape[1:], patch):
        s = np.arange(n)[slice(0, n, int(np.floor(p * 0.5)))]
        steps.append(np.append(s[s < n - p], n - p))
    for i in steps[0]:
        for j in steps[1]:
            for k in steps[2]:
                count[i : i + patch[0], j : j + patch[1], k : k + patch[2]] += 1
    with torch.no_grad():
        want = conv(x[None])[0] * (count if blend == "sum" else 1)
    assert count.min() >= 1 and count.max() > 1
    assert torch.allclose(got, want, atol=1e-4)


def test_predict_maps_classes_to_label_values():
    conv = torch.nn.Conv3d(1, 3, 1)
    with torch.no_grad():
        conv.weight.zero_(), conv.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    meta = {"crop_box": [[0, 16]] * 3, "ras_shape": [16] * 3, "native_ornt": [[0, 1], [1, 1], [2, 1]]}
    pred = evaluate.predict(conv, np.zeros((1, 16, 16, 16), np.float32), {"patch": 16, "label_values": [0, 1, 4]}, meta)
    assert pred.dtype == np.uint8 and (pred == 4).all()


def test_native_mapping_resizes_logits_then_argmaxes():
    """On a 0.7 x 1 x 2.6 mm case stored LPS: preprocess.native_argmax equals an independent
    implementation (scipy zoom of each logit map to the cropped box, order 1, then
    argmax, un-crop, undo the reorientation with nibabel) on >= 99.5 % of voxels."""
    import nibabel as nib
    from scipy import ndimage

    import preprocess

    rng = np.random.default_rng(0)
    shape, spacing = (50, 36, 16), (0.7, 1.0, 2.6)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    data = ((g**2).sum(0) < 0.8) * rng.uniform(100, 200, shape)
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # L, P, S
    image, _, meta = preprocess.preprocess_arrays([data.astype(np.float32)], aff)
    logits = torch.from_numpy(
        ndimage.gaussian_filter(rng.standard_normal((3, *image.shape[1:])), (0, 2, 2, 2)).astype(np.float32)
    )
    got = preprocess.native_argmax(logits, meta, chunk=5)
    box = meta["crop_box"]
    size = [b - a for a, b in box]
    zoomed = np.stack(
        [
            ndimage.zoom(c, np.array(size) / np.array(c.shape), order=1, mode="nearest", grid_mode=True)
            for c in logits.numpy()
        ]
    )
    full = np.zeros(meta["ras_shape"], np.uint8)
    full[tuple(slice(a, b) for a, b in box)] = zoomed.argmax(0)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.io_orientation(aff))
    want = nib.orientations.apply_orientation(full, back)
    assert got.shape == want.shape == shape
    assert (got == want).mean() >= 0.995
    # the trilinear argmax is not the nearest-neighbour map of the 1 mm argmax: boundaries differ
    nearest = preprocess.to_native(logits.argmax(0).numpy().astype(np.uint8), meta)
    assert (nearest != want).mean() > (got != want).mean()
