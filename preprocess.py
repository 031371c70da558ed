"""
Raw NIfTI -> training-ready arrays (the BRAINS-45K recipe of AMAES), and the demo data.

    python preprocess.py --input RAW --output OUT [--workers N] [--overwrite]
    python preprocess.py --demo demo            # synthetic dataset -> demo/raw, demo/preprocessed

RAW is either
  - an nnU-Net-style labelled dataset: imagesTr/<case>_0000.nii.gz (one file per
    channel), labelsTr/<case>.nii.gz, optional imagesTs/ (+ labelsTs/), dataset.json.
    Without imagesTs, a seeded 25 % of the training cases becomes the test split.
  - any other folder: searched recursively for *.nii / *.nii.gz, each 3D file one
    single-channel pretraining volume; a 4D file is split into its 3D volumes
    (cases <name>_v000, <name>_v001, ...), since each MRI sequence or time point is its
    own pretraining volume.

A challenge download in its own layout is read with --format brats21|isles22|wmh|msseg,
as the authors' Yucca task conversions (channel order, label mapping, test cases: their
train_test_split for BraTS21 / ISLES22, the challenge's test folders for WMH / MSSEG);
--pretraining writes such a download's training cases as unlabelled volumes instead.

Per case, in the order of the authors' code (Yucca 1.1.7, which AMAES used to build
BRAINS-45K): reorient to RAS (axis permutation and flips, exact) -> crop to the
bounding box of channel 0's voxels > 0, plus one voxel at the upper end of each axis
(Yucca's box ends at max + 1 and its crop slices to the end + 1) -> on thick-slice
datasets the thick axis first (Yucca's determine_transpose) -> per channel, at native resolution: clip at
the 99th percentile of the foreground (voxels != the minimum), z-score with the
foreground mean/std, min-max rescale to [0, 1] (background = 0) -> resize to 1 mm
(size rounded; cubic B-spline with anti-aliasing where an axis shrinks, as
skimage.transform.resize; labels nearest). Written to OUT:
  images/<case>.npy  float16 (C, X, Y, Z)    labels/<case>.npy  uint8 (X, Y, Z)
  meta/<case>.json   sources, original geometry, crop box, intensity values
  dataset.json       cases with split, channels, labels;  failed.json  what failed and why
Every file is written under a temporary name and renamed; meta/<case>.json is written
last and marks the case done, so a rerun skips done cases, redoes anything a killed
run left half-written and retries failures. Input files are only read.
Exit status: 0 when every input was used, 1 when any case failed, 2 for bad flags.
"""

import argparse
import concurrent.futures as cf
import functools
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

MIN_SIDE = 15  # volumes with a shorter side are rejected (BRAINS-45K recipe)
RECIPE = (
    2  # bumped when the recipe's output changes (2: Yucca's crop end, the planned transpose): older cases are redone
)


class CaseError(Exception):
    """A problem with one input case: reported, recorded in failed.json, then skipped."""


class InputError(Exception):
    """The input as a whole is unusable (an empty folder, a --format that finds nothing):
    one line, exit 2, and nothing written."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors as one line that points at --help, not the usage block
    before it (every script of the kit parses its flags with this)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see python {self.prog} --help)\n")


def unwritable(path):
    """None when files can be made in the folder `path` (created if missing), else why not."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable (permission denied)"
    return None


# -----------------------------------------------------------------------------
# Atomic writes (every file the kit writes goes through write_atomic) and JSON


def write_atomic(path, write, keep=None):
    """write(tmp) to a temporary file next to `path`, fsync it, rename it over `path`,
    fsync the folder: a reader sees the old file or the new one, never half of one,
    even after a crash or power loss. keep: rename the old `path` to this first.
    On any failure (a full disk) the temporary file is removed and the error raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if keep is not None and path.exists():
            os.replace(path, keep)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # the renames themselves reach the disk with the folder's entry
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # folders cannot be fsynced on some file systems; the file itself is safe
        pass


def clean_json(x):
    """x with every non-finite float (NaN, inf) replaced by None, so the JSON it gives
    is standard JSON (null) that every tool can read."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean_json(v) for v in x]
    if isinstance(x, np.generic):
        return clean_json(x.item())
    return x


def save_json(path, obj):
    write_atomic(path, lambda p: p.write_text(json.dumps(clean_json(obj), indent=1, allow_nan=False)))


def save_npy(path, arr):
    def write(p):
        with open(p, "wb") as f:
            np.save(f, arr)

    write_atomic(path, write)


# -----------------------------------------------------------------------------
# Reading and checking one NIfTI


def read_nifti(path, volume=None, opened=None):
    """(data float32 array, affine) of a NIfTI file, fully read so that truncation shows.
    volume: read only that 3D volume of a 4D file. opened: a dict that keeps the file
    open between calls, so reading volumes 0, 1, 2, ... of a .nii.gz in order
    decompresses the file once in all (gzip seeks forward from where it stopped),
    and only one volume is in memory at a time."""
    try:
        if opened is None or str(path) not in opened:
            img = nib.load(str(path), keep_file_open=opened is not None)
            if opened is not None:
                opened[str(path)] = img
        img = opened[str(path)] if opened is not None else img
        data = np.asanyarray(img.dataobj if volume is None else img.dataobj[..., volume], dtype=np.float32)
    except Exception as e:  # nibabel, gzip, zlib and EOF errors all mean the same to a user
        raise CaseError(
            f"cannot read as NIfTI ({type(e).__name__}: {str(e)[:120]}); "
            "the file is corrupt, truncated or not NIfTI: re-export or re-download it"
        )
    return data, img.affine


def check_volume(data, what):
    if data.ndim != 3:
        raise CaseError(f"{what} has shape {data.shape}, expected a 3D volume")
    if min(data.shape) < MIN_SIDE:
        raise CaseError(f"{what} has shape {data.shape}: a side is shorter than {MIN_SIDE} voxels")
    if not np.isfinite(data).all():
        raise CaseError(f"{what} has {int((~np.isfinite(data)).sum())} NaN/inf voxels; fix or remove them")
    if data.min() == data.max():
        raise CaseError(f"{what} is empty (every voxel is {data.min():g})")


def same_grid(a_shape, a_aff, b_shape, b_aff, tol=1e-3):
    return tuple(a_shape) == tuple(b_shape) and np.allclose(a_aff, b_aff, atol=tol)


# -----------------------------------------------------------------------------
# Resizing: skimage.transform.resize's values, axis by axis


def _taps(n_in, n_out, order):
    """Source indices and weights of a resize along one axis, for skimage's (and
    scipy.ndimage.zoom's grid_mode) coordinates: output voxel o reads the input at
    (o + 0.5) * n_in / n_out - 0.5. order 0: nearest; 1: linear; 3: cubic B-spline
    (weights of the spline coefficients). Indices outside the axis are mirrored
    (skimage's default mode 'reflect' is ndimage's 'mirror')."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        idx, w = np.floor(src + 0.5).astype(np.int64)[None], np.ones((1, n_out))
    else:
        i = np.floor(src).astype(np.int64)
        t = src - i
        if order == 1:
            idx, w = np.stack([i, i + 1]), np.stack([1 - t, t])
        else:
            idx = np.stack([i - 1, i, i + 1, i + 2])
            w = np.stack([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3]) / 6
    if n_in == 1:
        return np.zeros_like(idx), w
    period = 2 * (n_in - 1)
    idx = np.abs(idx) % period
    return np.where(idx > n_in - 1, period - idx, idx), w


def resize(x, shape, order=3):
    """skimage.transform.resize(x, shape, order) with its defaults (mode 'reflect',
    Gaussian anti-aliasing with sigma (factor - 1) / 2 along axes that shrink, output
    clipped to the input's range), which is what the authors' Yucca preprocessing
    calls: the same values to float32 rounding (tests compare), but computed axis
    by axis. A tensor-product B-spline evaluated on a grid factorises, so each axis
    costs its 4 taps instead of 4^3 = 64 per voxel: 4-10x faster. order 0 (labels)
    picks the nearest voxel, without anti-aliasing."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = x.min(), x.max()
    factors = np.array(x.shape, float) / np.array(shape, float)
    if order > 0 and np.any(factors > 1):
        x = ndimage.gaussian_filter(x, np.maximum(0, (factors - 1) / 2), mode="mirror").astype(np.float32)
    for ax, n in enumerate(shape):
        if n == x.shape[ax]:
            continue  # an unchanged axis: interpolation at the grid nodes returns them
        c = ndimage.spline_filter1d(x, 3, axis=ax, mode="mirror", output=np.float32) if order == 3 else x
        idx, w = _taps(x.shape[ax], n, order)
        c = np.moveaxis(c, ax, 0)
        w = w.astype(np.float32).reshape(w.shape + (1,) * (c.ndim - 1))
        out = c[idx[0]] * w[0]
        for t in range(1, len(idx)):
            out += c[idx[t]] * w[t]
        x = np.moveaxis(out, 0, ax)
    return np.clip(x, lo, hi) if order > 0 else x


# -----------------------------------------------------------------------------
# The recipe, forward and back


def normalise(x):
    """Yucca's volume_wise_znorm: foreground = voxels != the minimum; clip at the
    foreground's 99th percentile, z-score with the foreground's mean and std, then
    min-max rescale the whole volume to [0, 1]. x: (X, Y, Z). The z-score is an
    affine map, which the min-max rescale undoes, so the result is computed as
    (min(x, clip) - min) / (max - min) of the clipped volume in one pass (the same
    values to float rounding); mean and std are recorded in the meta."""
    lo = float(x.min())
    v = x[x != lo]
    clip = float(np.percentile(v, 99))
    v = np.minimum(v, clip)
    mean, std = float(v.mean()), float(v.std())
    hi = min(float(x.max()), clip)
    out = (np.minimum(x, clip) - lo) * np.float32(1 / max(hi - lo, 1e-8))
    std = max(std, 1e-8)
    return out.astype(np.float32, copy=False), {
        "clip": clip,
        "mean": mean,
        "std": std,
        "z_min": (lo - mean) / std,
        "z_max": (hi - mean) / std,
    }


def preprocess_arrays(channels, affine, label=None, transpose=None):
    """The authors' order (Yucca 1.1.7, functional/preprocessing.py): reorient to
    RAS, crop to the bounding box of channel 0's voxels > 0 (plus one voxel at the
    upper end of each axis, as Yucca's get_bbox_for_foreground + crop_to_box),
    transpose the axes if the dataset's plan says so
    (determine_transpose), normalise each channel (normalise), resize to 1 mm (cubic,
    anti-aliased, resize; labels nearest) with the size rounded. channels: list of
    (X, Y, Z) arrays on one grid with `affine`; label likewise or None. Returns (image
    (C, x, y, z) float32 in [0, 1], label (x, y, z) uint8 or None, meta: what
    to_native needs to map back exactly)."""
    native_ornt = nib.io_orientation(affine)
    ornt = nib.orientations.ornt_transform(native_ornt, nib.orientations.axcodes2ornt("RAS"))  # permutation + flips
    ras = [nib.orientations.apply_orientation(c, ornt) for c in channels]
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, channels[0].shape)
    spacing = nib.affines.voxel_sizes(ras_affine)
    above = ras[0] > 0
    box = []
    for d in range(3):  # the bounding box from three 1-D profiles: far cheaper than argwhere on the volume
        hit = np.flatnonzero(above.any(axis=tuple(i for i in range(3) if i != d)))
        if len(hit) == 0:
            raise CaseError(
                "channel 0 has no voxel above 0, so there is nothing to crop to "
                "(the recipe crops to the bounding box of the voxels > 0)"
            )
        # Yucca's get_bbox_for_foreground ends the box at max + 1 and crop_to_box slices to end + 1:
        # the crop keeps one voxel past the foreground on every axis (where the volume has one)
        box.append([int(hit[0]), min(int(hit[-1]) + 2, above.shape[d])])
    crop = tuple(slice(a, b) for a, b in box)
    cropped = [r[crop] for r in ras]
    # Yucca's planner may move a thick-slice axis first (determine_transpose); after the crop, before the resize
    transpose = list(transpose or (0, 1, 2))
    cropped = [np.transpose(c, transpose) for c in cropped]
    spacing_t = [float(spacing[t]) for t in transpose]
    target = [max(1, int(round(n * s))) for n, s in zip(cropped[0].shape, spacing_t)]  # 1 mm
    image, stats = [], []
    for c in cropped:
        if c.min() == c.max():
            raise CaseError("a channel is constant inside the head's bounding box")
        x, st = normalise(c)
        image.append(resize(x, target, order=3))
        stats.append(st)
    lab = None
    if label is not None:
        lab = np.transpose(nib.orientations.apply_orientation(label, ornt)[crop], transpose)
        lab = resize(lab, target, order=0).round().astype(np.uint8)
    meta = {
        "native_ornt": native_ornt.tolist(),
        "ras_shape": [int(s) for s in ras[0].shape],
        "ras_affine": ras_affine.tolist(),
        "spacing": [float(s) for s in spacing],
        "crop_box": box,
        "transpose": transpose,
        "shape": [len(image), *target],
        "resampled_spacing": [n * s / t for n, s, t in zip(cropped[0].shape, spacing_t, target)],
        "intensity": stats,
    }
    return np.stack(image), lab, meta


def _from_ras(arr, meta):
    """Undo the reorientation: RAS axes back to the original file's axes."""
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), np.array(meta["native_ornt"]))
    return nib.orientations.apply_orientation(arr, back)


def to_native(arr, meta):
    """A label map on the preprocessed grid (x, y, z) -> the original image's grid:
    nearest resize back to the cropped box, background outside it, reorientation
    undone. Exact wherever the 1 mm grid holds the original voxel centres."""
    arr = np.transpose(arr, np.argsort(meta.get("transpose") or (0, 1, 2)))  # the plan's axis order undone
    full = np.zeros(meta["ras_shape"], dtype=arr.dtype)
    box = meta["crop_box"]
    full[tuple(slice(a, b) for a, b in box)] = resize(arr, [b - a for a, b in box], order=0).astype(arr.dtype)
    return _from_ras(full, meta)


def native_argmax(logits, meta, chunk=8, regions=False):
    """Class index map on the original image's grid from logits (K, x, y, z) (a tensor)
    on the preprocessed grid, as the authors' reverse_preprocessing: the logits are
    resized trilinearly (torch interpolate, align_corners False) to the cropped box
    at native resolution and the argmax is taken there; outside the box is background.
    regions=True (sigmoid outputs, one per region): bit k of the result is set where
    logit k > 0. Memory stays bounded for 512 x 512 x 300 grids: the output is made in
    slabs of `chunk` planes (linear interpolation along the first axis, bilinear along
    the other two), never holding the full-resolution logits. Returns uint8 (X, Y, Z)."""
    box = meta["crop_box"]
    size = [b - a for a, b in box]
    back = np.argsort(meta.get("transpose") or (0, 1, 2))  # the plan's axis order undone (a view, no copy)
    logits = logits.permute(0, *[int(b) + 1 for b in back])
    if logits.shape[0] > (8 if regions else 255):
        raise ValueError("native_argmax writes uint8: at most 255 classes or 8 regions")
    bits = 2 ** torch.arange(logits.shape[0], device=logits.device).view(1, -1, 1, 1)
    n0 = logits.shape[1]
    src = ((torch.arange(size[0], dtype=torch.float64) + 0.5) * (n0 / size[0]) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n0 - 1)
    i1 = (i0 + 1).clamp(max=n0 - 1)
    w1 = (src - i0).float().to(logits.device)
    out = np.zeros(meta["ras_shape"], dtype=np.uint8)
    for start in range(0, size[0], chunk):
        o = slice(start, min(start + chunk, size[0]))
        lo, hi = int(i0[o].min()), int(i1[o].max())
        planes = torch.nn.functional.interpolate(
            logits[:, lo : hi + 1].float().transpose(0, 1), size=size[1:], mode="bilinear", align_corners=False
        )  # (n, K, Y, Z)
        w = w1[o].view(-1, 1, 1, 1)
        slab = planes[i0[o] - lo] * (1 - w) + planes[i1[o] - lo] * w  # (chunk, K, Y, Z)
        out[box[0][0] + start : box[0][0] + o.stop, box[1][0] : box[1][1], box[2][0] : box[2][1]] = (
            ((slab > 0) * bits).sum(1).to(torch.uint8).cpu().numpy()
            if regions
            else slab.argmax(1).to(torch.uint8).cpu().numpy()
        )
    return _from_ras(out, meta)


# -----------------------------------------------------------------------------
# Finding the cases


def label_values(dataset_json):
    """Label values allowed by an nnU-Net dataset.json (v2 {name: value} or v1 {value: name})."""
    labels = dataset_json.get("labels")
    if not labels:
        return None
    vals = set()
    for k, v in labels.items():
        if str(k).isdigit():  # v1: {"0": "background"}
            vals.add(int(k))
        else:  # v2: {"background": 0}, or a region given as a list of values
            vals.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    return sorted(vals)


def label_semantics(ds):
    """What an nnU-Net (v2 or v1) dataset.json says about its labels: names of the
    values, the ignore label (named "ignore"), training regions (a label given as a
    list of values: nnU-Net's region training, with regions_class_order), and the
    evaluation regions (a converter's, else the training regions, else each label)."""
    labels = ds.get("labels") or {}
    names, regions, ignore = {}, {}, None
    for k, v in labels.items():
        if str(k).isdigit():  # v1: {"0": "background"}
            names[int(k)] = str(v)
        elif isinstance(v, (list, tuple)):
            regions[k] = [int(x) for x in v]
        elif k == "ignore":
            ignore = int(v)
        else:
            names[int(v)] = k
    for vals in regions.values():
        for v in vals:
            names.setdefault(v, f"label {v}")
    ev = ds.get("evaluation") or {}
    return {
        "label_names": {str(v): n for v, n in sorted(names.items())},
        "ignore_label": ignore,
        "evaluation_ignore": ev.get("ignore", ignore),
        "training_regions": regions or None,
        "regions_class_order": ds.get("regions_class_order"),
        "evaluation_regions": ev.get("regions") or regions or {n: [v] for v, n in sorted(names.items()) if v != 0},
        "metric_rules": ev.get("rules", "default"),
    }


# -----------------------------------------------------------------------------
# The paper's downstream datasets, read in their download layouts


def _one(root, pattern):
    found = sorted(root.glob(pattern))
    return found[0] if found else None


def sklearn_test_names(names, random_state, test_size=0.25):
    """The test part of scikit-learn's train_test_split(names, random_state=random_state)
    (test_size 0.25, shuffled), with numpy alone: ShuffleSplit takes ceil(0.25 n) test
    items, the first ones of np.random.RandomState(random_state).permutation(n)."""
    perm = np.random.RandomState(random_state).permutation(len(names))
    return [names[i] for i in perm[: math.ceil(test_size * len(names))]]


# The authors' test splits (Yucca's task conversions Task012_BraTS21 and Task005_ISLES22):
# train_test_split over the sorted subject folder names, and how many subjects their download had
AUTHORS_SPLITS = {"brats21": (4215532, 1251), "isles22": (859032, 250)}


def authors_split(fmt, cases, failed, names):
    """Put the authors' test cases of `fmt` in the test split; `names` are every subject
    folder of the download (failed ones too: the authors split the folder list)."""
    seed, expected = AUTHORS_SPLITS[fmt]
    names = sorted(set(names))  # batchgenerators' subdirs(join=False) sorts the names
    test = set(sklearn_test_names(names, seed))
    for c in cases:
        c["split"] = "test" if c["case"] in test else "train"
    if names and len(names) != expected:  # none at all: run() refuses the input in one line
        print(
            f"preprocess.py: warning: {len(names)} {fmt} subject folders, the authors' download has {expected}: the "
            f"test split is the authors' rule (train_test_split, random_state {seed}) over these, so it holds other "
            f"cases than theirs",
            file=sys.stderr,
        )
    return {
        "method": "authors",
        "rule": f"scikit-learn train_test_split(sorted subject folders, test_size=0.25, random_state={seed})",
        "random_state": seed,
        "subjects": len(names),
    }


def find_brats21(root):
    """BraTS 2021 (RSNA-ASNR-MICCAI): BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz.
    Channels flair, t1, t1ce, t2 and labels 0, 1 NCR, 2 ED, 4 ET -> 3 ET, as the authors'
    Yucca Task012_BraTS21, with its test split (authors_split). The challenge's regions
    whole tumour (1, 2, 3), tumour core (1, 3) and enhancing tumour (3) with the BraTS
    rules are evaluate.py --metrics challenge."""
    cases, failed = [], []
    subjects = sorted({p.parent for m in ("flair", "t1", "t1ce", "t2", "seg") for p in root.rglob(f"*_{m}.nii*")})
    for d in subjects:
        name = d.name
        files = [_one(d, f"{name}_{m}.nii*") for m in ("flair", "t1", "t1ce", "t2")]
        label = _one(d, f"{name}_seg.nii*")
        if None in files:
            failed.append(
                {
                    "case": name,
                    "files": [str(f) for f in files if f],
                    "reason": "missing modality: "
                    + ", ".join(m for m, f in zip(("flair", "t1", "t1ce", "t2"), files) if f is None),
                }
            )
            continue
        cases.append(
            {
                "case": name,
                "split": "train",
                "files": [str(f) for f in files],
                "label": str(label) if label else None,
                "label_map": {4: 3},
            }
        )
    meta = {
        "name": "BraTS2021",
        "channel_names": {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"},
        "labels": {"background": 0, "necrotic tumour core": 1, "peritumoral edema": 2, "enhancing tumour": 3},
        "evaluation": {
            "regions": {"whole tumour": [1, 2, 3], "tumour core": [1, 3], "enhancing tumour": [3]},
            "rules": "brats",
        },
        "test_split": authors_split("brats21", cases, failed, [d.name for d in subjects]),
    }
    for c in cases:
        if c["split"] == "train" and not c["label"]:  # a subject without a segmentation cannot be trained on
            failed.append({"case": c["case"], "files": c["files"], "reason": f"no {c['case']}_seg.nii.gz"})
    cases = [c for c in cases if c["label"] or c["split"] == "test"]
    return cases, failed, meta


def find_isles22(root):
    """ISLES 2022 (BIDS): sub-strokecaseNNNN/ses-0001/{anat/*_FLAIR, dwi/*_dwi, dwi/*_adc}.nii.gz,
    masks derivatives/sub-*/ses-0001/*_msk.nii.gz on the DWI grid (the first release put
    these under rawdata/ and derivatives/). Channels FLAIR, DWI, ADC, each resampled onto
    the mask's grid with cubic splines, as the authors' Yucca Task005_ISLES22 (the FLAIR
    has its own spacing and orientation), with its test split (authors_split over the
    subjects that have a mask); label 1 = infarct. The ISLES rules are evaluate.py
    --metrics challenge."""
    cases, failed = [], []
    masks = sorted(root.rglob("*_msk.nii*"))
    for msk in masks:
        sub = msk.name.split("_")[0]
        found = {m: _one(root, f"**/{sub}/**/{sub}*_{m}.nii*") for m in ("FLAIR", "dwi", "adc")}
        files = [found["FLAIR"], found["dwi"], found["adc"]]
        if None in files:
            failed.append(
                {
                    "case": sub,
                    "files": [str(msk)],
                    "reason": "missing modality: " + ", ".join(m for m, f in found.items() if f is None),
                }
            )
            continue
        cases.append(
            {"case": sub, "split": "train", "files": [str(f) for f in files], "label": str(msk), "onto_label": True}
        )
    meta = {
        "name": "ISLES2022",
        "channel_names": {"0": "FLAIR", "1": "DWI", "2": "ADC"},
        "labels": {"background": 0, "infarct": 1},
        "evaluation": {"regions": {"infarct": [1]}, "rules": "isles"},
        "test_split": authors_split("isles22", cases, failed, [m.name.split("_")[0] for m in masks]),
    }
    return cases, failed, meta


def find_wmh(root, with_t1=False, label2_ignore=False):
    """WMH Segmentation Challenge 2017: <id>/pre/{FLAIR,T1}.nii.gz and <id>/wmh.nii.gz
    (at any depth: sites Utrecht, Singapore, Amsterdam/GE3T...; cases under a folder named
    test/Test go to the test split, as the authors' conversions take the challenge's Train
    and Test folders). By default the authors' default task, Yucca's Task006_WMH_Flair:
    FLAIR only (so a 1-channel pretrained stem transfers) and labels 0, 1 WMH, 2 other
    pathology, label 2 a class trained and scored like the others.
    with_t1: FLAIR + T1 (their Task008_WMH). label2_ignore: label 2 is the ignore label
    (nothing in the loss) and --metrics challenge scores as the WMH challenge (label 2
    masked out of the prediction, label 1 scored)."""
    cases, failed = [], []
    want = ("FLAIR", "T1") if with_t1 else ("FLAIR",)
    for lab in sorted(root.rglob("wmh.nii*")):
        d = lab.parent.parent if lab.parent.name == "pre" else lab.parent
        files = [_one(d / "pre", f"{m}.nii*") for m in want]
        name = "_".join(p for p in d.relative_to(root).parts)
        if None in files:
            failed.append(
                {"case": name, "files": [str(lab)], "reason": "missing " + " or ".join(f"pre/{m}.nii.gz" for m in want)}
            )
            continue
        test = any(p.lower() == "test" for p in d.relative_to(root).parts)
        cases.append(
            {"case": name, "split": "test" if test else "train", "files": [str(f) for f in files], "label": str(lab)}
        )
    meta = {
        "name": "WMH2017",
        "channel_names": {str(i): m for i, m in enumerate(want)},
        "test_split": {"method": "challenge", "rule": "the challenge's own Train / Test folders"},
    }
    meta["labels"] = {
        "background": 0,
        "white matter hyperintensities": 1,
        ("ignore" if label2_ignore else "other pathology"): 2,
    }
    # the challenge's scoring, whichever way label 2 was trained: label 2 masked out, label 1 scored
    meta["evaluation"] = {"regions": {"white matter hyperintensities": [1]}, "ignore": 2, "rules": "wmh"}
    return cases, failed, meta


def find_msseg(root):
    """MSSEG-2016: Center_0X/Patient_0Y/Preprocessed_Data/{DP,FLAIR,GADO,T1,T2}_preprocessed.nii.gz
    and Masks/Consensus.nii.gz. Channels DP, FLAIR, GADO, T1, T2 (the authors' Task011_MSSEG1);
    the case name includes the centre (patient numbers repeat across centres)."""
    cases, failed = [], []
    mods = ("DP", "FLAIR", "GADO", "T1", "T2")
    for pre in sorted(root.rglob("Preprocessed_Data")):
        patient = pre.parent
        name = f"{patient.parent.name}_{patient.name}"
        files = [_one(pre, f"{m}_preprocessed.nii*") for m in mods]
        label = _one(patient / "Masks", "Consensus.nii*")
        if None in files:
            failed.append(
                {
                    "case": name,
                    "files": [str(f) for f in files if f],
                    "reason": "missing modality: " + ", ".join(m for m, f in zip(mods, files) if f is None),
                }
            )
            continue
        test = any(p.lower().startswith("test") for p in patient.relative_to(root).parts)
        cases.append(
            {
                "case": name,
                "split": "test" if test and label else "train",
                "files": [str(f) for f in files],
                "label": str(label) if label else None,
            }
        )
    meta = {
        "name": "MSSEG2016",
        "channel_names": {str(i): m for i, m in enumerate(mods)},
        "labels": {"background": 0, "lesion": 1},
        "evaluation": {"regions": {"lesion": [1]}, "rules": "default"},
        "test_split": {"method": "challenge", "rule": "the challenge's own Training / Testing folders"},
    }
    return cases, failed, meta


CONVERTERS = {"brats21": find_brats21, "isles22": find_isles22, "wmh": find_wmh, "msseg": find_msseg}


def find_labelled(root):
    """Cases of an nnU-Net dataset: [(case, split, [channel files], label file or None)],
    plus failures for files that do not fit the layout, and dataset.json's content."""
    meta = json.loads((root / "dataset.json").read_text()) if (root / "dataset.json").exists() else {}
    n_ch = len(meta.get("channel_names", meta.get("modality", {}))) or None
    cases, failed = [], []
    for split, img_dir, lab_dir in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        if not (root / img_dir).is_dir():
            continue
        groups = {}
        for f in sorted((root / img_dir).iterdir()):
            if not f.name.endswith((".nii", ".nii.gz")):
                continue
            m = re.fullmatch(r"(.+)_(\d{4})\.nii(\.gz)?", f.name)
            if not m:
                failed.append({"case": f.name, "files": [str(f)], "reason": "name does not follow <case>_0000.nii.gz"})
                continue
            groups.setdefault(m.group(1), {})[int(m.group(2))] = f
        channels = n_ch or max((len(g) for g in groups.values()), default=1)
        for case, g in groups.items():
            files = [g.get(c) for c in range(channels)]
            lab = next(
                (p for p in (root / lab_dir / f"{case}.nii.gz", root / lab_dir / f"{case}.nii") if p.exists()), None
            )
            if None in files or len(g) != channels:
                failed.append(
                    {
                        "case": case,
                        "files": [str(p) for p in g.values()],
                        "reason": f"expected channels 0000..{channels - 1:04d}, found {sorted(g)}",
                    }
                )
            elif split == "train" and lab is None:
                failed.append(
                    {"case": case, "files": [str(p) for p in files], "reason": f"no label {lab_dir}/{case}.nii.gz"}
                )
            else:
                cases.append(
                    {"case": case, "split": split, "files": [str(p) for p in files], "label": str(lab) if lab else None}
                )
    return cases, failed, meta


def find_unlabelled(root):
    """Every *.nii / *.nii.gz below root, one case per 3D volume (4D files split)."""
    cases, failed = [], []
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
    for f in files:
        case = re.sub(r"\.nii(\.gz)?$", "", str(f.relative_to(root))).replace(os.sep, "_")
        try:
            shape = nib.load(str(f)).shape  # header only
        except Exception as e:
            failed.append(
                {
                    "case": case,
                    "files": [str(f)],
                    "reason": f"cannot read NIfTI header ({type(e).__name__}); re-export the file",
                }
            )
            continue
        if len(shape) == 4 and shape[3] > 1:
            cases += [
                {"case": f"{case}_v{t:03d}", "split": "train", "files": [str(f)], "volume": t, "label": None}
                for t in range(shape[3])
            ]
        else:
            cases.append({"case": case, "split": "train", "files": [str(f)], "label": None})
    return cases, failed


def inputs(c):
    """Every file a case reads: its channels, then its label if any."""
    return c["files"] + ([c["label"]] if c["label"] else [])


def fingerprint(c):
    return [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in inputs(c)]


def done_meta(out, c):
    """The case's meta if it is done, else None. Done = a meta file that parses,
    matches the inputs' size and mtime, and whose arrays exist with the recorded shape
    (np.load reads only the header)."""
    try:
        meta = json.loads((out / "meta" / f"{c['case']}.json").read_text())
        ok = (
            meta["fingerprint"] == fingerprint(c)
            and meta.get("recipe") == RECIPE
            and meta.get("transpose", [0, 1, 2]) == c.get("transpose", [0, 1, 2])
            and tuple(np.load(out / "images" / f"{c['case']}.npy", mmap_mode="r").shape) == tuple(meta["shape"])
            and (
                not c["label"]
                or tuple(np.load(out / "labels" / f"{c['case']}.npy", mmap_mode="r").shape) == tuple(meta["shape"][1:])
            )
        )
        return meta if ok else None
    except Exception:
        return None


# -----------------------------------------------------------------------------
# One case (runs in a worker process)


def onto_grid(x, affine, shape, target_affine):
    """x (on `affine`) resampled onto the voxel grid (shape, target_affine) with cubic
    splines, 0 outside: nibabel.processing.resample_from_to(order=3), which the
    authors' ISLES conversion uses."""
    m = np.linalg.inv(affine) @ target_affine  # target voxel -> source voxel
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    coords = m[:3, :3] @ idx + m[:3, 3:4]
    return ndimage.map_coordinates(x, coords, order=3, mode="constant", cval=0.0).reshape(shape).astype(np.float32)


def process_case(c, out, allowed_labels, opened=None):
    name = c["case"]
    channels, affine = [], None
    label = None
    if c["label"]:
        label, laff = read_nifti(c["label"])
        if label.ndim == 4 and label.shape[3] == 1:
            label = label[..., 0]
    for f in c["files"]:
        data, aff = read_nifti(f, c.get("volume"), opened if "volume" in c else None)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        elif data.ndim == 4:
            raise CaseError(f"{f} is 4D {data.shape}; give one 3D file per channel")
        check_volume(data, f)
        if c.get("onto_label") and label is not None and not same_grid(data.shape, aff, label.shape, laff):
            data, aff = onto_grid(data, aff, label.shape, laff), laff  # ISLES: every channel on the mask's grid
        if affine is not None and not same_grid(channels[0].shape, affine, data.shape, aff):
            raise CaseError(f"{f}: its grid differs from channel 0's {c['files'][0]}; register the channels first")
        affine = aff if affine is None else affine
        channels.append(data)
    if label is not None:
        for old, new in c.get("label_map", {}).items():  # e.g. BraTS 4 -> 3
            label[label == old] = new
        if tuple(label.shape) != tuple(channels[0].shape):
            raise CaseError(
                f"label {c['label']} has shape {label.shape}, the image {tuple(channels[0].shape)}; "
                "it must share the image's voxel grid"
            )
        if not same_grid(label.shape, laff, channels[0].shape, affine):
            raise CaseError(
                f"label {c['label']} has the image's shape but another affine (up to "
                f"{np.abs(np.asarray(laff) - np.asarray(affine)).max():.3g} mm apart: shifted or rotated); "
                "it must share the image's voxel grid"
            )
        if not np.isfinite(label).all() or (label != np.round(label)).any():
            raise CaseError(f"label {c['label']} has non-integer values")
        vals = sorted(int(v) for v in np.unique(label))
        if allowed_labels is not None and set(vals) - set(allowed_labels):
            raise CaseError(
                f"label {c['label']} has values {sorted(set(vals) - set(allowed_labels))} "
                f"not in dataset.json's labels {allowed_labels}"
            )
    image, lab, meta = preprocess_arrays(channels, affine, label, c.get("transpose"))
    save_npy(out / "images" / f"{name}.npy", image.astype(np.float16))
    if lab is not None:
        save_npy(out / "labels" / f"{name}.npy", lab)
    grid = c["label"] if c.get("onto_label") and c["label"] else c["files"][0]  # whose voxel grid the case is on
    meta.update(
        {
            "case": name,
            "split": c["split"],
            "recipe": RECIPE,
            "source_root": c["root"],
            "source_files": c["files"],
            "source_label": c["label"],
            "grid_file": grid,
            "label_map": {str(k): v for k, v in c.get("label_map", {}).items()},
            "volume": c.get("volume"),
            "original_affine": np.asarray(affine).tolist(),
            "original_shape": list(channels[0].shape),
            "original_spacing": [float(s) for s in nib.affines.voxel_sizes(affine)],
            "original_orientation": "".join(nib.aff2axcodes(affine)),
            "fingerprint": fingerprint(c),
            "label_counts": {str(v): int(n) for v, n in zip(*np.unique(lab, return_counts=True))}
            if lab is not None
            else None,
        }
    )
    save_json(out / "meta" / f"{name}.json", meta)  # last: marks the case done
    return meta


def worker(job, out, allowed_labels):
    """One job: a 3D case, or every volume of one 4D file (read in order, the file
    kept open, so it is decompressed once). Returns [(case, meta or None, error text
    or None)]; never raises."""
    results, opened = [], {}
    for c in job:
        try:
            results.append((c["case"], process_case(c, out, allowed_labels, opened), None))
        except CaseError as e:
            results.append((c["case"], None, str(e)))
        except Exception as e:  # an unforeseen failure must not stop the batch either
            results.append((c["case"], None, f"unexpected {type(e).__name__}: {e}"))
    return results


def jobs(cases):
    """Cases grouped into work units: the volumes of a 4D file together, in order."""
    groups = {}
    for c in cases:
        groups.setdefault(c["files"][0] if "volume" in c else c["case"], []).append(c)
    return [sorted(g, key=lambda c: c.get("volume") or 0) for g in groups.values()]


def init_worker(parent=None):
    """Pool worker set-up: one thread per process, and the worker ends with its parent
    however the parent dies (kill -9 included): Linux's PR_SET_PDEATHSIG sends it
    SIGKILL then, and a thread watching the parent pid covers other systems."""
    torch.set_num_threads(1)  # one process per core
    if parent is None:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    import threading

    threading.Thread(target=watch, daemon=True).start()


# -----------------------------------------------------------------------------
# The run


def assign_test_split(cases, fraction, seed):
    """Without imagesTs, for a dataset the authors never split: a seeded `fraction` of
    the training cases becomes the test split (the kit's own rule)."""
    if any(c["split"] == "test" for c in cases) or not any(c["label"] for c in cases):
        return None
    names = sorted(c["case"] for c in cases)
    rng = np.random.default_rng(seed)
    test = set(rng.choice(names, size=int(round(fraction * len(names))), replace=False).tolist())
    for c in cases:
        c["split"] = "test" if c["case"] in test else "train"
    return {
        "method": "kit",
        "rule": f"a seeded {fraction:g} of the cases (numpy default_rng({seed}))",
        "seed": seed,
        "fraction": fraction,
    }


def header_geometry(c):
    """[(shape, spacing)] of a case's channel files from their headers (the label's grid
    for channels resampled onto it), as Yucca's dataset properties list every image. A
    header that cannot be read adds nothing (the case fails on its own later)."""
    files = [c["label"]] * len(c["files"]) if c.get("onto_label") and c["label"] else c["files"]
    return [g for g in map(_header_geometry, files) if g is not None]


@functools.lru_cache(maxsize=None)
def _header_geometry(f):
    """(shape, spacing) of the first 3 axes from f's header (read once per file: the
    volumes of a 4D file share it), or None for a file that is unreadable or 2D."""
    try:
        h = nib.load(f).header
    except Exception:
        return None
    return (h.get_data_shape()[:3], h.get_zooms()[:3]) if len(h.get_data_shape()) >= 3 else None


def plan_transpose(geometry):
    """Yucca's determine_transpose (YuccaPlanner, inherited by YuccaPlanner_1_1_1 and the
    unsupervised planners): from the median size and spacing of the training images
    (raw header shapes, before reorientation), when the shortest median axis is under
    half the next one and its spacing over twice the next one's (thick slices), the
    axes are sorted by median size, so the thick-slice axis comes first; else none.
    The order is applied to the RAS arrays after the crop, as Yucca does."""
    if not geometry:
        return [0, 1, 2]
    size = np.median(np.array([g[0] for g in geometry], float), 0)
    key = size.argsort()
    spacing = np.median(np.array([g[1] for g in geometry], float), 0)[key]
    if size[key][0] < size[key][1] / 2 and spacing[0] > spacing[1] * 2:
        return [int(k) for k in key]
    return [0, 1, 2]


def as_pretraining(cases, channel_names):
    """A challenge download as unlabelled pretraining volumes, as BRAINS-45K holds them
    (each channel its own single-channel volume), with the test split left out so
    that pretraining never sees a downstream test case. Returns (cases, left out)."""
    left_out = sorted(c["case"] for c in cases if c["split"] == "test")
    vols = [
        {"case": f"{c['case']}_{channel_names[str(i)]}", "split": "train", "files": [f], "label": None}
        for c in cases
        if c["split"] == "train"
        for i, f in enumerate(c["files"])
    ]
    return vols, left_out


def run(
    inp,
    out,
    workers,
    overwrite=False,
    test_fraction=0.25,
    seed=0,
    quiet=False,
    fmt=None,
    transpose="auto",
    pretraining=False,
    wmh_t1=False,
    wmh_label2_ignore=False,
):
    """Preprocess `inp` into `out` (fmt: one of CONVERTERS for a download layout;
    pretraining: its training cases as unlabelled volumes, test cases left out);
    returns (n_done, n_skipped, failures)."""
    t0 = time.time()
    inp = Path(inp).resolve()  # sources are recorded absolute, so outputs work from any folder
    labelled = fmt is not None or (inp / "imagesTr").is_dir()
    left_out = None
    if labelled:
        if fmt == "wmh":
            cases, failed, ds_meta = find_wmh(inp, wmh_t1, wmh_label2_ignore)
        else:
            cases, failed, ds_meta = CONVERTERS[fmt](inp) if fmt else find_labelled(inp)
        split_info = ds_meta.get("test_split") or assign_test_split(cases, test_fraction, seed)
        if pretraining:
            cases, left_out = as_pretraining(cases, ds_meta.get("channel_names") or {})
            labelled, ds_meta = False, {"name": f"{ds_meta.get('name', inp.name)}-pretraining"}
    else:
        (cases, failed), ds_meta, split_info = find_unlabelled(inp), {}, None
    if not cases:  # nothing to preprocess: say so, and write no empty dataset
        kind = (
            f"--format {fmt} found no {fmt} case"
            if fmt
            else "no case found (neither an nnU-Net dataset with imagesTr/ nor any *.nii / *.nii.gz file)"
            if not labelled
            else "no usable case in imagesTr/"
        )
        raise InputError(
            f"--input {inp}: {kind}"
            + (f"; {len(failed)} input(s) unusable, e.g. {failed[0]['case']}: {failed[0]['reason']}" if failed else "")
            + "; nothing written"
        )
    if not quiet:
        print(
            f"preprocess.py: {inp} ({fmt or ('nnU-Net labelled' if labelled else 'unlabelled')}"
            f"{', pretraining volumes' if pretraining else ''}, {len(cases)} case(s) found) -> {out}"
        )
    allowed = label_values(ds_meta)
    _header_geometry.cache_clear()  # headers as they are now
    plan = (
        plan_transpose([g for c in cases if c["split"] == "train" for g in header_geometry(c)])
        if transpose == "auto"
        else [0, 1, 2]
    )
    if plan != [0, 1, 2] and not quiet:
        print(
            f"preprocess: thick slices (Yucca's determine_transpose): axes stored in the order {plan} "
            f"(--transpose none keeps RAS order)"
        )
    for c in cases:
        c["root"], c["transpose"] = str(inp), plan
    for d in ("images", "labels", "meta") if labelled else ("images", "meta"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*/.*.tmp"):  # what a killed run left behind
        stale.unlink()
    metas = {} if overwrite else {c["case"]: m for c in cases if (m := done_meta(out, c))}
    todo = [c for c in cases if c["case"] not in metas]
    skipped = len(metas)
    bar = tqdm(total=len(todo), desc="preprocess", unit="case", disable=quiet or not todo)
    for f in failed:
        print(f"FAILED {f['case']}: {f['reason']}", file=sys.stderr)
    work = jobs(todo)
    if workers > 1 and len(work) > 1:
        pool = cf.ProcessPoolExecutor(workers, initializer=init_worker, initargs=(os.getpid(),))
        results = pool.map(worker, work, [out] * len(work), [allowed] * len(work), chunksize=1)
    else:
        pool, results = None, (worker(j, out, allowed) for j in work)
    by_name = {c["case"]: c for c in cases}
    for name, meta, err in (r for rs in results for r in rs):
        bar.update(1)
        if err:
            failed.append({"case": name, "files": inputs(by_name[name]), "reason": err})
            print(f"FAILED {name}: {err}", file=sys.stderr)
        else:
            metas[name] = meta
    bar.close()
    if pool:
        pool.shutdown()
    done = len(metas) - skipped
    entries = [
        {
            "case": c["case"],
            "split": c["split"],
            "shape": metas[c["case"]]["shape"],
            "label_counts": metas[c["case"]]["label_counts"],
        }
        for c in cases
        if c["case"] in metas
    ]
    channels = ds_meta.get("channel_names", ds_meta.get("modality")) or {"0": "MRI"}
    summary = {
        "name": ds_meta.get("name", inp.name),
        "source": str(inp),
        "labelled": labelled,
        "format": fmt or "nnunet",
        "channels": channels,
        "n_channels": len(channels) if labelled else 1,
        "labels": ds_meta.get("labels"),
        "label_values": allowed,
        **(label_semantics(ds_meta) if labelled else {}),
        "test_split": split_info,
        "transpose": plan,
        **({"pretraining_from": fmt, "left_out_test_cases": left_out} if left_out is not None else {}),
        "counts": {
            "train": sum(e["split"] == "train" for e in entries),
            "test": sum(e["split"] == "test" for e in entries),
            "failed": len(failed),
        },
        "cases": entries,
    }
    save_json(out / "dataset.json", summary)
    save_json(out / "failed.json", failed)
    if not quiet:
        print(
            f"preprocess: {done} done, {skipped} skipped (already done), {len(failed)} failed "
            f"in {time.time() - t0:.1f} s -> {out}" + (f"  (see {out / 'failed.json'})" if failed else "")
        )
    return done, skipped, failed


# -----------------------------------------------------------------------------
# The demo dataset: brain-like phantoms with lesion labels


def smooth_noise(rng, shape, scale):
    """Smooth random field in [-1, 1]-ish: coarse noise upsampled (trilinear)."""
    coarse = torch.from_numpy(rng.standard_normal([max(2, s // scale) for s in shape]).astype(np.float32))
    return torch.nn.functional.interpolate(coarse[None, None], size=shape, mode="trilinear", align_corners=True)[
        0, 0
    ].numpy()


def demo_phantom(rng, shape=(72, 84, 72)):
    """A 1 mm RAS head: scalp, skull, CSF, grey and white matter with smooth random
    folding, ventricles, and 1-4 lesion blobs in white matter (label 1). Returns
    (FLAIR-like intensities, label)."""
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radii = rng.uniform(0.78, 0.9, 3)
    r = np.sqrt(((g / radii[:, None, None, None]) ** 2).sum(0))  # ellipsoidal radius
    r = r + 0.04 * smooth_noise(rng, shape, 12)
    img = np.zeros(shape, np.float32)  # air
    img[r < 1.0] = 0.35  # scalp
    img[r < 0.93] = 0.08  # skull (dark)
    img[r < 0.87] = 0.12  # CSF
    fold = 0.08 * smooth_noise(rng, shape, 6)
    brain, wm = r + fold < 0.82, r + 1.5 * fold < 0.62
    img[brain] = 0.75  # grey matter
    img[wm] = 0.55  # white matter
    vent = (
        np.sqrt(
            (
                (g - np.array([0, 0.05, 0.1])[:, None, None, None]) ** 2
                / np.array([0.12, 0.3, 0.12])[:, None, None, None] ** 2
            ).sum(0)
        )
        < 1
    )
    img[vent & wm] = 0.12
    label = np.zeros(shape, np.uint8)
    for _ in range(rng.integers(1, 5)):
        for _ in range(100):  # a centre inside white matter
            c = [rng.integers(0, s) for s in shape]
            if wm[tuple(c)] and not vent[tuple(c)]:
                break
        rad = rng.uniform(3, 7)
        idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
        d = np.sqrt(((idx - np.array(c)[:, None, None, None]) ** 2).sum(0)) + 2 * smooth_noise(rng, shape, 8)
        blob = (d < rad) & brain
        label[blob] = 1
        img[blob] = rng.uniform(0.95, 1.1)
    img = img * (1 + 0.03 * smooth_noise(rng, shape, 3))  # texture
    return img, label


def make_demo(root, n_cases=32, seed=0, quiet=False, shape=(72, 84, 72)):
    """Write the demo dataset in the nnU-Net layout to root (imagesTr, labelsTr,
    dataset.json; no imagesTs, so preprocessing draws the 25 % test split). Each case
    gets a random intensity scale, bias field, noise, an anisotropic spacing and a
    non-RAS storage orientation, so the demo exercises the real preprocessing path."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    codes = [("L", "P", "S"), ("R", "A", "S"), ("L", "A", "S"), ("A", "S", "R"), ("P", "I", "L"), ("S", "R", "A")]
    for i in tqdm(range(n_cases), desc="demo", unit="case", disable=quiet):
        img, lab = demo_phantom(rng, tuple(shape))
        img = img * (1 + 0.3 * smooth_noise(rng, img.shape, 24))  # bias field
        noise = rng.normal(0, 0.02, img.shape) * (img > 0)  # air stays 0, so the brain crop has work to do
        img = np.abs(img + noise) * rng.uniform(100, 3000)  # Rician-like magnitude noise, random scale
        spacing = np.array([1.0, 1.0, 1.0])
        spacing[rng.integers(0, 3)] = rng.choice([1.5, 2.0])  # one thick-slice axis
        # thick slices: keep the 1 mm planes nearest to each slice centre
        ax = int(np.argmax(spacing))
        k = spacing[ax]
        n = int(img.shape[ax] / k)
        src = (np.arange(n) * k + (k - 1) / 2).round().astype(int)
        img_s, lab_s = np.take(img, src, axis=ax), np.take(lab, src, axis=ax)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = -np.array(img_s.shape) * spacing / 2 + rng.uniform(-5, 5, 3)
        ornt = nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(codes[i % len(codes)])
        )
        name = f"demo_{i:03d}"
        im = nib.Nifti1Image(img_s.astype(np.float32), affine).as_reoriented(ornt)
        lb = nib.Nifti1Image(lab_s.astype(np.uint8), affine).as_reoriented(ornt)
        im.set_qform(im.affine, 1), lb.set_qform(lb.affine, 1)
        nib.save(im, root / "imagesTr" / f"{name}_0000.nii.gz")
        nib.save(lb, root / "labelsTr" / f"{name}.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "AMAES-demo",
                "channel_names": {"0": "FLAIR"},
                "labels": {"background": 0, "lesion": 1},
                "numTraining": n_cases,
                "file_ending": ".nii.gz",
            },
            indent=1,
        )
    )


# -----------------------------------------------------------------------------


def get_args(argv=None):
    p = ArgumentParser(
        prog="preprocess.py",
        description=__doc__.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python preprocess.py --input /data/OASIS3 --output data/oasis\n"
        "  python preprocess.py --input /data/Dataset501_WMH --output data/wmh\n"
        "  python preprocess.py --demo demo",
    )
    p.add_argument("--input", type=Path, help="raw folder: nnU-Net dataset (imagesTr/...) or any folder of NIfTI files")
    p.add_argument("--output", type=Path, help="where images/, labels/, meta/, dataset.json, failed.json go")
    p.add_argument(
        "--format",
        choices=list(CONVERTERS),
        help="--input is a download of BraTS 2021, ISLES 2022, WMH 2017 or "
        "MSSEG-2016 in its own layout: converted as the authors' Yucca task conversions (channels in their "
        "order, BraTS 4 -> 3, ISLES channels on the mask's grid, WMH FLAIR only with label 2 a class; the "
        "authors' test cases: their train_test_split for BraTS/ISLES, the challenge's test folders for "
        "WMH/MSSEG) and preprocessed in one run",
    )
    p.add_argument(
        "--wmh-with-t1",
        action="store_true",
        help="--format wmh: FLAIR + T1 (the authors' Task008_WMH) "
        "instead of FLAIR only (their default task, Task006_WMH_Flair)",
    )
    p.add_argument(
        "--wmh-label2-ignore",
        action="store_true",
        help="--format wmh: label 2 (other pathology) as the "
        "ignore label, left out of the loss, as the WMH challenge scores it (default: a class, as the authors)",
    )
    p.add_argument(
        "--pretraining",
        action="store_true",
        help="with --format: write the download's TRAINING cases as "
        "unlabelled pretraining volumes (each channel its own volume, as in BRAINS-45K) and leave its test "
        "cases out, so pretraining never sees a downstream test case",
    )
    p.add_argument(
        "--transpose",
        default="auto",
        choices=("auto", "none"),
        help="auto (default, the authors' Yucca "
        "planner): when the training images are mostly thick-slice (median), store the thick axis first; "
        "none: always RAS axis order",
    )
    p.add_argument(
        "--demo",
        type=Path,
        metavar="DIR",
        help="write the synthetic demo dataset to DIR/raw and preprocess it to DIR/preprocessed",
    )
    p.add_argument("--demo-cases", type=int, default=32, help="number of demo cases (default 32)")
    p.add_argument(
        "--demo-shape",
        type=int,
        nargs=3,
        default=[72, 84, 72],
        metavar=("X", "Y", "Z"),
        help="demo head size in 1 mm voxels (default 72 84 72; e.g. 160 192 160 for real-size benchmarks)",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="redo every case, also those already done")
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.25,
        help="test share when a dataset the authors never split "
        "has no imagesTs (default 0.25; the kit's own seeded split)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the test split and of the demo phantoms (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    a = p.parse_args(argv)
    if a.demo is not None:
        if a.input or a.output:
            p.error("--demo DIR writes DIR/raw and DIR/preprocessed itself; do not combine it with --input/--output")
        a.input, a.output = a.demo / "raw", a.demo / "preprocessed"
    else:
        if a.input is None or a.output is None:
            p.error("give --input RAW and --output OUT (or --demo DIR)")
        if not a.input.is_dir():
            p.error(f"--input {a.input}: no such folder")
        if a.output.resolve().is_relative_to(a.input.resolve()):
            p.error(f"--output {a.output} is inside --input {a.input}; choose a folder outside the raw data")
    if a.workers < 1:
        p.error("--workers must be >= 1")
    if a.pretraining and not a.format:
        p.error("--pretraining converts a challenge download: give its --format too")
    if (a.wmh_with_t1 or a.wmh_label2_ignore) and a.format != "wmh":
        p.error("--wmh-with-t1 / --wmh-label2-ignore are options of --format wmh")
    if not 0 <= a.test_fraction < 1:
        p.error("--test-fraction must be in [0, 1)")
    if a.demo_cases < 4:
        p.error("--demo-cases must be >= 4")
    if min(a.demo_shape) < 32:
        p.error("--demo-shape sides must be >= 32")
    return a


def main(argv=None):
    a = get_args(argv)
    if a.demo is not None and not (a.input / "dataset.json").exists():
        make_demo(a.input, a.demo_cases, a.seed, a.quiet, a.demo_shape)
    try:
        if unwritable(a.output):
            raise InputError(f"--output {a.output}: {unwritable(a.output)}; choose another --output")
        _, _, failed = run(
            a.input,
            a.output,
            a.workers,
            a.overwrite,
            a.test_fraction,
            a.seed,
            a.quiet,
            a.format,
            a.transpose,
            a.pretraining,
            a.wmh_with_t1,
            a.wmh_label2_ignore,
        )
    except InputError as e:
        print(f"preprocess.py: error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
