"""
Throughput of the data pipeline (more benchmarks join here as the stages land).

    python preprocess.py --demo big --demo-cases 8 --demo-shape 160 192 160
    python bench.py data --data big/preprocessed --patch 128 --workers 1 2

Prints one JSON line per measurement, then a table. Each figure is the median of
--repeats timed runs (after one warm-up run) with the spread (min..max).
  data: samples/s of PretrainDataset per preset in one process (= per CPU core, with
        torch and SimpleITK held to one thread), with N DataLoader worker processes, and
        the cost of random_mask on a batch.
"""
import argparse
import json
import statistics
import sys
import time

import torch

import data


def timed(fn, repeats):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def report(rows, name, unit, values):
    med = statistics.median(values)
    row = {"bench": name, "unit": unit, "median": round(med, 3), "min": round(min(values), 3),
           "max": round(max(values), 3), "repeats": len(values)}
    print(json.dumps(row), flush=True)
    rows.append(row)


def bench_data(a):
    torch.set_num_threads(1)
    rows = []
    for preset in a.presets:
        ds = data.PretrainDataset(a.data, patch=a.patch, preset=preset, seed=0, split=None)
        n = a.samples
        counter = iter(range(10 ** 9))

        def one_core():
            for _ in range(n):
                ds.sample(next(counter))
        report(rows, f"data/{preset}/1 process", "samples/s", [n / t for t in timed(one_core, a.repeats)])
        for w in a.workers:
            if w < 2:
                continue
            steps = max(1, n * w // a.batch)  # n samples per worker, fresh sample numbers each run
            start = iter(range(0, 10 ** 9, steps))

            def loader():
                sampler = data.StepSampler(next(start), steps, a.batch)
                for _ in torch.utils.data.DataLoader(ds, batch_size=a.batch, sampler=sampler, num_workers=w):
                    pass
            times = timed(loader, a.repeats)
            report(rows, f"data/{preset}/{w} workers", "samples/s", [steps * a.batch / t for t in times])
    x = torch.rand(a.batch, 1, a.patch, a.patch, a.patch)
    report(rows, f"mask/batch {a.batch}", "ms", [t * 1e3 for t in timed(lambda: data.random_mask(x), a.repeats)])
    return rows


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="data pipeline: samples/s per preset and worker count, masking cost")
    d.add_argument("--data", default="demo/preprocessed", help="preprocessed dataset (default demo/preprocessed)")
    d.add_argument("--patch", type=int, default=128, help="patch side (default 128)")
    d.add_argument("--batch", type=int, default=8, help="batch for the loader and masking runs (default 8)")
    d.add_argument("--presets", nargs="+", default=list(data.PRESETS), choices=data.PRESETS, help="presets to time")
    d.add_argument("--workers", type=int, nargs="+", default=[1], help="DataLoader worker counts to time (1 = in-process only)")
    d.add_argument("--samples", type=int, default=16, help="samples per timed run and per worker (default 16)")
    d.add_argument("--repeats", type=int, default=3, help="timed runs per figure (default 3)")
    a = p.parse_args(argv)
    if a.patch < 16 or a.batch < 1 or a.samples < 1 or a.repeats < 1 or min(a.workers) < 1:
        p.error("--patch >= 16, --batch, --samples, --repeats, --workers >= 1")
    return a


def main(argv=None):
    a = get_args(argv)
    try:
        rows = bench_data(a)
    except (FileNotFoundError, ValueError) as e:
        print(f"bench.py: {e}", file=sys.stderr)
        return 2
    print(f"\n{'benchmark':32s} {'median':>10s} {'min..max':>18s}  unit")
    for r in rows:
        print(f"{r['bench']:32s} {r['median']:10.2f} {r['min']:8.2f}..{r['max']:<8.2f}  {r['unit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
