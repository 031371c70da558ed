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

Defaults are the paper's (REFERENCE.md section 2): patch 128, batch 8 per process,
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
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from models import ARCHS, build_model, describe, patch_rule

METHODS = ("amaes", "mae", "swin_ssl")
# flags that may be given anew when a run is resumed: they change where or how fast, not the result
RUNTIME_FLAGS = {"out", "data", "resume", "workers", "compile", "log_every", "ckpt_every", "checkpointing", "quiet", "device"}


class StopRun(Exception):
    """The run cannot go on (repeated non-finite losses): exit 1 with this message."""


def get_args(argv=None):
    """Parsed flags, checked; a.given holds the flags whose value is not the default."""
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="unet_b", choices=list(ARCHS), help="network (default unet_b)")
    p.add_argument("--method", default="amaes", choices=METHODS, help="amaes (default), mae, or swin_ssl (swinunetr only)")
    p.add_argument("--data", default="demo/preprocessed", help="preprocessed dataset (preprocess.py output; default demo/preprocessed)")
    p.add_argument("--out", default="runs/pretrain", help="run folder (default runs/pretrain)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt.pt with its saved settings; "
                   "start it when --out has no ckpt.pt yet (so a rerun of the same command picks up where it stopped)")
    p.add_argument("--init", metavar="CKPT", help="start from another run's weights (ckpt.pt or encoder.pt): tensors that match "
                   "by name and shape load, the rest are listed and keep their fresh initialisation")
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
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of volumes held out for validation (default 0.01; at least 1)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="autocast dtype (default auto: bf16 on GPUs that support it, else fp16 + GradScaler; fp32 on CPU)")
    p.add_argument("--grad-clip", type=float, default=0, help="clip the gradient norm to this (default 0 = off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (less memory, ~30 %% more compute)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (default: cores per process - 1, at most 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples, masks, split and initialisation (default 0)")
    p.add_argument("--log-every", type=int, default=20, help="log.jsonl line every N steps (default 20)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="write ckpt.pt every N steps, besides each epoch end (default 1000)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row (default 5)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="default auto: cuda when available")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
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
    for name in ("batch", "epochs", "steps_per_epoch", "steps", "log_every", "ckpt_every", "max_bad_steps"):
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.workers is not None and a.workers < 0:
        p.error("--workers must be >= 0")
    a.given = sorted(k for k, v in vars(a).items() if v != p.get_default(k))
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
    tmp = path.with_name(".tmp-" + path.name)
    nib.save(nib.Nifti1Image(x, np.eye(4)), tmp)
    os.replace(tmp, path)


def save_atomic(obj, path):
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_weights_by_name(model, path):
    """--init: copy every tensor of a ckpt.pt (its model) or encoder.pt (its encoder)
    whose name and shape match; return the names left at their fresh initialisation."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--init {path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or not ("model" in ck or "encoder" in ck):
        raise ValueError(f"--init {path}: neither a ckpt.pt (with 'model') nor an encoder.pt (with 'encoder')")
    if ck.get("arch", model.arch) != model.arch:
        raise ValueError(f"--init {path}: weights of {ck['arch']!r}, but --arch is {model.arch!r}")
    state = ck["model"] if "model" in ck else {"encoder." + k: v for k, v in ck["encoder"].items()}
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fits:
        raise ValueError(f"--init {path}: no tensor matches {model.arch} by name and shape")
    model.load_state_dict(fits, strict=False)
    return sorted(set(own) - set(fits))


# -----------------------------------------------------------------------------

def train(a):
    """The whole run for flags `a`; returns the (unwrapped) model."""
    out = Path(a.out)

    # -- distributed setup (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE) ------
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    master = rank == 0
    say = print if master else (lambda *x, **k: None)

    # -- resume or fresh start ------------------------------------------------
    ck = None
    if a.resume and (out / "ckpt.pt").exists():
        ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
        saved = ck["args"]
        ignored = [k for k in a.given if k not in RUNTIME_FLAGS and saved.get(k) != getattr(a, k)]
        for k, v in saved.items():  # the saved settings, except runtime flags given now (e.g. a moved --data)
            if k not in ("out", "resume", "given") and not (k in RUNTIME_FLAGS and k in a.given):
                setattr(a, k, v)
        if ignored:
            say(f"resume: the run's saved settings are kept; ignored --{', --'.join(k.replace('_', '-') for k in ignored)}")
        if ck["world"] != world:
            raise ValueError(f"--resume: {out} was trained with {ck['world']} processes and this launch has {world}; "
                             "resume with the same --nproc_per_node so the sample order continues exactly")
    elif (out / "ckpt.pt").exists():
        raise FileExistsError(f"{out} already holds a run (ckpt.pt); pass --resume to continue it or choose another --out")
    elif a.resume:
        say(f"--resume: {out} has no checkpoint yet; starting the run")

    # -- data ---------------------------------------------------------------
    ds_json = data.read_dataset(a.data)
    cases = sorted(c["case"] for c in ds_json["cases"] if c["split"] == "train") or sorted(c["case"] for c in ds_json["cases"])
    n_val = max(1, round(a.val_fraction * len(cases))) if a.val_fraction > 0 and len(cases) > 1 else 0
    val_cases = sorted(np.random.default_rng([a.seed, 99]).choice(cases, n_val, replace=False).tolist()) if n_val else []
    train_cases = [c for c in cases if c not in val_cases]
    train_ds = data.PretrainDataset(a.data, train_cases, a.patch, a.aug, a.seed)
    val_ds = data.PretrainDataset(a.data, val_cases, a.patch, "none", a.seed + 1) if val_cases else None
    spe = a.steps_per_epoch or max(1, len(train_cases) // (a.batch * world))
    total = a.steps or a.epochs * spe
    warmup = round(total * a.warmup_epochs / a.epochs)
    in_ch = int(ds_json.get("n_channels", 1))
    workers = a.workers if a.workers is not None else min(10, max(1, (os.cpu_count() or 2) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))) - 1))

    # -- model, optimiser, precision ---------------------------------------
    torch.manual_seed(a.seed)
    model = build_model(a.arch, in_channels=in_ch, mode="pretrain", checkpointing=a.checkpointing)
    if a.arch == "swinunetr" and a.method != "swin_ssl":
        # masked modelling uses only the reconstruction head; frozen heads keep DDP
        # from waiting for gradients that never come
        model.decoder.rotation_head.requires_grad_(False), model.decoder.contrastive_head.requires_grad_(False)
    if a.init and ck is None:
        fresh = load_weights_by_name(model, a.init)
        say(f"init: loaded {len(model.state_dict()) - len(fresh)} tensors from {a.init}; "
            f"re-initialised {len(fresh)}" + (f": {', '.join(fresh[:8])}" + (" ..." if len(fresh) > 8 else "") if fresh else ""))
    model.to(device)
    if a.dtype == "auto":
        a.dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if a.dtype == "fp16" and not cuda:
        raise ValueError("--dtype fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[a.dtype]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=a.dtype == "fp16")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=a.wd)
    step = 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
        step = ck["step"]
    net = torch.compile(model) if a.compile else model
    if world > 1:
        net = DDP(net, device_ids=[local] if cuda else None)

    if master:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(a), indent=1))
        if ck is not None and (out / "log.jsonl").exists():
            # drop lines a killed run wrote after its last checkpoint: they will be redone
            keep = [ln for ln in (out / "log.jsonl").read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            (out / "log.jsonl").write_text("".join(ln + "\n" for ln in keep))
    say(describe(model))
    say(f"{a.method}: {len(train_cases)} train / {len(val_cases)} validation volumes, {world} process(es) x batch {a.batch}, "
        f"patch {a.patch}^3, {total} steps ({spe} per epoch, warm-up {warmup}), {a.dtype} on {device.type}, aug {a.aug}")

    def log(row):
        if master:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def checkpoint():
        if not master:
            return
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "step": step, "epoch": step // spe, "total": total, "world": world, "rng": torch.get_rng_state(),
                     "args": vars(a), "arch": a.arch, "in_channels": in_ch, "train_cases": train_cases,
                     "val_cases": val_cases}, out / "ckpt.pt")
        save_atomic({"arch": a.arch, "in_channels": in_ch, "method": a.method, "step": step,
                     "encoder": model.encoder.state_dict()}, out / "encoder.pt")

    def all_sum(*xs):
        t = torch.tensor(xs, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    @torch.no_grad()
    def validate():
        """Each validation volume once, rank r taking every W-th; losses all-reduced.
        The unwrapped model runs it, since ranks may see different numbers of volumes."""
        if val_ds is None:
            return None
        model.eval()
        tot = cnt = 0.0
        for k in range(rank, len(val_cases), world):
            inp, target, _ = val_ds.sample(k)
            inp, target = inp[None].to(device), target[None].to(device)
            loss, _, (x, y, t) = compute_loss(model, inp, target, a, (a.seed, 2 ** 31 - 1, k), autocast)
            tot, cnt = tot + loss.item(), cnt + 1
            if k == 0:  # rank 0 writes the first example
                for name, v in (("input", x), ("reconstruction", y), ("target", t)):
                    save_nifti(out / "samples" / f"step{step:07d}_{name}.nii.gz", v[0].float().cpu())
        model.train()
        tot, cnt = all_sum(tot, cnt)
        return tot / cnt

    if step >= total:
        say(f"{out} is already finished ({step} of {total} steps)")
        return model
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=a.batch, sampler=data.StepSampler(step, total - step, a.batch, rank, world),
        num_workers=workers, pin_memory=cuda, prefetch_factor=4 if workers else None, persistent_workers=False)
    batches = iter(loader)
    net.train()
    bad = 0
    win = dict(loss=0.0, n=0, steps=0, wait=0.0, time=0.0)  # the current log interval
    bar = None
    t_end = time.perf_counter()
    while step < total:
        epoch = step // spe
        if bar is None and not a.quiet and master:
            bar = tqdm(total=min(spe, total - epoch * spe), initial=step - epoch * spe, desc=f"epoch {epoch}", leave=False)
        inp, target = next(batches)  # (B, C, P, P, P) each
        inp, target = inp.to(device, non_blocking=True), target.to(device, non_blocking=True)
        t_data = time.perf_counter()
        lr = lr_at(step, total, warmup, a.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, parts, _ = compute_loss(net, inp, target, a, (a.seed, step, rank), autocast)
        # every rank must agree before backward, or DDP's all-reduce would hang
        finite = all_sum(float(torch.isfinite(loss)))[0] == world
        if finite:
            scaler.scale(loss).backward()
            if a.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
            scaler.step(opt)
            scaler.update()
            bad = 0
        else:
            bad += 1
            log({"step": step, "skipped": "non-finite loss", "lr": lr})
            say(f"step {step}: non-finite loss, step skipped ({bad} in a row)")
            if bad >= a.max_bad_steps:
                raise StopRun(f"stopped at step {step}: {bad} non-finite losses in a row. Lower --lr, set --grad-clip, "
                              f"or use --dtype fp32; resume from the last checkpoint with --resume")
        opt.zero_grad(set_to_none=True)
        step += 1
        lv = loss.item()
        now = time.perf_counter()
        win["wait"] += t_data - t_end
        win["time"] += now - t_end
        win["steps"] += 1
        step_time, t_end = now - t_end, now
        if finite:
            win["loss"], win["n"] = win["loss"] + lv, win["n"] + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.4f}", samples_s=f"{a.batch * world / step_time:.1f}")
        if step % a.log_every == 0 or step == total:
            loss_sum, n = all_sum(win["loss"], win["n"])
            row = {"step": step, "epoch": epoch, "loss": loss_sum / n if n else None, "lr": lr,
                   "samples_per_s": round(a.batch * world * win["steps"] / win["time"], 2),
                   "data_wait": round(win["wait"] / win["time"], 4),
                   "peak_gb": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if cuda else None}
            row.update({k: round(v.item(), 5) for k, v in parts.items()})
            log(row)
            win = dict(loss=0.0, n=0, steps=0, wait=0.0, time=0.0)
        epoch_end = step % spe == 0 or step == total
        if epoch_end:
            if bar is not None:
                bar.close()
                bar = None
            v = validate()
            if v is not None:
                log({"step": step, "epoch": epoch, "val_loss": v})
            say(f"epoch {epoch}: step {step}/{total}, train loss {lv:.4f}" + (f", validation loss {v:.4f}" if v is not None else ""))
        if epoch_end or step % a.ckpt_every == 0:
            checkpoint()
            t_end = time.perf_counter()  # validation and saving are not data wait
    say(f"done: {out / 'encoder.pt'} (for finetune.py --pretrained), log {out / 'log.jsonl'}, samples {out / 'samples'}")
    return model


def main(argv=None):
    """Exit status: 0 done, 1 stopped by non-finite losses, 2 bad flags or inputs (one line, no traceback)."""
    a = get_args(argv)
    try:
        train(a)
        return 0
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # the types the checks above raise
        print(f"pretrain.py: error: {e}", file=sys.stderr)
        return 2
    except StopRun as e:
        print(f"pretrain.py: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
