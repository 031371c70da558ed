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
Wald et al.'s setting is a command line away: --mask-token 16 --mask-ratio 0.75 --loss-on masked.

Defaults are the paper's and the authors' code's (Munk et al. 2024, arXiv 2408.00640;
github.com/asbjrnmunk/amaes): patch 128, batch 8 per process,
AdamW lr 1e-4 wd 0.01, linear warm-up from lr*1e-3 over 5 epochs then cosine to 0,
stepped every iteration; 100 epochs of int(n_train / (batch * world)) steps; 1 % of
the volumes held out for validation; bf16 autocast on GPUs that have it, fp16 with a
GradScaler on those that do not, fp32 on the CPU.

RUN/ holds args.json, log.jsonl (one JSON line per --log-every steps, per validation
and per skipped step), ckpt.pt (everything needed to continue; written every
--ckpt-every steps and at each epoch end, atomically), encoder.pt (the encoder's
weights plus its arch, for finetune.py --pretrained) and samples/ (one validation
example per validation as NIfTI: masked input, reconstruction, target).
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
from models import ARCHS, build_model, describe, patch_rule
from preprocess import write_atomic
from training import (Interval, StopRun, UserError, add_run_flags, all_sum, check_patch, check_run_flags, load_pretrained_file, guarded_step, make_loader, make_optimizer,
                      precision, open_run, resume_or_start, restore, run_main, save_all, set_lr, setup, steps, stopped, user_input, wrap)

METHODS = ("amaes", "mae", "swin_ssl")
INTERP = {"cubic": 3, "linear": 1}


def get_args(argv=None):
    """Parsed flags, checked; a.given holds the flags whose value is not the default."""
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="unet_b", choices=list(ARCHS), help="network (default unet_b)")
    p.add_argument("--method", default="amaes", choices=METHODS, help="amaes (default), mae, or swin_ssl (swinunetr only)")
    p.add_argument("--data", default="demo/preprocessed", help="preprocessed dataset (preprocess.py output; default demo/preprocessed)")
    p.add_argument("--out", default="runs/pretrain", help="run folder (default runs/pretrain)")
    p.add_argument("--init", metavar="CKPT", help="start from pretrained weights: another run's ckpt.pt or encoder.pt, or a "
                   "released file (as finetune.py --pretrained); tensors that match by name and shape load, the rest are "
                   "listed and keep their fresh initialisation; without --arch the file's arch is used")
    p.add_argument("--patch", type=int, default=128, help="cubic patch side (default 128)")
    p.add_argument("--batch", type=int, default=8, help="batch per process (default 8)")
    p.add_argument("--epochs", type=int, default=100, help="epochs (default 100)")
    p.add_argument("--steps-per-epoch", type=int, help="steps per epoch (default int(n_train / (batch * world)))")
    p.add_argument("--steps", type=int, help="total steps instead of epochs x steps per epoch; the schedule shrinks to fit")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4; Tang et al. used 4e-4 for swin_ssl)")
    p.add_argument("--wd", type=float, default=0.01, help="AdamW weight decay (default 0.01; Tang et al. 0.1)")
    p.add_argument("--warmup-epochs", type=float, default=5, help="linear warm-up from lr*1e-3, in epochs (default 5)")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="share of tokens masked (default 0.6)")
    p.add_argument("--mask-token", type=int, default=4, help="mask token side in voxels (default 4; Wald et al. 16)")
    p.add_argument("--loss-on", default="all", choices=("all", "masked"), help="MSE over all voxels (default) or masked voxels only")
    p.add_argument("--aug", choices=data.PRESETS, help="augmentation preset (default: all for amaes, none for mae and swin_ssl)")
    p.add_argument("--interp", default="cubic", choices=list(INTERP), help="spatial resampling: cubic B-spline (default, "
                   "the authors') or linear (ours: faster, blurrier; leaves the paper's recipe)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of volumes held out for validation (default 0.01; at least 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples, masks, split and initialisation (default 0)")
    add_run_flags(p)
    a = p.parse_args(argv)
    if a.method == "swin_ssl" and a.arch != "swinunetr":
        p.error(f"--method swin_ssl is SwinUNETR's own SSL (rotation, contrastive and reconstruction heads on its "
                f"Swin bottleneck); use --arch swinunetr, or --method amaes / mae for {a.arch}")
    divisor, minimum = patch_rule(a.arch)
    if a.patch % divisor or a.patch < minimum:
        p.error(f"--patch {a.patch}: {a.arch} needs a multiple of {divisor}, at least {minimum}")
    if a.method != "swin_ssl" and (a.mask_token < 1 or a.patch % a.mask_token):
        p.error(f"--patch {a.patch} is not divisible by --mask-token {a.mask_token}")
    if not 0 <= a.mask_ratio < 1:
        p.error("--mask-ratio must be in [0, 1)")
    if not 0 <= a.val_fraction < 0.5:
        p.error("--val-fraction must be in [0, 0.5)")
    check_run_flags(p, a, ("batch", "epochs", "steps_per_epoch", "steps", "log_every", "ckpt_every", "max_bad_steps"))
    a.legacy_merge = False  # SwinUNETR's PatchMerging order: set from --init (Tang / BrainSegFounder weights)
    if a.aug is None:
        a.aug = "all" if a.method == "amaes" else "none"
    return a


# -----------------------------------------------------------------------------
# Pieces the loop uses

def lr_at(step, total, warmup, lr):
    """Linear warm-up from lr*1e-3 to lr over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return lr * (1e-3 + (1 - 1e-3) * step / warmup)
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
        parts = {"rot": F.cross_entropy(r.float(), rot), "contrast": nt_xent(c),
                 "rec": F.l1_loss(rec.float(), targets)}
        return sum(parts.values()), parts, (views, rec, targets)
    masked, mask = data.random_mask(inp, a.mask_ratio, a.mask_token, generator(inp.device, *key))
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
    """(C, X, Y, Z) array -> NIfTI (1 mm, RAS, as preprocessed), written atomically."""
    x = np.asarray(x, dtype=np.float32)
    x = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
    write_atomic(path, lambda p: p.write_bytes(gzip.compress(nib.Nifti1Image(x, np.eye(4)).to_bytes(), compresslevel=1)))


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
    ck = resume_or_start(a, out, ctx)  # None for a new run

    # -- data -----------------------------------------------------------------
    with user_input():
        ds_json = data.read_dataset(a.data)
        cases = sorted(c["case"] for c in ds_json["cases"] if c["split"] == "train") or sorted(c["case"] for c in ds_json["cases"])
        n_val = max(1, round(a.val_fraction * len(cases))) if a.val_fraction > 0 and len(cases) > 1 else 0
        val_cases = sorted(np.random.default_rng([a.seed, 99]).choice(cases, n_val, replace=False).tolist()) if n_val else []
        train_cases = [c for c in cases if c not in val_cases]
        a.aug_on = a.aug_on if a.aug_on != "auto" else ("device" if ctx.cuda else "workers")
        train_ds = data.PretrainDataset(a.data, train_cases, a.patch, a.aug, a.seed, aug_on=a.aug_on, order=INTERP[a.interp])
        val_ds = data.PretrainDataset(a.data, val_cases, a.patch, "none", a.seed + 1) if val_cases else None
    spe = a.steps_per_epoch or max(1, len(train_cases) // (a.batch * ctx.world))
    total = a.steps or a.epochs * spe
    warmup = round(total * a.warmup_epochs / a.epochs)
    in_ch = int(ds_json.get("n_channels", 1))

    # -- model, optimiser, precision ------------------------------------------
    torch.manual_seed(a.seed)
    pre = load_pretrained_file(a.init, "--init") if a.init and ck is None else None
    if pre is not None:  # a released file says which network it is (and how SwinUNETR merges patches)
        if "arch" in a.given and a.arch != pre["arch"]:
            raise UserError(f"--init {a.init} holds {pre['arch']} weights, but --arch is {a.arch}")
        a.arch, a.legacy_merge = pre["arch"], pre["legacy_merge"]
        check_patch(a.arch, a.patch)
    model = build_model(a.arch, in_channels=in_ch, mode="pretrain", checkpointing=a.checkpointing, legacy_merge=a.legacy_merge)
    if a.arch == "swinunetr" and a.method != "swin_ssl":
        # masked modelling uses only the reconstruction head; frozen heads keep DDP
        # from waiting for gradients that never come
        model.decoder.rotation_head.requires_grad_(False), model.decoder.contrastive_head.requires_grad_(False)
    if pre is not None:
        fresh = load_weights_by_name(model, pre, a.init)
        say(f"init: loaded {len(model.state_dict()) - len(fresh)} tensors from {a.init}; "
            f"re-initialised {len(fresh)}" + (f": {', '.join(fresh[:8])}" + (" ..." if len(fresh) > 8 else "") if fresh else ""))
    model.to(ctx.device)
    a.dtype, autocast, scaler = precision(ctx.device, a.dtype)
    opt = make_optimizer(model.parameters(), "adamw", a.lr, a.wd, ctx.device)
    step = restore(ck, model, opt, scaler)
    net = wrap(model, a.compile, ctx)
    log = open_run(out, a, ck, step, ctx)
    if ctx.master:
        (out / "samples").mkdir(exist_ok=True)
    say(describe(model))
    say(f"{a.method}: {len(train_cases)} train / {len(val_cases)} validation volumes, {ctx.world} process(es) x batch {a.batch}, "
        f"patch {a.patch}^3, {total} steps ({spe} per epoch, warm-up {warmup}), {a.dtype} on {ctx.device.type}, aug {a.aug}")

    saved = ck["step"] if ck is not None else None  # the step of the last good checkpoint

    def checkpoint():
        """ckpt.pt (everything to resume) and encoder.pt (for finetune.py); finite weights only."""
        save_all(ctx, [({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                         "step": step, "epoch": step // spe, "total": total, "world": ctx.world,
                         "rng": torch.get_rng_state(), "args": vars(a), "arch": a.arch, "in_channels": in_ch,
                         "train_cases": train_cases, "val_cases": val_cases}, out / "ckpt.pt", True),
                        ({"arch": a.arch, "in_channels": in_ch, "method": a.method, "step": step,
                          "encoder": model.encoder.state_dict()}, out / "encoder.pt", False)])

    @torch.no_grad()
    def validate():
        """Each validation volume once, rank r taking every W-th; losses all-reduced.
        The unwrapped model runs it, since ranks may see different numbers of volumes."""
        if val_ds is None:
            return None
        model.eval()
        tot = cnt = 0.0
        for k in range(ctx.rank, len(val_cases), ctx.world):
            inp, target, _ = val_ds.sample(k)
            inp, target = inp[None].to(ctx.device), target[None].to(ctx.device)
            loss, _, (x, y, t) = compute_loss(model, inp, target, a, (a.seed, 2 ** 31 - 1, k), autocast)
            tot, cnt = tot + loss.item(), cnt + 1
            if k == 0:  # rank 0 writes the first example
                for name, v in (("input", x), ("reconstruction", y), ("target", t)):
                    save_nifti(out / "samples" / f"step{step:07d}_{name}.nii.gz", v[0].float().cpu())
        model.train()
        tot, cnt = all_sum(ctx, tot, cnt)
        return tot / cnt

    if step >= total:
        say(f"{out} is already finished ({step} of {total} steps)")
        return model
    loader = make_loader(train_ds, a.batch, step, total - step, ctx, a.workers)
    meter = Interval(ctx, a.max_bad_steps, a.dtype == "fp16")
    net.train()
    for s, epoch, batch in steps(loader, step, total, spe, meter, a.quiet):
        if a.aug_on == "device":  # crop-padded regions (B, C, 181, 181, 181) and sample numbers: augment here
            inp, target = data.augment_batch(train_ds, *batch)  # (B, C, P, P, P) each
        else:  # augmented in the workers
            inp, target = (t.float() for t in batch)
        lr = lr_at(s, total, warmup, a.lr)
        set_lr(opt, lr)
        loss, parts, _ = compute_loss(net, inp, target, a, (a.seed, s, ctx.rank), autocast)
        skipped = guarded_step(loss, opt, scaler, a.grad_clip, a.dtype == "fp16")
        meter.add(s, loss, skipped, parts)
        step = s + 1
        epoch_end = step % spe == 0 or step == total
        if step % a.log_every == 0 or step == total or epoch_end or step % a.ckpt_every == 0:
            meter.check(log, out / "ckpt.pt", saved)  # skipped steps: logged, or too many in a row: stop
        if step % a.log_every == 0 or step == total:
            log(dict(step=step, epoch=epoch, lr=lr, **meter.row(a.batch * ctx.world)))
        if epoch_end:
            v = validate()
            if v is not None:
                log({"step": step, "epoch": epoch, "val_loss": v})
            say(f"epoch {epoch}: step {step}/{total}" + (f", validation loss {v:.4f}" if v is not None else ""))
        if epoch_end or step % a.ckpt_every == 0:
            try:
                checkpoint()
            except StopRun as e:
                raise stopped(step, str(e), out / "ckpt.pt", saved) from None
            saved = step
        if epoch_end or step % a.ckpt_every == 0:
            meter.restart()  # validation and saving are not data wait
    say(f"done: {out / 'encoder.pt'} (for finetune.py --pretrained), log {out / 'log.jsonl'}, samples {out / 'samples'}")
    return model


def main(argv=None):
    """Exit status: 0 done, 1 stopped (non-finite steps or weights, a full disk), 2 bad flags or inputs."""
    return run_main("pretrain.py", train, get_args(argv))


if __name__ == "__main__":
    sys.exit(main())
