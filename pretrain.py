"""
Self-supervised pretraining: AMAES (default), plain MAE, or SwinUNETR's SSL baseline.

    torchrun --nproc_per_node=G pretrain.py --arch unet_xl --data OUT --out RUN
    python pretrain.py --arch unet_b --data demo/preprocessed --out runs/demo --patch 32 --batch 2 --steps 60
    python pretrain.py --out RUN --resume                        # continue exactly where RUN stopped

Methods:
  amaes     augmentation preset "all", then random masking (ratio 0.6, 4^3 tokens, on
            the device); the network reconstructs the spatially augmented patch before
            intensity augmentation, so it undoes both the masking and the corruption.
  mae       the same without augmentation (the paper's ablation).
  swin_ssl  Tang et al.'s SSL for --arch swinunetr: two rotated, cut-out views per
            sample; loss = rotation CE + NT-Xent (temperature 0.5) + L1 reconstruction.
Recipes (--recipe; every number is still a flag of its own, and the resolved numbers
are printed and saved in args.json):
  amaes  (default) Munk et al. 2024 (arXiv 2408.00640; asbjrnmunk/amaes src/pretrain.py):
         patch 128, batch 8 PER PROCESS, AdamW lr 1e-4 wd 0.01, linear warm-up from
         lr * 1e-3 over 5 epochs then cosine to 0 (per step), 100 epochs of
         int(n_train / (batch * world)) steps, mask 0.6 of 4^3 tokens, MSE on all voxels,
         augmentation "all"; bf16 on GPUs that have it, else fp16 + GradScaler; fp32 on CPU.
  tang   Tang et al. 2022, "the exact configuration" AMAES compared with: Project-MONAI/
         research-contributions SwinUNETR/Pretrain main.py's defaults with --lrdecay
         (l.155-187: AdamW lr 4e-4, decay 0.1, warm-up from 0 over 500 steps then cosine
         to 0 per step, batch_size 2 volumes x sw_batch_size 2 crops = 4 per process,
         AMP fp16, no gradient clipping) at 128^3 for 100 epochs (AMAES's own change;
         Tang's crops were 96^3). swin_ssl on swinunetr; cutout as utils/ops.py.
         The README's published run (--lr 6e-6 --batch_size 1, 8 GPUs, 100k steps) is
         flags: --lr 6e-6 --batch 2 --steps 100000 --patch 96 on 8 processes.
  wald   Wald et al. 2024, dense MAE with ResEnc-L (MIC-DKFZ/nnssl BaseMAETrainer_BS8,
         BaseMAETrainer.py l.66-79 / l.569-579, AbstractTrainer.py l.157-165): SGD
         Nesterov momentum 0.99, lr 1e-2, wd 3e-5, poly (1 - epoch/epochs)^0.9 stepped
         per epoch, 1000 epochs x 250 steps (250k), batch 8 IN TOTAL over the processes
         (total_batch_size; 8 / world each), patch 160 cut from a 257^3 pre-crop
         (get_patch_size / 0.85), gradient clip 12, 16^3 mask blocks, 75 % masked (the
         U(0.6, 0.9) per batch is BaseVariableSparkMAETrainer's, the sparse SparK
         encoder: --mask-ratio-range 0.6 0.9), MSE on masked voxels, augmentation
         rotation +-30 (p 0.2) / scaling 0.7..1.4 drawn as batchgenerators (p 0.2) /
         mirroring, no intensity rows, fp16 AMP. (nnssl z-scores each volume; this
         kit's preprocessing is AMAES's.)
  bsf1   BrainSegFounder stage 1 (lab-smile/BrainSegFounder pretrain/README.md l.15,
         pretrain/main_T1T2.py): swin_ssl, AdamW lr 5e-4 constant (no --lrdecay), decay
         0.1, 100000 steps (the loop stops at num_steps; --epochs 300 never binds),
         2 volumes x 2 crops of 96^3 per process, AMP fp16; data: T1 + T2-FLAIR.
  bsf2   BrainSegFounder stage 2 (downstream/BraTS/ssl/launch.sh): lr 6e-6, warm-up 500
         then cosine, decay 0.1, 50000 steps, 2 volumes x 2 crops of 96^3 per process,
         fp32 (--noamp); data: the task's training images, --init stage 1's ckpt.pt.
Every recipe says whether --batch is per process or in total (--batch-scope, args.json,
the recipe line printed at the start).

RUN/ holds args.json, log.jsonl (one JSON line per --log-every steps, per validation
and per skipped step), ckpt.pt (everything needed to continue; written every
--ckpt-every steps and at each epoch end, atomically), encoder.pt (the encoder's
weights plus its arch, for finetune.py --pretrained), samples/ (one validation
example per validation as NIfTI: masked input, reconstruction, target; and as one
PNG, stepNNNNNNN.png: three slices through the patch centre of the augmented input,
masked input, reconstruction and target) and progress.png (the loss curves from
log.jsonl, redrawn at each validation). --no-pictures leaves the PNGs out.
Randomness: sample k of the run is a pure function of (seed, k) (data.py), and the
masks of step s on rank r come from a generator seeded with (seed, s, r), so --resume
gives the same next batch, the same masks and the same learning rate as an
uninterrupted run.
"""

import argparse
import gzip
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

import data
import pictures
from models import ARCHS, build_model, describe, patch_rule
from preprocess import ArgumentParser
from training import (
    Interval,
    StopRun,
    UserError,
    add_run_flags,
    all_sum,
    check_patch,
    check_resumed_cases,
    check_run_flags,
    gather,
    guarded_step,
    load_pretrained_file,
    make_loader,
    make_optimizer,
    open_run,
    precision,
    preflight,
    process_batch,
    restore,
    resume_or_start,
    run_main,
    save_all,
    set_lr,
    setup,
    steps,
    stop_if_signalled,
    stopped,
    user_input,
    wrap,
    write_file,
)

METHODS = ("amaes", "mae", "swin_ssl")
INTERP = {"cubic": 3, "linear": 1}
# The papers' recipes: the value of every flag a recipe sets, one plain dict each. batch_scope says
# whether --batch is per process (AMAES, Tang, BrainSegFounder: every process loads its own batch)
# or the total over all processes (nnssl: total_batch_size split over the GPUs).
# one recipe per block, its numbers side by side (ruff format would put each on a line of its own)
# fmt: off
RECIPES = {
    "amaes": dict(method="amaes", optimizer="adamw", lr=1e-4, wd=0.01, schedule="cosine", warmup_epochs=5.0,
                  warmup_steps=None, warmup_start=1e-3, epochs=100, steps_per_epoch=None, steps=None, patch=128,
                  batch=8, batch_scope="process", crops_per_volume=1, mask_ratio_range=[0.6, 0.6], mask_token=4,
                  loss_on="all", aug="all", grad_clip=0.0, dtype="auto"),
    # Tang et al.'s "exact configuration" as AMAES used it: research-contributions SwinUNETR/Pretrain
    # main.py defaults with --lrdecay (lr 4e-4 l.176, decay 0.1 l.177, warmup 500 l.158, warmup_cosine
    # l.183/245, batch_size 2 x sw_batch_size 2 crops l.174-175, AMP unless --noamp l.187), at 128^3
    # for 100 epochs (AMAES's change). The README's published run is flags (README.md).
    "tang": dict(method="swin_ssl", optimizer="adamw", lr=4e-4, wd=0.1, schedule="cosine", warmup_epochs=None,
                 warmup_steps=500, warmup_start=0.0, epochs=100, steps_per_epoch=None, steps=None, patch=128, batch=4,
                 batch_scope="process", crops_per_volume=2, mask_ratio_range=[0.6, 0.6], mask_token=4, loss_on="all",
                 aug="none", grad_clip=0.0, dtype="fp16"),
    # nnssl BaseMAETrainer_BS8 (BaseMAETrainer.py l.569-579: total_batch_size 8; mask_percentage 0.75
    # l.79; patch 160 l.78), AbstractTrainer.py l.157-163 (lr 1e-2, wd 3e-5, momentum 0.99, 250 x 1000)
    "wald": dict(method="mae", optimizer="sgd", lr=1e-2, wd=3e-5, schedule="poly", warmup_epochs=None, warmup_steps=0,
                 warmup_start=1e-3, epochs=1000, steps_per_epoch=250, steps=None, patch=160, batch=8,
                 batch_scope="total", crops_per_volume=1, mask_ratio_range=[0.75, 0.75], mask_token=16,
                 loss_on="masked", aug="wald", grad_clip=12.0, dtype="fp16"),
    # BrainSegFounder stage 1 (lab-smile/BrainSegFounder pretrain/README.md l.15: main_T1T2.py --epochs 300
    # --lr 5e-4, no --lrdecay: a constant lr; main_T1T2.py: the loop runs while global_step < num_steps
    # l.483, num_steps 100000 l.266, batch_size 2 x sw_batch_size 2 l.285-286, roi 96 l.282, AMP)
    "bsf1": dict(method="swin_ssl", optimizer="adamw", lr=5e-4, wd=0.1, schedule="constant", warmup_epochs=None,
                 warmup_steps=0, warmup_start=0.0, epochs=300, steps_per_epoch=None, steps=100_000, patch=96, batch=4,
                 batch_scope="process", crops_per_volume=2, mask_ratio_range=[0.6, 0.6], mask_token=4, loss_on="all",
                 aug="none", grad_clip=0.0, dtype="fp16"),
    # BrainSegFounder stage 2 (downstream/BraTS/ssl/launch.sh: lr 6e-6, BATCH_SIZE 2, NUM_STEPS 50000,
    # TOTAL_EPOCHS 100, roi 96, --lrdecay --decay 0.1, --noamp; main_T1T2.py there: warmup 500 l.268,
    # warmup_cosine l.294, sw_batch_size 2 l.286)
    "bsf2": dict(method="swin_ssl", optimizer="adamw", lr=6e-6, wd=0.1, schedule="cosine", warmup_epochs=None,
                 warmup_steps=500, warmup_start=0.0, epochs=100, steps_per_epoch=None, steps=50_000, patch=96,
                 batch=4, batch_scope="process", crops_per_volume=2, mask_ratio_range=[0.6, 0.6], mask_token=4,
                 loss_on="all", aug="none", grad_clip=0.0, dtype="fp32"),
}
# fmt: on
ARCH_OF = {"amaes": "unet_b", "tang": "swinunetr", "wald": "resenc_l", "bsf1": "swinunetr", "bsf2": "swinunetr"}


def get_args(argv=None):
    """Parsed flags, checked; a.given holds the flags whose value is not the default."""
    p = ArgumentParser(
        prog="pretrain.py", description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--arch",
        choices=list(ARCHS),
        help="network (default: the recipe's: unet_b / swinunetr / resenc_l; with --init a released file's)",
    )
    p.add_argument(
        "--recipe",
        default="amaes",
        choices=list(RECIPES),
        help="a paper's whole recipe (default amaes; tang: the "
        "SwinUNETR-SSL baseline; wald: the dense MAE of Wald et al.; bsf1 / bsf2: BrainSegFounder's stage 1 / 2); "
        "any flag below overrides one number of it",
    )
    p.add_argument(
        "--method", choices=METHODS, help="amaes, mae, or swin_ssl (swinunetr only) (recipe: amaes / swin_ssl / mae)"
    )
    p.add_argument(
        "--data",
        default="demo/preprocessed",
        help="preprocessed dataset (preprocess.py output; default demo/preprocessed)",
    )
    p.add_argument("--out", default="runs/pretrain", help="run folder (default runs/pretrain)")
    p.add_argument(
        "--init",
        metavar="CKPT",
        help="start from pretrained weights: another run's ckpt.pt or encoder.pt, or a "
        "released file (as finetune.py --pretrained); tensors that match by name and shape load, the rest are "
        "listed and keep their fresh initialisation; without --arch the file's arch is used",
    )
    p.add_argument("--patch", type=int, help="cubic patch side (recipe: 128 / 128 / 160)")
    p.add_argument(
        "--batch",
        type=int,
        help="samples (crops) per step, per process or in total as --batch-scope says "
        "(recipe: 8 per process / 4 per process / 8 in total / 4 per process / 4 per process)",
    )
    p.add_argument(
        "--batch-scope",
        choices=("process", "total"),
        help="--batch is per process, or the total over all "
        "processes split evenly (recipe: process / process / total (nnssl's total_batch_size) / process / process)",
    )
    p.add_argument(
        "--crops-per-volume",
        type=int,
        help="consecutive samples cut from the same volume (recipe: 1 / 2 / 1 / 2 / 2: "
        "Tang's and BrainSegFounder's sw_batch_size crops of each of batch_size volumes)",
    )
    p.add_argument(
        "--epochs", type=int, help="epochs (recipe: 100 / 100 / 1000 / 300 / 100; bsf1 / bsf2 stop at --steps)"
    )
    p.add_argument(
        "--steps-per-epoch", type=int, help="steps per epoch (recipe: int(n_train / (batch * world)), wald 250)"
    )
    p.add_argument(
        "--steps",
        type=int,
        help="total steps instead of epochs x steps per epoch; the schedule shrinks to fit "
        "(recipe: - / - / - / 100000 / 50000, BrainSegFounder's num_steps)",
    )
    p.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        help="AdamW, or SGD with Nesterov momentum 0.99 (recipe: adamw / adamw / sgd)",
    )
    p.add_argument("--lr", type=float, help="peak learning rate (recipe: 1e-4 / 4e-4 / 1e-2 / 5e-4 / 6e-6)")
    p.add_argument("--wd", type=float, help="weight decay (recipe: 0.01 / 0.1 / 3e-5 / 0.1 / 0.1)")
    p.add_argument(
        "--schedule",
        choices=("cosine", "poly", "constant"),
        help="linear warm-up then cosine to 0 per step, poly "
        "(1 - epoch/epochs)^0.9 per epoch, or constant (Tang's code without --lrdecay) (recipe: cosine / cosine / "
        "poly / constant / cosine)",
    )
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up, in epochs (recipe: 5 for amaes)")
    p.add_argument(
        "--warmup-steps", type=int, help="linear warm-up, in steps (recipe: 500 for tang); wins over --warmup-epochs"
    )
    p.add_argument(
        "--warmup-start", type=float, help="warm-up starts at lr times this (recipe: 1e-3 for amaes, 0 for tang)"
    )
    p.add_argument(
        "--mask-ratio",
        type=float,
        help="share of tokens masked (recipe: 0.6 amaes, 0.75 wald); sets --mask-ratio-range R R",
    )
    p.add_argument(
        "--mask-ratio-range",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="mask ratio drawn U(LO, HI) per batch, the same on every rank (recipe: 0.6 0.6 / - / 0.75 0.75; "
        "0.6 0.9 is nnssl's BaseVariableSparkMAETrainer, the sparse SparK encoder: another trainer)",
    )
    p.add_argument("--mask-token", type=int, help="mask token side in voxels (recipe: 4 / - / 16)")
    p.add_argument(
        "--loss-on",
        choices=("all", "masked"),
        help="MSE over all voxels or masked voxels only (recipe: all / - / masked)",
    )
    p.add_argument(
        "--aug", choices=data.PRESETS, help="augmentation preset (recipe: all / none / wald / none / none; mae: none)"
    )
    p.add_argument(
        "--interp",
        default="cubic",
        choices=list(INTERP),
        help="spatial resampling: cubic B-spline (default, "
        "the authors') or linear (ours: faster, blurrier; leaves the paper's recipe)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        help="share of volumes held out for validation (default 0.01; at least 1)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the samples, masks, split and initialisation (default 0)"
    )
    p.add_argument(
        "--test-sets",
        nargs="+",
        default=[],
        metavar="DATA",
        help="labelled preprocessed datasets you will "
        "evaluate on: a warning names any pretraining volume that is one of their test cases (same raw file "
        "name and size); build such data with preprocess.py --format FMT --pretraining to leave them out",
    )
    add_run_flags(p)
    a = p.parse_args(argv)
    given = {k for k, v in vars(a).items() if v is not None and v != p.get_default(k)}
    if a.mask_ratio is not None:
        a.mask_ratio_range = [a.mask_ratio, a.mask_ratio]
    for k, v in RECIPES[a.recipe].items():  # the recipe fills every number not given
        if getattr(a, k) is None or (k == "dtype" and "dtype" not in given):
            setattr(a, k, v)
    if a.method == "mae" and "aug" not in given and a.recipe == "amaes":
        a.aug = "none"  # the plain-MAE ablation of AMAES: no augmentation
    a.arch = a.arch or ARCH_OF[a.recipe]
    if a.method == "swin_ssl" and a.arch != "swinunetr":
        p.error(
            f"--method swin_ssl is SwinUNETR's own SSL (rotation, contrastive and reconstruction heads on its "
            f"Swin bottleneck); use --arch swinunetr, or --method amaes / mae for {a.arch}"
        )
    divisor, minimum = patch_rule(a.arch)
    if a.patch % divisor or a.patch < minimum:
        p.error(f"--patch {a.patch}: {a.arch} needs a multiple of {divisor}, at least {minimum}")
    if a.method != "swin_ssl" and (a.mask_token < 1 or a.patch % a.mask_token):
        p.error(f"--patch {a.patch} is not divisible by --mask-token {a.mask_token}")
    if not 0 <= a.mask_ratio_range[0] <= a.mask_ratio_range[1] < 1:
        p.error("--mask-ratio / --mask-ratio-range must be in [0, 1), LO <= HI")
    if not 0 <= a.val_fraction < 0.5:
        p.error("--val-fraction must be in [0, 0.5)")
    check_run_flags(
        p,
        a,
        ("batch", "epochs", "steps_per_epoch", "steps", "log_every", "ckpt_every", "max_bad_steps", "crops_per_volume"),
    )
    if not a.lr >= 0 or not a.wd >= 0:  # NaN too; 0 is allowed (a frozen run, as the tests' exact-transfer check)
        p.error(f"--lr and --wd must be >= 0 (got --lr {a.lr:g}, --wd {a.wd:g})")
    a.given = sorted(given)  # what the user typed (resume compares these), not what the recipe filled in
    a.legacy_merge = False  # SwinUNETR's PatchMerging order: set from --init (Tang / BrainSegFounder weights)
    return a


# -----------------------------------------------------------------------------
# Pieces the loop uses


def lr_at(step, total, warmup, lr, start=1e-3, schedule="cosine", steps_per_epoch=1):
    """cosine: linear warm-up from lr * start to lr over `warmup` steps, then cosine to
    0 at `total` (per step; AMAES, and Tang et al.'s WarmupCosineSchedule with start 0).
    poly: lr * (1 - epoch / epochs) ** 0.9, stepped per epoch (nnU-Net / nnssl PolyLR).
    constant: lr (Tang's and BrainSegFounder's main.py without --lrdecay: no scheduler)."""
    if schedule == "constant":
        return lr
    if schedule == "poly":
        epochs = math.ceil(total / steps_per_epoch)
        return lr * (1 - (step // steps_per_epoch) / epochs) ** 0.9
    if step < warmup:
        return lr * (start + (1 - start) * step / warmup)
    t = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def generator(device, *key):
    """A torch generator seeded by a tuple of ints, so masks depend on (seed, step, rank) only."""
    return torch.Generator(device=device).manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def nt_xent(z, temperature=0.5):
    """Contrastive loss over 2B embeddings where rows i and i+B are the two views of a sample."""
    z = F.normalize(z.float(), dim=1)
    n = z.shape[0]
    sim = z @ z.t() / temperature  # (2B, 2B)
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    pos = (torch.arange(n, device=z.device) + n // 2) % n
    return F.cross_entropy(sim, pos)


def compute_loss(model, inp, target, a, key, autocast):
    """One batch's loss. inp, target: (B, C, P, P, P) on the device. Returns (loss,
    parts dict, (network input, output, target) for the sample writer)."""
    if a.method == "swin_ssl":
        views, targets, rot = data.swin_ssl_views(inp, generator("cpu", *key))
        with autocast:
            r, c, rec = model(views)  # (2B, 4), (2B, 512), (2B, C, P, P, P)
        parts = {"rot": F.cross_entropy(r.float(), rot), "contrast": nt_xent(c), "rec": F.l1_loss(rec.float(), targets)}
        return sum(parts.values()), parts, (views, rec, targets)
    lo, hi = a.mask_ratio_range  # per batch, from (seed, step) only: the same on every rank
    ratio = lo if lo == hi else float(np.random.default_rng([key[0], key[1], 7]).uniform(lo, hi))
    masked, mask = data.random_mask(inp, ratio, a.mask_token, generator(inp.device, *key))
    with autocast:
        out = model(masked)
    out = out[2] if isinstance(out, tuple) else out  # SwinUNETR's SSL model: its reconstruction head
    err = (out.float() - target) ** 2  # (B, C, P, P, P)
    if a.loss_on == "masked":
        loss = (err * mask).sum() / (mask.sum() * err.shape[1]).clamp(min=1)
    else:
        loss = err.mean()
    return loss, {}, (masked, out, target)


def save_nifti(path, x):
    """(C, X, Y, Z) array -> NIfTI (1 mm, RAS, as preprocessed), written atomically (a full disk: StopRun)."""
    x = np.asarray(x, dtype=np.float32)
    x = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
    write_file(path, lambda p: p.write_bytes(gzip.compress(nib.Nifti1Image(x, np.eye(4)).to_bytes(), compresslevel=1)))


def load_weights_by_name(model, pre, path):
    """--init: copy every tensor of a pretrained file (models.read_pretrained: the kit's
    ckpt.pt / encoder.pt or a released file) whose name and shape match; return the
    names left at their fresh initialisation."""
    own = model.state_dict()
    fits = {k: v for k, v in pre["model"].items() if k in own and own[k].shape == v.shape}
    if not fits:
        raise UserError(f"--init {path}: no tensor matches {model.arch} by name and shape")
    model.load_state_dict(fits, strict=False)
    return sorted(set(own) - set(fits))


# -----------------------------------------------------------------------------


def train(a):
    """The whole run for flags `a`; returns the (unwrapped) model."""
    ctx = setup(a.device)  # rank, world size, device; say() prints on rank 0 only
    out, say = Path(a.out), ctx.say
    ck = resume_or_start(a, out, ctx, script="pretrain.py")  # None for a new run
    for k, v in {"batch_scope": "process", "crops_per_volume": 1}.items():
        if ck is not None and k not in ck["args"]:
            setattr(a, k, v)  # a run saved before the flag existed continues as it ran
    bp = process_batch(a.batch, a.batch_scope, ctx.world)  # samples per process and step

    # -- data -----------------------------------------------------------------
    with user_input():
        ds_json = data.read_dataset(a.data)
        cases = sorted(c["case"] for c in ds_json["cases"] if c["split"] == "train") or sorted(
            c["case"] for c in ds_json["cases"]
        )
        n_val = max(1, round(a.val_fraction * len(cases))) if a.val_fraction > 0 and len(cases) > 1 else 0
        val_cases = (
            sorted(np.random.default_rng([a.seed, 99]).choice(cases, n_val, replace=False).tolist()) if n_val else []
        )
        train_cases = [c for c in cases if c not in val_cases]
        check_resumed_cases(ck, a.data, train_cases, val_cases)
        data.check_cases(a.data, train_cases + val_cases)  # a truncated file named now, not after some steps
        if not a.no_preflight and (ck is None or "data" in a.given):  # one read of every volume: at the start only
            data.check_finite(a.data, cases[ctx.rank :: ctx.world], share=lambda bad: gather(ctx, bad))  # a share each
        a.aug_on = a.aug_on if a.aug_on != "auto" else ("device" if ctx.cuda else "workers")
        train_ds = data.PretrainDataset(
            a.data,
            train_cases,
            a.patch,
            a.aug,
            a.seed,
            aug_on=a.aug_on,
            order=INTERP[a.interp],
            crops=a.crops_per_volume,
        )
        val_ds = data.PretrainDataset(a.data, val_cases, a.patch, "none", a.seed + 1) if val_cases else None
        for t, files in data.leaked_test_files(a.data, a.test_sets).items():
            say(
                f"pretrain.py: warning: {len(files)} raw files of --data {a.data} are test cases of {t} "
                f"(e.g. {files[0]}): rebuild the pretraining data with preprocess.py --format FMT --pretraining "
                "to leave them out"
            )
    spe = a.steps_per_epoch or max(1, len(train_cases) // (bp * ctx.world))
    total = a.steps or a.epochs * spe
    # warm-up in steps (tang) or in epochs (amaes); with --steps it shrinks with the run
    warmup = a.warmup_steps if a.warmup_steps is not None else round(total * (a.warmup_epochs or 0) / a.epochs)
    in_ch = int(ds_json.get("n_channels", 1))
    say(
        f"pretrain.py: run {out} ({'resumed at step ' + str(ck['step']) if ck else 'new'}), data {a.data} "
        f"({ds_json.get('name')}: {len(train_cases)} + {len(val_cases)} val volumes)"
        + (f", init {a.init}" if a.init else "")
    )

    # -- model, optimiser, precision ------------------------------------------
    torch.manual_seed(a.seed)
    pre = load_pretrained_file(a.init, "--init") if a.init and ck is None else None
    if pre is not None:  # a released file says which network it is (and how SwinUNETR merges patches)
        if "arch" in a.given and a.arch != pre["arch"]:
            raise UserError(f"--init {a.init} holds {pre['arch']} weights, but --arch is {a.arch}")
        a.arch, a.legacy_merge = pre["arch"], pre["legacy_merge"]
        check_patch(a.arch, a.patch)
    model = build_model(
        a.arch, in_channels=in_ch, mode="pretrain", checkpointing=a.checkpointing, legacy_merge=a.legacy_merge
    )
    if a.arch == "swinunetr" and a.method != "swin_ssl":
        # masked modelling uses only the reconstruction head; frozen heads keep DDP
        # from waiting for gradients that never come
        model.decoder.rotation_head.requires_grad_(False), model.decoder.contrastive_head.requires_grad_(False)
    if pre is not None:
        fresh = load_weights_by_name(model, pre, a.init)
        say(
            f"init: loaded {len(model.state_dict()) - len(fresh)} tensors from {a.init}; "
            f"re-initialised {len(fresh)}"
            + (f": {', '.join(fresh[:8])}" + (" ..." if len(fresh) > 8 else "") if fresh else "")
        )
    model.to(ctx.device)
    if a.dtype == "fp16" and not ctx.cuda and "dtype" not in a.given:
        a.dtype = "fp32"  # a recipe's fp16 AMP is for GPUs
    a.dtype, autocast, scaler = precision(ctx.device, a.dtype)
    opt = make_optimizer(model.parameters(), a.optimizer, a.lr, a.wd, ctx.device)
    step = restore(ck, model, opt, scaler)
    sample_bytes = (2 * in_ch * a.patch**3 if a.aug_on == "workers" else in_ch * math.prod(train_ds.region_size())) * 2
    preflight(model, a, ctx, out, sample_bytes, a.optimizer, other_files=64 * 2**20)  # samples/ NIfTIs: a few MB each
    net = wrap(model, a.compile, ctx)
    log = open_run(out, a, ck, step, ctx)
    if ctx.master:
        (out / "samples").mkdir(exist_ok=True)
    say(describe(model))
    say(
        f"recipe {a.recipe}: "
        + ", ".join(f"{k} {getattr(a, k)}" for k in RECIPES[a.recipe])
        + f" (batch {a.batch} {'in total over the processes' if a.batch_scope == 'total' else 'per process'})"
    )
    say(
        f"{a.method}: {len(train_cases)} train / {len(val_cases)} validation volumes, "
        f"{ctx.world} process(es) x batch {bp} "
        f"(--batch {a.batch} {'in total' if a.batch_scope == 'total' else 'per process'}), "
        f"patch {a.patch}^3, {total} steps ({spe} per epoch, warm-up {warmup}), {a.dtype} on {ctx.device.type}, "
        f"aug {a.aug}"
    )

    saved = ck["step"] if ck is not None else None  # the step of the last good checkpoint

    def checkpoint():
        """ckpt.pt (everything to resume) and encoder.pt (for finetune.py); finite weights only."""
        save_all(
            ctx,
            [
                (
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scaler": scaler.state_dict(),
                        "step": step,
                        "epoch": step // spe,
                        "total": total,
                        "world": ctx.world,
                        "rng": torch.get_rng_state(),
                        "args": vars(a),
                        "arch": a.arch,
                        "in_channels": in_ch,
                        "train_cases": train_cases,
                        "val_cases": val_cases,
                    },
                    out / "ckpt.pt",
                    True,
                ),
                (
                    {
                        "arch": a.arch,
                        "in_channels": in_ch,
                        "method": a.method,
                        "step": step,
                        "encoder": model.encoder.state_dict(),
                    },
                    out / "encoder.pt",
                    False,
                ),
            ],
        )

    @torch.no_grad()
    def validate():
        """Each validation volume once, rank r taking every W-th; losses all-reduced.
        The unwrapped model runs it, since ranks may see different numbers of volumes."""
        if val_ds is None:
            return None
        model.eval()
        tot = cnt = 0.0
        err = ""
        for k in range(ctx.rank, len(val_cases), ctx.world):
            inp, target, _ = val_ds.sample(k)
            inp, target = inp[None].to(ctx.device), target[None].to(ctx.device)
            loss, _, (x, y, t) = compute_loss(model, inp, target, a, (a.seed, 2**31 - 1, k), autocast)
            tot, cnt = tot + loss.item(), cnt + 1
            if k == 0:  # rank 0 writes the first example
                try:
                    for name, v in (("input", x), ("reconstruction", y), ("target", t)):
                        save_nifti(out / "samples" / f"step{step:07d}_{name}.nii.gz", v[0].float().cpu())
                except StopRun as e:  # a full disk: every rank stops below, none waits for rank 0
                    err = str(e)
                if (
                    not a.no_pictures and not err
                ):  # the same, as one PNG: channel 0, three slices through the patch centre
                    vols = [v[0, 0].float().cpu().numpy() for v in (inp, x, y, t)]  # 4 x (P, P, P)
                    try:
                        pictures.save_png(
                            out / "samples" / f"step{step:07d}.png",
                            pictures.volumes_picture(vols, ["augmented", "masked", "reconstruction", "target"])[0],
                        )
                    except OSError as e:  # a picture is not worth a run: say so and train on
                        say(f"validation picture not written ({e})")
        model.train()
        tot, cnt, failed = all_sum(ctx, tot, cnt, bool(err))
        if failed:
            raise stopped(step, err or "rank 0 could not write its samples", out / "ckpt.pt", saved)
        return tot / cnt

    if step >= total:
        say(f"{out} is already finished ({step} of {total} steps)")
        return model
    loader = make_loader(train_ds, bp, step, total - step, ctx, a.workers)
    meter = Interval(ctx, a.max_bad_steps, a.dtype == "fp16")
    net.train()
    for s, epoch, batch in steps(loader, step, total, spe, meter, a.quiet):
        if a.aug_on == "device":  # crop-padded regions (B, C, 181, 181, 181) and sample numbers: augment here
            inp, target = data.augment_batch(train_ds, *batch)  # (B, C, P, P, P) each
        else:  # augmented in the workers
            inp, target = (t.float() for t in batch)
        lr = lr_at(s, total, warmup, a.lr, a.warmup_start, a.schedule, spe)
        set_lr(opt, lr)
        loss, parts, _ = compute_loss(net, inp, target, a, (a.seed, s, ctx.rank), autocast)
        skipped = guarded_step(loss, opt, scaler, a.grad_clip, a.dtype == "fp16")
        meter.add(s, loss, skipped, parts)
        step = s + 1
        epoch_end = step % spe == 0 or step == total
        if step % a.log_every == 0 or step == total or epoch_end or step % a.ckpt_every == 0:
            meter.check(log, out / "ckpt.pt", saved)  # skipped steps: logged, or too many in a row: stop
        if step % a.log_every == 0 or step == total:
            log(dict(step=step, epoch=epoch, lr=lr, **meter.row(bp * ctx.world)))
        if epoch_end:
            v = validate()
            if v is not None:
                log({"step": step, "epoch": epoch, "val_loss": v})
            if ctx.master and not a.no_pictures:
                try:
                    pictures.progress_png(out / "log.jsonl", out / "progress.png")
                except OSError as e:  # a picture is not worth a run: say so and train on
                    say(f"progress.png not written ({e})")
            say(f"epoch {epoch}: step {step}/{total}" + (f", validation loss {v:.4f}" if v is not None else ""))
        if epoch_end or step % a.ckpt_every == 0:
            try:
                checkpoint()
            except StopRun as e:
                raise stopped(step, str(e), out / "ckpt.pt", saved) from None
            saved = step
        if epoch_end or step % a.ckpt_every == 0:
            meter.restart()  # validation and saving are not data wait
        stop_if_signalled(
            ctx, step, saved, checkpoint, log, meter, ("pretrain.py", out)
        )  # SIGTERM & co: save this step, exit 3
    say(
        f"done: {out / 'encoder.pt'} (for finetune.py --pretrained), log {out / 'log.jsonl'}, samples {out / 'samples'}"
    )
    return model


def main(argv=None):
    """Exit status: 0 done, 1 stopped (non-finite steps or weights, a full disk), 2 bad flags or inputs,
    3 stopped by SIGTERM / SIGINT / SIGUSR1 with the step reached saved."""
    return run_main("pretrain.py", train, get_args(argv))


if __name__ == "__main__":
    sys.exit(main())
