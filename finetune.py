"""
Few-shot finetuning: a pretrained encoder, a new U-Net decoder, n labelled cases.

    torchrun --nproc_per_node=G finetune.py --arch unet_b --data OUT --pretrained RUN/encoder.pt \
        --n-train 20 --seed 0 --out FT
    python finetune.py --recipe bsf --data OUT --pretrained BrainSegFounder_stage2.pt --n-train 20 --out FT_bsf
    python finetune.py --arch unet_b --data OUT --pretrained none --n-train 20 --out FT_scratch   # from scratch
    python finetune.py --out FT --resume

The encoder's weights come from pretrain.py's RUN/encoder.pt (the transfer is reported
tensor by tensor); the decoder is new. A 1-channel encoder on a 4-channel task keeps
its first convolution freshly initialised, as the authors' transfer does (load what
matches by name and shape); --tile-stem tiles it over the channels instead (the
default of --recipe wald, as nnssl does). --n-train
cases are drawn from the train split by --seed (data.select_few_shot): a 20-shot run
reads 20 labelled cases and no other, and evaluate.py uses its last weights, as the
authors do. FT/cases.json lists every labelled case the run read.

Recipes (--recipe; every number is still a flag, resolved values saved in args.json):
  amaes  (default) Munk et al. 2024 (asbjrnmunk/amaes src/train.py with Yucca 1.1.7):
         500 epochs x 100 batches of 8 PER PROCESS, patch 128, AdamW lr 1e-4 wd 3e-5, cosine
         annealing per epoch with T_max 575 and eta_min 1e-9, foreground oversampling
         0.33, loss soft Dice (softmax, background included, per sample, smooth 1) + CE.
         Augmentation: the spatial preset when finetuning, the full recipe (unclipped,
         Yucca's default) from scratch (--aug overrides).
  wald   nnssl's nnU-Net PretrainedTrainer (TaWald/nnUNet branch nnssl_finetuning_inclusion,
         nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py l.36-41, on
         nnUNetTrainer.py with batchgeneratorsv2): SGD Nesterov momentum 0.99, lr 1e-3
         (1e-2 from scratch, --pretrained none, as nnU-Net), wd 3e-5, linear warm-up of
         the whole network over 50 epochs then poly 0.9 over the remaining 950 of 1000
         epochs of 250 batches of 2 IN TOTAL over the processes, patch 160, gradient
         clip 12, Dice (background excluded, smooth 1e-5) + CE, no deep supervision; a
         stem with fewer channels than the task is tiled over them (weight / C).
         nnU-Net's augmentation (--aug nnunet: rotation, scaling, noise, blur,
         brightness, contrast, low resolution, gamma with and without inversion,
         mirroring, at nnUNetTrainer.py l.712-808's probabilities; trilinear), its
         sampler (--sampler nnunet: the last third of each batch forced to hold
         foreground, the patch centred on a voxel of a class drawn among those present)
         and its predictor, recorded in the run for evaluate.py: Gaussian blending
         (sigma patch/8), mirroring over all three axes, nnU-Net's window positions.
         (nnU-Net takes the batch size and batch Dice from its plan; here 2 and per
         sample.)
  bsf    BrainSegFounder's BraTS finetuning (lab-smile/BrainSegFounder c58e9e6,
         downstream/BraTS/finetuning/; main = main_FinetuningSwinUNETR_4Channels.py):
         AdamW (main l.259-260) lr 1e-4 (launch.sh l.29, from scratch too) wd 1e-5
         (main l.53 reg_weight); batch 2 PER PROCESS (launch.sh l.28; a DataLoader per
         process over its share of the list, data_utils.py l.166-174; 2 GPUs there, l.5);
         patch 128 (launch.sh l.35); 300 epochs (main l.48), an epoch one pass over the
         n-train cases: ceil(n / (batch x processes)) steps (10 for 20 cases on one GPU);
         LinearWarmupCosineAnnealingLR (main l.268-271, optimizers/lr_scheduler.py
         l.20-100) over 50 warm-up epochs (main l.86), warmup_start_lr 0, eta_min 0,
         stepped after each epoch (trainer.py l.225-226): epoch 0 at lr 0; fp32
         (launch.sh l.34 --noamp, main l.108); loss MONAI DiceLoss(to_onehot_y=False,
         sigmoid=True) alone (main l.218; --squared_dice is not given, so smooth_nr =
         smooth_dr = 1e-5, background included, per sample and channel, no BCE) on the
         dataset's training_regions (their 3 sigmoid outputs TC / WT / ET from
         ConvertToMultiChannelBasedOnBratsClassesd, data_utils.py l.121); a dataset
         without regions trains softmax classes with the same Dice alone. Crops:
         CropForegroundd(k_divisible=128) then RandSpatialCropd (data_utils.py
         l.122-127: --sampler bsf, no foreground forcing); augmentation --aug bsf:
         RandFlipd p 0.5 per axis, RandScaleIntensityd(0.1, p 1), RandShiftIntensityd(0.1,
         p 1) (l.128-133; main l.80-83's *_prob flags are never read). Stem: the patch
         embedding is replaced by a fresh Conv3d (main l.161-177, l.189), so no tiling.
         Predictor, recorded for evaluate.py: windows averaged (sliding_window_inference's
         default mode "constant": --blend mean), overlap 0.6 (test.py l.31; validation
         0.5, main l.84, = --overlap), no mirroring, sigmoid > 0.5 (test.py l.102-104).
         Their model selection: validation Dice every 5 epochs (launch.sh l.34) on a
         held-out fold, the best kept as model.pt (trainer.py l.172-223), which test.py
         loads (l.29). Here --val-cases stays 0 by default, so a 20-shot run reads 20
         labelled cases as AMAES's does and is scored on its last weights; --val-cases N
         (--val-every 5 from the recipe) and evaluate.py --checkpoint best is their
         selection. Not reproduced: their NormalizeIntensityd(nonzero, channel_wise) per
         crop and per volume (the kit's [0, 1] preprocessing instead), the last partial
         batch of a pass, and their validation Dice on unthresholded sigmoids (main
         l.220 AsDiscrete without a threshold; the kit thresholds).
Every recipe says whether --batch is per process or in total (--batch-scope, args.json,
the recipe line printed at the start).
Same DDP, AMP, checkpoint, resume and non-finite-loss rules as pretrain.py.

FT/ holds args.json, cases.json, log.jsonl, ckpt.pt (the last state: for --resume
and for evaluate.py) and progress.png (nnU-Net's: training loss and validation Dice
from log.jsonl, redrawn every epoch; --no-pictures leaves it out). Model selection
is ours and leaves the paper's protocol: --val-cases N holds N more labelled train
cases out for validation Dice (sliding window over each held-out volume, every
--val-every epochs and at the end) and keeps the best weights in best.pt
(evaluate.py --checkpoint best); the run then reads n-train + N labelled cases.
"""

import argparse
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import models
import pictures
from evaluate import sliding_window
from models import ARCHS, build_model, describe, load_encoder, patch_rule
from preprocess import ArgumentParser, save_json
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
)

# The finetuning recipes: the value of every flag a recipe sets, one plain dict each. lr_scratch:
# the lr when --pretrained none. batch_scope: --batch per process (AMAES: every device loads 8) or the
# total over the processes (nnU-Net's plan batch size, split over the GPUs, nnUNetTrainer.py l.363-406).
# one recipe per block, its numbers side by side (ruff format would put each on a line of its own)
# fmt: off
RECIPES = {
    "amaes": dict(patch=128, batch=8, batch_scope="process", epochs=500, steps_per_epoch=100, optimizer="adamw",
                  lr=1e-4, lr_scratch=1e-4, wd=3e-5, schedule="cosine", t_max=575.0, eta_min=1e-9, warmup_epochs=0,
                  dice_smooth=1.0, dice_background="include", grad_clip=0.0, tile_stem=False, sampler="yucca",
                  interp="cubic", blend="sum", tta=False, loss="dice_ce", val_every=50, infer_overlap=0.5,
                  dtype="auto"),
    # nnssl's PretrainedTrainer (TaWald/nnUNet branch nnssl_finetuning_inclusion,
    # nnunetv2/training/nnUNetTrainer/pretraining/pretrainedTrainer.py l.36-41: lr 1e-3, 1e-2 from scratch;
    # warm-up 50 epochs l.38) on nnU-Net's trainer: its augmentation (aug nnunet), sampler, trilinear
    # resampling (batchgeneratorsv2 SpatialTransform mode 'bilinear'), and predictor (Gaussian blending,
    # mirroring over the axes (0, 1, 2) of nnUNetTrainer.py l.468/483)
    "wald": dict(patch=160, batch=2, batch_scope="total", epochs=1000, steps_per_epoch=250, optimizer="sgd", lr=1e-3,
                 lr_scratch=1e-2, wd=3e-5, schedule="warmup_poly", t_max=575.0, eta_min=0.0, warmup_epochs=50,
                 dice_smooth=1e-5, dice_background="exclude", grad_clip=12.0, tile_stem=True, sampler="nnunet",
                 interp="linear", blend="gaussian", tta=True, loss="dice_ce", val_every=50, infer_overlap=0.5,
                 dtype="auto"),
    # BrainSegFounder's BraTS finetuning (lab-smile/BrainSegFounder downstream/BraTS/finetuning/, the module
    # docstring gives each number's file and line). steps_per_epoch None: one pass over the n-train cases,
    # ceil(n / (batch x processes)), derived in train(); t_max and interp are unused (warmup_cosine, no resampling).
    "bsf": dict(patch=128, batch=2, batch_scope="process", epochs=300, steps_per_epoch=None, optimizer="adamw",
                lr=1e-4, lr_scratch=1e-4, wd=1e-5, schedule="warmup_cosine", t_max=300.0, eta_min=0.0,
                warmup_epochs=50, dice_smooth=1e-5, dice_background="include", grad_clip=0.0, tile_stem=False,
                sampler="bsf", interp="cubic", blend="mean", tta=False, loss="dice", val_every=5, infer_overlap=0.6,
                dtype="fp32"),
}
# fmt: on


def get_args(argv=None):
    """Parsed flags, checked; a.given holds the flags whose value is not the default."""
    p = ArgumentParser(
        prog="finetune.py", description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", choices=list(ARCHS), help="network (default: the one in --pretrained, else unet_b)")
    p.add_argument(
        "--decoder",
        choices=("unet", "native"),
        help="MedNeXt only: U-Net decoder (default, the paper) or MedNeXt's own",
    )
    p.add_argument(
        "--data", default="demo/preprocessed", help="preprocessed labelled dataset (default demo/preprocessed)"
    )
    p.add_argument(
        "--pretrained",
        help="pretrained weights (required): RUN/encoder.pt of pretrain.py, a released file "
        "(AMAES *_lw_dec_fullaug.pth, nnssl/OpenMind ResEnc-L, MONAI model_swinvit.pt, BrainSegFounder; "
        "detected from its contents), or 'none' to train from scratch",
    )
    p.add_argument("--out", default="runs/finetune", help="run folder (default runs/finetune)")
    p.add_argument(
        "--n-train",
        default="20",
        help="labelled training cases, drawn by --seed from the train split, or 'all' (default 20)",
    )
    p.add_argument(
        "--val-cases",
        type=int,
        default=0,
        help="ours, not the paper's: hold out N more labelled train cases for "
        "validation Dice and keep best.pt (default 0: the run reads exactly --n-train labelled cases)",
    )
    p.add_argument(
        "--tile-stem",
        action=argparse.BooleanOptionalAction,
        help="a pretrained first convolution with fewer "
        "input channels than the task is tiled over them, scaled by 1/C (recipe amaes: no, the stem stays freshly "
        "initialised as the AMAES authors' transfer leaves it, so --tile-stem leaves their protocol; recipe wald: "
        "yes, as nnssl's PretrainedTrainer does; recipe bsf: no, BrainSegFounder replaces the whole patch "
        "embedding)",
    )
    p.add_argument(
        "--recipe",
        default="amaes",
        choices=list(RECIPES),
        help="amaes (default: Munk et al.'s "
        "finetuning), wald (nnssl's nnU-Net PretrainedTrainer, after Wald et al.'s MAE) or bsf "
        "(BrainSegFounder's BraTS finetuning); any flag below overrides one number of it",
    )
    p.add_argument("--patch", type=int, help="cubic patch side (recipe: amaes / wald / bsf values: 128 / 160 / 128)")
    p.add_argument(
        "--batch",
        type=int,
        help="samples per step, per process or in total as --batch-scope says "
        "(recipe: 8 per process / 2 in total / 2 per process)",
    )
    p.add_argument(
        "--batch-scope",
        choices=("process", "total"),
        help="--batch is per process, or the total over all "
        "processes split evenly (recipe: process / total, nnU-Net's plan batch size over the GPUs / "
        "process)",
    )
    p.add_argument("--epochs", type=int, help="epochs (recipe: 500 / 1000 / 300)")
    p.add_argument(
        "--steps-per-epoch",
        type=int,
        help="batches per epoch (recipe: 100 / 250 / one pass over the "
        "n-train cases, ceil(n-train / (batch x processes)): 10 for 20 cases on one GPU)",
    )
    p.add_argument(
        "--steps", type=int, help="total steps instead of epochs x steps per epoch; the schedule shrinks to fit"
    )
    p.add_argument(
        "--optimizer",
        choices=("adamw", "sgd"),
        help="AdamW, or SGD with Nesterov momentum 0.99 (recipe: adamw / sgd / adamw)",
    )
    p.add_argument(
        "--lr",
        type=float,
        help="learning rate (recipe: 1e-4 / 1e-3 with --pretrained, 1e-2 from scratch as nnU-Net / 1e-4)",
    )
    p.add_argument("--wd", type=float, help="weight decay (recipe: 3e-5 / 3e-5 / 1e-5)")
    p.add_argument(
        "--schedule",
        choices=("cosine", "warmup_poly", "warmup_cosine"),
        help="cosine annealing per epoch "
        "(T_max, eta_min); linear warm-up of the whole network over --warmup-epochs then poly 0.9; or "
        "linear warm-up from 0 over --warmup-epochs then cosine to --eta-min at the last epoch (MONAI "
        "tutorials' LinearWarmupCosineAnnealingLR) (recipe: cosine / warmup_poly / warmup_cosine)",
    )
    p.add_argument("--t-max", type=float, help="cosine annealing period in epochs, schedule cosine (recipe: 575)")
    p.add_argument("--eta-min", type=float, help="cosine annealing floor (recipe: 1e-9 / unused / 0)")
    p.add_argument(
        "--warmup-epochs", type=int, help="warm-up epochs of warmup_poly / warmup_cosine (recipe: unused / 50 / 50)"
    )
    p.add_argument(
        "--fg-p",
        type=float,
        default=0.33,
        help="share of patches forced to hold a labelled voxel (default 0.33, both recipes); how, --sampler says",
    )
    p.add_argument(
        "--sampler",
        choices=("yucca", "nnunet", "bsf"),
        help="yucca: each patch forced with p --fg-p, its "
        "voxel drawn from all classes' voxels pooled, anywhere in the patch (AMAES); nnunet: the last "
        "round(B * (1 - fg-p)).. slots of each step's batch (all processes) forced, a class drawn among "
        "those present, the patch centred on one of its voxels; bsf: no foreground forcing (--fg-p unused), "
        "a patch uniform in the image's non-zero box grown to a multiple of the patch (MONAI "
        "CropForegroundd k_divisible + RandSpatialCropd) (recipe: yucca / nnunet / bsf)",
    )
    p.add_argument(
        "--centre-fg", action="store_true", help="ours, not the paper's: a forced patch is centred on its voxel"
    )
    p.add_argument(
        "--interp",
        choices=("cubic", "linear"),
        help="image resampling of the spatial rows: cubic B-spline "
        "(AMAES's Yucca) or linear (batchgeneratorsv2's, nnU-Net) (recipe: cubic / linear)",
    )
    p.add_argument(
        "--loss",
        choices=("dice_ce", "dice", "ce"),
        help="soft Dice + CE 1:1, or one of them (recipe: dice_ce / dice_ce / dice, MONAI DiceLoss alone)",
    )
    p.add_argument(
        "--dice-smooth",
        type=float,
        help="soft Dice smoothing term, numerator and denominator (recipe: "
        "1 / 1e-5 / 1e-5, MONAI DiceLoss's smooth_nr = smooth_dr)",
    )
    p.add_argument(
        "--dice-background",
        choices=("include", "exclude"),
        help="background class in the soft Dice (recipe: "
        "include / exclude, nnU-Net's do_bg False / include, MONAI's include_background)",
    )
    p.add_argument(
        "--aug",
        choices=data.PRESETS,
        help="augmentation preset (recipe amaes: spatial when finetuning, all from "
        "scratch; recipe wald: nnunet, nnU-Net's default pipeline, either way; recipe bsf: bsf, either way)",
    )
    p.add_argument(
        "--val-every", type=int, help="validate every N epochs (with --val-cases), and at the end (recipe: 50 / 50 / 5)"
    )
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in validation (default 0.5)")
    p.add_argument(
        "--infer-overlap",
        type=float,
        help="sliding-window overlap recorded in the run for evaluate.py "
        "(recipe: 0.5 / 0.5 / 0.6, BrainSegFounder's test.py)",
    )
    p.add_argument(
        "--blend",
        choices=("sum", "gaussian", "mean"),
        help="sliding-window blending, recorded in the run "
        "for evaluate.py (recipe: sum, Yucca's summed logits / gaussian, nnU-Net's importance map sigma "
        "patch/8 / mean, MONAI sliding_window_inference mode constant)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="mirroring at inference (the mean over the 8 flips), "
        "recorded in the run for evaluate.py (recipe: no / yes, nnU-Net's predictor over axes 0, 1, 2 / no)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the case selection, samples and initialisation (default 0)"
    )
    add_run_flags(p)
    a = p.parse_args(argv)
    given = {k for k, v in vars(a).items() if v is not None and v != p.get_default(k)}
    for k, v in RECIPES[a.recipe].items():  # the recipe fills every number not given
        if k != "lr_scratch" and k not in given:
            setattr(a, k, RECIPES[a.recipe]["lr_scratch"] if k == "lr" and a.pretrained == "none" else v)
    check_run_flags(
        p, a, ("batch", "epochs", "steps_per_epoch", "steps", "log_every", "ckpt_every", "max_bad_steps", "val_every")
    )
    if not a.lr >= 0 or not a.wd >= 0:  # NaN too; 0 is allowed (a frozen run, as the tests' exact-transfer check)
        p.error(f"--lr and --wd must be >= 0 (got --lr {a.lr:g}, --wd {a.wd:g})")
    a.given = sorted(given)  # what the user typed (resume compares these), not what the recipe filled in
    a.legacy_merge = False  # SwinUNETR's PatchMerging order: set from --pretrained (Tang / BrainSegFounder weights)
    if a.resume and any(Path(a.out, n).exists() for n in ("ckpt.pt", "ckpt_prev.pt")):
        return a  # the rest comes from the run's checkpoint
    if a.pretrained is None:
        p.error("--pretrained is required: RUN/encoder.pt from pretrain.py, or 'none' to train from scratch")
    if a.pretrained != "none" and not Path(a.pretrained).is_file():
        p.error(f"--pretrained {a.pretrained}: no such file (give RUN/encoder.pt, or 'none')")
    if a.decoder and not (a.arch or "").startswith("mednext"):
        p.error("--decoder is for MedNeXt only (give --arch mednext_*)")
    if a.arch:
        divisor, minimum = patch_rule(a.arch)
        if a.patch % divisor or a.patch < minimum:
            p.error(f"--patch {a.patch}: {a.arch} needs a multiple of {divisor}, at least {minimum}")
    if a.n_train != "all" and not (a.n_train.isdigit() and int(a.n_train) >= 1):
        p.error(f"--n-train {a.n_train}: a positive number or 'all'")
    if a.val_cases < 0 or not 0 <= a.fg_p <= 1 or not 0 <= a.overlap < 1 or not 0 <= a.infer_overlap < 1:
        p.error("--val-cases >= 0, --fg-p in [0, 1], --overlap and --infer-overlap in [0, 1)")
    if a.aug is None:
        a.aug = {"wald": "nnunet", "bsf": "bsf"}.get(a.recipe, "all" if a.pretrained == "none" else "spatial")
    return a


# -----------------------------------------------------------------------------


def lr_at(step, steps_per_epoch, epochs, total, a):
    """Stepped per epoch. cosine (AMAES): annealing with T_max in epochs and an eta_min
    floor. warmup_poly (nnssl's PretrainedTrainer): lr (e + 1) / W for the first W
    epochs, then lr (1 - (e - W) / (epochs - W)) ** 0.9. With --steps the run has fewer
    epochs and T_max / W shrink in proportion. warmup_cosine (BrainSegFounder's
    LinearWarmupCosineAnnealingLR, optimizers/lr_scheduler.py l.20-100, warmup_start_lr 0,
    stepped after each epoch, trainer.py l.225-226), its closed form (l.84-100): e lr / (W - 1)
    for e < W (epoch 0 trains at lr 0; epochs W - 1 and W both at lr), then
    eta_min + (lr - eta_min) (1 + cos(pi (e - W) / (E - W))) / 2 for the E epochs of the run."""
    run_epochs = math.ceil(total / steps_per_epoch)
    e = step // steps_per_epoch
    if a.schedule in ("warmup_poly", "warmup_cosine"):
        w = max(1, round(a.warmup_epochs * run_epochs / epochs))
    if a.schedule == "warmup_poly":
        return a.lr * (e + 1) / w if e < w else a.lr * (1 - (e - w) / max(1, run_epochs - w)) ** 0.9
    if a.schedule == "warmup_cosine":  # warmup_start_lr 0: the reference never passes it (main.py l.269-271)
        if e < w:
            return e * a.lr / max(1, w - 1)
        return a.eta_min + (a.lr - a.eta_min) * (1 + math.cos(math.pi * (e - w) / max(1, run_epochs - w))) / 2
    t_max = a.t_max * run_epochs / epochs  # = a.t_max for the full run
    return a.eta_min + (a.lr - a.eta_min) * (1 + math.cos(math.pi * e / t_max)) / 2


def targets(seg, values, ignore=None, regions=None):
    """Label values (B, *S) -> training targets: class indices (B, *S) for softmax, or
    region masks (B, R, *S) in {0, 1} for sigmoid outputs (nnU-Net's region training);
    voxels of the ignore label get -1 (they count nowhere in the loss)."""
    if regions:
        t = torch.stack([torch.isin(seg, torch.tensor(v, device=seg.device)) for v in regions.values()], 1).float()
    else:
        lut = torch.full((256,), -1, dtype=torch.long, device=seg.device)
        lut[values] = torch.arange(len(values), device=seg.device)  # label value -> class index
        t = lut[seg]
    if ignore is not None:
        t = torch.where((seg == ignore).unsqueeze(1) if regions else seg == ignore, -1, t)
    return t


def seg_loss(logits, target, kind="dice_ce", smooth=1.0, background=True, regions=False):
    """logits (B, K, *S). Softmax classes: target (B, *S) class indices; soft Dice
    (softmax, per sample and class, background included unless background=False,
    then averaged) + CE, summed 1:1. Regions: target (B, K, *S) in {0, 1}; soft Dice of
    the sigmoids + BCE (nnU-Net's DC_and_BCE). Target -1 marks ignored voxels."""
    logits = logits.float()
    valid = (target[:, :1] >= 0 if regions else (target >= 0).unsqueeze(1)).float()  # (B, 1, *S)
    dims = tuple(range(2, logits.dim()))
    if regions:
        p, g = logits.sigmoid() * valid, target.clamp(min=0) * valid
        ce = (F.binary_cross_entropy_with_logits(logits, target.clamp(min=0), reduction="none") * valid).sum() / (
            valid.sum() * logits.shape[1]
        ).clamp(min=1)
    else:
        p = logits.softmax(1) * valid
        g = F.one_hot(target.clamp(min=0), logits.shape[1]).movedim(-1, 1).float() * valid
        ce = F.cross_entropy(logits, target, ignore_index=-1) if (target >= 0).any() else logits.sum() * 0
    dice = (2 * (p * g).sum(dims) + smooth) / (p.sum(dims) + g.sum(dims) + smooth)  # (B, K)
    dice_loss = 1 - (dice if background or regions else dice[:, 1:]).mean()
    return {"dice_ce": ce + dice_loss, "dice": dice_loss, "ce": ce}[kind]


def transfer_report(rep, path, fmt, n_dec, in_ch):
    """One line for what the transfer did, tensor by tensor in summary."""
    return (
        f"transfer from {path} ({models.FORMATS[fmt]}): {len(rep['loaded'])} encoder tensors loaded"
        + (f"; {', '.join(rep['adapted'])} tiled to {in_ch} channels" if rep["adapted"] else "")
        + (f"; {', '.join(rep['fresh'])} freshly initialised ({in_ch} input channels)" if rep["fresh"] else "")
        + f"; decoder ({n_dec} tensors) freshly initialised"
        + (
            f"; not used from the file: {len(rep['unused'])} tensors "
            f"({', '.join(sorted({'.'.join(k.split('.')[:2]) for k in rep['unused']})[:4])})"
            if rep["unused"]
            else ""
        )
    )


def train(a):
    """The whole run for flags `a`; returns the (unwrapped) model."""
    ctx = setup(a.device)  # rank, world size, device; say() prints on rank 0 only
    out, say = Path(a.out), ctx.say
    ck = resume_or_start(a, out, ctx, script="finetune.py")  # None for a new run
    old_run = {"batch_scope": "process", "sampler": "yucca", "blend": "sum", "tta": False, "infer_overlap": 0.5}
    for k, v in old_run.items():
        if ck is not None and k not in ck["args"]:
            setattr(a, k, v)  # a run saved before the flag existed continues as it ran
    bp = process_batch(a.batch, a.batch_scope, ctx.world)  # samples per process and step

    # -- cases: n-shot training set, held-out validation cases -----------------
    with user_input():
        ds_json = data.read_dataset(a.data)
        if not ds_json.get("labelled", True) or "label_values" not in ds_json:
            raise ValueError(f"{a.data} has no labels; finetuning needs an nnU-Net-style labelled dataset")
        pool = sorted(c["case"] for c in ds_json["cases"] if c["split"] == "train")
        chosen = data.select_few_shot(pool, a.n_train, a.seed)
        rest = [c for c in pool if c not in chosen]
        if a.val_cases > len(rest) and ck is None:  # (a run started before this check resumes with what it had)
            raise UserError(
                f"--val-cases {a.val_cases}: only {len(rest)} train case(s) are left after --n-train {a.n_train} "
                f"of {len(pool)}; choose --val-cases {len(rest)} or fewer, or a smaller --n-train"
            )
        n_val = min(a.val_cases, len(rest))
        val_cases = (
            sorted(np.random.default_rng([a.seed, 98]).choice(rest, n_val, replace=False).tolist()) if n_val else []
        )
        check_resumed_cases(ck, a.data, chosen, val_cases)
        data.check_cases(a.data, chosen + val_cases, labels=True)  # a truncated file named now, not after some steps
        if not a.no_preflight:
            data.check_finite(a.data, (chosen + val_cases)[ctx.rank :: ctx.world], share=lambda bad: gather(ctx, bad))
        ignore = ds_json.get("ignore_label")  # e.g. WMH's "other pathology": no class, no loss
        values = [
            int(v) for v in ds_json["label_values"] if v != ignore
        ]  # e.g. BraTS [0, 1, 2, 3]: class k is values[k]
        regions = ds_json.get("training_regions")  # nnU-Net region labels: one sigmoid output per region
        in_ch = int(ds_json.get("n_channels", 1))
        a.aug_on = a.aug_on if a.aug_on != "auto" else ("device" if ctx.cuda else "workers")
        train_ds = data.SegDataset(
            a.data,
            chosen,
            a.patch,
            a.aug,
            a.seed,
            a.fg_p,
            aug_on=a.aug_on,
            order=3 if a.interp == "cubic" else 1,
            centre_fg=a.centre_fg,
            sampler=a.sampler,
            batch=bp * ctx.world,
        )
    if a.steps_per_epoch is None:  # recipe bsf: an epoch is one pass over the n-train cases (their DataLoader)
        a.steps_per_epoch = math.ceil(len(chosen) / (bp * ctx.world))
    spe = a.steps_per_epoch
    total = a.steps or a.epochs * spe
    say(
        f"finetune.py: run {out} ({'resumed at step ' + str(ck['step']) if ck else 'new'}), data {a.data} "
        f"({ds_json.get('name')}: {len(chosen)} + {len(val_cases)} val of {len(pool)} train cases), "
        f"pretrained {a.pretrained}"
    )

    # -- model: pretrained encoder, fresh decoder -----------------------------
    pre = load_pretrained_file(a.pretrained, "--pretrained") if ck is None and a.pretrained != "none" else None
    if pre is not None:  # the file says which network it is (and how SwinUNETR merges patches)
        if a.arch not in (None, pre["arch"]):
            raise UserError(
                f"--pretrained {a.pretrained} holds {pre['arch']} weights, but --arch is {a.arch}; "
                f"use --arch {pre['arch']} (or leave --arch out)"
            )
        a.arch, a.legacy_merge = pre["arch"], pre["legacy_merge"]
    a.arch = a.arch or "unet_b"
    check_patch(a.arch, a.patch)
    torch.manual_seed(a.seed)
    n_out = len(regions) if regions else len(values)
    model = build_model(
        a.arch, in_ch, n_out, decoder=a.decoder, checkpointing=a.checkpointing, legacy_merge=a.legacy_merge
    )
    if pre is not None:
        with user_input():
            rep = load_encoder(model, pre, adapt_stem=a.tile_stem)
        say(transfer_report(rep, a.pretrained, pre["format"], len(model.decoder.state_dict()), in_ch))
    elif ck is None:
        say("from scratch: no pretrained encoder")
    model.to(ctx.device)
    a.dtype, autocast, scaler = precision(ctx.device, a.dtype)
    opt = make_optimizer(model.parameters(), a.optimizer, a.lr, a.wd, ctx.device)
    step, best = restore(ck, model, opt, scaler), ck["best"] if ck is not None else -1.0
    region = math.prod(train_ds.region_size()) if a.aug_on != "workers" else a.patch**3
    sample_bytes = in_ch * region * 2 + region * (8 if a.aug_on == "workers" else 1)
    preflight(model, a, ctx, out, sample_bytes, a.optimizer)
    net = wrap(model, a.compile, ctx)

    facts = {
        "arch": a.arch,
        "in_channels": in_ch,
        "label_values": values,
        "labels": ds_json.get("labels"),
        "label_names": ds_json.get("label_names"),
        "training_regions": regions,
        "regions_class_order": ds_json.get("regions_class_order"),
        "ignore_label": ignore,
        "n_outputs": n_out,
        "patch": a.patch,
        "decoder": a.decoder,
        "legacy_merge": a.legacy_merge,
        "pretrained": a.pretrained,
        "seed": a.seed,
        "n_train": int(a.n_train) if a.n_train.isdigit() else a.n_train,
        "recipe": getattr(a, "recipe", None),
        "dataset": ds_json.get("name"),
        "data": str(Path(a.data).resolve()),
        "pretrained_file": a.pretrained if a.pretrained in (None, "none") else str(Path(a.pretrained).resolve()),
        "transpose": ds_json.get("transpose"),  # the axis order of the data: evaluate.py --images applies it
        # the recipe's predictor (window positions, blending, mirroring): evaluate.py applies it
        # (MONAI's window positions at any overlap are Yucca's: multiples of int(patch (1 - overlap)),
        # the last flush with the end)
        "inference": {
            "blend": a.blend,
            "tta": a.tta,
            "steps": "nnunet" if a.recipe == "wald" else "yucca",
            "overlap": a.infer_overlap,
        },
    }
    log = open_run(out, a, ck, step, ctx)
    if ctx.master:
        save_json(
            out / "cases.json",
            {
                "n_train": facts["n_train"],
                "seed": a.seed,
                "train": chosen,
                "val": val_cases,
                "labelled_cases_read": sorted(chosen + val_cases),
            },
        )
    say(describe(model))
    say(
        f"recipe {a.recipe}: "
        + ", ".join(f"{k} {getattr(a, k)}" for k in RECIPES[a.recipe] if k != "lr_scratch")
        + f", aug {a.aug} (batch {a.batch} "
        + f"{'in total over the processes' if a.batch_scope == 'total' else 'per process'})"
    )
    say(
        f"{len(chosen)}-shot ({a.n_train}, seed {a.seed}) of {len(pool)} train cases, "
        f"{len(val_cases)} held out for validation; {ctx.world} process(es) x batch {bp} "
        f"(--batch {a.batch} {'in total' if a.batch_scope == 'total' else 'per process'}), "
        f"sampler {a.sampler}, inference {a.blend}{' + mirroring' if a.tta else ''}, patch {a.patch}^3, "
        f"{total} steps ({spe} per epoch), {a.dtype} on {ctx.device.type}, aug {a.aug}"
    )

    saved = ck["step"] if ck is not None else None  # the step of the last good checkpoint

    def checkpoint(is_best=False):
        """ckpt.pt (the last state: to resume, and what evaluate.py reads) and, after a
        better validation (--val-cases), best.pt; finite weights only."""
        state = dict(facts, model=model.state_dict(), step=step, best=best)
        save_all(
            ctx,
            [
                (
                    dict(
                        state,
                        optimizer=opt.state_dict(),
                        scaler=scaler.state_dict(),
                        total=total,
                        world=ctx.world,
                        rng=torch.get_rng_state(),
                        args=vars(a),
                        train_cases=chosen,
                        val_cases=val_cases,
                    ),
                    out / "ckpt.pt",
                    True,
                )
            ]
            + ([(state, out / "best.pt", False)] if is_best else []),
        )

    @torch.no_grad()
    def validate():
        """Mean foreground Dice over the held-out cases (nanmean), rank r taking every W-th."""
        model.eval()
        tot = cnt = 0.0
        for case in val_cases[ctx.rank :: ctx.world]:
            img = torch.from_numpy(np.load(Path(a.data, "images", f"{case}.npy")).astype(np.float32)).to(ctx.device)
            ref = torch.from_numpy(np.load(Path(a.data, "labels", f"{case}.npy")).astype(np.int64)).to(ctx.device)
            logits = sliding_window(
                model, img, a.patch, a.overlap, a.blend, a.tta, autocast=autocast, steps=facts["inference"]["steps"]
            )
            keep = ref != ignore if ignore is not None else torch.ones_like(ref, dtype=torch.bool)
            if regions:  # region k of the prediction vs the reference voxels in region k
                pairs = [
                    (logits[k] > 0, torch.isin(ref, torch.tensor(v, device=ref.device)))
                    for k, v in enumerate(regions.values())
                ]
            else:
                pred = torch.tensor(values, device=ctx.device)[logits.argmax(0)]
                pairs = [(pred == v, ref == v) for v in values[1:]]
            for p, r in pairs:
                p, r = p & keep, r & keep
                denom = (p.sum() + r.sum()).item()
                if denom:  # a label absent from both has no Dice
                    tot, cnt = tot + 2 * (p & r).sum().item() / denom, cnt + 1
        model.train()
        tot, cnt = all_sum(ctx, tot, cnt)
        return tot / cnt if cnt else float("nan")

    if step >= total:
        say(f"{out} is already finished ({step} of {total} steps)")
        return model
    loader = make_loader(train_ds, bp, step, total - step, ctx, a.workers)
    meter = Interval(ctx, a.max_bad_steps, a.dtype == "fp16")
    net.train()
    for s, epoch, batch in steps(loader, step, total, spe, meter, a.quiet):
        if a.aug_on == "device":  # crop-padded patches, labels and sample numbers: augment here
            img, seg = data.augment_batch(train_ds, batch[0], batch[2], labels=batch[1])
        else:
            img, seg = batch[0].float(), batch[1]
        # img (B, C, P, P, P), seg (B, P, P, P) label values
        lr = lr_at(s, spe, a.epochs, total, a)
        set_lr(opt, lr)
        with autocast:
            logits = net(img)  # (B, K, P, P, P)
        loss = seg_loss(
            logits,
            targets(seg, values, ignore, regions),
            a.loss,
            a.dice_smooth,
            a.dice_background == "include",
            bool(regions),
        )
        skipped = guarded_step(loss, opt, scaler, a.grad_clip, a.dtype == "fp16")
        meter.add(s, loss, skipped)
        step = s + 1
        epoch_end = step % spe == 0 or step == total
        validating = bool(val_cases) and epoch_end and ((epoch + 1) % a.val_every == 0 or step == total)
        if step % a.log_every == 0 or step == total or validating or epoch_end or step % a.ckpt_every == 0:
            meter.check(log, out / "ckpt.pt", saved)  # skipped steps: logged, or too many in a row: stop
        if step % a.log_every == 0 or step == total:
            log(dict(step=step, epoch=epoch, lr=lr, **meter.row(bp * ctx.world)))
        is_best = False
        if validating:
            v = validate()
            is_best = not math.isnan(v) and v > best
            best = max(best, v) if not math.isnan(v) else best
            log({"step": step, "epoch": epoch, "val_dice": v, "best": best})
            say(f"epoch {epoch}: step {step}/{total}, validation Dice {v:.4f} (best {best:.4f})")
        if epoch_end and ctx.master and not a.no_pictures:  # nnU-Net's progress.png, from the log
            try:
                pictures.progress_png(out / "log.jsonl", out / "progress.png")
            except OSError as e:  # a picture is not worth a run: say so and train on
                say(f"progress.png not written ({e})")
        if is_best or epoch_end or step % a.ckpt_every == 0 or step == total:  # each epoch end, as pretrain.py
            try:
                checkpoint(is_best)
            except StopRun as e:
                raise stopped(step, str(e), out / "ckpt.pt", saved) from None
            saved = step
        if validating or epoch_end or step % a.ckpt_every == 0:
            meter.restart()  # validation and saving are not data wait
        stop_if_signalled(
            ctx, step, saved, checkpoint, log, meter, ("finetune.py", out)
        )  # SIGTERM & co: save this step, exit 3
    say(
        f"done: {out / 'ckpt.pt'} (the last weights)"
        + (f", {out / 'best.pt'} (best validation Dice {best:.4f})" if val_cases else "")
        + f"; next: python evaluate.py --run {shlex.quote(str(out))}"
    )
    return model


def main(argv=None):
    """Exit status: 0 done, 1 stopped (non-finite steps or weights, a full disk), 2 bad flags or inputs,
    3 stopped by SIGTERM / SIGINT / SIGUSR1 with the step reached saved."""
    return run_main("finetune.py", train, get_args(argv))


if __name__ == "__main__":
    sys.exit(main())
