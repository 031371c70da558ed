"""
The run plumbing that pretrain.py and finetune.py share, as plain functions in the
order a training script uses them (facebookresearch/mae's util/misc.py is the model).
Each script keeps its own loop inline; this file holds only what both loops need.

    ctx = setup(a.device)                               # torchrun's RANK / LOCAL_RANK / WORLD_SIZE
    ck = resume_or_start(a, out, ctx)                   # the folder's lock; ckpt.pt (or _prev) with --resume, else None
    data.check_cases(a.data, cases)                     # every .npy's header and size, before the first step
    a.dtype, autocast, scaler = precision(ctx.device, a.dtype)
    loader = make_loader(dataset, a.batch, step, total - step, ctx, a.workers)
    skipped = guarded_step(loss, opt, scaler, a.grad_clip)          # a device flag: no host sync
    save_all(ctx, [(state, out / "ckpt.pt", True)])     # finite weights only; the previous one kept
    stop_if_signalled(ctx, step, saved, checkpoint, log, meter, (prog, out))  # SIGTERM: save this step, exit 3
    sys.exit(run_main("pretrain.py", train, a))         # exit codes 0 / 1 / 2 / 3

What keeps a week of training safe:
- A step whose loss or gradients are not finite is skipped on the device (GradScaler's
  found-inf switch, used in every dtype), so the weights never take a non-finite
  update; --max-bad-steps such steps in a row stop the run (checked at log steps).
- A checkpoint is written only when every weight is finite, to a temporary file that
  is fsynced and renamed; the previous checkpoint stays as ckpt_prev.pt, so a failed
  or refused save never leaves the run without a good checkpoint.
- ckpt_prev.pt is only replaced by a checkpoint that loads, and only once the new
  ckpt.pt is complete; a full disk (whatever torch.save, gzip or np.save raise) is one
  line naming the file and the free space, the old files intact.
- SIGTERM / SIGINT / SIGUSR1 stop the run at a step boundary all ranks agree on, with
  a checkpoint of that step (exit 3); one run per folder (RUN/.lock, a flock that dies
  with its process); a killed run's temporary files go when the next one starts.
- log.jsonl is trimmed on every start to the checkpoint's step (a line cut short by a
  kill is dropped) and JSON written by the kit never holds NaN or Infinity (null).
"""

import contextlib
import errno
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm

from preprocess import clean_json, save_json, unwritable, write_atomic

# flags that may be given anew when a run is resumed: where and how fast it runs, and
# the ways past a divergence (clipping, precision, patience); everything else is the run's
RUNTIME_FLAGS = {
    "out",
    "data",
    "resume",
    "workers",
    "compile",
    "log_every",
    "ckpt_every",
    "checkpointing",
    "quiet",
    "device",
    "grad_clip",
    "dtype",
    "max_bad_steps",
    "aug_on",
    "no_preflight",
    "no_pictures",
}


class UserError(Exception):
    """Bad flags or inputs: one line on stderr, exit status 2, no traceback."""


class StopRun(Exception):
    """The run cannot go on (non-finite steps, weights or a full disk): exit 1 with this message."""


class Interrupted(Exception):
    """SIGTERM / SIGINT / SIGUSR1 stopped the run at a step boundary after saving that
    step: exit EXIT_SIGNAL with this message (how to resume)."""


EXIT_SIGNAL = 3  # "stopped by a signal, the step reached is saved": a requeue script resubmits with --resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@contextlib.contextmanager
def user_input():
    """Errors raised while reading the user's inputs (missing files, bad datasets, bad
    flag values) are the user's: re-raise them as UserError. Used around the setup
    block only, so an error inside the training loop keeps its traceback."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise UserError(str(e)) from None


def add_run_flags(p, ckpt_every=1000):
    """The flags every training script has for how (not what) it runs."""
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its ckpt.pt with its saved settings "
        "(ckpt_prev.pt if ckpt.pt is unreadable); start it when --out has no checkpoint yet, so a rerun of the "
        "same command picks up where it stopped",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="autocast dtype (default auto: bf16 on GPUs that support it, else fp16 + GradScaler; fp32 on CPU)",
    )
    p.add_argument(
        "--grad-clip", type=float, help="clip the gradient norm to this (default: the recipe's, 0 = off; wald 12)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--checkpointing", action="store_true", help="activation checkpointing (less memory, ~30 %% more compute)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader worker processes per training process, 0 = "
        "read in the training process (default: the cores this process may use, minus one)",
    )
    p.add_argument(
        "--aug-on",
        default="auto",
        choices=("auto", "device", "workers"),
        help="where the augmentation runs: batched on the training device after the workers crop, or per "
        "sample in the DataLoader workers (default auto: device on CUDA, workers on CPU); same samples either way",
    )
    p.add_argument("--log-every", type=int, default=20, help="log.jsonl line every N steps (default 20)")
    p.add_argument(
        "--ckpt-every", type=int, default=ckpt_every, help=f"write ckpt.pt every N steps (default {ckpt_every})"
    )
    p.add_argument(
        "--max-bad-steps",
        type=int,
        default=5,
        help="stop after this many steps in a row with a non-finite loss or gradients, each skipped (default 5)",
    )
    p.add_argument(
        "--device", default="auto", choices=("auto", "cuda", "cpu"), help="default auto: cuda when available"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--no-pictures",
        action="store_true",
        help="no PNG pictures (samples, progress.png); they cost well under 1 %% of a run",
    )
    p.add_argument(
        "--no-preflight",
        action="store_true",
        help="skip the check that the run fits in memory, /dev/shm and disk before it starts",
    )


def check_run_flags(p, a, names):
    """argparse errors for any of `names` below 1 (None = not given) and for negative
    --workers; then a.given = the flags whose value is not the default (for resume)."""
    for name in names:
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.workers is not None and a.workers < 0:
        p.error("--workers must be >= 0")
    a.given = sorted(k for k, v in vars(a).items() if v != p.get_default(k))


# -----------------------------------------------------------------------------
# Distributed setup


def setup(device="auto"):
    """Process facts from torchrun's environment; joins the process group (nccl on
    CUDA, gloo on CPU) when there is more than one process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: pick the fastest kernels once
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    master = rank == 0
    # tqdm.write prints above a progress bar instead of through it
    return SimpleNamespace(
        rank=rank,
        world=world,
        local=local,
        device=dev,
        cuda=cuda,
        master=master,
        say=(lambda s: tqdm.write(str(s))) if master else (lambda *x, **k: None),
    )


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()
    STOP.uninstall()
    release_lock()


class StopSignals:
    """SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (SLURM's --signal) ask the run to stop: the
    handler only notes the signal, and the loop stops at the next step boundary, where
    every rank agrees (requested), saves the step reached and exits EXIT_SIGNAL.
    A second signal more than a second after the first exits at once (128 + signal);
    one within a second is the same request delivered twice (the scheduler signals
    torchrun and its workers, and torchrun forwards it). After the stop's checkpoint
    is written, further signals are ignored: the process is on its way out."""

    def __init__(self):
        self.got, self.at, self.saved, self.old, self.pending = None, 0.0, False, {}, None

    def install(self):
        self.got, self.saved, self.pending = None, False, None
        if self.old or not threading_main():
            return
        for s in STOP_SIGNALS:
            self.old[s] = signal.signal(s, self.handler)

    def uninstall(self):
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}

    def handler(self, signum, frame):
        if self.got is None:
            self.got, self.at = signum, time.monotonic()
        elif not self.saved and time.monotonic() - self.at > 1.0:
            os._exit(128 + signum)

    def name(self):
        return signal.Signals(self.got).name if self.got is not None else "a signal to another rank"

    def requested(self, ctx):
        """Whether any rank got a stop signal; the same answer on every rank. One
        process: the flag now. Several: the all-reduced flag of the previous step
        boundary, so the host never waits for the device's current step (every rank
        reads the same collective, so all stop at the same step)."""
        if ctx.world == 1:
            return self.got is not None
        flag = torch.full((1,), float(self.got is not None), device=ctx.device)  # a fill kernel: no host sync
        dist.all_reduce(flag)
        prev, self.pending = self.pending, flag
        return prev is not None and prev.item() > 0


def threading_main():
    import threading

    return threading.current_thread() is threading.main_thread()


STOP = StopSignals()


def worker_signals(worker_id=None):
    """DataLoader worker_init_fn: a signal to the whole process group (Ctrl-C, a
    scheduler's SIGTERM) is the main process's to handle; a worker killed by it would
    end the run with a traceback instead of a checkpoint. SIGINT and SIGUSR1 are
    ignored; SIGTERM is waited for in a thread and obeyed only when it comes from the
    parent (the DataLoader's own terminate()) or the parent is gone."""
    import threading

    for s in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit the mask

    def wait():
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait, daemon=True).start()


def stop_if_signalled(ctx, step, saved, save, log, meter, prog_out):
    """At a step boundary: when a stop signal came (to any rank), save the step reached
    (unless it was just saved), log {"step", "stopped"} and raise Interrupted on every
    rank. save() is the script's checkpoint(); prog_out = (script, out) for the hint."""
    if not STOP.requested(ctx):
        return
    if meter.bar is not None:  # the line that follows starts on a line of its own
        meter.bar.close()
        meter.bar = None
    if saved != step:
        try:
            save()
        except StopRun as e:
            raise stopped(step, str(e), prog_out[1] / "ckpt.pt", saved) from None
    STOP.saved = True
    log({"step": step, "stopped": STOP.name()})
    launch = f"torchrun --nproc_per_node={ctx.world}" if ctx.world > 1 else "python"
    raise Interrupted(
        f"stopped by {STOP.name()} at step {step} ({prog_out[1] / 'ckpt.pt'} saved); resume with: "
        f"{launch} {prog_out[0]} --out {prog_out[1]} --resume"
    )


def all_sum(ctx, *xs):
    """Sum of numbers (or 0-d tensors) over all processes, as a list of floats (one sync)."""
    t = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=ctx.device) for x in xs])
    if ctx.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def gather(ctx, items):
    """Every process's list `items`, joined in rank order, on every process."""
    if ctx.world == 1:
        return list(items)
    parts = [None] * ctx.world
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def default_workers():
    """DataLoader workers per process: the cores this process may use (its CPU
    affinity, shared by the local processes), minus one for the training loop."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))) - 1)


def process_batch(batch, scope, world):
    """Samples per process for --batch read as --batch-scope says: "process" (every process
    loads `batch`: AMAES, Tang, BrainSegFounder) or "total" (split evenly over the processes,
    as nnssl's total_batch_size and nnU-Net's plan batch size; where it does not divide,
    nnssl gives ranks ceil(batch / world) and the last fewer, nnU-Net the first
    batch % world one more: here it must divide)."""
    if scope != "total":
        return batch
    if batch % world:
        raise UserError(
            f"--batch {batch} is the total over {world} processes (--batch-scope total) and must divide by "
            f"{world}; give a multiple of {world}, or --batch-scope process"
        )
    return batch // world


def make_loader(dataset, batch, start_step, steps, ctx, workers=None):
    """The run's one DataLoader: StepSampler order (data.py), so sample k is the same
    whatever the worker count, and a resumed run starts at its next step."""
    from data import StepSampler  # data.py is the only other module that knows the sample order

    workers = default_workers() if workers is None else workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        sampler=StepSampler(start_step, steps, batch, ctx.rank, ctx.world),
        num_workers=workers,
        pin_memory=ctx.cuda,
        prefetch_factor=4 if workers else None,
        worker_init_fn=worker_signals if workers else None,
    )


# -----------------------------------------------------------------------------
# One run per folder

LOCK = {}  # path -> open file holding the lock, for this process's life
NEW_FOLDERS = set()  # run folders lock_folder made (release_lock may remove them again when still empty)


def job_id():
    for k in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID", "TORCHELASTIC_RUN_ID"):
        if os.environ.get(k):
            return f"{k}={os.environ[k]}"
    return None


def lock_folder(folder, what="run"):
    """Take the lock of `folder` (created if missing): FOLDER/.lock, an exclusive
    flock held until this process ends, holding the owner's host, pid and job id.
    Another live process holding it: UserError naming it (one line, exit 2). A lock
    file whose process is gone (killed, node rebooted) holds no flock and is taken
    over, so a killed run never blocks its own resume."""
    import fcntl

    folder = Path(folder)
    if not folder.exists():
        NEW_FOLDERS.add(folder)  # made for this run: a run refused before it wrote anything leaves no folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{folder} is in use by {holder}; wait for it to end, or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(
        f"{what} {Path(sys.argv[0]).name} (host {socket.gethostname()}, pid {os.getpid()}"
        + (f", job {job_id()}" if job_id() else "")
        + ")\n"
    )
    f.flush()
    LOCK[path] = f


def release_lock(discard_new=False):
    """Close the locks this process holds; their files stay (unlinking one could let two
    later processes lock two files). discard_new: a folder the lock itself created and
    that holds nothing else (a run refused before its first write) is removed."""
    for path, f in LOCK.items():
        if discard_new and path.parent in NEW_FOLDERS and [p.name for p in path.parent.iterdir()] == [".lock"]:
            path.unlink()
            path.parent.rmdir()
        f.close()
    LOCK.clear()
    NEW_FOLDERS.clear()


def lock_run(out, ctx):
    """Rank 0 takes the lock of the run folder (lock_folder); every rank learns
    whether it did, so all stop alike."""
    err = None
    if ctx.master:
        try:
            lock_folder(out)
        except UserError as e:
            err = e
    if all_sum(ctx, err is not None)[0]:
        raise err or UserError(f"{out} is in use by another process")


# -----------------------------------------------------------------------------
# Resume


def find_checkpoint(out):
    """(path, checkpoint) of the newest readable checkpoint in `out` (ckpt.pt, else
    ckpt_prev.pt), or (None, None)."""
    for name in ("ckpt.pt", "ckpt_prev.pt"):
        p = out / name
        if p.exists():
            try:
                return p, torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:
                print(
                    f"warning: {p} is not readable ({type(e).__name__}); trying the previous checkpoint",
                    file=sys.stderr,
                )
    return None, None


def flag_names(keys):
    return ", ".join("--" + k.replace("_", "-") for k in keys)


def resume_or_start(a, out, ctx, runtime_flags=RUNTIME_FLAGS, script=None):
    """With --resume: the run's checkpoint, its saved settings copied onto `a` except
    the runtime flags given now (a moved --data, more --workers, a --grad-clip to get
    past a divergence); the flags that cannot change are named. Without --resume a
    folder that holds a run is refused, so nothing is overwritten by accident; so is a
    run of the other script (`script`: "pretrain.py" or "finetune.py") and an --out
    that cannot be written."""
    why = unwritable(out)
    if why:
        raise UserError(f"--out {out}: {why}; choose another --out")
    lock_run(out, ctx)  # one run per folder, before anything in it is read
    STOP.install()
    if ctx.master:
        for stale in list(out.glob(".*.tmp")) + list(
            out.glob("*/.*.tmp")
        ):  # a killed save's; the lock says no one writes them
            stale.unlink(missing_ok=True)
    path, ck = find_checkpoint(out)
    if ck is None:
        if any((out / n).exists() for n in ("ckpt.pt", "ckpt_prev.pt")):
            raise UserError(f"{out} holds checkpoints that cannot be read; move them away or choose another --out")
        if a.resume:
            ctx.say(f"--resume: {out} has no checkpoint yet; starting the run")
        return None
    if not a.resume:
        raise UserError(
            f"{out} already holds a run ({path.name}); pass --resume to continue it or choose another --out"
        )
    saved = ck["args"]
    kind = "finetune.py" if "n_train" in saved else "pretrain.py"
    if script is not None and kind != script:
        hint = (
            f"finetune it with finetune.py --pretrained {out / 'encoder.pt'} --out NEW_FOLDER"
            if kind == "pretrain.py"
            else f"resume it with finetune.py --out {out} --resume"
        )
        raise UserError(f"--out {out} holds a {kind} run, not a {script} one; {hint}")
    ignored = [k for k in a.given if k not in runtime_flags and saved.get(k) != getattr(a, k)]
    changed = [
        k for k in a.given if k in runtime_flags - {"out", "resume"} and k in saved and saved[k] != getattr(a, k)
    ]
    for k, v in saved.items():
        if k not in ("out", "resume", "given") and not (k in runtime_flags and k in a.given):
            setattr(a, k, v)
    if ignored:
        ctx.say(f"resume: the run's saved settings are kept; ignored {flag_names(ignored)}")
    if changed:
        ctx.say(f"resume: changed for the rest of the run: {flag_names(changed)}")
    if ck["world"] != ctx.world:
        raise UserError(
            f"--resume: {out} was trained with {ck['world']} processes and this launch has {ctx.world}; "
            "resume with the same --nproc_per_node so the sample order continues exactly"
        )
    ctx.say(f"resume: {path} at step {ck['step']}")
    return ck


def check_resumed_cases(ck, data, train_cases, val_cases):
    """On resume: UserError unless --data gives the run exactly the cases it trained and
    validated on (a moved copy of its dataset is welcome, another dataset is not)."""
    if ck is None or "train_cases" not in ck:
        return
    was = set(ck["train_cases"]) | set(ck.get("val_cases") or [])
    now = set(train_cases) | set(val_cases)
    if (sorted(ck["train_cases"]), sorted(ck.get("val_cases") or [])) != (sorted(train_cases), sorted(val_cases)):
        diff = sorted(was - now)[:3] or sorted(now - was)[:3]
        raise UserError(
            f"--resume: --data {data} does not give the run its cases ({len(was - now)} of its {len(was)} "
            f"missing, {len(now - was)} new, e.g. {', '.join(diff) or 'a different split'}); give the run's "
            f"dataset (args.json) or a copy of it"
        )


# -----------------------------------------------------------------------------
# Precision and the guarded optimiser step


def autocast_for(device, dtype="auto"):
    """(dtype name, autocast context) for --dtype on `device`: bf16 where the GPU has
    it, else fp16; fp32 (no autocast) on the CPU unless bf16 is asked for."""
    if dtype == "auto":
        dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if dtype == "fp16" and device.type != "cuda":
        raise UserError("--dtype fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[dtype]
    return dtype, torch.autocast(device.type, dtype=amp, enabled=amp is not None)


def precision(device, dtype="auto"):
    """(dtype name, autocast context, GradScaler). The scaler is on in every dtype: its
    unscale_ checks all gradients for inf/NaN on the device and its step() skips the
    update when it finds one. In fp16 it also scales the loss (from 2^16, adapting);
    in bf16 / fp32 guarded_step pins its scale at 1 (a power of two: exact)."""
    dtype, autocast = autocast_for(device, dtype)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16 if dtype == "fp16" else 1.0)
    return dtype, autocast, scaler


def make_optimizer(params, name, lr, wd, device, momentum=0.99, nesterov=True):
    """AdamW (AMAES, Tang et al.) or SGD with Nesterov momentum (Wald et al.); fused
    kernels on CUDA, which also let GradScaler skip a step without a host sync."""
    params = [p for p in params if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd, **fused)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **fused)


def restore(ck, model, opt, scaler):
    """A resumed run's model, optimiser, scaler and RNG state; returns its step (0 when ck is None)."""
    if ck is None:
        return 0
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng"])
    return ck["step"]


def wrap(model, compile_, ctx):
    """The module the loop calls: torch.compile'd on request, DDP across processes."""
    net = torch.compile(model) if compile_ else model
    if ctx.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[ctx.local] if ctx.cuda else None)
    return net


def check_patch(arch, patch):
    """UserError unless `patch` suits `arch` (models.patch_rule)."""
    import models

    divisor, minimum = models.patch_rule(arch)
    if patch % divisor or patch < minimum:
        raise UserError(f"--patch {patch}: {arch} needs a multiple of {divisor}, at least {minimum}")


def load_pretrained_file(path, flag):
    """models.read_pretrained of a file, with one clear line (UserError) for a file
    that is missing, truncated or not a torch file, that holds pickled Python objects
    (refused: weights_only loading never runs them), or that matches no known layout."""
    import models  # models.py is torch-only and imported by every script anyway

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except Exception as e:
        msg = str(e)
        if any(
            w in msg for w in ("Unsupported global", "GLOBAL ", "Unsupported class")
        ):  # torch >= 2.4 / 2.3's wording
            what = next((ln.strip() for ln in msg.splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            what = what[what.find("Unsupported") :][:160] if "Unsupported class" in what else what[:160]
            raise UserError(
                f"{flag} {path}: refused: the file holds pickled Python objects ({what}); only tensors and plain "
                "values are loaded (torch.load weights_only), so nothing in it was run"
            ) from None
        first = msg.splitlines()[0] if msg else ""  # torch's own first line only when it is short and about the file
        detail = (
            f"{type(e).__name__}: {first}"
            if first and len(first) <= 120 and "Weights only" not in first
            else type(e).__name__
        )
        raise UserError(
            f"{flag} {path}: not a readable checkpoint: not a torch file, or a truncated one (torch.load: "
            f"{detail}); give RUN/encoder.pt or a released weights file"
        ) from None
    try:
        return models.read_pretrained(ck)
    except ValueError as e:
        raise UserError(f"{flag} {path}: {e}") from None


# -----------------------------------------------------------------------------
# Pre-flight: will the run fit? (memory, /dev/shm, disk), before any work

GB = 2**30


def _saved_bytes(model, x, amp, units=()):
    """One forward + backward of x with saved-tensor hooks counting the storages
    autograd keeps beyond the parameters: (bytes of tensors with x's batch dimension,
    the batch of maps; bytes of the others, such as autocast's low-precision copies
    of the weights; the largest batch tensor; {unit index: bytes kept while inside
    that unit}). Units are the modules activation checkpointing wraps."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # counted as weights
    kept, per, inside, largest = {}, {}, [None], [0]

    def pack(t):
        try:
            key, n = (t.untyped_storage().data_ptr(), t.device), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (rare): counted by size
            key, n = (id(t), None), t.numel() * t.element_size()
        if key[0] not in weights and key not in kept:
            batched = t.dim() > 0 and t.shape[0] == x.shape[0]
            kept[key] = (n, batched)
            if batched:
                largest[0] = max(largest[0], n)
            if inside[0] is not None:
                per[inside[0]] = per.get(inside[0], 0) + n
        return t

    hooks = [
        h
        for i, u in enumerate(units)
        for h in (
            u.register_forward_pre_hook(lambda m, a, i=i: inside.__setitem__(0, i)),
            u.register_forward_hook(lambda m, a, o: inside.__setitem__(0, None)),
        )
    ]
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None),
        ):
            out = model(x)
        sum(o.float().mean() for o in (out if isinstance(out, tuple) else (out,))).backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    batch = sum(n for n, b in kept.values() if b)
    return batch, sum(n for n, b in kept.values() if not b), largest[0], per


def estimate_memory(model, patch, batch, dtype="fp32", checkpointing=False, optimizer="adamw"):
    """Bytes a training step of `model` needs at `patch`^3 x `batch`: {"weights",
    "gradients", "optimizer", "fixed", "activations", "total"}. Activations are
    measured, not guessed: one forward + backward at the arch's smallest training
    side (batch 1; 2 for SwinUNETR's SSL form, which pairs views) in the run's
    autocast dtype (bf16 stands in for fp16 on the CPU), with saved-tensor hooks
    counting what autograd keeps. What has the batch dimension is scaled by voxels x
    batch (the memory of these fully convolutional networks is linear in both); the
    rest (autocast's low-precision copies of the weights) is "fixed". On top: twice
    the largest kept tensor for the transient gradients of the backward pass, and
    with checkpointing the largest stage, recomputed during backward. Checked against
    profiled peaks of real steps (tests/test_preflight.py); convolution workspaces of
    the GPU libraries are not counted."""
    import models

    device = next(model.parameters()).device
    side = models.patch_rule(model.arch)[1]
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16 if device.type == "cuda" else torch.bfloat16}.get(dtype)
    units = [
        u
        for m in model.modules()
        if hasattr(m, "checkpointing")
        for c in m.children()
        for u in (c if isinstance(c, torch.nn.ModuleList) else [c])
    ]
    was_training = model.training
    was_ckpt = any(getattr(m, "checkpointing", False) for m in model.modules())  # the stages hold the switch
    b = 2 if model.mode == "pretrain" and model.arch == "swinunetr" else 1
    x = torch.rand(b, model.in_channels, side, side, side, device=device)
    model.train()
    try:
        model.set_checkpointing(checkpointing)
        kept, fixed, largest, _ = _saved_bytes(model, x, amp)
        recompute = 0
        if checkpointing:  # the stage recomputed in backward holds what it held without checkpointing
            model.set_checkpointing(False)
            recompute = max(_saved_bytes(model, x, amp, units)[3].values(), default=0)
    finally:
        model.train(was_training)
        model.set_checkpointing(was_ckpt)
    scale = (patch / side) ** 3 * batch / b
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = {
        "weights": 4 * sum(p.numel() for p in model.parameters()),
        "gradients": 4 * params,
        "optimizer": (8 if optimizer == "adamw" else 4) * params,
        "fixed": fixed,
        "activations": (kept + 2 * largest + recompute) * scale,
    }
    est["total"] = sum(est.values())
    return est


def size(b):
    return f"{b / GB:.1f} GB" if b >= GB else f"{b / 2**20:.0f} MB"


def available_memory(device):
    """Free bytes where the activations live: the GPU's free memory, or the RAM this
    process may still use (MemAvailable, and a cgroup limit when there is one)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        for ln in open("/proc/meminfo"):
            if ln.startswith("MemAvailable:"):
                free = int(ln.split()[1]) * 1024
        for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
            if os.path.exists(f):
                limit = open(f).read().strip()
                if limit.isdigit() and int(limit) < 2**60:
                    free = min(free or int(limit), int(limit))
    except OSError:
        pass
    return free


def free_shm():
    """Free bytes of /dev/shm (where DataLoader workers hand their batches over), or None."""
    import shutil

    return shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else None


def free_disk(path):
    import shutil

    path = path.resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def preflight(model, a, ctx, out, sample_bytes, optimizer="adamw", other_files=0):
    """Before the first step: the memory the run needs (estimate_memory) against what
    the device has, DataLoader batches in flight against /dev/shm, the checkpoints
    the run will write against the disk of --out. Something that does not fit: UserError (one line,
    exit 2) naming the need, what is available and settings that would fit; within
    15 % of the limit: a warning. --no-preflight skips it."""
    if a.no_preflight:
        return
    try:
        _preflight(model, a, ctx, out, sample_bytes, optimizer, other_files)
        err = None
    except UserError as e:
        err = e
    if all_sum(ctx, err is not None)[0]:  # every rank stops alike, none is left waiting
        raise err or UserError("pre-flight failed on another rank")


def _preflight(model, a, ctx, out, sample_bytes, optimizer, other_files):
    problems = []
    est = estimate_memory(model, a.patch, a.batch, a.dtype, a.checkpointing, optimizer)
    avail = available_memory(ctx.device)
    where = "GPU memory" if ctx.cuda else "RAM"
    if avail is not None and est["total"] > avail:
        static = est["total"] - est["activations"]
        per_sample = est["activations"] / a.batch
        fits = []
        largest = int((0.9 * avail - static) // per_sample) if per_sample else 0
        if largest >= 1:
            fits.append(f"--batch {largest}")
        if not a.checkpointing:
            ck = estimate_memory(model, a.patch, a.batch, a.dtype, True, optimizer)
            if ck["total"] < 0.9 * avail:
                fits.append("--checkpointing")
        if a.patch > 64:
            small = static + est["activations"] * (64 / a.patch) ** 3
            batch64 = max(1, int((0.9 * avail - static) // (per_sample * (64 / a.patch) ** 3)))
            fits.append("--patch 64" + ("" if small < 0.9 * avail else f" --batch {batch64}"))
        problems.append(
            f"{where}: the run needs about {est['total'] / GB:.1f} GB "
            f"(activations {est['activations'] / GB:.1f} GB for "
            f"{a.batch} x {a.patch}^3 {a.dtype}, weights + gradients + optimiser {static / GB:.1f} GB) and "
            f"{avail / GB:.1f} GB are free; "
            + ("would fit: " + " or ".join(fits) if fits else "nothing at this arch fits: use a bigger machine")
        )
    elif avail is not None and est["total"] > 0.85 * avail:
        ctx.say(
            f"pre-flight: the run needs about {est['total'] / GB:.1f} GB of the {avail / GB:.1f} GB free {where}: close"
        )
    workers = a.workers if a.workers is not None else default_workers()
    shm, shm_need = free_shm(), workers * 4 * a.batch * sample_bytes  # prefetch_factor 4 batches per worker
    if workers and shm is not None and shm_need > shm:
        w = int(shm // (4 * a.batch * sample_bytes))
        problems.append(
            f"/dev/shm: {workers} DataLoader workers hold about {size(shm_need)} of batches in flight and "
            f"{size(shm)} are free; use --workers {w} or run Docker with a larger --shm-size (e.g. 16g)"
        )
    # what the run writes: ckpt.pt (weights + optimiser) and encoder.pt / best.pt (weights), three of each at the
    # peak of a save (the _prev file, the current one, the new one in its temp file); less what is there already
    ckpt = est["weights"] + est["optimizer"] + est["weights"]
    there = sum(
        (out / n).stat().st_size for n in ("ckpt.pt", "ckpt_prev.pt", "encoder.pt", "best.pt") if (out / n).exists()
    )
    disk, disk_need = free_disk(out), max(0, 3 * ckpt - there) + other_files
    if disk_need > disk:
        problems.append(
            f"disk: the checkpoints need about {size(disk_need)} more on {out} and {size(disk)} are free; "
            "free space or choose another --out"
        )
    if problems:
        raise UserError("pre-flight: " + " | ".join(problems) + " (--no-preflight skips this check)")


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


def guarded_step(loss, opt, scaler, grad_clip=0.0, fp16=False):
    """backward, unscale, optional clip, step, zero_grad. Returns a 0-d bool tensor on
    the device: True when the step was skipped because the loss or a gradient, or the
    gradients' total norm, was not finite (after DDP's all-reduce, so every rank
    agrees). No host sync: the caller reads the flags at log steps (Interval)."""
    scaler.scale(loss).backward()
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # of the scaled gradients
    # Finite gradients whose norm overflows must skip the step too: mark one gradient
    # (adding NaN or 0), so that unscale_'s inf/NaN check sees it.
    grads[0].add_(torch.where(torch.isfinite(norm), 0.0, float("nan")).to(grads[0].dtype))
    scaler.unscale_(opt)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    scaler.step(opt)  # skipped on the device when unscale_ found inf/NaN
    scaler.update(None if fp16 else 1.0)  # fp16: adapt the scale; bf16 / fp32: keep it at 1
    opt.zero_grad(set_to_none=True)
    return ~torch.isfinite(norm)


class Interval:
    """The current log interval, accumulated without host syncs (device tensors for
    the loss, host clocks for the time) and read once per log step; also the
    epoch's progress bar. It follows the skipped-step flags, so --max-bad-steps
    skipped steps in a row stop the run. In fp16 the GradScaler skips steps of its own
    while it finds its scale (each halves it, 2^16 down to 1 in 16 steps), so fp16
    allows 16 more."""

    def __init__(self, ctx, max_bad, fp16=False):
        self.ctx, self.max_bad = ctx, max_bad + (16 if fp16 else 0)
        self.bad_run, self.stop_at, self.pending, self.bar = 0, None, [], None
        self.restart()
        self.reset()

    def reset(self):
        self.loss = torch.zeros((), device=self.ctx.device)
        self.n = torch.zeros((), device=self.ctx.device)
        self.steps, self.wait, self.time, self.parts = 0, 0.0, 0.0, {}

    def restart(self):
        """Start the step clock anew (after validation or saving, which are not steps)."""
        self.tick = self.t_data = time.perf_counter()

    def add(self, step, loss, skipped, parts=None):
        """After the optimiser step `step` (0-based): its loss, skipped flag and loss parts."""
        ok = ~skipped
        self.loss += torch.where(ok, loss.detach().float(), 0.0)
        self.n += ok
        self.pending.append((step, skipped))
        now = time.perf_counter()
        self.steps, self.wait, self.time = (
            self.steps + 1,
            self.wait + self.t_data - self.tick,
            self.time + now - self.tick,
        )
        self.tick, self.parts = now, {k: v.detach() for k, v in (parts or {}).items()}
        if self.bar is not None:
            self.bar.update(1)

    def skipped_steps(self):
        """Resolve the pending flags (one sync): the skipped step numbers, in order.
        Sets stop_at to the step where --max-bad-steps in a row was first reached."""
        if not self.pending:
            return []
        flags = torch.stack([f for _, f in self.pending]).tolist()
        out = []
        for (s, _), bad in zip(self.pending, flags):
            self.bad_run = self.bad_run + 1 if bad else 0
            if bad:
                out.append(s)
            if self.bad_run >= self.max_bad and self.stop_at is None:
                self.stop_at = s
        self.pending = []
        return out

    def check(self, log, ckpt, saved_step):
        """Log the steps skipped since the last check (one host sync); StopRun, naming
        the checkpoint to resume from, when --max-bad-steps came in a row."""
        for s in self.skipped_steps():
            log({"step": s, "skipped": "non-finite loss or gradients"})
            self.ctx.say(f"step {s}: non-finite loss or gradients, step skipped")
        if self.stop_at is not None:
            raise stopped(
                self.stop_at,
                f"{self.max_bad} steps in a row had a non-finite loss or gradients "
                "(each was skipped: the weights are untouched)",
                ckpt,
                saved_step,
            )

    def row(self, samples_per_step):
        """The log line of the interval (losses all-reduced), then a fresh interval."""
        loss_sum, n = all_sum(self.ctx, self.loss, self.n)
        row = {
            "loss": loss_sum / n if n else None,
            "samples_per_s": round(samples_per_step * self.steps / max(self.time, 1e-9), 2),
            "data_wait": round(self.wait / max(self.time, 1e-9), 4),
            "peak_gb": round(torch.cuda.max_memory_allocated(self.ctx.device) / 2**30, 2) if self.ctx.cuda else None,
        }
        row.update({k: float(v) for k, v in self.parts.items()})
        if self.bar is not None and row["loss"] is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}")
        self.reset()
        return row


def steps(loader, step, total, steps_per_epoch, meter, quiet=False):
    """The training loop's steps, as facebookresearch/mae's log_every: yields (step,
    epoch, batch) from `step` to `total`, the batch's tensors on the device. Keeps a
    tqdm bar per epoch (rank 0) in the meter and records when the batch was ready,
    so the meter knows how long the loop waited for data."""
    from data import CaseReadError

    batches = iter(loader)
    meter.restart()
    while step < total:
        epoch = step // steps_per_epoch
        if meter.bar is None and not quiet and meter.ctx.master:
            meter.bar = tqdm(
                total=min(steps_per_epoch, total - epoch * steps_per_epoch),
                initial=step - epoch * steps_per_epoch,
                desc=f"epoch {epoch}",
                leave=False,
            )
        # sample numbers (1-D integers) stay on the host: the augmentation reads them there
        try:
            got = next(batches)
        except (
            CaseReadError
        ) as e:  # a file that broke after data.check_cases; from a worker the message ends the traceback
            raise UserError(str(e).strip().splitlines()[-1].split("CaseReadError: ", 1)[-1]) from None
        batch = [
            t if t.dim() == 1 and not t.is_floating_point() else t.to(meter.ctx.device, non_blocking=True) for t in got
        ]
        meter.t_data = time.perf_counter()
        yield step, epoch, batch
        step += 1
        if meter.bar is not None and (step % steps_per_epoch == 0 or step == total):
            meter.bar.close()
            meter.bar = None


# -----------------------------------------------------------------------------
# Checkpoints and logs


def non_finite(state):
    """Names of the floating tensors of a state dict that hold inf or NaN."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def loads(path):
    """Whether the checkpoint at `path` loads: its zip index and every record are
    there (a file cut short by a kill or a full disk fails). mmap: nothing is read."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True
    except Exception:
        return False


def write_error(e):
    """What a failed write says when the disk is at fault (full, a file size limit,
    an I/O error): an OSError, or torch.save's RuntimeError from its zip writer
    ("unexpected pos", "file write failed"). None for anything else (a bug)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    msg = str(e)
    if isinstance(e, RuntimeError) and ("write" in msg or "unexpected pos" in msg):
        return "the write failed: torch.save says " + msg.strip().splitlines()[0].split("] ")[-1].strip(" .")[:120]
    return None


def write_file(path, write, keep=None):
    """write_atomic(path, write, keep); a failed write (a full disk) becomes StopRun:
    one line naming the file, what the system said and the free space. Nothing is
    left behind: the temporary file is removed and `path` is the old file."""
    try:
        write_atomic(path, write, keep=keep)
    except Exception as e:
        why = write_error(e)
        if why is None:
            raise
        raise StopRun(
            f"could not write {path} ({why}; {size(free_disk(path.parent))} free there); "
            "free space on that disk or use another --out"
        ) from None


def save_checkpoint(state, path, keep_prev=True):
    """Write `state` (a dict with "model" or "encoder" weights) to `path` atomically
    (temp file, fsync, rename). The file it replaces becomes <name>_prev.pt, but
    only if it loads (after a kill cut it short it is replaced, and the good _prev
    stays); the old _prev goes only when the new file is complete, so a save needs
    room for three checkpoints. Weights that are not all finite are refused (StopRun)
    and nothing is written; a full disk: StopRun, the old files intact."""
    bad = non_finite(state.get("model") or state.get("encoder"))
    if bad:
        raise StopRun(
            f"the weights became non-finite ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
            f"not saved over {path}"
        )
    prev = path.with_name(path.stem + "_prev" + path.suffix) if keep_prev else None
    keep = prev if prev is not None and path.exists() and loads(path) else None
    write_file(path, lambda p: torch.save(state, p), keep=keep)


def save_all(ctx, saves):
    """Rank 0 writes each (state, path, keep_prev) with save_checkpoint; every rank
    learns whether that worked (StopRun on all of them if not), so no rank is left
    waiting in a collective for one that stopped."""
    err = ""
    if ctx.master:
        try:
            for state, path, keep_prev in saves:
                save_checkpoint(state, path, keep_prev)
        except StopRun as e:
            err = str(e)
    if all_sum(ctx, bool(err))[0]:
        raise StopRun(err or "rank 0 could not write its checkpoint")


def stopped(step, why, ckpt, saved_step):
    """The StopRun of a run that stops at `step`, naming the checkpoint to resume from."""
    hint = (
        f"Resume from {ckpt} (step {saved_step}, finite weights) with --resume, adding --grad-clip 1 or --dtype fp32 "
        "if it diverged"
        if saved_step is not None
        else "No checkpoint was written yet: start the run again"
    )
    return StopRun(f"stopped at step {step}: {why}. {hint}")


def open_run(out, a, ck, step, ctx):
    """Rank 0 makes the run folder and writes args.json; on resume it trims the log
    (lines a killed run wrote after its checkpoint are redone). Returns log(row),
    which appends a line on rank 0 and does nothing elsewhere."""
    if ctx.master:
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_args(out / "args.json", a, ck is not None)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):  # a full disk: as every write of the run says it
                raise StopRun(
                    f"could not write {out / 'args.json'} ({e.strerror}; {size(free_disk(out))} free there); "
                    "free space on that disk or use another --out"
                ) from None
            raise UserError(f"--out {out}: cannot write there ({e.strerror or e}); choose another --out") from None
        trim_log(out / "log.jsonl", step)  # also without a checkpoint: a run killed before its first one starts anew
    return (lambda row: append_log(out / "log.jsonl", row)) if ctx.master else (lambda row: None)


def write_args(path, a, resumed):
    """args.json: the settings of the run's first invocation, as resolved then; each
    resume appends the flags given anew, with the time, to its "resumes" list."""
    try:
        first = json.loads(path.read_text()) if resumed and path.exists() else None
    except json.JSONDecodeError:
        first = None
    if first is None:
        first = dict(vars(a), resumes=[])
    else:
        first.setdefault("resumes", []).append(
            {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "given": {k: getattr(a, k, None) for k in a.given}}
        )
    save_json(path, first)


def trim_log(path, step):
    """On every (re)start: keep the log lines up to `step`, the checkpoint's (later
    ones are redone), drop a line a killed run left half-written, rewrite atomically."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            keep.append(ln)
    write_file(path, lambda p: p.write_text("".join(ln + "\n" for ln in keep)))


def append_log(path, row):
    """One JSON line (NaN and Infinity written as null); a full disk: StopRun."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(clean_json(row), allow_nan=False) + "\n")
    except OSError as e:
        raise StopRun(
            f"could not write {path} ({e.strerror or e}; {size(free_disk(path.parent))} free there); "
            "free space on that disk or use another --out"
        ) from None


# -----------------------------------------------------------------------------


def run_main(prog, train, a):
    """Run train(a); exit status 0 done, 1 stopped (StopRun: one line), 2 user error
    (one line), EXIT_SIGNAL (3) stopped by a signal with the step reached saved (one
    line: how to resume). Anything else is a bug and keeps its traceback (exit 1)."""
    say = os.environ.get("RANK", "0") == "0"  # every rank stops alike; rank 0 says why
    try:
        train(a)
        return 0
    except UserError as e:
        if say:
            print(f"{prog}: error: {e}", file=sys.stderr)
        release_lock(discard_new=True)
        return 2
    except StopRun as e:
        if say:
            print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        if say:
            print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_SIGNAL
    except OSError as e:  # a --data folder removed or unmounted under the run: the user's, not a bug
        data = getattr(a, "data", None)
        if data is None or (
            os.path.exists(os.path.join(data, "dataset.json")) and os.path.exists(os.path.join(data, "images"))
        ):
            raise
        if say:
            print(
                f"{prog}: error: --data {data} disappeared during the run ({type(e).__name__}); put it back "
                "and continue with --resume",
                file=sys.stderr,
            )
        return 2
    finally:
        teardown()
