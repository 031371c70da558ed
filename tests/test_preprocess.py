"""preprocess.py: geometry, round trip, intensity recipe, bad inputs, resume, demo."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import preprocess as pp

ROOT = Path(__file__).resolve().parents[1]


def save(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def head(shape=(30, 34, 26), seed=0):
    """Zero air around an ellipsoid of textured tissue: an easy brain stand-in."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (g**2).sum(0) < 0.7
    return (inside * rng.uniform(100, 500, shape)).astype(np.float32)


def affine_for(codes, spacing, origin=(-10.0, 5.0, 3.0)):
    """Affine of an array stored with axis codes `codes` (e.g. LPS) and `spacing`."""
    ornt = nib.orientations.axcodes2ornt(codes)
    aff = np.zeros((4, 4))
    aff[3, 3] = 1
    for i, (ax, flip) in enumerate(ornt.astype(int)):
        aff[ax, i] = flip * spacing[i]
    aff[:3, 3] = origin
    return aff


@pytest.mark.parametrize("codes,spacing", [(("L", "P", "S"), (1.0, 1.0, 2.0)), (("S", "L", "A"), (1.0, 1.0, 1.0))])
def test_orientation_and_spacing(codes, spacing):
    data = head()
    lab = np.zeros(data.shape, np.uint8)
    lab[10:14, 12:15, 9:12] = 1
    aff = affine_for(codes, spacing)
    image, label, meta = pp.preprocess_arrays([data], aff, lab)
    ras = np.array(meta["ras_affine"])
    assert nib.aff2axcodes(ras) == ("R", "A", "S")
    assert np.allclose(meta["resampled_spacing"], 1.0, atol=0.05)
    # independent expectation: nibabel's canonical reorientation, cropped, at 1 mm
    ref = nib.as_closest_canonical(nib.Nifti1Image(lab, aff))
    assert np.allclose(ras, ref.affine) and list(ref.shape) == meta["ras_shape"]
    box = meta["crop_box"]
    nz = np.argwhere(np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(data, aff)).dataobj) > 0)
    # Yucca's box: one voxel past the last foreground voxel kept (get_bbox_for_foreground max + 1, then
    # crop_to_box's slice end + 1), unless the volume ends there
    assert box == [[int(a), min(int(b) + 2, n)] for a, b, n in zip(nz.min(0), nz.max(0), meta["ras_shape"])]
    assert any(b + 2 <= n for b, n in zip(nz.max(0), meta["ras_shape"]))  # the extra voxel is inside here
    assert list(label.shape) == [round((b - a) * s) for (a, b), s in zip(box, meta["spacing"])]

    # the label blob sits at the same world position before and after (within a voxel)
    def world(idx_pre):  # preprocessed voxel -> native RAS voxel -> mm
        native = [a + (i + 0.5) * (b - a) / n - 0.5 for i, (a, b), n in zip(idx_pre, box, label.shape)]
        return nib.affines.apply_affine(ras, native)

    before = nib.affines.apply_affine(aff, np.argwhere(lab).mean(0))
    assert np.allclose(before, world(np.argwhere(label).mean(0)), atol=0.6)
    if spacing == (1.0, 1.0, 1.0):  # a pure permutation: voxel-exact
        full = np.zeros(meta["ras_shape"], np.uint8)
        full[tuple(slice(a, b) for a, b in box)] = label
        assert np.array_equal(full, np.asanyarray(ref.dataobj))


@pytest.mark.parametrize(
    "codes,spacing",
    [(("L", "P", "S"), (1.0, 1.0, 2.0)), (("A", "S", "R"), (2.0, 1.0, 1.0)), (("R", "A", "S"), (1.0, 1.0, 1.0))],
)
def test_sidecar_round_trip_of_a_label(codes, spacing):
    """Tolerance: exact wherever the 1 mm grid holds the original voxel centres, which
    is the case for these spacings (1 and 2 mm); we require 100 %."""
    data = head(seed=1)
    rng = np.random.default_rng(2)
    lab = ((data > 0) & (rng.random(data.shape) < 0.3)).astype(np.uint8) * rng.integers(1, 4, data.shape).astype(
        np.uint8
    )
    aff = affine_for(codes, spacing)
    _, label, meta = pp.preprocess_arrays([data], aff, lab)
    back = pp.to_native(label, meta)
    assert back.shape == lab.shape
    assert np.array_equal(back, lab)


def test_anisotropic_sub_millimetre_equals_the_authors_order():
    """An independent implementation of the authors' order with skimage (what their
    Yucca code calls): RAS, crop to channel 0 > 0, normalise at native resolution,
    skimage.transform.resize(order=3) with its defaults to the rounded 1 mm size.
    Tolerance: 1e-4 of the [0, 1] range (float32 rounding of two resamplers)."""
    skimage_resize = pytest.importorskip("skimage.transform").resize
    spacing = (0.9, 1.2, 1.5)
    data = head((44, 36, 28), seed=4) * 3.7 + 0.0
    aff = affine_for(("L", "P", "S"), spacing)
    image, _, meta = pp.preprocess_arrays([data], aff)
    ras = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(data, aff)).dataobj).astype(np.float64)
    nz = np.argwhere(ras > 0)
    x = ras[tuple(slice(a, b + 2) for a, b in zip(nz.min(0), nz.max(0)))]  # Yucca keeps one voxel past the end
    fg = x != x.min()
    x = np.minimum(x, np.quantile(x[fg], 0.99))
    x = (x - x[fg].mean()) / x[fg].std()
    x = (x - x.min()) / (x.max() - x.min())
    rsp = nib.affines.voxel_sizes(nib.as_closest_canonical(nib.Nifti1Image(data, aff)).affine)
    target = np.round(np.array(x.shape) * rsp).astype(int)
    want = skimage_resize(x, target, order=3)
    assert image.shape == (1, *target)
    assert np.abs(image[0] - want).max() <= 1e-4


def test_intensity_recipe():
    data = head(seed=3)
    image, _, meta = pp.preprocess_arrays([data], np.eye(4))
    x = image[0]
    fg = data[data != data.min()]
    s = meta["intensity"][0]
    assert s["clip"] == pytest.approx(np.percentile(fg, 99), rel=1e-3)
    clipped = np.minimum(fg, s["clip"])
    assert s["mean"] == pytest.approx(clipped.mean(), rel=1e-3) and s["std"] == pytest.approx(clipped.std(), rel=1e-3)
    assert x.min() == 0 and x.max() == pytest.approx(1)
    crop = tuple(slice(a, b) for a, b in meta["crop_box"])
    orig = data[crop]
    assert np.all(x[orig == 0] == 0)  # background is 0
    assert np.allclose(x[orig >= s["clip"]], 1, atol=1e-4)  # clipped top 1 % all at the maximum
    # linear in between: the rescaled value of a voxel follows from the recorded values
    z = (np.minimum(orig, s["clip"]) - s["mean"]) / s["std"]
    assert np.allclose(x, (z - s["z_min"]) / (s["z_max"] - s["z_min"]), atol=1e-3)
    # cropped to the head's bounding box
    nz = np.argwhere(data > 0)
    assert meta["crop_box"] == [
        [int(a), min(int(b) + 2, n)] for a, b, n in zip(nz.min(0), nz.max(0), meta["ras_shape"])
    ]


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_dataset(root, n_good=3):
    aff = affine_for(("L", "P", "S"), (1.0, 1.0, 1.5))
    for i in range(n_good):
        d = head(seed=10 + i)
        save(root / "imagesTr" / f"good{i}_0000.nii.gz", d, aff)
        lab = np.zeros(d.shape, np.uint8)
        lab[12:16, 12:16, 10:13] = 1
        save(root / "labelsTr" / f"good{i}.nii.gz", lab, aff)
    (root / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "lesion": 1}})
    )


def add_bad_cases(root):
    aff = np.eye(4)
    ok_lab = np.zeros((30, 34, 26), np.uint8)
    bad = {}
    # truncated gzip
    save(root / "imagesTr" / "trunc_0000.nii.gz", head(), aff)
    p = root / "imagesTr" / "trunc_0000.nii.gz"
    p.write_bytes(p.read_bytes()[:400])
    bad["trunc"] = "cannot read"
    # not NIfTI at all
    (root / "imagesTr" / "text_0000.nii").write_text("this is not an image\n" * 50)
    bad["text"] = "cannot read"
    # 2D image
    save(root / "imagesTr" / "flat_0000.nii.gz", np.ones((30, 30), np.float32), aff)
    bad["flat"] = "expected a 3D volume"
    # NaN voxels
    d = head()
    d[3, 3, 3] = np.nan
    save(root / "imagesTr" / "nan_0000.nii.gz", d, aff)
    bad["nan"] = "NaN/inf"
    # constant
    save(root / "imagesTr" / "const_0000.nii.gz", np.full((30, 30, 30), 7, np.float32), aff)
    bad["const"] = "empty"
    # too small
    save(root / "imagesTr" / "small_0000.nii.gz", head((30, 30, 10)), aff)
    bad["small"] = "shorter than 15"
    # label grid differs
    save(root / "imagesTr" / "grid_0000.nii.gz", head(), aff)
    save(root / "labelsTr" / "grid.nii.gz", np.zeros((30, 34, 25), np.uint8), aff)
    bad["grid"] = "must share the image's voxel grid"
    # label values not in dataset.json
    save(root / "imagesTr" / "vals_0000.nii.gz", head(), aff)
    lab = ok_lab.copy()
    lab[5, 5, 5] = 7
    save(root / "labelsTr" / "vals.nii.gz", lab, aff)
    bad["vals"] = "not in dataset.json"
    for name in ("trunc", "text", "flat", "nan", "const", "small"):
        save(root / "labelsTr" / f"{name}.nii.gz", ok_lab, aff)
    return bad


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "preprocess.py"), *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


def test_bad_inputs_are_named_and_skipped(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_dataset(raw)
    bad = add_bad_cases(raw)
    before = {p: sha(p) for p in raw.rglob("*") if p.is_file()}
    r = run_cli("--input", raw, "--output", out, "--workers", 2, "--quiet", "--test-fraction", 0)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    failed = {f["case"]: f["reason"] for f in json.loads((out / "failed.json").read_text())}
    assert set(failed) == set(bad)
    for case, words in bad.items():
        assert words in failed[case], (case, failed[case])
        line = next(ln for ln in r.stderr.splitlines() if ln.startswith(f"FAILED {case}:"))
        assert words in line
    ds = json.loads((out / "dataset.json").read_text())
    assert sorted(c["case"] for c in ds["cases"]) == ["good0", "good1", "good2"]
    for i in range(3):
        img = np.load(out / "images" / f"good{i}.npy")
        assert img.dtype == np.float16 and img.ndim == 4 and 0 <= img.min() and img.max() <= 1
        assert np.load(out / "labels" / f"good{i}.npy").dtype == np.uint8
    assert {p: sha(p) for p in raw.rglob("*") if p.is_file()} == before  # inputs untouched


def test_resume_skips_done_and_redoes_deleted(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_dataset(raw, n_good=4)
    done, skipped, failed = pp.run(raw, out, workers=1, quiet=True)
    assert (done, skipped, failed) == (4, 0, [])
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "meta").iterdir()}
    assert pp.run(raw, out, workers=1, quiet=True)[:2] == (0, 4)
    (out / "images" / "good2.npy").unlink()
    (out / "meta" / ".good1.json.123.tmp").write_text("{half")  # left by a killed run
    assert pp.run(raw, out, workers=1, quiet=True)[:2] == (1, 3)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "meta").iterdir()}
    assert set(after) == set(stamp)  # the stale temp file is gone
    assert [n for n in stamp if stamp[n] != after[n]] == ["good2.json"]
    # a truncated array (killed mid-write by another tool) is not trusted
    (out / "images" / "good0.npy").write_bytes(b"\x93NUMPY")
    assert pp.run(raw, out, workers=1, quiet=True)[:2] == (1, 3)
    assert pp.run(raw, out, workers=1, quiet=True, overwrite=True)[:2] == (4, 0)


def test_seeded_test_split_is_recorded(tmp_path):
    raw = tmp_path / "raw"
    make_dataset(raw, n_good=8)
    pp.run(raw, tmp_path / "a", workers=1, quiet=True, seed=5)
    pp.run(raw, tmp_path / "b", workers=1, quiet=True, seed=5)
    a, b = (json.loads((tmp_path / x / "dataset.json").read_text()) for x in "ab")
    assert a["cases"] == b["cases"] and a["test_split"]["seed"] == 5 and a["test_split"]["method"] == "kit"
    assert sum(c["split"] == "test" for c in a["cases"]) == 2


def test_unlabelled_folder_with_4d_split(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    save(raw / "sub-01" / "anat" / "sub-01_T1w.nii.gz", head(), np.eye(4))
    save(raw / "sub-02" / "func.nii", np.stack([head(seed=s) for s in range(3)], -1), np.eye(4))
    done, _, failed = pp.run(raw, out, workers=1, quiet=True)
    assert failed == [] and done == 4
    names = sorted(p.stem for p in (out / "images").iterdir())
    assert names == ["sub-01_anat_sub-01_T1w", "sub-02_func_v000", "sub-02_func_v001", "sub-02_func_v002"]
    assert not (out / "labels").exists()


@pytest.mark.parametrize(
    "args,words",
    [
        (["--input", "/nonexistent/raw", "--output", "x"], "--input /nonexistent/raw: no such folder"),
        (["--input", "{raw}", "--output", "{raw}/out"], "is inside --input"),
        (["--demo", "d", "--input", "{raw}"], "do not combine"),
        (["--input", "{raw}", "--output", "o", "--workers", "0"], "--workers must be >= 1"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags(tmp_path, args, words):
    (tmp_path / "raw").mkdir()
    r = run_cli(*[a.replace("{raw}", str(tmp_path / "raw")) for a in args])
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_demo_is_deterministic_and_non_ras(tmp_path):
    pp.make_demo(tmp_path / "a", n_cases=4, seed=3, quiet=True)
    pp.make_demo(tmp_path / "b", n_cases=4, seed=3, quiet=True)
    codes = set()
    for f in sorted((tmp_path / "a" / "imagesTr").iterdir()):
        ia, ib = nib.load(str(f)), nib.load(str(tmp_path / "b" / "imagesTr" / f.name))
        assert np.array_equal(ia.get_fdata(), ib.get_fdata()) and np.allclose(ia.affine, ib.affine)
        codes.add("".join(nib.aff2axcodes(ia.affine)))
        assert max(nib.affines.voxel_sizes(ia.affine)) > 1.0  # anisotropic
    assert codes - {"RAS"}
    labs = [np.asanyarray(nib.load(str(p)).dataobj) for p in (tmp_path / "a" / "labelsTr").iterdir()]
    assert all(set(np.unique(x)) == {0, 1} for x in labs)
