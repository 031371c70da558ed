"""
Throughput and memory of the networks, the data pipeline and whole training steps.

    python bench.py models --arch unet_b unet_xl --patch 128 --batch 8 --dtype bf16 --device cuda
    python preprocess.py --demo big --demo-cases 8 --demo-shape 160 192 160
    python bench.py data --data big/preprocessed --patch 128 --workers 1 2
    python bench.py train --arch unet_b --data big/preprocessed --patch 128 --batch 8 --dtype bf16

Prints one JSON line per measurement, then a table. Each figure is the median of
--repeats timed runs (after a warm-up run, never counted) with the spread (min..max).
  models: forward + backward of every arch in pretraining and segmentation form on a
          random batch: ms per step, samples/s, peak memory (CUDA) beside the
          pre-flight estimate (est_gb: weights + gradients + activations), and achieved
          TFLOP/s (FLOPs counted once with torch.utils.flop_counter.FlopCounterMode).
  data:   samples/s of PretrainDataset per preset in one process (= per CPU core, with
          torch and SimpleITK held to one thread), with N DataLoader worker processes,
          and the cost of random_mask on a batch.
  train:  pretrain.py itself, run as a subprocess for --steps steps: samples/s,
          data-wait share and peak memory from its log.jsonl, one log interval per
          repeat, the first interval (start-up, compilation) left out.
  pictures: ms per picture the stages write (validation PNG, progress.png, an
          evaluation case PNG), to set against the steps between two of them.
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import pictures
import training
from models import ARCHS, build_model, patch_rule
from preprocess import ArgumentParser


def timed(fn, repeats):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def report(rows, name, unit, values, **extra):
    med = statistics.median(values)
    row = {
        "bench": name,
        "unit": unit,
        "median": round(med, 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "repeats": len(values),
        **extra,
    }
    print(json.dumps(row), flush=True)
    rows.append(row)


def bench_models(a):
    device = torch.device(a.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[a.dtype]
    autocast = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
    rows = []
    for arch in a.arch:
        for mode in a.modes:
            divisor, minimum = patch_rule(arch)
            if a.patch < minimum or a.patch % divisor:
                print(
                    json.dumps(
                        {
                            "bench": f"models/{arch}/{mode}",
                            "skipped": f"needs a patch multiple of {divisor}, at least {minimum}",
                        }
                    ),
                    flush=True,
                )
                continue
            model = build_model(
                arch, 1, None if mode == "pretrain" else 2, mode=mode, checkpointing=a.checkpointing
            ).to(device)
            est = training.estimate_memory(
                model, a.patch, a.batch, a.dtype, a.checkpointing
            )  # pretrain.py's pre-flight
            est_gb = round(
                (est["total"] - est["optimizer"]) / 2**30, 2
            )  # no optimiser here: weights, grads, activations
            x = torch.rand(a.batch, 1, a.patch, a.patch, a.patch, device=device)

            def step():
                with autocast:
                    out = model(x)
                sum(o.float().mean() for o in (out if isinstance(out, tuple) else (out,))).backward()
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            with FlopCounterMode(display=False) as fc:
                step()
            flops = fc.get_total_flops()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = timed(step, a.repeats)
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
            med = statistics.median(times)
            report(
                rows,
                f"models/{arch}/{mode}",
                "ms/step",
                [t * 1e3 for t in times],
                samples_per_s=round(a.batch / med, 2),
                peak_gb=peak,
                est_gb=est_gb,
                tflop_per_sample=round(flops / a.batch / 1e12, 3),
                tflops=round(flops / med / 1e12, 2),
                patch=a.patch,
                batch=a.batch,
                dtype=a.dtype,
                device=device.type,
            )
            model = x = None  # free before the next arch is built
    return rows


def bench_train(a):
    """pretrain.py as a user runs it; figures from its log.jsonl."""
    rows = []
    for arch in a.arch:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = (
                [
                    sys.executable,
                    str(Path(__file__).with_name("pretrain.py")),
                    "--arch",
                    arch,
                    "--data",
                    a.data,
                    "--out",
                    tmp + "/run",
                    "--patch",
                    str(a.patch),
                    "--batch",
                    str(a.batch),
                    "--dtype",
                    a.dtype,
                    "--device",
                    a.device,
                    "--steps",
                    str(a.steps),
                    "--log-every",
                    str(a.log_every),
                    "--quiet",
                    "--method",
                    a.method,
                ]
                + (["--workers", str(a.workers)] if a.workers is not None else [])
                + (["--compile"] if a.compile else [])
            )
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise ValueError(f"pretrain.py failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
            log = [json.loads(ln) for ln in Path(tmp, "run", "log.jsonl").read_text().splitlines()]
        steps = [x for x in log if "samples_per_s" in x][1:]  # the first interval holds the start-up
        if not steps:
            raise ValueError("too few log intervals: raise --steps or lower --log-every")
        peak = max((x["peak_gb"] for x in steps if x["peak_gb"] is not None), default=None)
        report(
            rows,
            f"train/{arch}/{a.method}",
            "samples/s",
            [x["samples_per_s"] for x in steps],
            data_wait=round(statistics.median(x["data_wait"] for x in steps), 4),
            peak_gb=peak,
            patch=a.patch,
            batch=a.batch,
            dtype=a.dtype,
            device=a.device,
        )
    return rows


def authors_transforms(patch):
    """The authors' pretraining recipe built from Yucca's own transform classes (the
    public yucca package, version 1.1.7, when it is installed: pip install yucca==1.1.7)
    with the parameters of amaes src/augmentations/augmentation_composer.py, for timing
    side by side. None without Yucca."""
    try:
        from yucca.modules.data.augmentation.transforms import (
            AdditiveNoise,
            BiasField,
            Blur,
            Gamma,
            GibbsRinging,
            MotionGhosting,
            MultiplicativeNoise,
            SimulateLowres,
            Spatial,
        )
    except ImportError:
        return None
    clip = dict(clip_to_input_range=True)
    return [
        Spatial(
            patch_size=patch,
            crop=True,
            random_crop=False,
            cval="min",
            p_deform_per_sample=0.33,
            deform_sigma=(20, 30),
            deform_alpha=(200, 600),
            p_rot_per_sample=0.2,
            p_rot_per_axis=0.66,
            x_rot_in_degrees=(-30.0, 30.0),
            y_rot_in_degrees=(-30.0, 30.0),
            z_rot_in_degrees=(-30.0, 30.0),
            p_scale_per_sample=0.2,
            scale_factor=(0.9, 1.1),
            skip_label=True,
            **clip,
        ),
        AdditiveNoise(p_per_sample=0.2, mean=(0.0, 0.0), sigma=(1e-3, 1e-4), **clip),
        Blur(p_per_sample=0.2, p_per_channel=0.5, sigma=(0.0, 1.0), **clip),
        MultiplicativeNoise(p_per_sample=0.2, mean=(0, 0), sigma=(1e-3, 1e-4), **clip),
        MotionGhosting(p_per_sample=0.2, alpha=(0.85, 0.95), num_reps=(2, 11), axes=(0, 3), **clip),
        GibbsRinging(p_per_sample=0.2, cut_freq=(96, 129), axes=(0, 3), **clip),
        SimulateLowres(p_per_sample=0.2, p_per_channel=0.5, p_per_axis=0.33, zoom_range=(0.5, 1.0), **clip),
        BiasField(p_per_sample=0.33, **clip),
        Gamma(p_per_sample=0.2, p_invert_image=0.05, gamma_range=(0.5, 2.0), **clip),
    ]


def bench_data(a):
    """samples/s per preset: the TorchIO driver per sample in one process (= per CPU
    core), the workers' share of the batched path (read + crop-pad), the batched path
    on CPU and on CUDA, DataLoader workers running the TorchIO driver, and, when Yucca
    is installed, the authors' transforms on the same regions."""
    torch.set_num_threads(1)
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for preset in a.presets:
        ds = data.PretrainDataset(a.data, patch=a.patch, preset=preset, seed=0, split=None, aug_on="workers")
        n = a.samples
        counter = iter(range(10**9))

        def one_core():
            for _ in range(n):
                ds.sample(next(counter))

        report(
            rows, f"data/{preset}/torchio driver, 1 process", "samples/s", [n / t for t in timed(one_core, a.repeats)]
        )

        def crop_only():
            for _ in range(n):
                ds.region(next(counter))

        report(
            rows, f"data/{preset}/read + crop-pad, 1 process", "samples/s", [n / t for t in timed(crop_only, a.repeats)]
        )
        ks = list(range(a.batch))
        regions = torch.stack([torch.from_numpy(ds.region(k)[1]).half() for k in ks])
        for dev in devices:
            r, t = regions.to(dev), torch.tensor(ks)

            def batched():
                data.augment_batch(ds, r, t)
                if dev == "cuda":
                    torch.cuda.synchronize()

            report(
                rows,
                f"data/{preset}/batched on {dev}, batch {a.batch}",
                "samples/s",
                [a.batch / s for s in timed(batched, a.repeats)],
            )
        for w in a.workers:
            if w < 2:
                continue
            steps = max(1, n * w // a.batch)  # n samples per worker, fresh sample numbers each run
            start = iter(range(0, 10**9, steps))

            def loader():
                sampler = data.StepSampler(next(start), steps, a.batch)
                for _ in torch.utils.data.DataLoader(ds, batch_size=a.batch, sampler=sampler, num_workers=w):
                    pass

            times = timed(loader, a.repeats)
            report(
                rows, f"data/{preset}/torchio driver, {w} workers", "samples/s", [steps * a.batch / t for t in times]
            )
        theirs = authors_transforms((a.patch,) * 3) if preset == "all" and a.authors else None
        if theirs is not None:

            def authors():
                for _ in range(n):
                    d = {"image": ds.region(next(counter))[1][None].astype(np.float64)}
                    for tr in theirs:
                        d = tr(d)

            report(
                rows,
                "data/all/authors' Yucca transforms, 1 process",
                "samples/s",
                [n / t for t in timed(authors, a.repeats)],
            )
        elif preset == "all" and a.authors:
            print(
                json.dumps(
                    {"bench": "data/all/authors", "skipped": "yucca is not installed (pip install yucca==1.1.7)"}
                )
            )
    x = torch.rand(a.batch, 1, a.patch, a.patch, a.patch)
    report(rows, f"mask/batch {a.batch}", "ms", [t * 1e3 for t in timed(lambda: data.random_mask(x), a.repeats)])
    return rows


def bench_preprocess(a):
    """Seconds per volume of preprocess.py's recipe, one process, on the NIfTI files of
    --input; with --authors also Yucca's preprocess_case_for_training_without_label on
    the same files (the authors' BRAINS-45K path), side by side."""
    import nibabel as nib

    import preprocess

    torch.set_num_threads(1)
    files = sorted(p for p in Path(a.input).rglob("*") if p.name.endswith((".nii", ".nii.gz")))[: a.files]
    if not files:
        raise ValueError(f"--input {a.input}: no NIfTI files")
    theirs = None
    if a.authors:
        try:
            from yucca.functional.preprocessing import preprocess_case_for_training_without_label as theirs
        except ImportError:
            print(
                json.dumps(
                    {"bench": "preprocess/authors", "skipped": "yucca is not installed (pip install yucca==1.1.7)"}
                )
            )
    rows = []
    for f in files:

        def ours():
            x, aff = preprocess.read_nifti(f)
            preprocess.preprocess_arrays([x], aff)

        report(rows, f"preprocess/ours/{f.name}", "s/volume", timed(ours, a.repeats))
        if theirs is not None:

            def authors():
                theirs(
                    images=[nib.load(str(f))],
                    normalization_operation=["volume_wise_znorm"],
                    target_spacing=[1.0, 1.0, 1.0],
                    crop_to_nonzero=True,
                    image_properties={},
                    intensities=None,
                )

            report(rows, f"preprocess/authors' Yucca/{f.name}", "s/volume", timed(authors, a.repeats))
    return rows


def bench_pictures(a):
    """ms per picture on the host, against the steps they ride along with: the
    pretraining validation PNG (4 volumes of P^3, once per epoch), progress.png (read
    and drawn from a log of --log-lines lines, once per epoch) and an evaluation case
    PNG (a 182 x 218 x 182 volume with two outlined masks, once per case)."""
    rows, rng = [], np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    vols = [rng.random((a.patch,) * 3, dtype=np.float32) for _ in range(4)]  # (P, P, P) each
    report(
        rows,
        f"pictures/pretrain validation PNG, 4 x {a.patch}^3",
        "ms",
        [
            1e3 * t
            for t in timed(
                lambda: pictures.save_png(tmp / "v.png", pictures.volumes_picture(vols, ["a", "b", "c", "d"])[0]),
                a.repeats,
            )
        ],
    )
    with open(tmp / "log.jsonl", "w") as f:
        for i in range(a.log_lines):
            val = {"val_dice": i / a.log_lines} if i % 10 == 0 else {}
            f.write(json.dumps({"step": 20 * i, "loss": 1 / (i + 1), **val}) + "\n")
    report(
        rows,
        f"pictures/progress.png, {a.log_lines} log lines",
        "ms",
        [1e3 * t for t in timed(lambda: pictures.progress_png(tmp / "log.jsonl", tmp / "p.png"), a.repeats)],
    )
    image = rng.random((182, 218, 182), dtype=np.float32)
    g = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij"), -1)
    ref = ((g - (90, 100, 90)) ** 2).sum(-1) < 400
    pred = ((g - (92, 100, 90)) ** 2).sum(-1) < 380
    masks = [(ref, pictures.GREEN), (pred, pictures.RED)]
    report(
        rows,
        "pictures/evaluation case PNG, 182x218x182",
        "ms",
        [
            1e3 * t
            for t in timed(
                lambda: pictures.save_png(tmp / "c.png", pictures.outline_picture(image, masks)[0]), a.repeats
            )
        ],
    )
    return rows


def get_args(argv=None):
    p = ArgumentParser(
        prog="bench.py", description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    for name, text in (
        ("models", "forward + backward of each arch: ms/step, samples/s, peak memory, TFLOP/s"),
        ("train", "whole pretrain.py steps (data + model): samples/s, data-wait share, peak memory"),
    ):
        m = sub.add_parser(name, help=text)
        m.add_argument(
            "--arch",
            nargs="+",
            default=list(ARCHS) if name == "models" else ["unet_b", "unet_xl"],
            choices=list(ARCHS),
            help="architectures (default: all for models, unet_b unet_xl for train)",
        )
        m.add_argument("--patch", type=int, default=128, help="patch side (default 128)")
        m.add_argument("--batch", type=int, default=8, help="batch (default 8)")
        m.add_argument(
            "--dtype",
            default="auto",
            choices=("auto", "bf16", "fp16", "fp32"),
            help="autocast dtype (default auto: bf16 on CUDA, fp32 on CPU)",
        )
        m.add_argument(
            "--device", default="auto", choices=("auto", "cuda", "cpu"), help="default auto: cuda when available"
        )
        if name == "models":
            m.add_argument(
                "--modes",
                nargs="+",
                default=["pretrain", "seg"],
                choices=("pretrain", "seg"),
                help="forms (default both)",
            )
            m.add_argument("--checkpointing", action="store_true", help="with activation checkpointing")
            m.add_argument("--repeats", type=int, default=3, help="timed runs per figure (default 3)")
        else:
            m.add_argument(
                "--data", default="demo/preprocessed", help="preprocessed dataset (default demo/preprocessed)"
            )
            m.add_argument(
                "--method",
                default="amaes",
                choices=("amaes", "mae", "swin_ssl"),
                help="pretraining method (default amaes)",
            )
            m.add_argument("--steps", type=int, default=40, help="steps of the run (default 40)")
            m.add_argument("--log-every", type=int, default=10, help="steps per timed interval (default 10)")
            m.add_argument(
                "--workers",
                type=int,
                help="DataLoader worker processes of the pretrain.py run, 0 = read in "
                "the training process (default: pretrain.py's)",
            )
            m.add_argument("--compile", action="store_true", help="torch.compile the model")
    d = sub.add_parser("data", help="data pipeline: samples/s per preset and worker count, masking cost")
    d.add_argument("--data", default="demo/preprocessed", help="preprocessed dataset (default demo/preprocessed)")
    d.add_argument("--patch", type=int, default=128, help="patch side (default 128)")
    d.add_argument("--batch", type=int, default=8, help="batch for the loader and masking runs (default 8)")
    d.add_argument("--presets", nargs="+", default=list(data.PRESETS), choices=data.PRESETS, help="presets to time")
    d.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1],
        help="DataLoader worker process counts to time the "
        "TorchIO driver with (default 1; the batched path is timed in this process)",
    )
    d.add_argument("--samples", type=int, default=16, help="samples per timed run and per worker (default 16)")
    d.add_argument("--repeats", type=int, default=3, help="timed runs per figure (default 3)")
    d.add_argument(
        "--authors",
        action="store_true",
        help="also time the authors' Yucca transforms (needs pip install yucca==1.1.7)",
    )
    q = sub.add_parser(
        "preprocess", help="seconds per volume of the preprocessing recipe (and of the authors' Yucca with --authors)"
    )
    q.add_argument("--input", required=True, help="folder of raw NIfTI volumes (searched recursively)")
    q.add_argument("--files", type=int, default=4, help="at most this many files (default 4)")
    q.add_argument("--repeats", type=int, default=3, help="timed runs per figure (default 3)")
    q.add_argument("--authors", action="store_true", help="also time Yucca 1.1.7's preprocessing on the same files")
    g = sub.add_parser("pictures", help="ms per picture (validation PNG, progress.png, evaluation case PNG)")
    g.add_argument("--patch", type=int, default=128, help="patch side of the validation picture (default 128)")
    g.add_argument("--log-lines", type=int, default=2500, help="lines of the log drawn in progress.png (default 2500)")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per figure (default 3)")
    a = p.parse_args(argv)
    if (
        getattr(a, "patch", 16) < 16
        or getattr(a, "batch", 1) < 1
        or getattr(a, "repeats", 1) < 1
        or getattr(a, "steps", 1) < 1
    ):
        p.error("--patch >= 16; --batch, --repeats, --steps >= 1")
    if a.what == "data" and (a.samples < 1 or min(a.workers) < 1):
        p.error("--samples and --workers >= 1")
    if a.what in ("models", "train"):
        if a.device == "cuda" and not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible")
        a.device = a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        a.dtype = a.dtype if a.dtype != "auto" else "bf16" if a.device == "cuda" else "fp32"
    return a


def main(argv=None):
    a = get_args(argv)
    try:
        rows = {
            "models": bench_models,
            "data": bench_data,
            "train": bench_train,
            "preprocess": bench_preprocess,
            "pictures": bench_pictures,
        }[a.what](a)
    except (FileNotFoundError, ValueError) as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    print(f"\n{'benchmark':48s} {'median':>10s} {'min..max':>18s}  {'unit':10s} other")
    for r in rows:
        other = ", ".join(
            f"{k} {v}"
            for k, v in r.items()
            if k in ("samples_per_s", "tflops", "peak_gb", "est_gb", "data_wait") and v is not None
        )
        print(f"{r['bench']:48s} {r['median']:10.2f} {r['min']:8.2f}..{r['max']:<8.2f}  {r['unit']:10s} {other}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
