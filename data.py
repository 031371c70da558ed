"""
Datasets, patch sampling, the AMAES augmentation recipe, masking and few-shot splits.

    python data.py --show demo/preprocessed --out recipe.png [--preset all|spatial|wald|nnunet]  # each row
    from data import PretrainDataset, StepSampler, augment_batch, random_mask
    ds = PretrainDataset("demo/preprocessed", patch=128, preset="all", seed=0)
    loader = DataLoader(ds, batch_size=8, sampler=StepSampler(0, 1000, 8), num_workers=8)
    for region, k in loader:                          # (B, C, 181, 181, 181) float16, sample numbers
        inp, target = augment_batch(ds, region.cuda(), k)   # (B, C, 128, 128, 128) each, on the GPU
        inp, mask = random_mask(inp)                  # masking on the device, no gradients

The data path is the authors' (Munk et al. 2024, github.com/asbjrnmunk/amaes with Yucca
1.1.7), step by step:
  pretraining  crop-pad a 181^3 region (get_max_rotated_size(128)): along an axis
               shorter than 181 the whole axis, centred and padded with the volume
               minimum; along a longer one a uniform start. Then the spatial rows on
               coordinates centred on (181 - 1) / 2, cubic B-spline interpolation
               (order 3, scipy's map_coordinates with its prefilter, outside = the
               minimum) of the centre 128^3 -- on every sample, transformed or not,
               so even the plain centre crop is read at half-voxel positions. That
               patch is the target; the intensity rows make the input. `mae` (no
               augmentation) crop-pads 128^3 directly, no resampling.
  finetuning   crop-pad 128^3, with p 0.33 around a foreground voxel drawn from one
               pooled list (every 10th labelled voxel, all classes together) so that
               it lands anywhere in the patch; then the spatial rows on the patch
               itself (identity coordinates are integers: no resampling when nothing
               fires), labels nearest (outside = 0). The from-scratch `all` preset
               leaves out the clip to the input range (Yucca's default there).
The workers only read and crop-pad (float16, a few ms). The rows run afterwards,
batched on the training device (augment_batch), or per sample in the workers
(--aug-on workers), or in any TorchIO pipeline (the Amaes* transforms): the same
torch functions in every case. Every random choice of sample k -- the case, the crop,
each row's parameters and the noise fields -- is a pure function of (seed, k): the
noise comes from a counter-based generator (hash of key and voxel index) that gives
the same numbers on every device. So a sample does not depend on the driver, the
device (beyond float rounding), the worker count, or a resume.

Presets (probabilities per sample, the authors' values in RECIPE):
  none     crop only (plain MAE)
  spatial  rotation (p 0.2, then 0.66 per axis, +-30 deg), scaling (p 0.2, 0.9..1.1)
  all      elastic (p 0.33) + the spatial rows, then on the input only, in this order:
           additive noise, blur, multiplicative noise, ghosting, Gibbs ringing, low
           resolution, bias field, gamma; each clipped to its input's range in
           pretraining (clip=False for the from-scratch finetuning preset).
  wald     Wald et al.'s MAE recipe (WALD, nnssl BaseMAETrainer): rotation (p 0.2, every
           axis), scaling 0.7..1.4 drawn as batchgenerators (p 0.2), mirroring (p 0.5 per
           axis); no intensity rows; cut from a get_patch_size / 0.85 pre-crop (257^3 for 160).
  nnunet   nnU-Net's default training augmentation (NNUNET; nnssl's finetuning inherits it):
           rotation and scaling as wald but scales U(0.7, 1.4), then Gaussian noise, blur,
           brightness, contrast, low resolution, inverted gamma, gamma, mirroring; from
           the same pre-crop; trilinear as batchgeneratorsv2 (finetune --recipe wald).
  bsf      BrainSegFounder's BraTS finetuning (BSF; MONAI transforms): mirroring (p 0.5 per
           axis), then x * (1 + f) and x + o, f and o ~ U(-0.1, 0.1), one each per sample
           (p 1); no resampling, no clipping (finetune --recipe bsf, with --sampler bsf).
"""

import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from torchio.transforms import IntensityTransform, SpatialTransform
from torchio.transforms.augmentation import RandomTransform

import pictures  # numpy and the standard library only

PRESETS = ("none", "spatial", "all", "wald", "nnunet", "bsf")

# The authors' recipe (amaes src/augmentations/augmentation_composer.py, Yucca 1.1.7
# defaults): probabilities and ranges, one plain dict.
RECIPE = dict(
    elastic=0.33,
    elastic_alpha=(200.0, 600.0),
    elastic_sigma=(20.0, 30.0),
    rotation=0.2,
    rotation_axis=0.66,
    rotation_deg=30.0,
    scale=0.2,
    scale_range=(0.9, 1.1),
    mirror=0.0,
    additive_noise=0.2,
    noise_sigma=(1e-4, 1e-3),
    blur=0.2,
    blur_channel=0.5,
    blur_sigma=(0.0, 1.0),
    multiplicative_noise=0.2,
    ghosting=0.2,
    ghost_alpha=(0.85, 0.95),
    ghost_reps=(2, 10),
    gibbs=0.2,
    gibbs_keep=(96, 128),
    low_resolution=0.2,
    lowres_channel=0.5,
    lowres_axis=0.33,
    lowres_zoom=(0.5, 1.0),
    bias_field=0.33,
    gamma=0.2,
    gamma_invert=0.05,
    gamma_low=(0.5, 1.0),
    gamma_high=(1.0, 2.0),
)
# Wald et al.'s MAE pretraining (nnssl BaseMAETrainer): rotation +-30 on every axis with p 0.2,
# isotropic scaling 0.7..1.4 with p 0.2, mirroring of each axis with p 0.5; no elastic, no intensity rows
# Scales drawn as batchgenerators' augment_spatial draws them (spatial_transformations.py l.256-259):
# with p 0.5 U(0.7, 1), else U(1, 1.4); patches cut from a pre-crop of get_patch_size(patch) / 0.85
# (nnssl configure_basic_dummyDA.py l.36), centred and cropped on whole voxels when nothing fires.
WALD = dict(RECIPE, elastic=0.0, rotation_axis=1.0, scale_range=(0.7, 1.4), scale_draw="below_above", mirror=1.0)
# nnU-Net's default training augmentation (nnUNetTrainer.get_training_transforms, TaWald/nnUNet branch
# nnssl_finetuning_inclusion nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py l.712-808, batchgeneratorsv2):
# rotation p 0.2 (+-30 deg on every axis, l.464), scaling p 0.2 U(0.7, 1.4) one factor for all axes,
# no elastic; then noise, blur, brightness, contrast, low resolution, inverted gamma, gamma (rows NNUNET_ROWS,
# their probabilities and ranges below), mirroring of each axis with p 0.5.
NNUNET = dict(
    RECIPE,
    elastic=0.0,
    rotation_axis=1.0,
    scale_range=(0.7, 1.4),
    scale_draw="uniform",
    mirror=1.0,
    nn_noise=0.1,
    nn_noise_sigma=(0.0, 0.1),
    nn_blur=0.2,
    nn_blur_channel=0.5,
    nn_blur_sigma=(0.5, 1.0),
    nn_brightness=0.15,
    nn_brightness_range=(0.75, 1.25),
    nn_contrast=0.15,
    nn_contrast_range=(0.75, 1.25),
    nn_lowres=0.25,
    nn_lowres_channel=0.5,
    nn_lowres_scale=(0.5, 1.0),
    nn_gamma_invert=0.1,
    nn_gamma=0.3,
    nn_gamma_range=(0.7, 1.5),
)
# BrainSegFounder's BraTS finetuning (lab-smile/BrainSegFounder downstream/BraTS/finetuning/utils/data_utils.py
# l.128-133, MONAI transforms): RandFlipd p 0.5 on each axis alone (l.128-130); RandScaleIntensityd(factors=0.1,
# prob=1.0): x * (1 + f), one f ~ U(-0.1, 0.1) for all channels (l.132); RandShiftIntensityd(offsets=0.1,
# prob=1.0): x + o, one o ~ U(-0.1, 0.1) for all channels (l.133). No rotation, scaling or clipping. (Their
# argparse's RandFlipd_prob 0.2 / RandScaleIntensityd_prob 0.1 / ... main_FinetuningSwinUNETR_4Channels.py
# l.80-83 are never read: the loader hard-codes the numbers above.)
BSF = dict(
    RECIPE,
    elastic=0.0,
    rotation=0.0,
    scale=0.0,
    mirror=1.0,
    bsf_scale=1.0,
    bsf_scale_range=(-0.1, 0.1),
    bsf_shift=1.0,
    bsf_shift_range=(-0.1, 0.1),
)
BSF_ROWS = ("bsf_scale", "bsf_shift")
NNUNET_ROWS = ("nn_noise", "nn_blur", "nn_brightness", "nn_contrast", "nn_lowres", "nn_gamma_invert", "nn_gamma")
SPATIAL_ROWS = ("elastic", "rotation", "scale", "mirror")
INTENSITY_ROWS = (
    "additive_noise",
    "blur",
    "multiplicative_noise",
    "ghosting",
    "gibbs",
    "low_resolution",
    "bias_field",
    "gamma",
)
INTENSITY_ALL = INTENSITY_ROWS + NNUNET_ROWS + BSF_ROWS  # every intensity row any preset has, in the order applied
# the presets with a recipe of their own; the others use RECIPE
PRESET_RECIPES = {"wald": WALD, "nnunet": NNUNET, "bsf": BSF}


# -----------------------------------------------------------------------------
# The preprocessed dataset (preprocess.py's output)


def read_dataset(root):
    """dataset.json of a preprocessed folder, with a clear error when it is not one."""
    root = Path(root)
    f = root / "dataset.json"
    raw = (root / "imagesTr").is_dir() or any(root.glob("*.nii*"))
    if raw and not (root / "images").is_dir():  # an nnU-Net raw dataset has a dataset.json of its own
        raise ValueError(
            f"{root} is raw data, not a preprocessed dataset: preprocess it first "
            f"(python preprocess.py --input {root} --output OUT), then give --data OUT"
        )
    if not f.exists():
        if not root.is_dir():
            raise FileNotFoundError(
                f"{root}: no such folder, so no dataset.json; give the preprocessed dataset (--data OUT "
                "of preprocess.py --output OUT)"
            )
        raise FileNotFoundError(
            f"{root} is not a preprocessed dataset (no dataset.json); "
            "run preprocess.py --input RAW --output " + str(root) + " first"
        )
    ds = json.loads(f.read_text())
    if "cases" not in ds:
        raise ValueError(f"{f} is not preprocess.py's dataset.json (no case list); preprocess the raw data first")
    if not ds["cases"]:
        raise ValueError(
            f"{f} lists no usable cases" + (f"; see {root / 'failed.json'}" if (root / "failed.json").exists() else "")
        )
    return ds


def check_cases(root, cases, labels=False):
    """Before the first step, every case the run reads: images/<case>.npy (and
    labels/<case>.npy) has a readable header, a file size that matches it (a file cut
    short by a kill or a full disk does not) and label and image grids that agree,
    as nnU-Net's --verify_dataset_integrity. Reads headers only. ValueError naming the
    first bad file (the scripts make it one line, exit 2; rerunning preprocess.py redoes that case)."""
    root = Path(root)
    for case in cases:
        shape = None
        for sub in ("images", "labels") if labels else ("images",):
            f = root / sub / f"{case}.npy"
            try:
                with open(f, "rb") as fh:
                    version = np.lib.format.read_magic(fh)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shp, _, dtype = read(fh)
                    need = fh.tell() + int(np.prod(shp)) * dtype.itemsize
                have = f.stat().st_size
            except FileNotFoundError:
                raise ValueError(
                    f"{f} is missing; rerun preprocess.py on {root}'s raw data (it redoes missing cases)"
                ) from None
            except (OSError, ValueError, EOFError) as e:
                raise ValueError(
                    f"{f} is not a readable .npy ({e}); rerun preprocess.py on {root}'s raw data "
                    "(it redoes broken cases)"
                ) from None
            if have < need:
                raise ValueError(
                    f"{f} is truncated ({have} of {need} bytes); rerun preprocess.py on {root}'s raw data "
                    "(it redoes broken cases)"
                )
            if shape is not None and tuple(shp) != tuple(shape[1:]):
                raise ValueError(
                    f"{f} has shape {tuple(shp)}, its image {tuple(shape)}; rerun preprocess.py on {root}'s raw data"
                )
            shape = shp


def check_finite(root, cases, share=list):
    """ValueError naming the cases whose preprocessed image holds NaN or inf: one read
    of each, before the first step, instead of steps skipped later for a non-finite
    loss (padding with a NaN volume's minimum spreads the NaN). share(bad cases) -> all
    of them: the processes of a distributed run each check their share of the cases
    and pool what they found (training.gather), so every one stops alike."""
    bad = []
    for case in cases:
        x = load_case(Path(root, "images", f"{case}.npy"))  # a broken file: CaseReadError naming it
        if not all(np.isfinite(x[c]).all() for c in range(x.shape[0])):  # a channel at a time: little memory
            bad.append(case)
    bad = share(bad)
    if bad:
        raise ValueError(
            f"{root}: the preprocessed image of {len(bad)} case(s) holds NaN or inf values ({', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}); preprocess them again (preprocess.py --overwrite) or remove "
            "them from dataset.json"
        )


def leaked_test_files(root, test_roots):
    """{test dataset: [raw file names]} of the pretraining volumes of `root` that are test
    cases of the labelled datasets `test_roots`, matched by the raw source files' name and
    size recorded in each case's meta (so a copy of a file is found too). BRAINS-45K
    holds BraTS21, ISLES22, WMH and MSSEG1, so pretraining on it can see their test cases."""

    def sources(r, split=None):
        out = {}
        for c in read_dataset(r)["cases"]:
            if split is None or c["split"] == split:
                meta = json.loads((Path(r) / "meta" / f"{c['case']}.json").read_text())
                out.update({(Path(p).name, size): c["case"] for p, size, _ in meta.get("fingerprint", [])})
        return out

    ours = sources(root)
    found = {}
    for t in test_roots:
        hits = sorted(name for name, size in set(sources(t, "test")) & set(ours))
        if hits:
            found[str(t)] = hits
    return found


def case_names(root, split=None):
    return [c["case"] for c in read_dataset(root)["cases"] if split is None or c["split"] == split]


def select_few_shot(train_cases, n, seed):
    """n cases drawn from the train split by seed: sorted names, reproducible. n may be
    "all". Raises ValueError when n exceeds the split."""
    cases = sorted(train_cases)
    if n == "all":
        return cases
    n = int(n)
    if not 1 <= n <= len(cases):
        raise ValueError(f"--n-train {n}: the train split has {len(cases)} cases; choose 1..{len(cases)} or 'all'")
    rng = np.random.default_rng([seed, 20])
    return sorted(rng.choice(cases, size=n, replace=False).tolist())


class StepSampler(torch.utils.data.Sampler):
    """Sample numbers for rank `rank` of `world`: step s, slot b -> (s * world + rank) * batch + b.
    torch's DistributedSampler would hand out 0..n-1 every epoch and so repeat every
    augmentation; here each sample number is new, and a resumed run starts at its step."""

    def __init__(self, start_step, steps, batch, rank=0, world=1):
        self.start, self.steps, self.batch, self.rank, self.world = start_step, steps, batch, rank, world

    def __iter__(self):
        for s in range(self.start, self.start + self.steps):
            base = (s * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self):
        return self.steps * self.batch


# -----------------------------------------------------------------------------
# Random numbers that are the same on every device

M32 = 0xFFFFFFFF


def key_of(*ints):
    """A 64-bit key from a tuple of non-negative ints (numpy's SeedSequence mixing)."""
    a, b = np.random.SeedSequence([int(i) for i in ints]).generate_state(2)
    return int(a) | int(b) << 32


def _s32(v):  # the int32 with the bits of the 32-bit unsigned v
    v &= M32
    return v - (1 << 32) if v >> 31 else v


def _hash32(x, tmp=None):
    """Chris Wellons' lowbias32, a well-mixed 32-bit integer hash, in place on an int32
    tensor holding the bits: int32 products wrap mod 2^32 as the hash needs, and the
    shifts are made logical by masking the sign bits the arithmetic shift brings in."""
    tmp = torch.empty_like(x) if tmp is None else tmp
    x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp).bitwise_and_(0xFFFF))
    x.mul_(_s32(0x7FEB352D))
    x.bitwise_xor_(torch.bitwise_right_shift(x, 15, out=tmp).bitwise_and_(0x1FFFF))
    x.mul_(_s32(0x846CA68B))
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=tmp).bitwise_and_(0xFFFF))


def uniform(key, shape, device="cpu"):
    """U(0, 1] float32 numbers: number i is hash(hash(i ^ low 32 bits of key) ^ high
    32 bits) -- a counter-based generator, so CPU and GPU give the same numbers.
    On the CPU in blocks of 2^18 with in-place int32 ops: the arithmetic then stays
    in cache and allocates nothing per op (int32 also vectorises where int64 products
    do not: 6x faster than the same hash in int64)."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=torch.float32, device=device)
    block = n if out.is_cuda else 1 << 18
    x = torch.empty(min(n, block), dtype=torch.int32, device=device)
    tmp = torch.empty_like(x)
    for s in range(0, n, block):
        m = min(n, s + block) - s
        h, t = x[:m], tmp[:m]
        torch.arange(s, s + m, dtype=torch.int32, device=device, out=h)
        _hash32(_hash32(h.bitwise_xor_(_s32(key)), t).bitwise_xor_(_s32(key >> 32)), t)
        out[s : s + m] = h.bitwise_right_shift_(8).bitwise_and_(0xFFFFFF).add_(1).float().mul_(2.0**-24)
    return out.view(shape)


def normal(key, shape, device="cpu"):
    """N(0, 1) float32 numbers (Box-Muller on two uniform streams), the same on every device."""
    u1, u2 = (
        uniform(key_of(key & M32, key >> 32, 1), shape, device),
        uniform(key_of(key & M32, key >> 32, 2), shape, device),
    )
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


# -----------------------------------------------------------------------------
# The parameters of one sample: plain numbers, drawn from numpy's default_rng


def draw_params(seed, k, preset, channels, patch, recipe=RECIPE, clip=True):
    """Every augmentation parameter of sample k: {"key", "clip", "spatial": {...},
    "intensity": {row: per-channel (or per-sample) parameters or None}}. Rows that do
    not fire are left out. The draws follow the authors' structure: per sample, then
    per channel (and per axis) where their transforms draw so."""
    rng = np.random.default_rng([seed, k, 1])
    # (show passes its forced recipes)
    r = PRESET_RECIPES.get(preset, recipe) if recipe is RECIPE else recipe
    p = {"key": key_of(seed, k, 2), "clip": clip, "spatial": {}, "intensity": {}}
    if preset == "none":
        return p
    sp = p["spatial"]
    if preset in ("wald", "nnunet", "bsf"):
        sp["_crop"] = True  # nothing fired: a whole-voxel centre crop of the pre-crop, no resampling
    if preset == "all" and rng.random() < r["elastic"]:
        sp["elastic"] = [rng.uniform(*r["elastic_alpha"]), rng.uniform(*r["elastic_sigma"])]
    if rng.random() < r["rotation"]:
        angles = [
            rng.uniform(-r["rotation_deg"], r["rotation_deg"]) if rng.random() < r["rotation_axis"] else 0.0
            for _ in range(3)
        ]
        if any(angles):
            sp["rotation"] = angles
    if rng.random() < r["scale"]:
        lo, hi = r["scale_range"]
        if r.get("scale_draw") == "below_above":  # batchgenerators: below 1 or above 1 with p 0.5 each
            sp["scale"] = rng.uniform(lo, 1.0) if rng.random() < 0.5 and lo < 1 else rng.uniform(max(lo, 1.0), hi)
        else:
            sp["scale"] = rng.uniform(lo, hi)
    if preset == "nnunet":
        draw_nnunet_rows(rng, r, channels, p["intensity"])
    if r["mirror"] and rng.random() < r["mirror"]:
        sp["mirror"] = [bool(rng.random() < 0.5) for _ in range(3)]
    if preset == "bsf":  # MONAI's order: flips, then scale, then shift; one number per sample
        for row in BSF_ROWS:
            if rng.random() < r[row]:
                p["intensity"][row] = float(rng.uniform(*r[row + "_range"]))
    if preset != "all":
        return p
    it = p["intensity"]

    def per_channel(prob, draw):  # over the channels, None where the row does not fire
        vals = [draw() if rng.random() < prob else None for _ in range(channels)]
        return vals if any(v is not None for v in vals) else None

    def put(row, value):
        if value is not None:
            it[row] = value

    put("additive_noise", per_channel(r["additive_noise"], lambda: rng.uniform(*r["noise_sigma"])))
    if rng.random() < r["blur"]:
        sigma = rng.uniform(*r["blur_sigma"])  # one per sample, then p 0.5 per channel
        put("blur", per_channel(r["blur_channel"], lambda: sigma))
    put("multiplicative_noise", per_channel(r["multiplicative_noise"], lambda: rng.uniform(*r["noise_sigma"])))
    put(
        "ghosting",
        per_channel(
            r["ghosting"],
            lambda: [
                rng.uniform(*r["ghost_alpha"]),
                int(rng.integers(r["ghost_reps"][0], r["ghost_reps"][1] + 1)),
                int(rng.integers(0, 3)),
            ],
        ),
    )
    put(
        "gibbs",
        per_channel(
            r["gibbs"], lambda: [int(rng.integers(r["gibbs_keep"][0], r["gibbs_keep"][1] + 1)), int(rng.integers(0, 3))]
        ),
    )
    if rng.random() < r["low_resolution"]:

        def target():  # each axis zoomed with p 0.33; a channel whose axes all stay is left as it is (Yucca)
            z = rng.uniform(*r["lowres_zoom"])
            return [round(n * z) if rng.random() < r["lowres_axis"] else n for n in patch]

        put("low_resolution", per_channel(r["lowres_channel"], target))
    put("bias_field", per_channel(r["bias_field"], lambda: [int(rng.integers(0, n)) for n in patch]))
    if rng.random() < r["gamma"]:
        invert = bool(rng.random() < r["gamma_invert"])
        it["gamma"] = [rng.uniform(*r["gamma_low"]) if rng.random() < 0.5 else rng.uniform(*r["gamma_high"]), invert]
    return p


def bg_contrast(rng, lo, hi):
    """batchgeneratorsv2's BGContrast draw (transforms/intensity/contrast.py l.12-20): with p 0.5
    U(lo, 1) when lo < 1, else U(max(lo, 1), hi)."""
    return rng.uniform(lo, 1.0) if rng.random() < 0.5 and lo < 1 else rng.uniform(max(lo, 1.0), hi)


def draw_nnunet_rows(rng, r, channels, it):
    """Parameters of nnU-Net's intensity rows (nnUNetTrainer.py l.745-801), into `it`: each row
    fires with its RandomTransform apply_probability; per channel as batchgeneratorsv2 draws them."""
    if rng.random() < r["nn_noise"]:  # one sigma for all channels (synchronize_channels True)
        it["nn_noise"] = rng.uniform(*r["nn_noise_sigma"])
    if rng.random() < r["nn_blur"]:  # p 0.5 per channel, one sigma per axis
        v = [
            [rng.uniform(*r["nn_blur_sigma"]) for _ in range(3)] if rng.random() < r["nn_blur_channel"] else None
            for _ in range(channels)
        ]
        if any(x is not None for x in v):
            it["nn_blur"] = v
    if rng.random() < r["nn_brightness"]:
        it["nn_brightness"] = [bg_contrast(rng, *r["nn_brightness_range"]) for _ in range(channels)]
    if rng.random() < r["nn_contrast"]:
        it["nn_contrast"] = [bg_contrast(rng, *r["nn_contrast_range"]) for _ in range(channels)]
    if rng.random() < r["nn_lowres"]:  # p 0.5 per channel, one scale for all axes
        v = [
            rng.uniform(*r["nn_lowres_scale"]) if rng.random() < r["nn_lowres_channel"] else None
            for _ in range(channels)
        ]
        if any(x is not None for x in v):
            it["nn_lowres"] = v
    for row in ("nn_gamma_invert", "nn_gamma"):
        if rng.random() < r[row]:
            it[row] = [bg_contrast(rng, *r["nn_gamma_range"]) for _ in range(channels)]


def initial_patch_size(patch, max_deg=30.0, min_scale=0.85):
    """nnU-Net's / nnssl's get_patch_size (nnssl ssl_data/compute_initial_patch_size.py,
    configure_basic_dummyDA.py l.36): the largest extent of the patch rotated by max_deg
    about each axis in turn, divided by the smallest scale 0.85, truncated: 257 for 160,
    205 for 128."""
    c = np.array(patch, dtype=float)
    ext = c.copy()
    for axis in range(3):
        angles = [0.0, 0.0, 0.0]
        angles[axis] = max_deg
        ext = np.maximum(ext, np.abs(rotation_matrix(angles) @ c))
    return tuple(int(v) for v in ext / min_scale)


# -----------------------------------------------------------------------------
# Resampling: cubic B-splines as scipy.ndimage, in torch, on any device

Z3 = math.sqrt(3) - 2  # the pole of the cubic B-spline prefilter


def bspline_prefilter(x, dim):
    """Cubic B-spline coefficients along `dim` with mirror boundaries, as scipy's
    spline_filter1d (order 3, mode 'mirror', which map_coordinates's 'constant' mode
    uses too): the causal then anti-causal recursion of Unser et al. (1993)."""
    dim = dim % x.dim()
    y = x.movedim(dim, 0).clone(memory_format=torch.contiguous_format)  # each step of the recursion: one dense plane
    n = y.shape[0]
    if n == 1:
        return x.clone()
    horizon = min(n, 30)  # |z|^30 < 1e-17: the mirrored initial sum is exact in float
    zk = torch.tensor([Z3**i for i in range(horizon)], dtype=y.dtype, device=y.device)
    y[0] = torch.tensordot(zk, y[:horizon], dims=1)
    for i in range(1, n):  # fused in-place steps: no temporary plane per step
        y[i].add_(y[i - 1], alpha=Z3)
    y[n - 1] = (Z3 / (Z3 * Z3 - 1)) * (y[n - 1] + Z3 * y[n - 2])
    for i in range(n - 2, -1, -1):  # y[i] = Z3 (y[i + 1] - y[i])
        y[i].sub_(y[i + 1]).mul_(-Z3)
    return y.mul_(6).movedim(0, dim)


def bspline_weights(t):
    """Weights of the 4 coefficients at offsets -1, 0, 1, 2 for fractional positions t:
    (4, *t.shape): (1 - t)^3 / 6, (3t^3 - 6t^2 + 4) / 6, the rest of 1, t^3 / 6."""
    w = torch.empty((4, *t.shape), dtype=t.dtype, device=t.device)
    t2 = t * t
    torch.mul(t2, t, out=w[3])  # t^3
    torch.mul(w[3], 0.5, out=w[1]).sub_(t2).add_(2 / 3)
    u = 1 - t
    torch.mul(u, u, out=w[0]).mul_(u).mul_(1 / 6)
    w[3].mul_(1 / 6)
    torch.add(w[0], w[1], out=w[2]).add_(w[3]).neg_().add_(1)
    return w


def mirror_index(i, n):
    """Index i reflected into [0, n) without repeating the edge (scipy's 'mirror')."""
    if n == 1:
        return torch.zeros_like(i)
    p = 2 * (n - 1)
    i = i.abs() % p
    return torch.where(i > n - 1, p - i, i)


def taps(pos, n, order, mode="mirror"):
    """Indices and weights (order + 1 taps, or 1 for order 0) of 1-D interpolation at
    positions `pos` (float tensor) on an axis of n samples. mode 'mirror' reflects
    taps beyond the edge; 'edge' clamps them."""
    if order == 0:
        return torch.floor(pos + 0.5).long().clamp(0, n - 1)[None], torch.ones_like(pos)[None]
    f = torch.floor(pos)
    t = pos - f
    f = f.long()
    if order == 1:
        idx, w = torch.stack([f, f + 1]), torch.stack([1 - t, t])
    else:
        idx, w = f + torch.arange(-1, 3, device=pos.device).view(-1, *[1] * pos.dim()), bspline_weights(t)
    return (mirror_index(idx, n) if mode == "mirror" else idx.clamp(0, n - 1)), w


def resample_axis(x, dim, pos, order, mode="mirror"):
    """x interpolated along `dim` at positions pos (1-D): the other axes untouched.
    Cubic: the prefilter and the 4-tap sum along one axis are together one linear map
    from the axis's n samples to the len(pos) outputs (a dense matrix: every output
    depends on every sample through the recursion). It is built once from the same
    recursion run on the n x n identity in float64 (axis_matrix) and applied as one
    matrix product -- exact, and 3x faster for a 181^3 region than n dependent steps
    over the volume."""
    if order == 3:
        m = axis_matrix(x.shape[dim], pos.detach().cpu().double().numpy().tobytes(), mode)
        return _matmul_along(x, dim, m.to(x.device, x.dtype))
    idx, w = taps(pos.to(x.device), x.shape[dim], order, mode)
    shape = [1] * x.dim()
    shape[dim] = -1
    out = 0
    for i, wi in zip(idx, w):
        out = out + x.index_select(dim, i) * wi.view(shape).to(x.dtype)
    return out


@functools.lru_cache(maxsize=32)
def axis_matrix(n, pos, mode="mirror"):
    """(len(pos), n) float64 matrix of cubic B-spline interpolation along an axis of n
    samples at positions pos (float64 bytes, hashable for the cache: the 1-D grids of a
    run repeat), prefilter included, boundaries as scipy's 'mirror' or 'edge' mode."""
    pos = torch.from_numpy(np.frombuffer(pos, dtype=np.float64).copy())
    x = torch.eye(n, dtype=torch.float64)
    if mode == "edge":  # scipy pads 12 edge values before prefiltering with mirror ends
        x = torch.cat([x[:1].expand(12, n), x, x[-1:].expand(12, n)])
        pos, mode = pos + 12, "mirror"
    x = bspline_prefilter(x, 0)  # column j: the coefficients of the unit signal e_j
    idx, w = taps(pos, x.shape[0], 3, mode)
    return sum(x[i] * wi[:, None] for i, wi in zip(idx, w))


def _matmul_along(x, dim, m):
    """out[..., o, ...] = sum_j m[o, j] x[..., j, ...] along `dim`: one GEMM (or a batch
    of them for an inner axis), no transposed copies of x. In float32: with TF32 matmuls
    switched on (torch.backends.cuda.matmul.allow_tf32, off by default and in this kit)
    the resampling would lose its exactness."""
    dim, shape = dim % x.dim(), x.shape
    if dim == x.dim() - 1:
        out = x.reshape(-1, shape[-1]) @ m.T
    else:
        out = torch.matmul(m, x.reshape(math.prod(shape[:dim]), shape[dim], -1))
    return out.view(*shape[:dim], m.shape[0], *shape[dim + 1 :])


def resize(x, shape, order=3, mode="mirror"):
    """skimage.transform.resize's values for the last len(shape) axes of a tensor:
    output voxel o reads (o + 0.5) * n_in / n_out - 0.5, cubic B-spline (order 3),
    linear or nearest, computed axis by axis (a tensor-product spline evaluated on a
    grid factorises: 4 taps per axis instead of 64 per voxel), output clipped to the
    input's range. No anti-aliasing here (preprocess.resize adds skimage's)."""
    lead = x.dim() - len(shape)
    lo, hi = x.amin(), x.amax()
    for d, n in enumerate(shape):
        if n != x.shape[lead + d]:
            pos = (torch.arange(n, dtype=torch.float64) + 0.5) * (x.shape[lead + d] / n) - 0.5
            x = resample_axis(x, lead + d, pos, order, mode)
    return x.clamp(lo, hi) if order else x


def cubic_sample(coef, coords, cval, chunk=None):
    """scipy.ndimage.map_coordinates(order=3, mode='constant') on prefiltered
    coefficients coef (X, Y, Z) at coords (3, N): the 4^3 tap weighted sum, mirrored
    coefficients past the edges, cval for points outside [0, n - 1]. Returns (N,).
    The coefficients are mirror-padded by 2 once, so a point's 64 taps are one base
    index plus 64 fixed offsets; the sum is reduced axis by axis (64 -> 16 -> 4 -> 1
    products). On the CPU the gathers go 2048 points at a time: their 64 x 2048
    indices and values then stay in cache (the gathers 2-3x faster than with 16384)."""
    n, dev = coef.shape, coef.device
    chunk = chunk or (1 << 18 if coef.is_cuda else 1 << 16)
    sub = chunk if coef.is_cuda else 1 << 11
    if min(n) > 2:  # torch's 'reflect' is scipy's 'mirror' (d c b | a b c d | c b a)
        flat = F.pad(coef[None, None], (2,) * 6, mode="reflect").reshape(-1)  # (X + 4) (Y + 4) (Z + 4)
    else:
        pad = [mirror_index(torch.arange(-2, s + 2, device=dev), s) for s in n]
        flat = coef[pad[0]][:, pad[1]][:, :, pad[2]].reshape(-1)
    m1, m2 = n[1] + 4, n[2] + 4
    r = torch.arange(4, device=dev)
    offsets = (
        ((r.view(4, 1, 1) * m1 + r.view(1, 4, 1)) * m2 + r.view(1, 1, 4)).view(64, 1) + (m1 + 1) * m2 + 1
    )  # tap -1 of the padded array
    hi = torch.tensor(n, device=dev, dtype=coords.dtype).view(3, 1) - 1
    out = torch.empty(coords.shape[1], dtype=coef.dtype, device=dev)
    for s in range(0, coords.shape[1], chunk):
        p = coords[:, s : s + chunk]
        inside = ((p >= 0) & (p <= hi)).all(0)
        p = torch.minimum(p.clamp(min=0), hi)  # outside points read anything in range, then get cval
        f = torch.floor(p)
        w = bspline_weights(p - f)  # (4, 3, m): taps -1, 0, 1, 2 per axis
        f = f.long()
        base = (f[0] * m1 + f[1]) * m2 + f[2]
        res = torch.empty(p.shape[1], dtype=coef.dtype, device=dev)
        for q in range(0, p.shape[1], sub):
            v = flat.index_select(0, (base[q : q + sub] + offsets).view(-1)).view(4, 4, 4, -1)
            wq = w[:, :, q : q + sub]
            acc = (v * wq[:, 2]).sum(2)  # (4, 4, m)
            acc = (acc * wq[:, 1]).sum(1)  # (4, m)
            res[q : q + sub] = (acc * wq[:, 0]).sum(0)
        out[s : s + chunk] = torch.where(inside, res, cval)
    return out


def linear_sample(vol, coords, cval, order):
    """map_coordinates(order=1 or 0, mode='constant') of vol (X, Y, Z) at coords (3, N):
    trilinear, or the nearest voxel (floor(x + 0.5), as scipy rounds)."""
    n = vol.shape
    inside = ((coords >= 0) & (coords <= torch.tensor(n, device=vol.device).view(3, 1) - 1)).all(0)
    if order == 0:
        i = [torch.floor(coords[d] + 0.5).long().clamp(0, n[d] - 1) for d in range(3)]
        val = vol[i[0], i[1], i[2]]
    else:  # grid_sample: (x, y, z) = (last, middle, first) axis, normalised to [-1, 1]
        g = coords / (torch.tensor(n, device=vol.device, dtype=coords.dtype).view(3, 1) - 1).clamp(min=1) * 2 - 1
        val = F.grid_sample(
            vol[None, None], g.flip(0).T.view(1, 1, 1, -1, 3).to(vol.dtype), mode="bilinear", align_corners=True
        ).view(-1)
    return torch.where(inside, val, torch.as_tensor(cval, dtype=vol.dtype, device=vol.device))


# -----------------------------------------------------------------------------
# The spatial rows: one coordinate grid, one resampling


def rotation_matrix(angles_deg):
    """Yucca's rotation: I . Rx . Ry . Rz (an axis whose angle is 0 is left out)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


@functools.lru_cache(maxsize=32)
def gaussian_matrix(n, sigma):
    """(n, n) float64 matrix of scipy.ndimage.gaussian_filter1d(mode='constant', cval=0,
    truncate 4) on an axis of n samples: row o holds the normalised kernel centred on o,
    cut where it leaves the axis. At the elastic field's sigmas (20-30 voxels, 201-tap
    kernels longer than the 128 axis) the matrix is dense, and one matrix product per
    axis costs less than a convolution or an FFT."""
    r = int(4 * sigma + 0.5)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = k / k.sum()
    d = torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1)  # output - input
    return torch.where(d.abs() <= r, k[(d + r).clamp(0, 2 * r)], 0.0)


def warps(params):
    """Whether spatial parameters move the grid off the axes (elastic or rotation): then
    every voxel needs its 64 cubic taps, otherwise the resampling factorises by axis."""
    return "elastic" in params or "rotation" in params


def spatial_coords(params, patch, centre, key, device):
    """Where each voxel of the output patch reads the input, in Yucca's order:
    zero-centred grid ((P - 1) / 2), + elastic displacement (gaussian_filter of
    U(-1, 1) noise, times alpha, per axis), rotated (coords^T . R), scaled, + the
    region's centre (n / 2 - 0.5). Returns (3, *patch), or per-axis 1-D positions
    [(P0,), (P1,), (P2,)] when the transform keeps the grid axis-aligned (no elastic,
    no rotation): then the resampling factorises axis by axis."""
    axes = [
        (torch.arange(p, dtype=torch.float32, device=device) - (p - 1) / 2) * params.get("scale", 1.0) for p in patch
    ]
    if not warps(params):
        return [a + c for a, c in zip(axes, centre)]
    g = torch.stack(
        torch.meshgrid(
            *[torch.arange(p, dtype=torch.float32, device=device) - (p - 1) / 2 for p in patch], indexing="ij"
        )
    )
    if "elastic" in params:
        alpha, sigma = params["elastic"]
        noise = torch.stack([uniform(key_of(key & M32, key >> 32, 10 + d), patch, device) for d in range(3)]) * 2 - 1
        for ax in range(3):  # the three fields at once: (3, *patch)
            noise = _matmul_along(noise, ax + 1, gaussian_matrix(patch[ax], sigma).to(device, torch.float32))
        g += noise * alpha
    if "rotation" in params:
        g = torch.einsum(
            "ij,i...->j...", torch.tensor(rotation_matrix(params["rotation"]), dtype=torch.float32, device=device), g
        )
    g = g * params.get("scale", 1.0)
    return g + torch.tensor(centre, dtype=torch.float32, device=device).view(3, 1, 1, 1)


def prefilter3(x):
    """Cubic B-spline coefficients of (..., X, Y, Z) along its last three axes."""
    return bspline_prefilter(bspline_prefilter(bspline_prefilter(x, -3), -2), -1)


def spatial(x, params, patch, order=3, cval=None, label=None, clip=False, coef=None):
    """The spatial rows of one sample: x (C, R0, R1, R2) -> (C, *patch) resampled at
    spatial_coords (centred on the region's centre), with the authors' cubic B-spline
    (order 3; 1 = trilinear, a faster deviation), outside = cval (default: the
    sample's minimum), clipped to the input's range with clip (pretraining); label
    (R0, R1, R2) -> (*patch) nearest, outside 0. coef: prefilter3(x) when the caller
    has it (augment_batch prefilters its rotated and deformed samples at once; the
    axis-aligned ones do not need it). Mirroring (Wald et al.'s recipe) flips the
    output."""
    if params.get("_crop") and not ({"elastic", "rotation", "scale"} & set(params)):
        # batchgenerators / batchgeneratorsv2 without a transform: a crop around floor(n / 2), no resampling
        sl = tuple(slice(n // 2 - p // 2, n // 2 - p // 2 + p) for n, p in zip(x.shape[1:], patch))
        out, lab = x[(slice(None),) + sl], (label[sl] if label is not None else None)
        if "mirror" in params:
            dims = [d for d, m in enumerate(params["mirror"]) if m]
            out, lab = out.flip([d + 1 for d in dims]), (lab.flip(dims) if lab is not None else None)
        return out, lab
    centre = [n / 2 - 0.5 for n in x.shape[1:]]
    lo, hi = x.amin(), x.amax()
    cval = lo if cval is None else cval
    # the 1-D grids of an axis-aligned transform are made on the CPU: they key the
    # cache of interpolation matrices without a device sync
    coords = spatial_coords(params, patch, centre, params.get("_key", 0), x.device if warps(params) else "cpu")
    if not warps(params):  # the tensor-product spline on a grid factorises: one matrix product per axis
        out, inside = x, True
        for d, pos in enumerate(coords):
            out = resample_axis(out, d + 1, pos, order)
            ok = (pos >= 0) & (pos <= x.shape[d + 1] - 1)
            inside = inside & ok.view([-1 if i == d else 1 for i in range(3)])
        inside = inside.to(x.device)
        out = torch.where(inside, out, cval)
        lab = None
        if label is not None:
            lab = label
            for d, pos in enumerate(coords):
                lab = lab.index_select(d, torch.floor(pos + 0.5).long().clamp(0, label.shape[d] - 1).to(label.device))
            lab = torch.where(inside, lab, torch.zeros((), dtype=label.dtype, device=label.device))
    else:
        flat = coords.reshape(3, -1)
        if order == 3:
            coef = prefilter3(x) if coef is None else coef
            out = torch.stack([cubic_sample(c, flat, cval).view(patch) for c in coef])
        else:
            out = torch.stack([linear_sample(c, flat, cval, order).view(patch) for c in x])
        lab = linear_sample(label, flat, 0, 0).view(patch) if label is not None else None
    if clip:
        out = out.clamp(lo, hi)
    if "mirror" in params:
        dims = [d for d, m in enumerate(params["mirror"]) if m]
        out = out.flip([d + 1 for d in dims])
        lab = lab.flip(dims) if lab is not None else None
    return out, lab


# -----------------------------------------------------------------------------
# The intensity rows (input only): one torch function each, on one sample (C, X, Y, Z)
# with that sample's parameters, in the authors' forms (Yucca 1.1.7 transforms).


def _pad_reflect(x, r, dim):  # scipy's 'reflect' (d c b a | a b c d | d c b a)
    n = x.shape[dim]
    left = x.narrow(dim, 0, r).flip(dim)
    right = x.narrow(dim, n - r, r).flip(dim)
    return torch.cat([left, x, right], dim)


def additive_noise(x, sigmas, key):
    """x + N(0, sigma) per channel (channels whose sigma is None untouched)."""
    for c, s in enumerate(sigmas):
        if s is not None:
            x[c] += normal(key_of(key & M32, key >> 32, 20 + c), x.shape[1:], x.device) * s
    return x


def blur(x, sigmas, key=None):
    """scipy.ndimage.gaussian_filter(x_c, sigma) per channel (mode 'reflect', truncate 4)."""
    for c, s in enumerate(sigmas):
        if s is None or s <= 1e-15:
            continue
        r = int(4 * s + 0.5)
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / s) ** 2)
        k = (k / k.sum()).tolist()
        y = x[c]
        for d in range(3):
            p = _pad_reflect(y, r, d)
            n = y.shape[d]
            y = sum(w * p.narrow(d, i, n) for i, w in enumerate(k))
        x[c] = y
    return x


def multiplicative_noise(x, sigmas, key):
    """x + x * N(0, sigma) per channel."""
    for c, s in enumerate(sigmas):
        if s is not None:
            x[c] += x[c] * normal(key_of(key & M32, key >> 32, 30 + c), x.shape[1:], x.device) * s
    return x


def _kspace(x, mask_along, axis):
    """|ifftn(fftn(x - m) * mask)| + m with m = min(0, min x): the shape of Yucca's
    ghosting and ringing (mask: 1-D over the unshifted frequencies of `axis`). A mask
    that varies along one axis only commutes with the transforms along the others,
    which then cancel: the 1-D transform pair along `axis` gives the same array at a
    third of the cost."""
    m = x.min().clamp(max=0)  # a tensor: no host sync on the GPU
    k = torch.fft.fft(x - m, dim=axis)
    shape = [1, 1, 1]
    shape[axis] = -1
    return torch.fft.ifft(k * mask_along.view(shape), dim=axis).abs().to(x.dtype) + m


def ghosting(x, params, key=None):
    """Motion ghosting per channel, params [alpha, reps, axis]: the unshifted k-space
    planes 0, r, 2r, ... (up to n - 2: Yucca's slice 0:-1:r) times alpha."""
    for c, p in enumerate(params):
        if p is not None:
            alpha, reps, axis = p
            n = x.shape[axis + 1]
            mask = torch.ones(n, device=x.device)
            mask[0 : n - 1 : reps] = alpha
            x[c] = _kspace(x[c], mask, axis)
    return x


def gibbs(x, params, key=None):
    """Gibbs ringing per channel, params [n_keep, axis]: after fftshift, all but the
    central frequencies [ceil(n/2) - ceil(k/2), ceil(n/2) + ceil(k/2)) set to 0. As in
    Yucca's code the drawn axis 0 acts on axis 1 and 1 on 0 (it transposes first)."""
    for c, p in enumerate(params):
        if p is not None:
            keep, axis = p
            axis = (1, 0, 2)[axis]
            n = x.shape[axis + 1]
            lo, hi = math.ceil(n / 2) - math.ceil(keep / 2), math.ceil(n / 2) + math.ceil(keep / 2)
            shifted = (torch.arange(n, device=x.device) + n // 2) % n  # where each frequency lands after fftshift
            x[c] = _kspace(x[c], ((shifted >= lo) & (shifted < hi)).to(x.dtype), axis)
    return x


def low_resolution(x, targets, key=None):
    """Per channel, target shape (None = untouched): skimage resize to the target with
    order 0, then back with order 3, both mode 'edge', no anti-aliasing (Yucca's
    simulate_lowres)."""
    for c, t in enumerate(targets):
        if t is not None and list(t) != list(x.shape[1:]):
            small = resize(x[c], t, order=0, mode="edge")
            x[c] = resize(small, x.shape[1:], order=3, mode="edge")
    return x


def bias_field(x, centres, key=None):
    """Per channel: x * (1 - sum_d (i_d - c_d)^2 / n_d^2), c a voxel: three 1-D terms."""
    for c, centre in enumerate(centres):
        if centre is not None:
            g = 1.0
            for d, (n, c0) in enumerate(zip(x.shape[1:], centre)):
                shape = [1, 1, 1]
                shape[d] = n
                g = g - ((torch.arange(n, dtype=x.dtype, device=x.device) - c0) ** 2 / n**2).view(shape)
            x[c] = x[c] * g
    return x


def gamma(x, params, key=None):
    """params [gamma, invert] for the whole sample: ((x - min) / (range + eps)) ** gamma
    * range + min over the sample's [min, max], inverted first with p 0.05. eps = 1:
    Yucca 1.1.7 passes its per_channel flag (True) into augment_gamma's epsilon
    position, so the channels share one gamma and the curve maps [0, 1] onto
    [0, 0.5 ** gamma]. We keep that: it is what AMAES pretrained with."""
    g, invert = params
    y = -x if invert else x
    lo, hi = y.min(), y.max()
    y = ((y - lo) / (hi - lo + 1.0)) ** g * (hi - lo) + lo
    return -y if invert else y


# nnU-Net's intensity rows (batchgeneratorsv2 transforms, as nnUNetTrainer.get_training_transforms sets them)


def nn_noise(x, sigma, key):
    """GaussianNoiseTransform (intensity/gaussian_noise.py): x + N(0, sigma), one sigma ~ U(0, 0.1)
    for all channels, independent noise per channel."""
    return x + normal(key_of(key & M32, key >> 32, 40), x.shape, x.device) * sigma


def nn_kernel(sigma, truncate=6.0):
    """batchgeneratorsv2's _build_kernel (noise/gaussian_blur.py l.179-202, truncate 6 as
    blur_dimension passes it): size = the odd number nearest sigma * 6 + 0.5, samples of
    exp(-x^2 / 2 sigma^2) at -(size - 1) / 2 .. (size - 1) / 2, normalised."""
    n = sigma * truncate + 0.5
    k = round(n)
    k = k if k % 2 == 1 else (k + 1 if n - k >= 0 else k - 1)
    t = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def nn_blur(x, sigmas, key=None):
    """GaussianBlurTransform: per channel (None = untouched) a separable Gaussian, one sigma
    per axis, torch 'reflect' padding (the edge voxel not repeated)."""
    for c, sig in enumerate(sigmas):
        if sig is None:
            continue
        y = x[c : c + 1]
        for d, s in enumerate(sig):
            k = nn_kernel(s).to(x.device, x.dtype)
            r = len(k) // 2
            pad = [0] * 6
            pad[2 * (2 - d)], pad[2 * (2 - d) + 1] = r, r
            yp = F.pad(y[None], pad, mode="reflect")[0]
            n = y.shape[d + 1]
            y = sum(w * yp.narrow(d + 1, i, n) for i, w in enumerate(k))
        x[c] = y[0]
    return x


def nn_brightness(x, factors, key=None):
    """MultiplicativeBrightnessTransform: x_c * m_c, m_c ~ BGContrast((0.75, 1.25)) per channel."""
    return x * torch.tensor(factors, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)


def nn_contrast(x, factors, key=None):
    """ContrastTransform(preserve_range=True): per channel (x - mean) * m + mean, clipped to
    the channel's [min, max] before the change."""
    for c, m in enumerate(factors):
        mean, lo, hi = x[c].mean(), x[c].min(), x[c].max()
        x[c] = ((x[c] - mean) * m + mean).clamp(lo, hi)
    return x


def nn_lowres(x, scales, key=None):
    """SimulateLowResolutionTransform (spatial/low_resolution.py l.55-62): per channel (None =
    untouched) down to round(n * scale) with 'nearest-exact', back with trilinear
    (align_corners False): torch's own interpolate, as there."""
    for c, sc in enumerate(scales):
        if sc is not None:
            small = F.interpolate(x[c][None, None], [round(n * sc) for n in x.shape[1:]], mode="nearest-exact")
            x[c] = F.interpolate(small, list(x.shape[1:]), mode="trilinear")[0, 0]
    return x


def nn_gamma_curve(x, g, invert):
    """GammaTransform (intensity/gamma.py l.54-103) on one channel with p_retain_stats 1:
    (inverted) ((x - min) / max(range, 1e-7)) ** g * range + min, then mean and (unbiased)
    std restored."""
    y = -x if invert else x
    mean, std = y.mean(), y.std()
    lo, hi = y.min(), y.max()
    y = ((y - lo) / (hi - lo).clamp(min=1e-7)) ** g * (hi - lo) + lo
    y = (y - y.mean()) * (std / y.std().clamp(min=1e-7)) + mean
    return -y if invert else y


def nn_gamma_invert(x, gammas, key=None):
    for c, g in enumerate(gammas):
        x[c] = nn_gamma_curve(x[c], g, True)
    return x


def nn_gamma(x, gammas, key=None):
    for c, g in enumerate(gammas):
        x[c] = nn_gamma_curve(x[c], g, False)
    return x


def bsf_scale(x, f, key=None):
    """MONAI ScaleIntensity(factor=f): x * (1 + f)."""
    return x * (1 + f)


def bsf_shift(x, o, key=None):
    """MONAI ShiftIntensity(offset=o): x + o, background included."""
    return x + o


INTENSITY = {
    "additive_noise": additive_noise,
    "blur": blur,
    "multiplicative_noise": multiplicative_noise,
    "ghosting": ghosting,
    "gibbs": gibbs,
    "low_resolution": low_resolution,
    "bias_field": bias_field,
    "gamma": gamma,
    "nn_noise": nn_noise,
    "nn_blur": nn_blur,
    "nn_brightness": nn_brightness,
    "nn_contrast": nn_contrast,
    "nn_lowres": nn_lowres,
    "nn_gamma_invert": nn_gamma_invert,
    "nn_gamma": nn_gamma,
    "bsf_scale": bsf_scale,
    "bsf_shift": bsf_shift,
}


def intensity(x, params, key, clip=True):
    """The intensity rows that fired (params: row -> parameters), in the recipe's
    order; with clip each result is clipped to its input's range (per channel, as
    Yucca's transforms do; gamma: the sample's range)."""
    for row in INTENSITY_ALL:
        if row in params:
            lo = x.amin(dim=(1, 2, 3), keepdim=True) if row != "gamma" else x.min()
            hi = x.amax(dim=(1, 2, 3), keepdim=True) if row != "gamma" else x.max()
            x = INTENSITY[row](x, params[row], key)
            if clip:
                x = torch.minimum(torch.maximum(x, lo), hi)
    return x


# -----------------------------------------------------------------------------
# Drivers: a batch on the training device, or TorchIO transforms per sample


def augment_sample(region, params, patch, order=3, label=None, target_copy=True, coef=None):
    """One sample, any device: region (C, R, R, R) -> (input, target) for pretraining
    (target = after the spatial rows, before the intensity rows) or (image, label)."""
    x, lab = region.float(), label
    # a region larger than the patch is always resampled (pretraining reads the centre
    # at half-voxel positions); a patch-sized one only when a spatial row fired, since
    # identity coordinates are its own voxels and cubic B-splines return them exactly
    if tuple(x.shape[1:]) != tuple(patch) or params["spatial"]:
        x, lab = spatial(
            x, dict(params["spatial"], _key=params["key"]), patch, order, label=label, clip=params["clip"], coef=coef
        )
    target = x.clone() if target_copy else None
    x = intensity(x, params["intensity"], params["key"], params["clip"])
    return (x, target) if label is None else (x, lab)


def augment_batch(ds, regions, ks, labels=None):
    """The batched path: a DataLoader batch of crop-padded regions (B, C, R, R, R) on
    the training device and their sample numbers -> (input, target) (pretraining,
    both (B, C, P, P, P)) or (image, label) (segmentation, label (B, P, P, P) int64).
    Runs without gradients; parameters from ds.params(k), as every other path."""
    with torch.no_grad():
        regions = regions.float()
        params = [ds.params(int(k)) for k in ks]
        # B-spline coefficients of the rotated or deformed samples at once (one recursion
        # per axis); axis-aligned ones are resampled by matrix products without them
        warped = [i for i, p in enumerate(params) if warps(p["spatial"])]
        coef = dict(zip(warped, prefilter3(regions[warped]))) if ds.order == 3 and warped else {}
        outs = [
            augment_sample(
                regions[i],
                params[i],
                ds.patch,
                ds.order,
                None if labels is None else labels[i].long(),
                labels is None,
                coef.get(i),
            )
            for i in range(len(params))
        ]
    a = torch.stack([o[0] for o in outs])
    b = torch.stack([o[1] for o in outs])
    return a, (b.long() if labels is not None else b)


def _base_args(t):  # include / exclude / copy ... of a TorchIO transform, for the one it hands over to
    return t._get_base_args() if hasattr(t, "_get_base_args") else {}


class AmaesRow(IntensityTransform):
    """One intensity row of the recipe with given parameters (as draw_params gives
    them: per channel, None = untouched) and noise key, as a TorchIO transform; it is
    recorded in the subject's history with them. RandomAmaesRow draws them."""

    def __init__(self, row, params, key, clip=True, **kwargs):
        super().__init__(**kwargs)
        if row not in INTENSITY:
            raise ValueError(f"unknown row {row!r}; choose from {', '.join(INTENSITY_ALL)}")
        self.row, self.params, self.key, self.clip = row, params, key, clip
        self.args_names = ["row", "params", "key", "clip"]

    def apply_transform(self, subject):
        for image in self.get_images(subject):
            image.set_data(intensity(image.data.float(), {self.row: self.params}, self.key, self.clip))
        return subject


class RandomAmaesRow(RandomTransform, IntensityTransform):
    """One intensity row with the authors' probabilities and ranges, for any TorchIO
    pipeline: draws its parameters (TorchIO's way: from torch's global RNG) and
    applies AmaesRow with them; a row that does not fire leaves the subject as it is."""

    def __init__(self, row, clip=True, recipe=RECIPE, **kwargs):
        super().__init__(**kwargs)
        self.row, self.clip, self.recipe = row, clip, recipe

    def apply_transform(self, subject):
        image = next(iter(self.get_images_dict(subject).values()))
        drawn = draw_params(
            int(torch.randint(2**31, ())), 0, "all", image.num_channels, image.spatial_shape, self.recipe
        )
        if self.row not in drawn["intensity"]:
            return subject
        return AmaesRow(self.row, drawn["intensity"][self.row], drawn["key"], self.clip, **_base_args(self))(subject)


class AmaesSpatial(SpatialTransform):
    """The spatial rows (elastic, rotation, scaling) with given parameters, resampled
    as the authors do: output `patch` centred on the image's centre, cubic B-spline
    (order 3), outside the image's minimum; label maps nearest, outside 0."""

    def __init__(self, patch, params, key, order=3, clip=False, **kwargs):
        super().__init__(**kwargs)
        self.patch, self.params, self.key, self.order, self.clip = list(patch), params, key, order, clip
        self.args_names = ["patch", "params", "key", "order", "clip"]

    def apply_transform(self, subject):
        sp = dict(self.params, _key=self.key)
        for image in self.get_images(subject):
            if image.type == tio.LABEL:
                image.set_data(spatial(image.data.float(), sp, self.patch, 0, cval=0)[0].to(image.data.dtype))
            else:
                image.set_data(spatial(image.data.float(), sp, self.patch, self.order, clip=self.clip)[0])
        return subject


class RandomAmaesSpatial(RandomTransform, SpatialTransform):
    """The spatial rows with the authors' probabilities (preset "all" includes the
    elastic row, "spatial" not), for any TorchIO pipeline."""

    def __init__(self, patch, preset="all", order=3, clip=False, recipe=RECIPE, **kwargs):
        super().__init__(**kwargs)
        self.patch, self.preset, self.order, self.clip, self.recipe = list(patch), preset, order, clip, recipe

    def apply_transform(self, subject):
        drawn = draw_params(int(torch.randint(2**31, ())), 0, self.preset, 1, self.patch, self.recipe)
        return AmaesSpatial(self.patch, drawn["spatial"], drawn["key"], self.order, self.clip, **_base_args(self))(
            subject
        )


def amaes_transforms(patch, preset="all", clip=True):
    """The recipe as one tio.Compose for any TorchIO pipeline: e.g.
    amaes_transforms((128,) * 3)(tio.Subject(t1=tio.ScalarImage("t1.nii.gz"))).
    (The reconstruction target of AMAES is the subject after the first transform.)"""
    rows = [RandomAmaesSpatial(patch, preset, clip=clip)] if preset != "none" else []
    return tio.Compose(rows + ([RandomAmaesRow(r, clip) for r in INTENSITY_ROWS] if preset == "all" else []))


# -----------------------------------------------------------------------------
# Datasets: the workers read and crop-pad; the rows run on the device (augment_batch)
# or, with aug_on="workers", here per sample through the TorchIO driver.


def croppad(vol, start, size, value):
    """vol[:, start:start + size] per axis, padded with `value` to `size` (Yucca's
    croppad: an axis shorter than size is taken whole, padded d // 2 before)."""
    return crop_box(vol, [s if n >= p else -((p - n) // 2) for n, s, p in zip(vol.shape[1:], start, size)], size, value)


def crop_box(vol, start, size, value):
    """vol[:, start:start + size] per axis for any start (negative, or past the end),
    the part outside the volume filled with `value` (nnU-Net's crop_and_pad_nd)."""
    out = np.full((vol.shape[0], *size), value, dtype=np.float32)
    src, dst = [slice(None)], [slice(None)]
    for n, s, p in zip(vol.shape[1:], start, size):
        a, b = max(s, 0), min(s + p, n)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - s, a - s + max(0, b - a)))
    out[tuple(dst)] = vol[tuple(src)]
    return out


class CaseReadError(ValueError):
    """A preprocessed file that cannot be read (cut short, overwritten, gone)."""


def load_case(path):
    """A preprocessed array, memory-mapped; CaseReadError naming the file if that fails."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        root = Path(path).parents[1]
        if isinstance(e, FileNotFoundError) and not (root / "dataset.json").exists():  # the whole folder went
            raise CaseReadError(
                f"--data {root} disappeared during the run ({type(e).__name__}); put it back and continue with --resume"
            ) from None
        raise CaseReadError(
            f"{path} cannot be read ({e}); rerun preprocess.py on its raw data (it redoes broken cases)"
        ) from None


class _Base(torch.utils.data.Dataset):
    def __init__(
        self,
        root,
        cases=None,
        patch=128,
        preset="all",
        seed=0,
        split="train",
        aug_on="device",
        order=3,
        recipe=RECIPE,
        clip=True,
        crops=1,
    ):
        if preset not in PRESETS:
            raise ValueError(f"--aug {preset!r}: choose from {', '.join(PRESETS)}")
        self.root = Path(root)
        self.cases = sorted(cases) if cases is not None else case_names(root, split)
        if not self.cases:
            raise ValueError(f"{root}: no cases in split {split!r}")
        for c in self.cases:
            if not (self.root / "images" / f"{c}.npy").exists():
                raise FileNotFoundError(f"{self.root / 'images' / (c + '.npy')} is missing; rerun preprocess.py")
        self.patch = (patch,) * 3 if isinstance(patch, int) else tuple(patch)
        self.preset, self.seed, self.aug_on, self.order, self.recipe, self.clip = (
            preset,
            seed,
            aug_on,
            order,
            recipe,
            clip,
        )
        self.crops = crops  # samples k with the same k // crops are cut from one volume (Tang's sw_batch_size)
        self.channels = int(np.load(self.root / "images" / f"{self.cases[0]}.npy", mmap_mode="r").shape[0])

    def __len__(self):
        return len(self.cases)

    def pick(self, k):
        """Case of sample k and its rng: each pass over the data is a seeded permutation;
        with crops > 1, that many consecutive samples share a volume (their crops differ)."""
        n, v = len(self.cases), k // self.crops
        perm = np.random.default_rng([self.seed, v // n, 1]).permutation(n)
        return self.cases[perm[v % n]], np.random.default_rng([self.seed, k])

    def region_size(self):
        """The crop the workers cut: the patch, or for the nnssl / nnU-Net presets their
        rotated-and-scaled pre-crop (initial_patch_size)."""
        return initial_patch_size(self.patch) if self.preset in ("wald", "nnunet") else self.patch

    def params(self, k):
        """The augmentation parameters of sample k (a pure function of (seed, k))."""
        return draw_params(self.seed, k, self.preset, self.channels, self.patch, self.recipe, self.clip)

    def image(self, case):
        return load_case(self.root / "images" / f"{case}.npy")

    def augment_tio(self, region, params, label=None):
        """The per-sample driver: the sample's rows as TorchIO transforms (AmaesSpatial,
        then AmaesRow for each intensity row that fires), recorded in the subject's
        history. Returns (input, target) or (image, label)."""
        subject = tio.Subject(
            image=tio.ScalarImage(tensor=region.float()),
            **({"label": tio.LabelMap(tensor=label[None])} if label is not None else {}),
        )
        if tuple(region.shape[1:]) != tuple(self.patch) or params["spatial"]:  # as augment_sample decides
            subject = AmaesSpatial(self.patch, params["spatial"], params["key"], self.order, params["clip"])(subject)
        target = subject["image"].data.clone()
        rows = [
            AmaesRow(r, params["intensity"][r], params["key"], params["clip"])
            for r in INTENSITY_ALL
            if r in params["intensity"]
        ]
        if rows:
            subject = tio.Compose(rows)(subject)
        self.last_history = subject.history
        return subject["image"].data, (target if label is None else subject["label"].data[0].long())


class PretrainDataset(_Base):
    """Pretraining samples. Item k = (region float16 (C, R, R, R), k) with R = 181 for
    presets with spatial rows (get_max_rotated_size(128)), the patch otherwise; run
    augment_batch on the device. With aug_on="workers" item k = (input, target) float16
    (C, P, P, P), augmented here. sample(k) -> (input, target, info) for inspection."""

    def region_size(self):
        if self.preset in ("none", "wald"):
            return super().region_size()
        p = self.patch  # the largest side a 2-D rotation of the patch reaches (Yucca get_max_rotated_size)
        return tuple(max(int(math.sqrt(p[i] ** 2 + p[j] ** 2)) for j in range(3) if j != i) for i in range(3))

    def region(self, k):
        case, rng = self.pick(k)
        vol = self.image(case)
        size = self.region_size()
        start = [int(rng.integers(n - s + 1)) if n >= s else 0 for n, s in zip(vol.shape[1:], size)]
        return case, croppad(vol, start, size, float(vol.min()))

    def sample(self, k):
        """Sample k through the TorchIO driver: (input, target, info)."""
        case, region = self.region(k)
        p = self.params(k)
        inp, target = self.augment_tio(torch.from_numpy(region), p)
        return inp, target, {"case": case, "spatial": p["spatial"], "intensity": p["intensity"]}

    def __getitem__(self, k):
        k = int(k)
        if self.aug_on == "workers":
            inp, target, _ = self.sample(k)
            return inp.half(), target.half()
        return torch.from_numpy(self.region(k)[1]).half(), k


class SegDataset(_Base):
    """Finetuning samples: the authors' CropPad(128) with foreground oversampling,
    then the spatial rows on the patch (labels nearest), intensity rows with preset
    "all" (clip False: the from-scratch recipe). Item k = (image float16 (C, P, P, P),
    label uint8 (P, P, P), k) for augment_batch, or with aug_on="workers" the
    augmented (image float16, label int64). centre_fg (ours): a forced patch is
    centred on the voxel instead of placing it anywhere in the patch. sample(k) ->
    (image, label, info) with info["fg_voxel"] the forced voxel (volume coordinates)."""

    def __init__(
        self,
        root,
        cases=None,
        patch=128,
        preset="spatial",
        seed=0,
        fg_p=0.33,
        split="train",
        aug_on="device",
        order=3,
        centre_fg=False,
        clip=False,
        sampler="yucca",
        batch=1,
    ):
        super().__init__(root, cases, patch, preset, seed, split, aug_on, order, clip=clip)
        if sampler not in ("yucca", "nnunet", "bsf"):
            raise ValueError(f"sampler {sampler!r}: yucca, nnunet or bsf")
        self.fg_p, self.centre_fg, self.sampler, self.batch = fg_p, centre_fg, sampler, batch
        self._fg = {}  # case -> (N, 3) foreground locations, per worker
        self._cls = {}  # case -> {label value: (N, 3) voxels}, nnU-Net's class_locations, per worker
        self._box = {}  # case -> (lo, hi) of the voxels > 0 in any channel, MONAI's CropForeground box, per worker

    def label(self, case):
        return load_case(self.root / "labels" / f"{case}.npy")

    def foreground(self, case, lab):
        """Yucca's foreground locations: every 10th voxel of np.nonzero(label), all
        classes pooled, at most about 100,000."""
        if case not in self._fg:
            locs = np.argwhere(np.asarray(lab) > 0)[::10]
            if len(locs) > 100_000:
                locs = locs[:: round(len(locs) / 100_000)]
            self._fg[case] = locs
        return self._fg[case]

    def forced(self, k):
        """nnU-Net's sampler (nnunetv2/training/dataloading/data_loader.py l.69-73, with the DDP
        split of nnUNetTrainer.py l.363-406): slot j of a step's batch of B samples (all
        processes together; sample k sits in slot k % B) must hold foreground iff
        j >= round(B * (1 - fg_p)): the last third of each batch, not a coin per sample."""
        return k % self.batch >= round(self.batch * (1 - self.fg_p))

    def class_locations(self, case, lab):
        if case not in self._cls:
            lab = np.asarray(lab)
            self._cls[case] = {int(v): np.argwhere(lab == v) for v in np.unique(lab) if v > 0}
        return self._cls[case]

    def crop_nnunet(self, k):
        """nnU-Net's get_bbox (data_loader.py l.91-165) for the pre-crop R = initial_patch_size:
        need_to_pad = R - patch (more where the volume is smaller), lower bounds -need // 2,
        upper n + need // 2 + need % 2 - R; a random box, or for a forced slot a class drawn
        uniformly among the classes present, a voxel of it uniformly, and the box centred
        on it (clipped below only, as there); outside the volume image 0 and label 0 (-1
        then 0, RemoveLabelTansform)."""
        case, rng = self.pick(k)
        vol, lab = self.image(case), self.label(case)
        shape, r, p = vol.shape[1:], self.region_size(), self.patch
        need = [max(ri - pi, ri - n) for ri, pi, n in zip(r, p, shape)]
        lbs = [-d // 2 for d in need]
        ubs = [n + d // 2 + d % 2 - ri for n, d, ri in zip(shape, need, r)]
        locs = self.class_locations(case, lab) if self.forced(k) else {}
        loc = None
        if locs:
            cls = sorted(locs)[int(rng.integers(len(locs)))]
            loc = locs[cls][int(rng.integers(len(locs[cls])))]
            start = [max(lb, int(v) - ri // 2) for lb, v, ri in zip(lbs, loc, r)]
        else:
            start = [int(rng.integers(lb, ub + 1)) for lb, ub in zip(lbs, ubs)]
        img = crop_box(vol, start, r, 0.0)
        seg = crop_box(lab[None], start, r, 0)[0].astype(np.uint8)
        return case, img, seg, ([int(v) for v in loc] if loc is not None else None), start

    def crop_bsf(self, k):
        """BrainSegFounder's (data_utils.py l.122-127): MONAI CropForegroundd(source_key="image",
        k_divisible=roi) -- the box of the voxels > 0 in any channel, grown to the next multiple of the
        patch around its centre (floor((N - n) / 2) before), outside the volume 0 -- then
        RandSpatialCropd(roi, random_size=False): a start uniform in [0, N - patch] of that box."""
        case, rng = self.pick(k)
        vol, lab = self.image(case), self.label(case)
        if case not in self._box:
            nz = np.argwhere(np.any(np.asarray(vol) > 0, axis=0))  # (N, 3)
            self._box[case] = (nz.min(0), nz.max(0) + 1) if len(nz) else (np.zeros(3, int), np.array(vol.shape[1:]))
        lo, hi = self._box[case]
        start = []
        for a, b, s in zip(lo, hi, self.patch):
            n = int(b - a)
            big = -(-n // s) * s  # compute_divisible_spatial_size
            start.append(int(a) - (big - n) // 2 + int(rng.integers(big - s + 1)))
        img = crop_box(vol, start, self.patch, 0.0)
        seg = crop_box(lab[None], start, self.patch, 0)[0].astype(np.uint8)
        return case, img, seg, None, start

    def crop(self, k):
        if self.sampler == "nnunet":
            return self.crop_nnunet(k)
        if self.sampler == "bsf":
            return self.crop_bsf(k)
        case, rng = self.pick(k)
        vol, lab = self.image(case), self.label(case)
        shape, p = vol.shape[1:], self.patch
        locs = self.foreground(case, lab) if self.fg_p > 0 else []
        forced = len(locs) > 0 and rng.random() < self.fg_p
        if forced:
            loc = locs[int(rng.integers(len(locs)))]
            if self.centre_fg:
                start = [min(max(int(v) - s // 2, 0), max(n - s, 0)) for v, s, n in zip(loc, p, shape)]
            else:  # the voxel lands anywhere in the patch
                start = [
                    int(rng.integers(max(0, v - s), min(v, n - s) + 1)) if n >= s else 0
                    for v, s, n in zip(loc, p, shape)
                ]
        else:
            start = [int(rng.integers(n - s + 1)) if n >= s else 0 for n, s in zip(shape, p)]
        img = croppad(vol, start, p, float(vol.min()))
        seg = croppad(lab[None], start, p, 0)[0].astype(np.uint8)
        return case, img, seg, ([int(v) for v in loc] if forced else None), start

    def sample(self, k):
        """Sample k through the TorchIO driver: (image, label, info)."""
        case, img, seg, fg, _ = self.crop(k)
        p = self.params(k)
        x, lab = self.augment_tio(torch.from_numpy(img), p, torch.from_numpy(seg).long())
        return x, lab, {"case": case, "fg_voxel": fg, "spatial": p["spatial"], "intensity": p["intensity"]}

    def __getitem__(self, k):
        k = int(k)
        if self.aug_on == "workers":
            x, lab, _ = self.sample(k)
            return x.half(), lab
        _, img, seg, _, _ = self.crop(k)
        return torch.from_numpy(img).half(), torch.from_numpy(seg), k


# -----------------------------------------------------------------------------
# Masking (AMAES) and the SwinUNETR-SSL views, on the training device


@torch.no_grad()
def random_mask(x, ratio=0.6, token=4, generator=None):
    """Mask a batch x (B, C, *S): in each sample independently, exactly
    int(n_tokens * (1 - ratio)) of the token^3 blocks are kept and the rest set to 0.
    ratio may be a tensor (B,) of per-sample ratios. Returns (masked x, mask
    (B, 1, *S) bool, True = masked). S must divide by token."""
    b, _, *s = x.shape
    if any(n % token for n in s):
        raise ValueError(
            f"patch {s} is not divisible by the mask token size {token}; "
            f"use a patch that is a multiple of {token} (--patch / --mask-token)"
        )
    grid = [n // token for n in s]
    n = math.prod(grid)
    ratio = torch.as_tensor(ratio, dtype=torch.float64).expand(b)
    keep = (n * (1 - ratio)).floor().long().to(x.device)  # (B,)
    order = torch.rand(b, n, device=x.device, generator=generator).argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
    tok = rank >= keep[:, None]  # the first `keep` of a random order are kept
    mask = tok.view(b, 1, grid[0], 1, grid[1], 1, grid[2], 1).expand(
        b, 1, grid[0], token, grid[1], token, grid[2], token
    )
    mask = mask.reshape(b, 1, *s)
    return x.masked_fill(mask, 0), mask


@torch.no_grad()
def cutout(x, donor=None, generator=None, max_drop=0.3, max_side=0.25, min_side=0.05):
    """Tang et al.'s drop (research-contributions SwinUNETR/Pretrain utils/ops.py
    patch_rand_drop l.17-43): fill boxes until U(0, max_drop) of the volume is covered,
    with N(0, 1) noise rescaled to [0, 1], or with the same box of `donor` (another
    sample of the batch) when given. As numpy's randint there, the upper bounds are
    exclusive: start in [0, n - lo), side in [lo, hi) with lo = int(0.05 n), hi =
    int(0.25 n) (lo at least 1 and hi above lo, for patches under 20 voxels), the box
    cut at the volume's end. x: (C, *S), in place."""
    s = x.shape[1:]
    total = math.prod(s)
    target = torch.rand((), generator=generator, device="cpu").item() * max_drop * total
    lo = [max(1, int(min_side * n)) for n in s]
    hi = [max(a + 1, int(max_side * n)) for a, n in zip(lo, s)]
    done = 0
    while done < target:
        start = [int(torch.randint(0, n - a, (), generator=generator)) for n, a in zip(s, lo)]
        size = [int(torch.randint(a, h, (), generator=generator)) for a, h in zip(lo, hi)]
        box = (slice(None),) + tuple(slice(a, min(a + z, n)) for a, z, n in zip(start, size, s))
        if donor is None:
            noise = torch.randn(x[box].shape, generator=generator).to(x.device)
            x[box] = (noise - noise.min()) / (noise.max() - noise.min()).clamp(min=1e-8)
        else:
            x[box] = donor[box]
        done += x[box][0].numel()
    return x


@torch.no_grad()
def swin_ssl_views(x, generator=None):
    """Two views per sample for SwinUNETR-SSL. Each view: rotate by k*90 degrees in the
    plane of the last two axes (k uniform in 0..3 is the rotation label), keep that as
    the reconstruction target, then cutout with noise and, when another sample of the
    batch is drawn, cutout pasted from it. x: (B, C, *S) with equal last two sides.
    Returns (views (2B, C, *S), targets (2B, C, *S), rotation labels (2B,))."""
    b = x.shape[0]
    views, targets, labels = [], [], []
    for _ in range(2):
        k = torch.randint(0, 4, (b,), generator=generator)
        rot = torch.stack([torch.rot90(x[i], int(k[i]), dims=(2, 3)) for i in range(b)])
        aug = rot.clone()
        for i in range(b):
            cutout(aug[i], generator=generator)
            j = int(torch.randint(0, b, (), generator=generator))
            if j != i:
                cutout(aug[i], donor=aug[j], generator=generator)
        views.append(aug), targets.append(rot), labels.append(k)
    return torch.cat(views), torch.cat(targets), torch.cat(labels).to(x.device)


# -----------------------------------------------------------------------------
# Seeing the recipe: python data.py --show DATA [--out FILE.png] [--preset all]


def preset_rows(preset):
    """The rows a preset can fire, in the recipe's order."""
    base = PRESET_RECIPES.get(preset, RECIPE)
    if preset == "none":
        return []
    spatial = [r for r in SPATIAL_ROWS if base[r] > 0 and (r != "elastic" or preset == "all")]
    return spatial + {"all": list(INTENSITY_ROWS), "nnunet": list(NNUNET_ROWS), "bsf": list(BSF_ROWS)}.get(preset, [])


def forced(preset, row, patch):
    """The preset's recipe with `row` firing for sure and every other row off (every
    axis and channel a row may skip taken too; Gibbs keeps 3/4 of the frequencies, the
    96 of 128 at the recipe's end, so that it shows on any patch)."""
    base = PRESET_RECIPES.get(preset, RECIPE)
    r = dict(base, **{k: 0.0 for k in SPATIAL_ROWS + INTENSITY_ALL})
    r.update(
        {
            row: 1.0,
            "rotation_axis": 1.0,
            "blur_channel": 1.0,
            "lowres_channel": 1.0,
            "lowres_axis": 1.0,
            "gibbs_keep": (round(0.75 * min(patch)),) * 2,
            "nn_blur_channel": 1.0,
            "nn_lowres_channel": 1.0,
        }
    )
    return r


def show(root, preset="all", case=None, patch=128, seed=0, mask_ratio=0.6, mask_token=4, clip=True):
    """One preprocessed case, centre-cropped (or padded) to `patch`, through each row of
    the preset alone, then masked as AMAES masks it. Returns (image (H, W, 3) uint8,
    panel origins, row names, [(name, params)]). Each row: three slices of channel 0
    and |row - original| on the axial slice, scaled to its own maximum (the noise rows
    change the image by 1e-4..1e-3, far below one grey level)."""
    case = case or sorted(case_names(root, "train") or case_names(root))[0]
    vol = np.load(Path(root) / "images" / f"{case}.npy").astype(np.float32)  # (C, X, Y, Z)
    p = (patch,) * 3
    orig = torch.from_numpy(croppad(vol, [(n - s) // 2 for n, s in zip(vol.shape[1:], p)], p, float(vol.min())))
    out = [("original " + case, orig, {})]
    for row in preset_rows(preset):
        for k in range(50):  # the first sample whose draw changes the image (a rotation of 0 deg, no mirrored axis...)
            params = draw_params(
                seed, k, "nnunet" if preset == "nnunet" else "all", orig.shape[0], p, forced(preset, row, p), clip
            )
            x, _ = augment_sample(orig.clone(), params, p, 3, target_copy=False)
            if not torch.equal(x, orig):
                break
        out.append((row, x, {k: v for k, v in {**params["spatial"], **params["intensity"]}.items() if k != "_crop"}))
    g = torch.Generator().manual_seed(seed)
    masked, _ = random_mask(orig[None], mask_ratio, mask_token, generator=g)
    out.append((f"mask {mask_ratio:g} of {mask_token}^3", masked[0], {"ratio": mask_ratio, "token": mask_token}))
    lo, hi = pictures.window(orig[0].numpy())
    z = pictures.auto_zoom(p)
    rows = []
    for _, x, _ in out:
        x0 = x[0].numpy()
        diff = np.abs(x0 - orig[0].numpy())
        panels = [pictures.zoom(pictures.grey(s, lo, hi), z) for s in pictures.ortho(x0)]
        changed = pictures.grey(pictures.ortho(diff)[2], 0.0, max(float(diff.max()), 1e-12))  # axial |x - original|
        rows.append(panels + [pictures.zoom(changed, z)])
    img, origins = pictures.grid(rows, [n for n, _, _ in out], ["sagittal", "coronal", "axial", "changed (axial)"])
    return img, origins, [n for n, _, _ in out], [(n, prm) for n, _, prm in out]


def main(argv=None):
    from preprocess import ArgumentParser  # one-line flag errors, as every script's

    p = ArgumentParser(
        description="See the augmentation recipe: one case through each row of a preset, "
        "then the AMAES mask, as one PNG grid with the row names."
    )
    p.add_argument("--show", required=True, metavar="DATA", help="preprocessed dataset (preprocess.py output)")
    p.add_argument("--out", default="recipe.png", help="PNG to write (default recipe.png)")
    p.add_argument(
        "--preset",
        default="all",
        choices=PRESETS,
        help="all (pretraining, default), spatial (finetuning), "
        "wald (Wald et al.'s MAE), nnunet (nnU-Net's, finetune --recipe wald), bsf (BrainSegFounder's, "
        "finetune --recipe bsf) or none",
    )
    p.add_argument("--case", help="which case (default: the first train case)")
    p.add_argument("--patch", type=int, default=128, help="cubic patch side (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    p.add_argument(
        "--no-clip",
        action="store_true",
        help="intensity rows not clipped to their input's range, as in the from-scratch finetuning preset (all)",
    )
    a = p.parse_args(argv)
    try:
        img, _, _, params = show(a.show, a.preset, a.case, a.patch, a.seed, clip=not a.no_clip)
    except (FileNotFoundError, ValueError) as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 2
    pictures.save_png(a.out, img)
    for name, prm in params:
        print(f"{name}: {json.dumps(prm)}")
    print(f"{a.out}: {img.shape[1]} x {img.shape[0]} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
