"""
Sliding-window inference, metrics in native space, and predictions as NIfTI.

    python evaluate.py --run FT [--split test]                        # FT's own dataset (its args.json), into FT/eval
    python evaluate.py --run FT --images NEW_SCANS --out FT/new      # raw NIfTI, never preprocessed

For each case, as the authors' Yucca predicts: sliding-window inference over the whole
preprocessed volume with the run's patch (window starts every patch/2 from 0, the last
flush with the end; a volume smaller than the patch padded with 0, centred; logits
summed over windows; or weighted by a Gaussian with --blend gaussian; --tta adds the 7
mirrored passes; a run of finetune.py --recipe wald records nnU-Net's predictor -- its
window positions, Gaussian blending and mirroring -- and gets it without flags); then, as
their reverse_preprocessing (and nnU-Net), the logits are
resized trilinearly to the cropped box at native resolution, argmaxed there, the box
put back into the volume (background outside) and the reorientation undone
(preprocess.native_argmax); the result is written as OUT/predictions/<case>.nii.gz
with the raw image's shape and affine.

Metrics per case on the native grid against the raw label file, in one of two sets:
  --metrics authors (default; amaes src/evaluator.py, what Table 2 was computed with):
    one confusion matrix per case over the label values; per value Dice, Jaccard,
    sensitivity, precision, volume similarity and the counts, NaN when a value is in
    neither; "all" = the same metrics of TP / FP / FN summed over the values other than
    0 (a micro-average, not the union mask); values rounded to 4 decimals, then per
    label the mean over cases with NaN left out (0 when NaN everywhere), rounded to 4.
  --metrics challenge: each challenge's conventions (BraTS regions WT / TC / ET with
    their empty-case rules, WMH label 2 masked out, ISLES lesion-wise F1 and volume
    difference, HD95 in mm), per region of the dataset.
OUT/metrics.json holds every value, the summary and which set it is; OUT/metrics.csv
one row per case and label (or region).

Pictures (--no-pictures leaves them out): OUT/pictures/<case>.png, the raw image's
slices where the reference or prediction is largest, reference outlined in green and
prediction in red; and OUT/index.html, one static page (no script, no external file):
the metric table worst case first, each case's picture, the run's settings and its
training curves. --report also writes report.html, linking each evaluation's page.

--images DIR: every *.nii(.gz) in DIR is a case (nnU-Net names <case>_0000.nii.gz,
<case>_0001.nii.gz ... are grouped into the channels of one case), preprocessed on the
fly with preprocess.py's recipe; only predictions are written.
"""

import argparse
import csv
import gzip
import html
import itertools
import json
import math
import os
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

import pictures
import preprocess  # the geometry both ways (recipe and to_native) lives there, once
from models import build_model
from training import UserError, autocast_for, lock_folder, release_lock

METRICS = ("dice", "jaccard", "sensitivity", "precision", "hd95_mm", "avd_percent")


# -----------------------------------------------------------------------------
# Inference


def window_starts(size, patch, overlap, rule="yucca"):
    """Start offsets along one axis. yucca (get_steps_for_sliding_window): every
    floor(patch * (1 - overlap)) voxels from 0 while a window still ends before the
    volume does, then one window flush with the end (200 voxels, patch 128, overlap
    0.5: 0, 64, 72). nnunet (nnunetv2/inference/sliding_window_prediction.py
    compute_steps_for_sliding_window): ceil((size - patch) / (patch * (1 - overlap))) + 1
    windows spread evenly, round(i * (size - patch) / (n - 1)) (0, 36, 72 for 200).
    size >= patch (the volume is padded first)."""
    if rule == "nnunet":
        n = math.ceil((size - patch) / (patch * (1 - overlap))) + 1
        return [round(i * (size - patch) / (n - 1)) for i in range(n)] if n > 1 else [0]
    step = max(1, math.floor(patch * (1 - overlap)))
    return [s for s in range(0, size, step) if s < size - patch] + [size - patch]


def gaussian_weight(patch, device):
    """nnU-Net's importance map (sliding_window_prediction.py compute_gaussian l.11-27): a unit
    impulse at patch // 2 filtered by scipy's gaussian_filter with sigma = patch / 8 (truncate 4:
    zero beyond int(4 sigma + 0.5) voxels), divided by its peak; zeros set to the smallest
    non-zero value. Separable: one sampled, normalised 1-D kernel per axis."""
    axes = []
    for p in patch:
        sigma, d = p / 8, torch.arange(p, device=device, dtype=torch.float64) - p // 2
        r = int(4 * sigma + 0.5)
        k = torch.exp(-0.5 * (d / sigma) ** 2) * (d.abs() <= r)
        axes.append(k / k.max())
    w = (axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]).float()
    return torch.where(w > 0, w, w[w > 0].min())


@torch.no_grad()
def sliding_window(model, image, patch, overlap=0.5, blend="sum", tta=False, batch=4, autocast=None, steps="yucca"):
    """Logits (K, X, Y, Z) for a whole volume image (C, X, Y, Z) (a tensor on the
    model's device), as the authors' Yucca predict: window logits SUMMED ("sum": no
    division, so a voxel seen by 8 windows has 8 windows' logits) or, with "gaussian",
    Gaussian-weighted and divided by the summed weights (nnU-Net), or with "mean" divided
    by the number of windows (MONAI sliding_window_inference mode "constant"); a volume smaller than
    the patch is padded with 0 (background), centred as Yucca's pad_to_size (d // 2
    before, the rest after), and cropped back. tta: the mean over the 8 mirror images
    (nnU-Net's mirroring over axes 0, 1, 2). steps: window positions, "yucca" or "nnunet"."""
    autocast = autocast or torch.autocast("cpu", enabled=False)
    patch = (patch,) * 3 if isinstance(patch, int) else tuple(patch)
    size = image.shape[1:]
    pad = [max(0, p - s) for p, s in zip(patch, size)]
    before = [d // 2 for d in pad]
    x = F.pad(image, [v for d, b in zip(reversed(pad), reversed(before)) for v in (b, d - b)])  # (C, X', Y', Z')
    grid = [window_starts(s, p, overlap, steps) for s, p in zip(x.shape[1:], patch)]
    starts = [(i, j, k) for i in grid[0] for j in grid[1] for k in grid[2]]
    # "sum": plain logits, no weights to keep; "mean": unit weights
    w = (
        gaussian_weight(patch, x.device)
        if blend == "gaussian"
        else torch.ones(patch, device=x.device)
        if blend == "mean"
        else None
    )
    flips = [d for r in range(4) for d in itertools.combinations((2, 3, 4), r)] if tta else [()]
    out = norm = None
    for b in range(0, len(starts), batch):
        chunk = starts[b : b + batch]
        xb = torch.stack(
            [x[:, i : i + patch[0], j : j + patch[1], k : k + patch[2]] for i, j, k in chunk]
        )  # (n, C, *P)
        logits = 0
        for dims in flips:
            with autocast:
                y = model(xb.flip(dims) if dims else xb)
            logits = logits + (y.flip(dims) if dims else y).float()
        logits = logits / len(flips)  # (n, K, *P)
        if out is None:
            out = torch.zeros((logits.shape[1], *x.shape[1:]), device=x.device)
            norm = torch.zeros(x.shape[1:], device=x.device) if w is not None else None
        for (i, j, k), y in zip(chunk, logits):
            sl = (slice(i, i + patch[0]), slice(j, j + patch[1]), slice(k, k + patch[2]))
            out[(slice(None),) + sl] += y if w is None else y * w
            if w is not None:
                norm[sl] += w
    if w is not None:
        out = out / norm
    return out[:, before[0] : before[0] + size[0], before[1] : before[1] + size[1], before[2] : before[2] + size[2]]


def load_model(path, device="cpu"):
    """A finetuned model from FT/best.pt or FT/ckpt.pt (weights_only), with its run
    facts: {"arch", "in_channels", "label_values", "patch", "decoder", ...}."""
    path = Path(path)
    if not path.exists():
        if path.name == "best.pt" and path.with_name("ckpt.pt").exists():
            raise FileNotFoundError(
                f"{path.parent} has no best.pt: it was trained without --val-cases (no validation, "
                "no best weights); evaluate its last weights: leave out --checkpoint best"
            )
        raise FileNotFoundError(f"{path} does not exist; is --run a finetune.py run folder?")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a finetune.py checkpoint ({type(e).__name__})") from None
    if isinstance(ck, dict) and "label_values" not in ck and "method" in (ck.get("args") or {}):
        raise ValueError(
            f"{path.parent} is a pretrain.py run: finetune its encoder.pt first (finetune.py "
            f"--pretrained {path.parent / 'encoder.pt'}), then evaluate that run"
        )
    try:
        model = build_model(
            ck["arch"],
            ck["in_channels"],
            ck.get("n_outputs", len(ck["label_values"])),
            decoder=ck.get("decoder"),
            legacy_merge=ck.get("legacy_merge", False),
        )
        model.load_state_dict(ck["model"])
    except Exception as e:
        raise ValueError(f"{path} is not a finetune.py checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    return model.to(device).eval(), {k: v for k, v in ck.items() if k not in ("model", "optimizer", "scaler", "rng")}


def predict(model, image, info, meta, overlap=0.5, blend="sum", tta=False, batch=4, autocast=None):
    """Label map on the original image's grid (uint8, the dataset's label values) for
    a preprocessed image (C, X, Y, Z) numpy array: sliding-window logits, resized to
    the native grid and argmaxed there (preprocess.native_argmax). A model trained on
    regions (sigmoid outputs) gives a region map per output, turned into labels as
    nnU-Net does: in region order, where region k is on, the label regions_class_order[k]."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).to(device)
    logits = sliding_window(
        model,
        x,
        info["patch"],
        overlap,
        blend,
        tta,
        batch,
        autocast,
        (info.get("inference") or {}).get("steps", "yucca"),
    )
    regions = info.get("training_regions")
    if not regions:
        return np.asarray(info["label_values"], dtype=np.uint8)[preprocess.native_argmax(logits, meta)]
    bits = preprocess.native_argmax(logits, meta, regions=True)
    order = info.get("regions_class_order") or [max(v) for v in regions.values()]
    out = np.zeros(bits.shape, np.uint8)
    for k, value in enumerate(order):
        out[(bits >> k) & 1 == 1] = value
    return out


# -----------------------------------------------------------------------------
# Metrics, as the authors computed them (--metrics authors, the default)

# amaes src/evaluator.py with yucca's metric functions (yucca functional/evaluation/metrics.py):
# name -> f(tp, fp, fn). Their numpy integer division gives NaN for 0 / 0 (a warning, not
# the ZeroDivisionError their except clause waits for), so every ratio is NaN when its
# denominator is 0 -- precision too when a label is missed entirely.
AUTHORS_METRICS = {
    "dice": lambda tp, fp, fn: 2 * tp / (2 * tp + fp + fn),
    "jaccard": lambda tp, fp, fn: tp / (tp + fp + fn),
    "sensitivity": lambda tp, fp, fn: tp / (tp + fn),
    "precision": lambda tp, fp, fn: tp / (tp + fp),
    "volume_similarity": lambda tp, fp, fn: 1 - abs(fn - fp) / (2 * tp + fn + fp),
    "tp": lambda tp, fp, fn: tp,
    "fp": lambda tp, fp, fn: fp,
    "fn": lambda tp, fp, fn: fn,
    "ref_voxels": lambda tp, fp, fn: tp + fn,
    "pred_voxels": lambda tp, fp, fn: tp + fp,
}
AUTHORS_RULES = (
    "authors (amaes src/evaluator.py): one confusion matrix per case over the label values; per label "
    "Dice = 2TP / (2TP + FP + FN) etc., NaN when a label is in neither; 'all' = the metric of TP / FP / FN "
    "summed over the labels other than 0 (a micro-average, not a union mask); each value rounded to 4 "
    "decimals, then the mean over cases with NaN left out, rounded to 4 (0 when NaN in every case)"
)


def confusion(pred, ref, values):
    """(K, K) voxel counts, rows = reference value, columns = predicted value, over the
    label values `values`; a voxel whose reference or prediction is not one of them
    (an ignore label) is left out, as sklearn's confusion_matrix(labels=values)."""
    values = np.asarray(values, np.int64)
    lut = np.full(max(int(values.max()), int(ref.max()), int(pred.max())) + 1, len(values), np.int64)
    lut[values] = np.arange(len(values))
    r, p = lut[np.clip(ref, 0, None).ravel()], lut[np.clip(pred, 0, None).ravel()]
    keep = (r < len(values)) & (p < len(values))
    return np.bincount(r[keep] * len(values) + p[keep], minlength=len(values) ** 2).reshape(len(values), len(values))


def _ratio(f, tp, fp, fn):
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.round(np.float64(f(np.int64(tp), np.int64(fp), np.int64(fn))), 4))


def authors_case_metrics(pred, ref, values):
    """{"0": metrics, "1": ..., "all": ...} for one case, as amaes src/evaluator.py's
    process_case: per label value from the confusion matrix, "all" from the TP / FP / FN
    summed over the values other than 0; every value rounded to 4 decimals."""
    cm = confusion(pred, ref, values)
    out, agg = {}, np.zeros(3, np.int64)
    for i, v in enumerate(values):
        tp, fp, fn = cm[i, i], cm[:, i].sum() - cm[i, i], cm[i, :].sum() - cm[i, i]
        if v != 0:
            agg += (tp, fp, fn)
        out[str(v)] = {m: _ratio(f, tp, fp, fn) for m, f in AUTHORS_METRICS.items()}
    out["all"] = {m: _ratio(f, *agg) for m, f in AUTHORS_METRICS.items()}
    return out


def authors_summary(rows, keys):
    """Per label and metric: "mean" as amaes src/evaluator.py reports it (the nanmean over
    cases, rounded to 4 decimals; 0 when NaN in every case), with std / median / n /
    nan_excluded beside it."""
    out = {}
    for k in keys:
        out[k] = {}
        for m in AUTHORS_METRICS:
            vals = np.array([r["metrics"][k][m] for r in rows if k in r["metrics"]], dtype=float)
            ok = vals[~np.isnan(vals)]
            with np.errstate(all="ignore"):
                mean = np.nanmean(vals) if len(ok) else 0.0
            out[k][m] = {
                "mean": float(np.round(mean, 4)),
                "std": float(ok.std()) if len(ok) else None,
                "median": float(np.median(ok)) if len(ok) else None,
                "n": int(len(ok)),
                "nan_excluded": int(np.isnan(vals).sum()),
            }
    return out


# -----------------------------------------------------------------------------
# Metrics, with each challenge's conventions (--metrics challenge)

# What each set of rules does where a mask is empty, and how HD95 is taken (printed with the table)
RULES = {
    "default": "Dice / Jaccard NaN when reference and prediction are both empty (left out of the mean, counted); "
    "HD95 = 95th percentile of the surface distances of both directions pooled, NaN when either mask is empty",
    "brats": "BraTS 2021: Dice 1 when both are empty, 0 when only one is; HD95 = the larger of the two directed 95th "
    "percentiles, 0 when both are empty, 373.13 mm when only one is",
    "wmh": "WMH 2017 (hjkuijf/wmhchallenge): label 2 masked out of the prediction, label 1 scored; "
    "HD95 = the larger of the two directed 95th percentiles between in-plane edges, NaN without a prediction; "
    "AVD %; lesion recall and F1 (26-connected lesions)",
    "isles": "ISLES 2022: Dice 1 when both are empty; absolute volume difference (ml); "
    "lesion F1 = TP / (TP + (FP + FN) / 2) and lesion count difference (26-connected lesions), "
    "F1 1 when neither has a lesion; no HD95",
}
BRATS_HD_EMPTY = 373.13  # mm: BraTS's penalty when exactly one mask is empty


def surface(mask, structure=None):
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(pred, ref, spacing, pooled=True, structure=None):
    """95th percentile of the distances (mm) from each surface voxel of one mask to the
    nearest surface voxel of the other: both directions pooled, or (pooled=False) the
    larger of the two directed percentiles. NaN if either mask is empty."""
    if not pred.any() or not ref.any():
        return float("nan")
    sp, sr = surface(pred, structure), surface(ref, structure)
    d_to_r = ndimage.distance_transform_edt(~sr, sampling=spacing)[sp]
    d_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)[sr]
    if pooled:
        return float(np.percentile(np.concatenate([d_to_r, d_to_p]), 95))
    return float(max(np.percentile(d_to_r, 95), np.percentile(d_to_p, 95)))


def lesions(pred, ref):
    """(TP reference lesions hit, FN, FP predicted lesions on no reference voxel, n_pred, n_ref), 26-connected."""
    full = np.ones((3, 3, 3), bool)
    lr, nr = ndimage.label(ref, structure=full)
    lp, npred = ndimage.label(pred, structure=full)
    hit_ref = len(np.unique(lr[pred & (lr > 0)]))
    hit_pred = len(np.unique(lp[ref & (lp > 0)]))
    return hit_ref, nr - hit_ref, npred - hit_pred, npred, nr


def label_metrics(pred, ref, spacing, rules="default"):
    """pred, ref: boolean masks on one grid with voxel spacing (mm), scored by `rules`
    (RULES). default: NaN where a value is undefined -- Dice / Jaccard when both are
    empty, sensitivity and AVD when the reference is empty, precision when the
    prediction is empty, HD95 when either is."""
    tp = float(np.logical_and(pred, ref).sum())
    p, r = float(pred.sum()), float(ref.sum())
    nan = float("nan")
    ml = float(np.prod(spacing)) / 1000
    m = {
        "dice": 2 * tp / (p + r) if p + r else nan,
        "jaccard": tp / (p + r - tp) if p + r else nan,
        "sensitivity": tp / r if r else nan,
        "precision": tp / p if p else nan,
        "hd95_mm": hd95(pred, ref, spacing),
        "avd_percent": abs(p - r) / r * 100 if r else nan,
        "ref_ml": r * ml,
        "pred_ml": p * ml,
    }
    if rules == "brats":
        m["dice"] = m["jaccard"] = 1.0 if p + r == 0 else m["dice"]
        m["hd95_mm"] = (
            0.0 if p + r == 0 else BRATS_HD_EMPTY if p == 0 or r == 0 else hd95(pred, ref, spacing, pooled=False)
        )
    elif rules == "wmh":
        inplane = np.zeros((3, 3, 3), bool)
        inplane[:, :, 1] = True  # SimpleITK BinaryErode radius (1, 1, 0): edges within each slice
        m["hd95_mm"] = hd95(pred, ref, spacing, pooled=False, structure=inplane)
        tp_l, fn, fp, n_pred, n_ref = lesions(pred, ref)
        rec = tp_l / n_ref if n_ref else nan
        prec = (n_pred - fp) / n_pred if n_pred else nan
        m["lesion_recall"] = rec
        m["lesion_f1"] = 2 * rec * prec / (rec + prec) if n_ref and n_pred and rec + prec else 0.0 if n_ref else nan
    elif rules == "isles":
        m["dice"] = 1.0 if p + r == 0 else m["dice"]
        m["hd95_mm"] = nan
        m["avd_ml"] = abs(p - r) * ml
        tp_l, fn, fp, n_pred, n_ref = lesions(pred, ref)
        m["lesion_f1"] = 1.0 if tp_l + fn + fp == 0 else tp_l / (tp_l + (fp + fn) / 2)
        m["lesion_count_diff"] = float(abs(n_pred - n_ref))
    return m


METRICS = (
    "dice",
    "jaccard",
    "sensitivity",
    "precision",
    "hd95_mm",
    "avd_percent",
    "avd_ml",
    "lesion_recall",
    "lesion_f1",
    "lesion_count_diff",
)


def case_metrics(pred, ref, spacing, regions, ignore=None, rules="default"):
    """{region name: metrics} for label maps pred and ref (values) on one grid. regions:
    {name: [label values]} (a plain label is a region of one value); voxels where the
    reference holds the ignore label are taken out of both masks."""
    keep = ref != ignore if ignore is not None else np.ones(ref.shape, bool)
    return {
        name: label_metrics(np.isin(pred, vals) & keep, np.isin(ref, vals) & keep, spacing, rules)
        for name, vals in regions.items()
    }


def summarise(rows, names):
    """Mean / std / median over cases per region and metric, NaNs left out (and counted)."""
    out = {}
    for v in names:
        out[str(v)] = {}
        for m in METRICS:
            vals = np.array([r["metrics"][str(v)].get(m, np.nan) for r in rows if str(v) in r["metrics"]], dtype=float)
            if np.isnan(vals).all() and m not in ("dice", "hd95_mm"):
                continue  # a metric these rules do not compute
            ok = vals[~np.isnan(vals)]
            out[str(v)][m] = {
                "mean": float(ok.mean()) if len(ok) else None,
                "std": float(ok.std()) if len(ok) else None,
                "median": float(np.median(ok)) if len(ok) else None,
                "n": int(len(ok)),
                "nan_excluded": int(np.isnan(vals).sum()),
            }
    return out


# -----------------------------------------------------------------------------
# Cases


def raw_cases(folder, in_channels):
    """[(case, [channel files])] of a folder of raw NIfTI (see --images)."""
    files = sorted(p for p in Path(folder).iterdir() if p.name.endswith((".nii", ".nii.gz")))
    groups = {}
    for f in files:
        m = re.fullmatch(r"(.+)_(\d{4})\.nii(\.gz)?", f.name)
        case, ch = (m.group(1), int(m.group(2))) if m else (re.sub(r"\.nii(\.gz)?$", "", f.name), 0)
        groups.setdefault(case, {})[ch] = f
    out, bad = [], []
    for case, g in sorted(groups.items()):
        if sorted(g) != list(range(in_channels)):
            bad.append(
                (
                    case,
                    f"has channels {sorted(g)}, the model needs {list(range(in_channels))} "
                    f"(name them {case}_0000.nii.gz ... {case}_{in_channels - 1:04d}.nii.gz)",
                )
            )
        else:
            out.append((case, [str(g[c]) for c in range(in_channels)]))
    return out, bad


def preprocess_raw(files, transpose=None):
    """(image (C, X, Y, Z), meta for to_native) of raw channel files, by preprocess.py's
    recipe, in the axis order of the model's training data (transpose)."""
    channels, affine = [], None
    for f in files:
        x, aff = preprocess.read_nifti(f)
        if x.ndim == 4 and x.shape[3] == 1:
            x = x[..., 0]
        preprocess.check_volume(x, f)
        if affine is not None and not preprocess.same_grid(channels[0].shape, affine, x.shape, aff):
            raise preprocess.CaseError(f"{f}: its grid differs from {files[0]}; register the channels first")
        affine = aff if affine is None else affine
        channels.append(x)
    image, _, meta = preprocess.preprocess_arrays(channels, affine, transpose=transpose)
    image = image.astype(np.float16)  # the precision preprocess.py stores, so both routes predict alike
    meta.update(
        {"original_affine": affine.tolist(), "original_shape": list(channels[0].shape), "source_files": list(files)}
    )
    return image, meta


def raw_file(path, meta, raw_root=None):
    """Where a raw source file of the case is now: as preprocess.py recorded it
    (absolute), or under --raw-root when the raw folder has moved."""
    p = Path(path)
    if raw_root is not None and meta.get("source_root"):
        p = Path(raw_root) / p.relative_to(meta["source_root"])
    if not p.exists():
        hint = (
            f"--raw-root {raw_root} does not hold it either"
            if raw_root
            else f"if the raw folder moved, pass --raw-root NEW_FOLDER (the folder given to preprocess.py --input, "
            f"then {meta.get('source_root')})"
        )
        raise preprocess.CaseError(f"raw file {p} not found; {hint}")
    return p


def save_prediction(path, pred_native, meta):
    """Write the label map with the raw image's affine (and its header's qform/sform)."""
    ref = nib.load(meta.get("grid_file") or meta["source_files"][0])
    img = nib.Nifti1Image(pred_native.astype(np.uint8), ref.affine, ref.header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    preprocess.write_atomic(path, lambda p: p.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6)))


# -----------------------------------------------------------------------------
# Pictures: one PNG per case, one page per evaluation (pictures.py draws them)


def case_dice(row):
    """A case's Dice over its foreground regions (nanmean; with the authors' metrics their
    'all'), NaN when none has one: the page's sort key."""
    ms = [row["metrics"]["all"]] if "all" in row["metrics"] else [m for k, m in row["metrics"].items() if k != "0"]
    d = [m["dice"] for m in ms if m.get("dice") is not None and not math.isnan(m["dice"])]
    return float(np.mean(d)) if d else float("nan")


def case_picture(path, meta, pred, ref=None, title=""):
    """PNG of the raw image (its first channel) on the native grid turned to RAS, through
    the slices where the reference or prediction is largest: reference outlined in
    green, prediction in red (yellow where they meet)."""
    image, affine = preprocess.read_nifti(meta["source_files"][0])
    image = image[..., 0] if image.ndim == 4 else image
    ornt = nib.orientations.ornt_transform(np.array(meta["native_ornt"]), nib.orientations.axcodes2ornt("RAS"))
    ras = [
        nib.orientations.apply_orientation(v, ornt)
        for v in (image, pred > 0, ref > 0 if ref is not None else None)
        if v is not None
    ]
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # native axis i is RAS axis ornt[i, 0]
    stretch = np.clip(np.round(spacing / spacing.min()), 1, 8).astype(int)  # a 3 mm axis shown 3 pixels a voxel
    masks = ([(ras[2], pictures.GREEN)] if ref is not None else []) + [(ras[1], pictures.RED)]
    pictures.save_png(path, pictures.outline_picture(ras[0], masks, title=title, stretch=stretch)[0])


def index_page(out, result, run):
    """OUT/index.html: the metric table worst case first, each case's picture, the
    run's settings (RUN/args.json) and its curves (RUN/log.jsonl) as inline SVG."""
    regions = [v for v in result["regions"] if v != "0"]  # the authors' metrics score the background too: not here
    rows = sorted(result["cases"], key=lambda r: (math.isnan(case_dice(r)), case_dice(r)))
    cols = [m for m in ("dice", "hd95_mm") if any(m in r["metrics"].get(v, {}) for r in rows for v in regions)]

    def cell(v):
        return float(v) if v is not None else "-"

    names = result.get("label_names") or {}
    table = pictures.table(
        ["case", "dice (mean)"]
        + [f"{v} ({names[v]}) {m}" if v in names else f"{v} {m}" for v in regions for m in cols],
        [
            [r["case"], cell(case_dice(r))] + [cell(r["metrics"].get(v, {}).get(m)) for v in regions for m in cols]
            for r in rows
        ],
    )
    body = [
        f"<p>{html.escape(str(result['run']))} ({html.escape(str(result['checkpoint']))}), {len(rows)} case(s), "
        f"{html.escape(result['rule_text'])}. Outlines: reference green, prediction red, both yellow.</p>",
        "<h2>Cases, worst first</h2>",
        table,
    ]
    for r in rows:
        if (out / "pictures" / f"{r['case']}.png").exists():
            body.append(
                f'<h3>{html.escape(r["case"])}</h3><img src="pictures/{html.escape(r["case"])}.png" '
                f'alt="{html.escape(r["case"])}">'
            )
    logged = pictures.log_series(pictures.read_log(Path(run) / "log.jsonl"))
    if logged:
        body += ["<h2>Training</h2>"] + [pictures.svg_curves({k: v}, title=k) for k, v in logged.items()]
    args = Path(run) / "args.json"
    if args.exists():
        settings = sorted(json.loads(args.read_text()).items())
        body += ["<h2>Run settings</h2>", pictures.table(["flag", "value"], settings)]
    body += ["<h2>Evaluation settings</h2>", pictures.table(["setting", "value"], sorted(result["settings"].items()))]
    pictures.write_atomic(out / "index.html", pictures.page(f"evaluation of {run}", "\n".join(body)))


def report_page(out, rows, evals):
    """out/report.html: the report's table, then one line per evaluation (worst mean
    Dice first) linking to its index.html by relative path."""
    body = [
        "<h2>Dice, mean +- std over runs</h2>",
        pictures.table(
            [
                "dataset",
                "metric set",
                "arch",
                "init",
                "from",
                "recipe",
                "n-train",
                "runs",
                "region",
                "dice mean",
                "dice std",
                "differs in",
            ],
            rows,
        ),
        "<h2>Evaluations</h2>",
    ]
    lines = []
    for key, folder, m in evals:
        dice = [s["dice"]["mean"] for s in m.get("summary", {}).values() if s.get("dice", {}).get("mean") is not None]
        page = folder / "index.html"
        rel = os.path.relpath(page, out)
        name = html.escape(f"{' / '.join(k for k in key if k)}: {m.get('run', folder)}")
        link = f'<a href="{html.escape(rel)}">{name}</a>' if page.exists() else name
        lines.append(
            (
                float(np.mean(dice)) if dice else float("nan"),
                f"<li>{link}: mean Dice {np.mean(dice) if dice else float('nan'):.4f}</li>",
            )
        )
    body += ["<ul>"] + [ln for _, ln in sorted(lines, key=lambda t: (math.isnan(t[0]), t[0]))] + ["</ul>"]
    pictures.write_atomic(out / "report.html", pictures.page("report", "\n".join(body)))


def get_args(argv=None):
    p = preprocess.ArgumentParser(
        prog="evaluate.py", description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", help="finetune.py run folder (reads its ckpt.pt, or best.pt)")
    p.add_argument(
        "--report",
        nargs="+",
        metavar="EVAL",
        help="instead of evaluating: gather finished evaluations (RUN, "
        "RUN/eval or any folder with metrics.json; shell globs welcome) into one table per dataset and metric set -- "
        "a row per configuration (arch, initialisation file, recipe, n-train; runs that differ in any other "
        "flag or evaluation setting get rows of their own), a run counted once however it is named; columns: "
        "Dice per region, mean +- std over runs (seeds) -- as Markdown and CSV in --out (default report/), and "
        "a bar plot PNG when matplotlib is installed",
    )
    p.add_argument(
        "--checkpoint",
        default="last",
        choices=("last", "best"),
        help="the last weights (default, as the authors) "
        "or best.pt of a run with --val-cases (model selection on extra labelled cases: not the paper's protocol)",
    )
    p.add_argument(
        "--data",
        help="preprocessed dataset (default: the run's own, from its checkpoint / args.json; "
        "another one is scored with a note saying so)",
    )
    p.add_argument("--split", default="test", choices=("test", "train", "all"), help="cases to evaluate (default test)")
    p.add_argument("--images", help="folder of raw NIfTI to segment instead of --data (predictions only)")
    p.add_argument(
        "--raw-root",
        help="where the raw dataset given to preprocess.py --input is now, if it moved "
        "(predictions take the raw images' grid and metrics read the raw labels)",
    )
    p.add_argument("--out", help="output folder (default RUN/eval, or RUN/predict with --images)")
    p.add_argument(
        "--metrics",
        default="authors",
        choices=("authors", "challenge"),
        help="authors (default): what the "
        "authors' evaluator computed for Table 2 (Dice etc. per label value and 'all', the micro-average over "
        "the foreground labels; nanmean over cases); challenge: the challenge's conventions (BraTS regions and "
        "empty-case rules, WMH label 2 masked, ISLES lesion-wise F1, HD95)",
    )
    p.add_argument(
        "--overlap",
        type=float,
        help="window overlap (default: what the run recorded, its recipe's: "
        "0.5 for amaes and wald, 0.6 for bsf as BrainSegFounder's test.py; 0.5 for older runs)",
    )
    p.add_argument(
        "--blend",
        choices=("sum", "gaussian", "mean"),
        help="sum logits (the paper), Gaussian-weight them "
        "(nnU-Net) or average them (MONAI) (default: what the run recorded, its recipe's: sum for amaes, "
        "gaussian for wald, mean for bsf; sum for older runs)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="test-time augmentation: average the 8 mirror images "
        "(default: what the run recorded: no for amaes, yes for wald, nnU-Net's mirroring)",
    )
    p.add_argument("--batch", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="autocast (default auto: bf16/fp16 on GPU, fp32 on CPU)",
    )
    p.add_argument(
        "--device", default="auto", choices=("auto", "cuda", "cpu"), help="default auto: cuda when available"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-pictures",
        action="store_true",
        help="no OUT/pictures/<case>.png and OUT/index.html (report: no report.html)",
    )
    a = p.parse_args(argv)
    if a.report:
        a.out = Path(a.out or "report")
        return a
    if not a.run:
        p.error("give --run FT (a finetune.py run to evaluate) or --report EVAL ...")
    if a.overlap is not None and not 0 <= a.overlap < 1:
        p.error("--overlap must be in [0, 1)")
    if a.batch < 1:
        p.error("--batch must be >= 1")
    if a.images and not Path(a.images).is_dir():
        p.error(f"--images {a.images}: no such folder")
    a.out = Path(a.out or Path(a.run) / ("predict" if a.images else "eval"))
    return a


def run_args(run):
    """The run's args.json (the first invocation, with "resumes"), or {}."""
    f = Path(run, "args.json")
    try:
        return json.loads(f.read_text()) if f.exists() else {}
    except json.JSONDecodeError:
        return {}


def run_data(run, info):
    """The preprocessed dataset the run trained on, where it is now: the checkpoint's
    record (resolved), else args.json's --data (a resume's new --data first); None when
    the run records none. FileNotFoundError when none of those folders exists any more."""
    args = run_args(run)
    given = [r["given"]["data"] for r in reversed(args.get("resumes", [])) if "data" in r.get("given", {})]
    known = [d for d in [info.get("data"), *given, args.get("data"), (info.get("args") or {}).get("data")] if d]
    if not known:
        return None
    found = next((d for d in known if Path(d, "dataset.json").exists()), None)
    if found is None:
        raise FileNotFoundError(f"the run's dataset {known[0]} is not there any more; give --data where it is now")
    return found


def print_table(summary, rule_text, names=None):
    """The summary as a table; with the authors' metrics, Dice, Jaccard, sensitivity and
    precision per label (names: label value -> name, shown beside the value)."""
    names = names or {}
    label = {v: f"{v} ({names[v]})" if v in names else v for v in summary}
    w = max([8] + [len(s) for s in label.values()])
    print(
        f"\n{'label/region':{w}s} {'metric':18s} {'mean':>9s} {'std':>9s} {'median':>9s} {'n':>4s} "
        f"{'NaN left out':>13s}"
    )
    for v, per in summary.items():
        for m, s in per.items():
            if m in ("tp", "fp", "fn", "ref_voxels", "pred_voxels", "volume_similarity"):
                continue  # in metrics.json / metrics.csv; the table keeps to the ratios people compare

            def f(x):
                return f"{x:9.4f}" if x is not None else f"{'-':>9s}"

            print(
                f"{label[v]:{w}s} {m:18s} {f(s['mean'])} {f(s['std'])} {f(s['median'])} {s['n']:4d} "
                f"{s['nan_excluded']:13d}"
            )
    print(f"Metrics: {rule_text}.")


# training flags that say where and how a run ran, not what it computed; with the seed
# (what the report averages over) and the configuration's own columns
PLUMBING = {
    "out",
    "data",
    "resume",
    "given",
    "resumes",
    "workers",
    "compile",
    "log_every",
    "ckpt_every",
    "checkpointing",
    "quiet",
    "device",
    "no_preflight",
    "aug_on",
    "max_bad_steps",
    "seed",
    "pretrained",
    "arch",
    "recipe",
    "n_train",
}


def run_setup(m):
    """What else decides an evaluated run's numbers: its training flags (metrics.json's
    train_args), the checkpoint (last / best), the split and the evaluation settings."""
    t = {k: v for k, v in (m.get("train_args") or {}).items() if k not in PLUMBING}
    return dict(
        t,
        checkpoint=Path(m.get("checkpoint") or "ckpt.pt").name,
        split=m.get("split"),
        **{f"eval_{k}": v for k, v in (m.get("settings") or {}).items()},
    )


def report(paths, out, html_page=True):
    """The Table-2-style comparison: finished evaluations grouped by configuration --
    (dataset, metric set, arch, pretrained or from scratch, the initialisation file,
    recipe, n-train) -- so runs scored or trained differently are never averaged; per
    label / region, the mean and (population) std over the runs (seeds) of each run's
    case-mean Dice. A metrics.json reached by two names counts once. Writes
    out/report.md, out/report.csv and out/report.html (the table, then each
    evaluation with a link to its page)."""
    runs, seen, scored, evals = [], set(), {}, []
    for p in map(Path, paths):
        f = next((c for c in (p / "metrics.json", p / "eval" / "metrics.json") if c.exists()), None)
        if f is None:
            print(f"skipped {p}: no metrics.json (evaluate it first: python evaluate.py --run RUN)", file=sys.stderr)
            continue
        if f.resolve() in seen:
            continue
        seen.add(f.resolve())
        m = json.loads(f.read_text())
        same = (
            json.dumps(
                [
                    m.get("run"),
                    Path(m.get("checkpoint") or "").name,
                    m.get("metric_set"),
                    m.get("split"),
                    m.get("data"),
                    m.get("settings"),
                ]
            )
            if Path(m.get("run") or "").is_absolute()
            else None
        )
        if same is not None and same in scored:  # one run evaluated twice alike (into two --out folders): counted once
            print(f"report: {f} scores the same run as {scored[same]} alike; counted once", file=sys.stderr)
            continue
        scored.setdefault(same, f)
        scratch = m.get("pretrained") in (None, "none")
        key = (
            m.get("dataset") or "dataset",
            m.get("metric_set") or "challenge",
            m.get("arch", "?"),
            "scratch" if scratch else "pretrained",
            "" if scratch else str(m.get("pretrained_file") or m["pretrained"]),
            str(m.get("recipe") or ""),
            str(m.get("n_train") or ""),
        )
        runs.append((key, m, f))
        evals.append((key, f.parent, m))
    if not runs:
        raise ValueError("no finished evaluation among the folders given")
    # runs of one configuration that differ in anything else (a training flag, the
    # checkpoint, the split, the evaluation settings) are rows of their own, not averaged
    setups = {}
    for key, m, f in runs:
        setups.setdefault(key, []).append(run_setup(m))
    groups, differs = {}, {}
    for key, m, f in runs:
        names = sorted({k for st in setups[key] for k in st if len({json.dumps(x.get(k)) for x in setups[key]}) > 1})
        variant = ", ".join(f"{k} {run_setup(m).get(k)}" for k in names)
        if variant:
            differs.setdefault(key, set()).add(variant)
        groups.setdefault(key + (variant,), []).append(m)
    for key, vs in differs.items():
        print(
            f"report: runs of {' / '.join(k for k in key[2:] if k)} differ in more than the seed, so they are not "
            f"averaged together: " + " | ".join(sorted(vs)),
            file=sys.stderr,
        )
    lines, rows = [], []
    for ds, mset in sorted({k[:2] for k in groups}):
        keys = sorted(k for k in groups if k[:2] == (ds, mset))
        regions = list(dict.fromkeys(r for k in keys for m in groups[k] for r in m["summary"]))
        extra = any(k[7] for k in keys)  # a column naming what sets runs of one configuration apart
        lines += [
            f"### {ds}, {mset} metrics (Dice, mean +- std over runs)",
            "",
            "| arch | init | from | recipe | n-train | runs | "
            + " | ".join(regions)
            + " |"
            + (" differs in |" if extra else ""),
            "|---|---|---|---|---|---|" + "---|" * (len(regions) + extra),
        ]
        for k in keys:
            cells = []
            for r in regions:
                vals = np.array(
                    [
                        m["summary"][r]["dice"]["mean"]
                        for m in groups[k]
                        if r in m["summary"] and m["summary"][r]["dice"]["mean"] is not None
                    ],
                    float,
                )
                mean, std = (float(vals.mean()), float(vals.std())) if len(vals) else (float("nan"), float("nan"))
                cells.append(f"{mean:.4f} +- {std:.4f}")
                rows.append([ds, mset, k[2], k[3], k[4], k[5], k[6], len(groups[k]), r, mean, std, k[7]])
            lines.append(
                f"| {k[2]} | {k[3]} | {k[4] or '-'} | {k[5] or '-'} | {k[6] or '-'} | {len(groups[k])} | "
                + " | ".join(cells)
                + " |"
                + (f" {k[7] or '-'} |" if extra else "")
            )
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    preprocess.write_atomic(out / "report.md", lambda p: p.write_text("\n".join(lines)))

    def write_csv(p):
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                [
                    "dataset",
                    "metric_set",
                    "arch",
                    "init",
                    "from",
                    "recipe",
                    "n_train",
                    "runs",
                    "region",
                    "dice_mean",
                    "dice_std",
                    "differs_in",
                ]
            )
            w.writerows(rows)

    preprocess.write_atomic(out / "report.csv", write_csv)
    if html_page:
        report_page(out, rows, evals)
    try:  # a picture when matplotlib is around; never a dependency
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1 + 1.2 * len(rows), 3.5))
        ax.bar(range(len(rows)), [r[9] for r in rows], yerr=[r[10] for r in rows], capsize=3)
        ax.set_xticks(range(len(rows)), [f"{r[2]} {r[3]}\n{r[8]}" for r in rows], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("Dice")
        fig.tight_layout()
        fig.savefig(out / "report.png", dpi=120)
    except ImportError:
        print(
            "report: no report.png: matplotlib is not installed (pip install matplotlib for the bar plot)",
            file=sys.stderr,
        )
    print("\n".join(lines))
    print(f"{out / 'report.md'}, {out / 'report.csv'}" + (f", {out / 'report.html'}" if html_page else ""))
    return rows


def main(argv=None):
    a = get_args(argv)
    if a.report:
        try:
            if preprocess.unwritable(a.out):
                raise ValueError(f"--out {a.out}: {preprocess.unwritable(a.out)}; choose another --out")
            report(a.report, a.out, not a.no_pictures)
            return 0
        except ValueError as e:
            print(f"evaluate.py: error: {e}", file=sys.stderr)
            return 2
    try:
        device = torch.device(
            "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"
        )
        run = Path(a.run)
        path = run / ("best.pt" if a.checkpoint == "best" else "ckpt.pt")
        model, info = load_model(path, device)
        rec = info.get("inference") or {}  # the run's predictor (finetune.py --recipe); a flag given here wins
        said = [
            f"--{k} {getattr(a, k)} given (the run recorded {rec[k]})"
            for k in ("blend", "tta", "overlap")
            if getattr(a, k) is not None and k in rec and getattr(a, k) != rec[k]
        ]
        a.blend = a.blend if a.blend is not None else rec.get("blend", "sum")
        a.tta = a.tta if a.tta is not None else bool(rec.get("tta", False))
        a.overlap = a.overlap if a.overlap is not None else float(rec.get("overlap", 0.5))
        if said:
            print("evaluate.py: " + "; ".join(said))
        _, autocast = autocast_for(device, a.dtype)
        note = None
        if not a.images:  # the run's own dataset unless --data says otherwise, and then a note says so
            own = run_data(run, info)
            if a.data is None and own is None:
                raise ValueError(f"{run} does not record its dataset (no args.json); give --data")
            if a.data is not None and own is not None and Path(a.data).resolve() != Path(own).resolve():
                note = (
                    f"evaluate.py: note: --data {a.data} is not the dataset the run trained on ({own}); "
                    f"scoring {a.data}"
                )
            a.data = a.data or own
        if preprocess.unwritable(a.out):
            raise ValueError(f"--out {a.out}: {preprocess.unwritable(a.out)}; choose another --out")
        ds = (
            json.loads(Path(a.data, "dataset.json").read_text())
            if not a.images and Path(a.data, "dataset.json").exists()
            else {}
        )
        names = ds.get("label_names") or info.get("label_names") or {}
        if a.metrics == "authors":  # the keys are the label values and "all", as the authors' results.json
            regions = {str(v): [v] for v in info["label_values"]} | {"all": [v for v in info["label_values"] if v != 0]}
            rules, rule_text = "authors", AUTHORS_RULES
        else:
            regions = ds.get("evaluation_regions") or {
                names.get(str(v), str(v)): [v] for v in info["label_values"] if v
            }
            rules = ds.get("metric_rules", "default")
            rule_text = RULES[rules]
        if a.images:
            cases, bad = raw_cases(a.images, info["in_channels"])
        else:
            if not Path(a.data, "dataset.json").exists():
                raise FileNotFoundError(
                    f"{a.data} is not a preprocessed dataset (no dataset.json); run preprocess.py first"
                )
            listed = ds["cases"]
            cases = [(c["case"], None) for c in listed if a.split == "all" or c["split"] == a.split]
            bad = []
        if not cases:
            raise ValueError(f"no cases to evaluate ({'--images ' + a.images if a.images else '--split ' + a.split})")
        lock_folder(a.out, "evaluation")  # one evaluation per folder; released when the process ends
    except (FileNotFoundError, ValueError, UserError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    print(
        f"evaluate.py: run {run}, weights from {path} (step {info.get('step')}), "
        + (f"images {a.images}" if a.images else f"data {a.data} ({ds.get('name')}, split {a.split})")
        + f": {len(cases)} case(s) -> {a.out}"
    )
    if note:
        print(note)
    try:
        return evaluate_cases(a, run, path, model, info, autocast, ds, regions, rules, rule_text, names, cases, bad)
    finally:
        release_lock()


def resumable(a, path, info):
    """A rerun with the same settings (and the same checkpoint file) skips the cases
    already done: each finished case leaves predictions/<case>.json (its metrics) next
    to its NIfTI. Changed settings: every case is redone. metrics.json / .csv of an
    earlier evaluation go now and come back complete at the end, so an interrupted
    evaluation leaves none. Returns the set of cases done."""
    pred = a.out / "predictions"
    pred.mkdir(parents=True, exist_ok=True)
    for stale in list(a.out.glob(".*.tmp")) + list(
        pred.glob(".*.tmp")
    ):  # a killed write's; the lock says no one writes them
        stale.unlink()
    for name in ("metrics.json", "metrics.csv", "failed.json"):
        (a.out / name).unlink(missing_ok=True)
    st = path.stat()
    settings = {
        "checkpoint": str(path.resolve()),
        "checkpoint_size": st.st_size,
        "checkpoint_mtime_ns": st.st_mtime_ns,
        "step": info.get("step"),
        "data": str(Path(a.images or a.data).resolve()),
        "split": a.split,
        "overlap": a.overlap,
        "blend": a.blend,
        "tta": a.tta,
        "dtype": a.dtype,
        "raw_root": a.raw_root,
        "metrics": a.metrics,
        "pictures": not a.no_pictures,
    }
    f = a.out / "settings.json"
    same = f.exists() and json.loads(f.read_text()) == json.loads(json.dumps(settings))
    if not same:
        for done in pred.glob("*.json"):
            done.unlink()
        preprocess.save_json(f, settings)
    return {d.stem for d in pred.glob("*.json") if (pred / f"{d.stem}.nii.gz").exists()}


def nan_for_null(x):
    """JSON's null back to NaN in a case's metrics (undefined values were written as null)."""
    if isinstance(x, dict):
        return {k: nan_for_null(v) for k, v in x.items()}
    return float("nan") if x is None else x


def evaluate_cases(a, run, path, model, info, autocast, ds, regions, rules, rule_text, names, cases, bad):
    """Predict (and score) every case, skipping those a killed run of the same settings
    finished; metrics.json / .csv, the pictures' page and the table at the end."""
    done = resumable(a, path, info)
    print(
        f"{info['arch']}, patch {info['patch']}, overlap {a.overlap}, blend {a.blend}{', tta' if a.tta else ''}, "
        f"metrics {a.metrics}"
    )
    rows, failed = [], [{"case": c, "reason": r} for c, r in bad]
    for c, r in bad:
        print(f"FAILED {c}: {r}")
    if done & {c for c, _ in cases}:
        print(
            f"{len(done & {c for c, _ in cases})} case(s) already done with these settings "
            "(predictions/<case>.json): skipped"
        )
    for case, files in tqdm(cases, desc="inference", unit="case", disable=a.quiet):
        record = a.out / "predictions" / f"{case}.json"
        if case in done:
            m = json.loads(record.read_text())["metrics"]
            if m is not None:
                rows.append({"case": case, "metrics": nan_for_null(m)})
            continue
        try:
            m = None
            if files is not None:  # --images: preprocess on the fly
                image, meta = preprocess_raw(files, info.get("transpose"))
            else:
                meta = json.loads(Path(a.data, "meta", f"{case}.json").read_text())
                meta["source_files"] = [str(raw_file(f, meta, a.raw_root)) for f in meta["source_files"]]
                if meta.get("grid_file"):
                    meta["grid_file"] = str(raw_file(meta["grid_file"], meta, a.raw_root))
                if meta.get("source_label"):
                    meta["source_label"] = str(raw_file(meta["source_label"], meta, a.raw_root))
                image = np.load(Path(a.data, "images", f"{case}.npy"))
            native = predict(model, image, info, meta, a.overlap, a.blend, a.tta, a.batch, autocast)
            save_prediction(a.out / "predictions" / f"{case}.nii.gz", native, meta)
            if files is None and meta.get("source_label"):
                ref, _ = preprocess.read_nifti(meta["source_label"])
                ref = np.rint(ref[..., 0] if ref.ndim == 4 else ref).astype(np.int64)
                for old, new in (meta.get("label_map") or {}).items():  # as preprocessing mapped it (BraTS 4 -> 3)
                    ref[ref == int(old)] = new
                if a.metrics == "authors":
                    m = authors_case_metrics(native, ref, info["label_values"])
                else:
                    m = case_metrics(
                        native,
                        ref,
                        meta["original_spacing"],
                        regions,
                        ds.get("evaluation_ignore", ds.get("ignore_label")),
                        rules,
                    )
                rows.append({"case": case, "metrics": m})
            if not a.no_pictures:
                (a.out / "pictures").mkdir(exist_ok=True)
                ref_ = ref if files is None and meta.get("source_label") else None
                title = case + (f" dice {case_dice(rows[-1]):.3f}" if ref_ is not None else "")
                case_picture(a.out / "pictures" / f"{case}.png", meta, native, ref_, title)
            preprocess.save_json(record, {"case": case, "metrics": m})  # this case is done
        except (preprocess.CaseError, OSError, ValueError) as e:
            failed.append({"case": case, "reason": str(e)})
            print(f"FAILED {case}: {e}")
    result = {
        "run": str(run.resolve()),
        "checkpoint": str(path),
        "split": None if a.images else a.split,
        "cases": rows,
        "failed": failed,
        "settings": {"overlap": a.overlap, "blend": a.blend, "tta": a.tta},
        "dataset": ds.get("name"),
        "arch": info["arch"],
        "pretrained": info.get("pretrained"),
        "seed": info.get("seed"),
        "n_train": info.get("n_train"),
        "recipe": info.get("recipe"),
        "data": None if a.images else str(Path(a.data).resolve()),
        "pretrained_file": info.get("pretrained_file"),
        "train_args": {k: v for k, v in (info.get("args") or run_args(run)).items() if k != "resumes"},
        "metric_set": a.metrics,
        "regions": regions,
        "label_names": names,
        "rules": rules,
        "rule_text": rule_text,
    }
    if rows:
        result["summary"] = (
            authors_summary(rows, list(regions)) if a.metrics == "authors" else summarise(rows, list(regions))
        )
        preprocess.save_json(a.out / "metrics.json", result)
        cols = list(AUTHORS_METRICS) if a.metrics == "authors" else [*METRICS, "ref_ml", "pred_ml"]

        def write_csv(p):
            with open(p, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["case", "label" if a.metrics == "authors" else "region", *cols])
                for r in rows:
                    for v, m in r["metrics"].items():
                        w.writerow([r["case"], v, *[m.get(k, "") for k in cols]])

        preprocess.write_atomic(a.out / "metrics.csv", write_csv)
        if not a.no_pictures:
            index_page(a.out, result, run)
        print_table(result["summary"], rule_text, names if a.metrics == "authors" else {})
        print(
            f"\n{a.out / 'metrics.json'}, {a.out / 'metrics.csv'}, predictions in {a.out / 'predictions'}"
            + ("" if a.no_pictures else f"; open {a.out / 'index.html'} in a browser")
        )
    else:
        preprocess.save_json(a.out / "failed.json", failed)
        print(f"predictions in {a.out / 'predictions'}" + ("" if a.images else " (no reference labels: no metrics)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
