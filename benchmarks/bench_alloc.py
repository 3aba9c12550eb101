"""Benchmark of issue 13: the memory allocator under a CPU training loop (`vqlog.alloc`).

    python benchmarks/bench_alloc.py                 # both shapes, 5 rounds
    python benchmarks/bench_alloc.py --shapes seed --rounds 3

What is timed: `vqlog.train.fit` itself (the real loop: batches, steps, schedule, the device-side
sums, one evaluation at the end) on bench_step's shapes and bench_syncs' synthetic windows, one
torch thread, after a short warm-up fit in the same process. Every variant runs in a fresh
interpreter of its own, since an allocator is chosen when a process starts:

- `glibc`: the C library's malloc as it comes, what a user's own training script runs with;
- `torch-thp`: the same with `THP_MEM_ALLOC_ENABLE=1`, which PyTorch's CPU performance tuning
  guide gives: torch's CPU allocator asks for transparent huge pages for its large tensors;
- `mallopt`: glibc's malloc after `vqlog.alloc.keep_freed_memory()` made its three settings with
  mallopt, what a vqlog command runs with where it cannot restart itself;
- `vqlog`: the same three settings and huge pages for the heap as glibc tunables
  (`vqlog.alloc.TUNABLES` in GLIBC_TUNABLES), what every vqlog command line and sweep worker runs
  with (`vqlog.alloc.restart_tuned`);
- `jemalloc`: jemalloc loaded with LD_PRELOAD, what the usual PyTorch CPU tuning guides suggest
  instead, with its own defaults, and `jemalloc+conf`: with the MALLOC_CONF that PyTorch's CPU
  performance tuning guide gives (both only when libjemalloc is installed: Debian's libjemalloc2).

The child processes run in turn, one round at a time (glibc, torch-thp, mallopt, vqlog, jemalloc, ...), and
the figures are ratios to vqlog's time in the same round: medians and spread over rounds. Next
to the wall time each child reports its CPU time (user and kernel), its minor page faults per
step, its peak RSS and how much of its memory is in transparent huge pages at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import _common

HERE = Path(__file__).resolve().parent
# The jemalloc settings PyTorch's CPU performance tuning guide gives: freed pages are kept (decay
# times of about 100 days) and large blocks get arenas of their own.
GUIDE_CONF = ("oversize_threshold:1,background_thread:true,metadata_thp:auto,"
              "dirty_decay_ms:9000000000,muzzy_decay_ms:9000000000")
JEMALLOC = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
            "/usr/lib/libjemalloc.so.2")

CHILD = r"""
import dataclasses, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
mode, shape, steps = sys.argv[2], sys.argv[3], int(sys.argv[4])
from vqlog import alloc
outcome = alloc.keep_freed_memory() if mode == "vqlog" else "not called"
import torch
torch.set_num_threads(1)
from bench_step import shape_configs
from bench_syncs import synthetic
from vqlog.train import fit
cfg = shape_configs()[shape]
data = synthetic(cfg)
fit(dataclasses.replace(cfg, iteration=3, eval_every=3), data)  # warm-up: code paths, caches
cfg = dataclasses.replace(cfg, iteration=steps, eval_every=steps, log_every=50)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
fit(cfg, data)
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")]
print(json.dumps({"outcome": outcome, "wall": wall, "user": r1.ru_utime - r0.ru_utime,
                  "sys": r1.ru_stime - r0.ru_stime, "minflt": r1.ru_minflt - r0.ru_minflt,
                  "maxrss_mib": r1.ru_maxrss / 1024,
                  "huge_mib": int(huge[0].split()[1]) / 1024 if huge else 0.0}))
"""


def base_env() -> dict:
    """This environment without any allocator setting of its own."""
    from vqlog import alloc

    drop = set(alloc.GLIBC_VARIABLES) | {"LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_CONF",
                                         "THP_MEM_ALLOC_ENABLE", alloc.OPT_OUT}
    return {k: v for k, v in os.environ.items() if k not in drop} | {"OMP_NUM_THREADS": "1"}


def variants() -> dict[str, dict]:
    """Variant name -> (mode, extra environment)."""
    from vqlog import alloc

    out = {"glibc": {"mode": "glibc", "env": {}},
           "torch-thp": {"mode": "glibc", "env": {"THP_MEM_ALLOC_ENABLE": "1"}},
           "mallopt": {"mode": "vqlog", "env": {}},
           "vqlog": {"mode": "vqlog", "env": {"GLIBC_TUNABLES": alloc.TUNABLES}}}
    lib = next((p for p in JEMALLOC if Path(p).exists()), None)
    if lib:
        out["jemalloc"] = {"mode": "jemalloc", "env": {"LD_PRELOAD": lib}}
        out["jemalloc+conf"] = {"mode": "jemalloc", "env": {"LD_PRELOAD": lib, "MALLOC_CONF": GUIDE_CONF}}
    return out


def run_child(variant: dict, shape: str, steps: int) -> dict:
    got = subprocess.run([sys.executable, "-c", CHILD, str(HERE), variant["mode"], shape, str(steps)],
                         env=base_env() | variant["env"], capture_output=True, text=True)
    if got.returncode != 0:
        raise SystemExit(f"a {variant['mode']} child failed:\n{got.stderr[-2000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["seed", "default"], choices=("seed", "default"))
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=30, help="steps per timed fit (default 30)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/alloc.json)")
    args = p.parse_args(argv)
    info = _common.machine("cpu", 1)
    kinds = variants()
    results, rows = {}, []
    for shape in args.shapes:
        runs = {name: [] for name in kinds}
        for r in range(args.rounds):
            for name, variant in kinds.items():
                runs[name].append(run_child(variant, shape, args.steps))
            print(f"{shape} round {r + 1}: " + ", ".join(
                f"{n} {1000 * v[-1]['wall'] / args.steps:.1f} ms/step" for n, v in runs.items()), flush=True)
        ratios = {name: _common.round_ratios([x["wall"] for x in runs[name]],
                                             [x["wall"] for x in runs["vqlog"]]) for name in kinds}
        results[shape] = {"runs": runs, "ratios_to_vqlog": ratios}
        for name in kinds:
            med = lambda key: _common.median([x[key] for x in runs[name]])  # noqa: E731
            lo, hi = _common.spread(ratios[name])
            rows.append([shape, name, f"{1000 * med('wall') / args.steps:.1f}",
                         f"{1000 * med('user') / args.steps:.1f} / {1000 * med('sys') / args.steps:.1f}",
                         f"{med('minflt') / args.steps:.0f}", f"{med('maxrss_mib'):.0f}",
                         f"{med('huge_mib'):.0f}",
                         "" if name == "vqlog" else
                         f"{_common.median(ratios[name]):.3f}x ({lo:.3f}-{hi:.3f})"])
    text = _common.render_table(
        ["shape", "allocator", "ms/step (median)", "user / kernel CPU ms/step", "page faults/step",
         "peak RSS MiB", "huge pages MiB", "time / vqlog's per round (min-max)"], rows)
    print()
    print(text)
    path = _common.write_json("alloc", {
        "benchmark": "alloc", "command": "python benchmarks/bench_alloc.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**info, "load_average_end": _common.machine()["load_average_1_5_15"]},
        "steps": args.steps, "rounds": args.rounds, "variants": list(kinds),
        "results": results, "table": text}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
