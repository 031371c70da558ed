"""
Few-shot finetuning: a pretrained encoder, a new U-Net decoder, n labelled cases.

    torchrun --nproc_per_node=G finetune.py --arch unet_b --data OUT --pretrained RUN/encoder.pt --n-train 20 --seed 0 --out FT
    python finetune.py --arch unet_b --data OUT --pretrained none --n-train 20 --out FT_scratch   # from scratch
    python finetune.py --out FT --resume

The encoder's weights come from pretrain.py's RUN/encoder.pt (the transfer is reported
tensor by tensor; a 1-channel encoder serves a 4-channel task through the first-conv
adaptation of models.load_encoder); the decoder is new. --n-train cases are drawn from
the train split by --seed (data.select_few_shot) and saved in FT/cases.json; up to
--val-cases of the remaining train cases are held out for validation (never test cases).

Defaults are the paper's (REFERENCE.md section 5): 500 epochs x 100 batches of 8,
patch 128, AdamW lr 1e-4 wd 3e-5, cosine annealing per epoch with T_max 575 and
eta_min 1e-9, foreground oversampling 0.33, loss soft Dice (softmax, background
included, per sample, smooth 1) + CE. Augmentation: the spatial preset when finetuning,
the full AMAES preset from scratch (--aug overrides). Same DDP, AMP, checkpoint, resume
and non-finite-loss rules as pretrain.py.

FT/ holds args.json, cases.json, log.jsonl, ckpt.pt (last state, for --resume and
evaluate.py --checkpoint last) and best.pt (weights with the best validation Dice,
what evaluate.py reads by default). Validation: sliding-window inference over each
held-out volume (evaluate.py's functions), Dice per foreground label on the
preprocessed grid, every --val-every epochs and at the end.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from evaluate import autocast_for, case_metrics, sliding_window
from models import ARCHS, build_model, describe, patch_rule, load_encoder

RUNTIME_FLAGS = {"out", "data", "resume", "workers", "compile", "log_every", "ckpt_every", "checkpointing", "quiet", "device"}


class StopRun(Exception):
    """The run cannot go on (repeated non-finite losses): exit 1 with this message."""


def get_args(argv=None):
    """Parsed flags, checked; a.given holds the flags whose value is not the default."""
    p = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="unet_b", choices=list(ARCHS), help="network (default unet_b)")
    p.add_argument("--decoder", choices=("unet", "native"), help="MedNeXt only: U-Net decoder (default, the paper) or MedNeXt's own")
    p.add_argument("--data", default="demo/preprocessed", help="preprocessed labelled dataset (default demo/preprocessed)")
    p.add_argument("--pretrained", help="encoder.pt of a pretrain.py run, or 'none' to train from scratch (required)")
    p.add_argument("--out", default="runs/finetune", help="run folder (default runs/finetune)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its ckpt.pt with its saved settings; "
                   "start it when --out has no ckpt.pt yet (so a rerun of the same command picks up where it stopped)")
    p.add_argument("--n-train", default="20", help="labelled training cases, drawn by --seed from the train split, or 'all' (default 20)")
    p.add_argument("--val-cases", type=int, default=5, help="held-out train cases for validation (default 5; 0 = none)")
    p.add_argument("--patch", type=int, default=128, help="cubic patch side (default 128)")
    p.add_argument("--batch", type=int, default=8, help="batch per process (default 8)")
    p.add_argument("--epochs", type=int, default=500, help="epochs (default 500)")
    p.add_argument("--steps-per-epoch", type=int, default=100, help="batches per epoch (default 100)")
    p.add_argument("--steps", type=int, help="total steps instead of epochs x steps per epoch; the schedule shrinks to fit")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--wd", type=float, default=3e-5, help="AdamW weight decay (default 3e-5)")
    p.add_argument("--t-max", type=float, default=575, help="cosine annealing period in epochs (default 575)")
    p.add_argument("--eta-min", type=float, default=1e-9, help="cosine annealing floor (default 1e-9)")
    p.add_argument("--fg-p", type=float, default=0.33, help="share of patches centred on a labelled voxel (default 0.33)")
    p.add_argument("--loss", default="dice_ce", choices=("dice_ce", "dice", "ce"), help="soft Dice + CE 1:1 (default), or one of them")
    p.add_argument("--dice-smooth", type=float, default=1.0, help="soft Dice smoothing term (default 1)")
    p.add_argument("--aug", choices=data.PRESETS, help="augmentation preset (default spatial when finetuning, all from scratch)")
    p.add_argument("--val-every", type=int, default=50, help="validate every N epochs, and at the end (default 50)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in validation (default 0.5)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="autocast dtype (default auto: bf16 on GPUs that support it, else fp16 + GradScaler; fp32 on CPU)")
    p.add_argument("--grad-clip", type=float, default=0, help="clip the gradient norm to this (default 0 = off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (less memory, ~30 %% more compute)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (default: cores per process - 1, at most 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the case selection, samples and initialisation (default 0)")
    p.add_argument("--log-every", type=int, default=20, help="log.jsonl line every N steps (default 20)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="write ckpt.pt every N steps, besides each epoch end (default 1000)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row (default 5)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="default auto: cuda when available")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    a.given = sorted(k for k, v in vars(a).items() if v != p.get_default(k))
    if a.resume and Path(a.out, "ckpt.pt").exists():
        return a  # the rest comes from the run's checkpoint
    if a.pretrained is None:
        p.error("--pretrained is required: RUN/encoder.pt from pretrain.py, or 'none' to train from scratch")
    if a.pretrained != "none" and not Path(a.pretrained).is_file():
        p.error(f"--pretrained {a.pretrained}: no such file (give RUN/encoder.pt, or 'none')")
    if a.decoder and not a.arch.startswith("mednext"):
        p.error("--decoder is for MedNeXt only")
    divisor, minimum = patch_rule(a.arch)
    if a.patch % divisor or a.patch < minimum:
        p.error(f"--patch {a.patch}: {a.arch} needs a multiple of {divisor}, at least {minimum}")
    if a.n_train != "all" and not (a.n_train.isdigit() and int(a.n_train) >= 1):
        p.error(f"--n-train {a.n_train}: a positive number or 'all'")
    for name in ("batch", "epochs", "steps_per_epoch", "steps", "log_every", "ckpt_every", "max_bad_steps", "val_every"):
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.workers is not None and a.workers < 0 or a.val_cases < 0 or not 0 <= a.fg_p <= 1 or not 0 <= a.overlap < 1:
        p.error("--workers and --val-cases >= 0, --fg-p in [0, 1], --overlap in [0, 1)")
    if a.aug is None:
        a.aug = "all" if a.pretrained == "none" else "spatial"
    return a


# -----------------------------------------------------------------------------

def lr_at(step, steps_per_epoch, epochs, total, a):
    """Cosine annealing stepped per epoch (T_max in epochs, eta_min floor). With --steps
    the run has fewer epochs and T_max shrinks in proportion."""
    t_max = a.t_max * math.ceil(total / steps_per_epoch) / epochs  # = a.t_max for the full run
    e = step // steps_per_epoch
    return a.eta_min + (a.lr - a.eta_min) * (1 + math.cos(math.pi * e / t_max)) / 2


def seg_loss(logits, seg, kind="dice_ce", smooth=1.0):
    """logits (B, K, *S), seg (B, *S) class indices. Soft Dice: softmax, background
    included, per sample and class, then averaged; CE over voxels; summed 1:1."""
    logits = logits.float()
    out = 0
    if kind in ("dice_ce", "ce"):
        out = out + F.cross_entropy(logits, seg)
    if kind in ("dice_ce", "dice"):
        p = logits.softmax(1)
        g = F.one_hot(seg, logits.shape[1]).movedim(-1, 1).float()
        dims = tuple(range(2, logits.dim()))
        dice = (2 * (p * g).sum(dims) + smooth) / (p.sum(dims) + g.sum(dims) + smooth)  # (B, K)
        out = out + 1 - dice.mean()
    return out


def save_atomic(obj, path):
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_pretrained(model, path):
    """models.load_encoder on a file, with one clear line for a file that is not an encoder."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--pretrained {path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    try:
        return load_encoder(model, ck)
    except ValueError as e:
        raise ValueError(f"--pretrained {path}: {e}") from None


def train(a):
    """The whole run for flags `a`; returns the (unwrapped) model."""
    out = Path(a.out)
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

    ck = None
    if a.resume and (out / "ckpt.pt").exists():
        ck = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
        for k, v in ck["args"].items():  # the saved settings, except runtime flags given now (e.g. a moved --data)
            if k not in ("out", "resume", "given") and not (k in RUNTIME_FLAGS and k in a.given):
                setattr(a, k, v)
        if ck["world"] != world:
            raise ValueError(f"--resume: {out} was trained with {ck['world']} processes and this launch has {world}; "
                             "resume with the same --nproc_per_node so the sample order continues exactly")
    elif (out / "ckpt.pt").exists():
        raise FileExistsError(f"{out} already holds a run (ckpt.pt); pass --resume to continue it or choose another --out")
    elif a.resume:
        say(f"--resume: {out} has no checkpoint yet; starting the run")

    # -- cases: n-shot training set, held-out validation cases -----------------
    ds_json = data.read_dataset(a.data)
    if not ds_json.get("labelled", True) or "label_values" not in ds_json:
        raise ValueError(f"{a.data} has no labels; finetuning needs an nnU-Net-style labelled dataset")
    pool = sorted(c["case"] for c in ds_json["cases"] if c["split"] == "train")
    chosen = data.select_few_shot(pool, a.n_train, a.seed)
    rest = [c for c in pool if c not in chosen]
    val_cases = sorted(np.random.default_rng([a.seed, 98]).choice(rest, min(a.val_cases, len(rest)), replace=False).tolist()) if rest else []
    values = [int(v) for v in ds_json["label_values"]]  # e.g. BraTS [0, 1, 2, 4]: class k is values[k]
    in_ch = int(ds_json.get("n_channels", 1))
    train_ds = data.SegDataset(a.data, chosen, a.patch, a.aug, a.seed, a.fg_p)
    spe = a.steps_per_epoch
    total = a.steps or a.epochs * spe
    workers = a.workers if a.workers is not None else min(10, max(1, (os.cpu_count() or 2) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))) - 1))

    # -- model: pretrained encoder, fresh decoder -----------------------------
    torch.manual_seed(a.seed)
    model = build_model(a.arch, in_ch, len(values), decoder=a.decoder, checkpointing=a.checkpointing)
    if ck is None and a.pretrained != "none":
        rep = load_pretrained(model, a.pretrained)
        n_dec = len(model.decoder.state_dict())
        say(f"transfer from {a.pretrained}: {len(rep['loaded'])} encoder tensors loaded"
            + (f" ({', '.join(rep['adapted'])} adapted to {in_ch} channels)" if rep["adapted"] else "")
            + f"; decoder ({n_dec} tensors) freshly initialised")
    elif ck is None:
        say("from scratch: no pretrained encoder")
    model.to(device)
    lut = torch.zeros(256, dtype=torch.long, device=device)
    lut[values] = torch.arange(len(values), device=device)  # label value -> class index
    a.dtype, autocast = autocast_for(device, a.dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=a.dtype == "fp16")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=a.wd)
    step, best = 0, -1.0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
        step, best = ck["step"], ck["best"]
    net = torch.compile(model) if a.compile else model
    if world > 1:
        net = DDP(net, device_ids=[local] if cuda else None)

    facts = {"arch": a.arch, "in_channels": in_ch, "label_values": values, "labels": ds_json.get("labels"),
             "patch": a.patch, "decoder": a.decoder}
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(a), indent=1))
        (out / "cases.json").write_text(json.dumps({"n_train": a.n_train, "seed": a.seed, "train": chosen, "val": val_cases}, indent=1))
        if ck is not None and (out / "log.jsonl").exists():
            # drop lines a killed run wrote after its last checkpoint: they will be redone
            keep = [ln for ln in (out / "log.jsonl").read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            (out / "log.jsonl").write_text("".join(ln + "\n" for ln in keep))
    say(describe(model))
    say(f"{len(chosen)}-shot ({a.n_train}, seed {a.seed}) of {len(pool)} train cases, {len(val_cases)} held out for validation; "
        f"{world} process(es) x batch {a.batch}, patch {a.patch}^3, {total} steps ({spe} per epoch), {a.dtype} on {device.type}, aug {a.aug}")

    def log(row):
        if master:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def checkpoint(is_best=False):
        if not master:
            return
        state = dict(facts, model=model.state_dict(), step=step, best=best)
        save_atomic(dict(state, optimizer=opt.state_dict(), scaler=scaler.state_dict(), total=total, world=world,
                         rng=torch.get_rng_state(), args=vars(a), train_cases=chosen, val_cases=val_cases), out / "ckpt.pt")
        if is_best or not val_cases:
            save_atomic(state, out / "best.pt")

    def all_sum(*xs):
        t = torch.tensor(xs, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    @torch.no_grad()
    def validate():
        """Mean foreground Dice over the held-out cases (nanmean), rank r taking every W-th."""
        model.eval()
        tot = cnt = 0.0
        for case in val_cases[rank::world]:
            img = torch.from_numpy(np.load(Path(a.data, "images", f"{case}.npy")).astype(np.float32)).to(device)
            ref = np.load(Path(a.data, "labels", f"{case}.npy"))
            pred = torch.tensor(values, device=device)[sliding_window(model, img, a.patch, a.overlap, autocast=autocast).argmax(0)]
            for m in case_metrics(pred.cpu().numpy(), ref, (1.0, 1.0, 1.0), values).values():
                if not math.isnan(m["dice"]):
                    tot, cnt = tot + m["dice"], cnt + 1
        model.train()
        tot, cnt = all_sum(tot, cnt)
        return tot / cnt if cnt else float("nan")

    if step >= total:
        say(f"{out} is already finished ({step} of {total} steps)")
        return model
    loader = torch.utils.data.DataLoader(
        train_ds, batch_size=a.batch, sampler=data.StepSampler(step, total - step, a.batch, rank, world),
        num_workers=workers, pin_memory=cuda, prefetch_factor=4 if workers else None)
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
        img, seg = next(batches)  # (B, C, P, P, P), (B, P, P, P) label values
        img, seg = img.to(device, non_blocking=True), seg.to(device, non_blocking=True)
        t_data = time.perf_counter()
        lr = lr_at(step, spe, a.epochs, total, a)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast:
            logits = net(img)  # (B, K, P, P, P)
        loss = seg_loss(logits, lut[seg], a.loss, a.dice_smooth)
        finite = all_sum(float(torch.isfinite(loss)))[0] == world  # every rank agrees before backward
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
            log({"step": step, "epoch": epoch, "loss": loss_sum / n if n else None, "lr": lr,
                 "samples_per_s": round(a.batch * world * win["steps"] / win["time"], 2),
                 "data_wait": round(win["wait"] / win["time"], 4),
                 "peak_gb": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2) if cuda else None})
            win = dict(loss=0.0, n=0, steps=0, wait=0.0, time=0.0)
        epoch_end = step % spe == 0 or step == total
        is_best = False
        if epoch_end:
            if bar is not None:
                bar.close()
                bar = None
            msg = f"epoch {epoch}: step {step}/{total}, loss {lv:.4f}"
            if val_cases and ((epoch + 1) % a.val_every == 0 or step == total):
                v = validate()
                is_best = not math.isnan(v) and v > best
                best = max(best, v) if not math.isnan(v) else best
                log({"step": step, "epoch": epoch, "val_dice": v, "best": best})
                msg += f", validation Dice {v:.4f} (best {best:.4f})"
            say(msg)
        if epoch_end or step % a.ckpt_every == 0:
            checkpoint(is_best)
            t_end = time.perf_counter()  # validation and saving are not data wait
    say(f"done: {out / 'best.pt'} ({f'best validation Dice {best:.4f}' if val_cases else 'no validation cases: the last weights'}), "
        f"{out / 'ckpt.pt'} (last); "
        f"next: python evaluate.py --run {out} --data {a.data}")
    return model


def main(argv=None):
    """Exit status: 0 done, 1 stopped by non-finite losses, 2 bad flags or inputs (one line, no traceback)."""
    a = get_args(argv)
    try:
        train(a)
        return 0
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # the types the checks above raise
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 2
    except StopRun as e:
        print(f"finetune.py: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
