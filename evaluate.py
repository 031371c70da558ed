"""
Sliding-window inference, metrics in native space, and predictions as NIfTI.

    python evaluate.py --run FT --data OUT --out FT/eval [--split test]
    python evaluate.py --run FT --images NEW_SCANS --out FT/new      # raw NIfTI, never preprocessed

For each case: sliding-window inference over the whole preprocessed volume with the
run's patch (overlap 0.5; logits summed over windows, as in the paper, or weighted by
a Gaussian with --blend gaussian; --tta adds the 7 mirrored passes); then, as the
authors' Yucca reverse_preprocessing (and nnU-Net), the logits are resized
trilinearly to the cropped box at native resolution, argmaxed there, the box put back
into the volume (background outside) and the reorientation undone
(preprocess.native_argmax); the result is written as OUT/predictions/<case>.nii.gz
with the raw image's shape and affine.

Metrics per case and foreground label, on the native grid against the raw label file
(spacing from its header): Dice, Jaccard, sensitivity, precision, HD95 in mm (95th
percentile of the surface distances in both directions, pooled) and absolute volume
difference (% of the reference volume). A label absent from both reference and
prediction has no Dice (NaN): such cases are left out of the averages (nanmean), as in
the paper, and the table says how many were. OUT/metrics.json holds every value and
the mean / std / median per label; OUT/metrics.csv one row per case and label.

--images DIR: every *.nii(.gz) in DIR is a case (nnU-Net names <case>_0000.nii.gz,
<case>_0001.nii.gz ... are grouped into the channels of one case), preprocessed on the
fly with preprocess.py's recipe; only predictions are written.
"""
import argparse
import csv
import gzip
import itertools
import json
import math
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

import preprocess  # the geometry both ways (recipe and to_native) lives there, once
from models import build_model
from training import UserError, autocast_for, lock_folder, release_lock

METRICS = ("dice", "jaccard", "sensitivity", "precision", "hd95_mm", "avd_percent")


# -----------------------------------------------------------------------------
# Inference

def window_starts(size, patch, overlap):
    """Start offsets along one axis: windows of `patch` with at least `overlap` shared,
    spread evenly, the first at 0 and the last flush with the end."""
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / (patch * (1 - overlap))) + 1
    return sorted({round(i * (size - patch) / (n - 1)) for i in range(n)})


def gaussian_weight(patch, device):
    """nnU-Net-style importance map: a Gaussian with sigma = patch / 8, peak 1."""
    axes = [torch.exp(-0.5 * ((torch.arange(p, device=device) - (p - 1) / 2) / (p / 8)) ** 2) for p in patch]
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (w / w.max()).clamp(min=1e-3)


@torch.no_grad()
def sliding_window(model, image, patch, overlap=0.5, blend="sum", tta=False, batch=4, autocast=None):
    """Logits (K, X, Y, Z) for a whole volume image (C, X, Y, Z) (a tensor on the
    model's device). Window logits are summed ("sum", the paper) or Gaussian-weighted,
    then divided by the summed weights; a volume smaller than the patch is padded with
    0 (background) and cropped back. tta: the mean over the 8 mirror images."""
    autocast = autocast or torch.autocast("cpu", enabled=False)
    patch = (patch,) * 3 if isinstance(patch, int) else tuple(patch)
    size = image.shape[1:]
    pad = [max(0, p - s) for p, s in zip(patch, size)]
    x = F.pad(image, [v for p in reversed(pad) for v in (0, p)])  # (C, X', Y', Z')
    grid = [window_starts(s, p, overlap) for s, p in zip(x.shape[1:], patch)]
    starts = [(i, j, k) for i in grid[0] for j in grid[1] for k in grid[2]]
    w = gaussian_weight(patch, x.device) if blend == "gaussian" else torch.ones(patch, device=x.device)
    flips = [d for r in range(4) for d in itertools.combinations((2, 3, 4), r)] if tta else [()]
    out = norm = None
    for b in range(0, len(starts), batch):
        chunk = starts[b:b + batch]
        xb = torch.stack([x[:, i:i + patch[0], j:j + patch[1], k:k + patch[2]] for i, j, k in chunk])  # (n, C, *P)
        logits = 0
        for dims in flips:
            with autocast:
                y = model(xb.flip(dims) if dims else xb)
            logits = logits + (y.flip(dims) if dims else y).float()
        logits = logits / len(flips)  # (n, K, *P)
        if out is None:
            out = torch.zeros((logits.shape[1], *x.shape[1:]), device=x.device)
            norm = torch.zeros(x.shape[1:], device=x.device)
        for (i, j, k), y in zip(chunk, logits):
            sl = (slice(i, i + patch[0]), slice(j, j + patch[1]), slice(k, k + patch[2]))
            out[(slice(None),) + sl] += y * w
            norm[sl] += w
    out = out / norm
    return out[:, :size[0], :size[1], :size[2]]


def load_model(path, device="cpu"):
    """A finetuned model from FT/best.pt or FT/ckpt.pt (weights_only), with its run
    facts: {"arch", "in_channels", "label_values", "patch", "decoder", ...}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; is --run a finetune.py run folder?")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(ck["arch"], ck["in_channels"], ck.get("n_outputs", len(ck["label_values"])), decoder=ck.get("decoder"),
                            legacy_merge=ck.get("legacy_merge", False))
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
    logits = sliding_window(model, x, info["patch"], overlap, blend, tta, batch, autocast)
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
# Metrics, with each challenge's conventions

# What each set of rules does where a mask is empty, and how HD95 is taken (printed with the table)
RULES = {
    "default": "Dice / Jaccard NaN when reference and prediction are both empty (left out of the mean, counted); "
               "HD95 = 95th percentile of the surface distances of both directions pooled, NaN when either mask is empty",
    "brats": "BraTS 2021: Dice 1 when both are empty, 0 when only one is; HD95 = the larger of the two directed 95th "
             "percentiles, 0 when both are empty, 373.13 mm when only one is",
    "wmh": "WMH 2017 (hjkuijf/wmhchallenge): label 2 masked out of the prediction, label 1 scored; HD95 = the larger of the "
           "two directed 95th percentiles between in-plane edges, NaN without a prediction; AVD %; lesion recall and F1 "
           "(26-connected lesions)",
    "isles": "ISLES 2022: Dice 1 when both are empty; absolute volume difference (ml); lesion F1 = TP / (TP + (FP + FN) / 2) "
             "and lesion count difference (26-connected lesions), F1 1 when neither has a lesion; no HD95",
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
    m = {"dice": 2 * tp / (p + r) if p + r else nan,
         "jaccard": tp / (p + r - tp) if p + r else nan,
         "sensitivity": tp / r if r else nan,
         "precision": tp / p if p else nan,
         "hd95_mm": hd95(pred, ref, spacing),
         "avd_percent": abs(p - r) / r * 100 if r else nan,
         "ref_ml": r * ml, "pred_ml": p * ml}
    if rules == "brats":
        m["dice"] = m["jaccard"] = 1.0 if p + r == 0 else m["dice"]
        m["hd95_mm"] = 0.0 if p + r == 0 else BRATS_HD_EMPTY if p == 0 or r == 0 else hd95(pred, ref, spacing, pooled=False)
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


METRICS = ("dice", "jaccard", "sensitivity", "precision", "hd95_mm", "avd_percent", "avd_ml", "lesion_recall", "lesion_f1",
           "lesion_count_diff")


def case_metrics(pred, ref, spacing, regions, ignore=None, rules="default"):
    """{region name: metrics} for label maps pred and ref (values) on one grid. regions:
    {name: [label values]} (a plain label is a region of one value); voxels where the
    reference holds the ignore label are taken out of both masks."""
    keep = ref != ignore if ignore is not None else np.ones(ref.shape, bool)
    return {name: label_metrics(np.isin(pred, vals) & keep, np.isin(ref, vals) & keep, spacing, rules)
            for name, vals in regions.items()}


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
            out[str(v)][m] = {"mean": float(ok.mean()) if len(ok) else None, "std": float(ok.std()) if len(ok) else None,
                              "median": float(np.median(ok)) if len(ok) else None, "n": int(len(ok)),
                              "nan_excluded": int(np.isnan(vals).sum())}
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
            bad.append((case, f"has channels {sorted(g)}, the model needs {list(range(in_channels))} "
                              f"(name them {case}_0000.nii.gz ... {case}_{in_channels - 1:04d}.nii.gz)"))
        else:
            out.append((case, [str(g[c]) for c in range(in_channels)]))
    return out, bad


def preprocess_raw(files):
    """(image (C, X, Y, Z), meta for to_native) of raw channel files, by preprocess.py's recipe."""
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
    image, _, meta = preprocess.preprocess_arrays(channels, affine)
    image = image.astype(np.float16)  # the precision preprocess.py stores, so both routes predict alike
    meta.update({"original_affine": affine.tolist(), "original_shape": list(channels[0].shape), "source_files": list(files)})
    return image, meta


def raw_file(path, meta, raw_root=None):
    """Where a raw source file of the case is now: as preprocess.py recorded it
    (absolute), or under --raw-root when the raw folder has moved."""
    p = Path(path)
    if raw_root is not None and meta.get("source_root"):
        p = Path(raw_root) / p.relative_to(meta["source_root"])
    if not p.exists():
        hint = (f"--raw-root {raw_root} does not hold it either" if raw_root else
                f"if the raw folder moved, pass --raw-root NEW_FOLDER (the folder given to preprocess.py --input, "
                f"then {meta.get('source_root')})")
        raise preprocess.CaseError(f"raw file {p} not found; {hint}")
    return p


def save_prediction(path, pred_native, meta):
    """Write the label map with the raw image's affine (and its header's qform/sform)."""
    ref = nib.load(meta.get("grid_file") or meta["source_files"][0])
    img = nib.Nifti1Image(pred_native.astype(np.uint8), ref.affine, ref.header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    preprocess.write_atomic(path, lambda p: p.write_bytes(gzip.compress(img.to_bytes(), compresslevel=6)))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="finetune.py run folder (reads its ckpt.pt, or best.pt)")
    p.add_argument("--report", nargs="+", metavar="EVAL", help="instead of evaluating: gather finished evaluations (RUN, "
                   "RUN/eval or any folder with metrics.json; shell globs welcome) into one table per dataset -- rows: arch "
                   "x pretrained / from scratch, columns: Dice per region, mean +- std over runs (seeds) -- as Markdown and "
                   "CSV in --out (default report/), and a bar plot PNG when matplotlib is installed")
    p.add_argument("--checkpoint", default="last", choices=("last", "best"), help="the last weights (default, as the authors) "
                   "or best.pt of a run with --val-cases (model selection on extra labelled cases: not the paper's protocol)")
    p.add_argument("--data", default="demo/preprocessed", help="preprocessed dataset (default demo/preprocessed)")
    p.add_argument("--split", default="test", choices=("test", "train", "all"), help="cases to evaluate (default test)")
    p.add_argument("--images", help="folder of raw NIfTI to segment instead of --data (predictions only)")
    p.add_argument("--raw-root", help="where the raw dataset given to preprocess.py --input is now, if it moved "
                   "(predictions take the raw images' grid and metrics read the raw labels)")
    p.add_argument("--out", help="output folder (default RUN/eval, or RUN/predict with --images)")
    p.add_argument("--overlap", type=float, default=0.5, help="window overlap (default 0.5)")
    p.add_argument("--blend", default="sum", choices=("sum", "gaussian"), help="sum logits (default, the paper) or Gaussian-weight them")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average the 8 mirror images")
    p.add_argument("--batch", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"), help="autocast (default auto: bf16/fp16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="default auto: cuda when available")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.report:
        a.out = Path(a.out or "report")
        return a
    if not a.run:
        p.error("give --run FT (a finetune.py run to evaluate) or --report EVAL ...")
    if not 0 <= a.overlap < 1:
        p.error("--overlap must be in [0, 1)")
    if a.batch < 1:
        p.error("--batch must be >= 1")
    if a.images and not Path(a.images).is_dir():
        p.error(f"--images {a.images}: no such folder")
    a.out = Path(a.out or Path(a.run) / ("predict" if a.images else "eval"))
    return a


def print_table(summary, rule_text):
    w = max([8] + [len(v) for v in summary])
    print(f"\n{'region':{w}s} {'metric':18s} {'mean':>9s} {'std':>9s} {'median':>9s} {'n':>4s} {'NaN left out':>13s}")
    for v, per in summary.items():
        for m, s in per.items():
            f = (lambda x: f"{x:9.4f}" if x is not None else f"{'-':>9s}")
            print(f"{v:{w}s} {m:18s} {f(s['mean'])} {f(s['std'])} {f(s['median'])} {s['n']:4d} {s['nan_excluded']:13d}")
    print(f"Rules: {rule_text}. NaN values are left out of the mean (nanmean) and counted.")


def report(paths, out):
    """The Table-2-style comparison: finished evaluations grouped by (dataset, arch,
    pretrained or from scratch); per region, the mean and (population) std over the
    runs of each run's case-mean Dice. Writes out/report.md and out/report.csv."""
    runs = []
    for p in map(Path, paths):
        f = next((c for c in (p / "metrics.json", p / "eval" / "metrics.json") if c.exists()), None)
        if f is None:
            print(f"skipped {p}: no metrics.json (evaluate it first: python evaluate.py --run RUN)", file=sys.stderr)
            continue
        m = json.loads(f.read_text())
        init = "scratch" if m.get("pretrained") in (None, "none") else "pretrained"
        runs.append(((m.get("dataset") or "dataset", m.get("arch", "?"), init), m))
    if not runs:
        raise ValueError("no finished evaluation among the folders given")
    groups = {}
    for key, m in runs:
        groups.setdefault(key, []).append(m)
    lines, rows = [], []
    for ds in sorted({k[0] for k in groups}):
        keys = sorted(k for k in groups if k[0] == ds)
        regions = list(dict.fromkeys(r for k in keys for m in groups[k] for r in m["summary"]))
        lines += [f"### {ds} (Dice, mean +- std over runs)", "", "| arch | init | runs | " + " | ".join(regions) + " |",
                  "|---|---|---|" + "---|" * len(regions)]
        for k in keys:
            cells = []
            for r in regions:
                vals = np.array([m["summary"][r]["dice"]["mean"] for m in groups[k]
                                 if r in m["summary"] and m["summary"][r]["dice"]["mean"] is not None], float)
                mean, std = (float(vals.mean()), float(vals.std())) if len(vals) else (float("nan"), float("nan"))
                cells.append(f"{mean:.4f} +- {std:.4f}")
                rows.append([ds, k[1], k[2], len(groups[k]), r, mean, std])
            lines.append(f"| {k[1]} | {k[2]} | {len(groups[k])} | " + " | ".join(cells) + " |")
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    preprocess.write_atomic(out / "report.md", lambda p: p.write_text("\n".join(lines)))

    def write_csv(p):
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["dataset", "arch", "init", "runs", "region", "dice_mean", "dice_std"])
            w.writerows(rows)
    preprocess.write_atomic(out / "report.csv", write_csv)
    try:  # a picture when matplotlib is around; never a dependency
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(1 + 1.2 * len(rows), 3.5))
        ax.bar(range(len(rows)), [r[5] for r in rows], yerr=[r[6] for r in rows], capsize=3)
        ax.set_xticks(range(len(rows)), [f"{r[1]} {r[2]}\n{r[4]}" for r in rows], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("Dice")
        fig.tight_layout()
        fig.savefig(out / "report.png", dpi=120)
    except ImportError:
        pass
    print("\n".join(lines))
    print(f"{out / 'report.md'}, {out / 'report.csv'}")
    return rows


def main(argv=None):
    a = get_args(argv)
    if a.report:
        try:
            report(a.report, a.out)
            return 0
        except ValueError as e:
            print(f"evaluate.py: error: {e}", file=sys.stderr)
            return 2
    try:
        device = torch.device("cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu")
        run = Path(a.run)
        path = run / ("best.pt" if a.checkpoint == "best" else "ckpt.pt")
        model, info = load_model(path, device)
        _, autocast = autocast_for(device, a.dtype)
        ds = json.loads(Path(a.data, "dataset.json").read_text()) if not a.images and Path(a.data, "dataset.json").exists() else {}
        names = ds.get("label_names") or info.get("label_names") or {}
        regions = ds.get("evaluation_regions") or {names.get(str(v), str(v)): [v] for v in info["label_values"] if v != 0}
        rules = ds.get("metric_rules", "default")
        if a.images:
            cases, bad = raw_cases(a.images, info["in_channels"])
        else:
            if not Path(a.data, "dataset.json").exists():
                raise FileNotFoundError(f"{a.data} is not a preprocessed dataset (no dataset.json); run preprocess.py first")
            listed = ds["cases"]
            cases = [(c["case"], None) for c in listed if a.split == "all" or c["split"] == a.split]
            bad = []
        if not cases:
            raise ValueError(f"no cases to evaluate ({'--images ' + a.images if a.images else '--split ' + a.split})")
        lock_folder(a.out, "evaluation")  # one evaluation per folder; released when the process ends
    except (FileNotFoundError, ValueError, UserError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    try:
        return evaluate_cases(a, run, path, model, info, autocast, ds, regions, rules, cases, bad)
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
    for stale in list(a.out.glob(".*.tmp")) + list(pred.glob(".*.tmp")):  # a killed write's; the lock says no one writes them
        stale.unlink()
    for name in ("metrics.json", "metrics.csv", "failed.json"):
        (a.out / name).unlink(missing_ok=True)
    st = path.stat()
    settings = {"checkpoint": str(path.resolve()), "checkpoint_size": st.st_size, "checkpoint_mtime_ns": st.st_mtime_ns,
                "step": info.get("step"), "data": str(Path(a.images or a.data).resolve()), "split": a.split,
                "overlap": a.overlap, "blend": a.blend, "tta": a.tta, "dtype": a.dtype, "raw_root": a.raw_root}
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


def evaluate_cases(a, run, path, model, info, autocast, ds, regions, rules, cases, bad):
    done = resumable(a, path, info)
    print(f"{info['arch']} from {path} (step {info.get('step')}), {len(cases)} case(s), patch {info['patch']}, "
          f"overlap {a.overlap}, blend {a.blend}{', tta' if a.tta else ''} -> {a.out}")
    rows, failed = [], [{"case": c, "reason": r} for c, r in bad]
    for c, r in bad:
        print(f"FAILED {c}: {r}")
    if done & {c for c, _ in cases}:
        print(f"{len(done & {c for c, _ in cases})} case(s) already done with these settings (predictions/<case>.json): skipped")
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
                image, meta = preprocess_raw(files)
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
                m = case_metrics(native, ref, meta["original_spacing"], regions, ds.get("ignore_label"), rules)
                rows.append({"case": case, "metrics": m})
            preprocess.save_json(record, {"case": case, "metrics": m})  # this case is done
        except (preprocess.CaseError, OSError, ValueError) as e:
            failed.append({"case": case, "reason": str(e)})
            print(f"FAILED {case}: {e}")
    result = {"run": str(run), "checkpoint": str(path), "split": None if a.images else a.split, "cases": rows, "failed": failed,
              "settings": {"overlap": a.overlap, "blend": a.blend, "tta": a.tta}, "dataset": ds.get("name"),
              "arch": info["arch"], "pretrained": info.get("pretrained"), "seed": info.get("seed"),
              "regions": regions, "rules": rules, "rule_text": RULES[rules]}
    if rows:
        result["summary"] = summarise(rows, list(regions))
        preprocess.save_json(a.out / "metrics.json", result)

        def write_csv(p):
            with open(p, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["case", "region", *METRICS, "ref_ml", "pred_ml"])
                for r in rows:
                    for v, m in r["metrics"].items():
                        w.writerow([r["case"], v, *[m.get(k, "") for k in METRICS], m["ref_ml"], m["pred_ml"]])
        preprocess.write_atomic(a.out / "metrics.csv", write_csv)
        print_table(result["summary"], RULES[rules])
        print(f"\n{a.out / 'metrics.json'}, {a.out / 'metrics.csv'}, predictions in {a.out / 'predictions'}")
    else:
        preprocess.save_json(a.out / "failed.json", failed)
        print(f"predictions in {a.out / 'predictions'}" + ("" if a.images else " (no reference labels: no metrics)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
