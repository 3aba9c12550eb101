"""Issue 13: sweeps started apart on one host share its cores (`vqlog.study.cores.CoreShare`).

    python benchmarks/bench_core_share.py                  # 2 sweeps, 6 trials of a seed shape
    python benchmarks/bench_core_share.py --sweeps 3 --trials 9 --iterations 100

What a user does on one host without `--workers`: starts `vqlog-sweep` in two terminals (or two
scheduler jobs) on one study, the SQLite defaults, no OMP_NUM_THREADS. Two ways, each in a fresh
folder, in the order shared, alone-sized, shared, ... (`--rounds`):

- `shared`: as vqlog runs them now: each trial takes cores / (vqlog processes training on the
  host) torch threads;
- `alone-sized`: every process with the host's cores as torch threads (OMP_NUM_THREADS = cores),
  which is what each did before, sizing torch's pool by the whole host.

The sweeps start `--stagger` seconds apart and share one study of `--trials` trials (the seed
spec's shape at batch 64, embedding_dim 128, `--iterations` iterations, no pruner). Reported: the
wall time until every sweep has ended, the median seconds a trial took, and the ratio
alone-sized / shared of both.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

SPEC = """name: share
data: {{source: synthetic}}
budget: {{iteration: {iterations}, eval_every: {iterations}}}
objective: mse
sampler: random
pruner: none
fixed: {{quantizer: vq, d_model: 32, d_state: 32, n_layers: 2, window: 256, stride: 64,
        downsample: 4}}
space:
  batch: [64]
  lr: {{type: float, low: 1.0e-4, high: 1.0e-3, log: true}}
  embedding_dim: [128]
  embedding_num: [256]
"""
TRIAL_SECONDS = re.compile(r"^Seq\d+\s.*\((\d+) it, ([0-9.]+) s\)", re.M)


def run_sweeps(mode: str, sweeps: int, trials: int, iterations: int, stagger: float,
               cores: int) -> dict:
    """`sweeps` single-worker sweeps on one study in a fresh folder; their wall time and the
    seconds of each trial."""
    with tempfile.TemporaryDirectory(prefix=f"vqlog-share-{mode}-") as folder:
        spec = Path(folder) / "share.yaml"
        spec.write_text(SPEC.format(iterations=iterations))
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env["TMPDIR"] = folder  # their own lock folder: nothing else on the host is counted
        if mode == "alone-sized":
            env["OMP_NUM_THREADS"] = str(cores)
        cmd = [str(Path(sys.executable).parent / "vqlog-sweep"), "--trials", str(trials),
               "--config", str(spec)]
        start = time.perf_counter()
        procs = []
        for i in range(sweeps):
            if i:
                time.sleep(stagger)
            procs.append(subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate()[0] for p in procs]
        wall = time.perf_counter() - start
        if any(p.returncode for p in procs):
            raise SystemExit(f"a sweep failed ({mode}):\n" + "\n".join(o[-2000:] for o in outputs))
    seconds = [float(m.group(2)) for o in outputs for m in TRIAL_SECONDS.finditer(o)]
    return {"mode": mode, "wall_s": round(wall, 1), "trial_s": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweeps", type=int, default=2, help="sweeps started apart (default 2)")
    p.add_argument("--trials", type=int, default=6, help="the study's trials (default 6)")
    p.add_argument("--iterations", type=int, default=300, help="per trial (default 300)")
    p.add_argument("--stagger", type=float, default=2.0, help="seconds between starts")
    p.add_argument("--rounds", type=int, default=1, help="pairs of runs, interleaved")
    p.add_argument("--out", help="JSON path (default benchmarks/results/core_share.json)")
    args = p.parse_args(argv)
    from vqlog.study.hosts import cores

    n = cores()
    info = _common.machine("cpu", n)
    runs = []
    for _ in range(args.rounds):
        for mode in ("shared", "alone-sized"):
            print(f"{mode}: {args.sweeps} sweeps, {args.trials} trials ...", flush=True)
            runs.append(run_sweeps(mode, args.sweeps, args.trials, args.iterations,
                                   args.stagger, n))
    rows, summary = [], {}
    for mode in ("shared", "alone-sized"):
        mine = [r for r in runs if r["mode"] == mode]
        wall = statistics.median(r["wall_s"] for r in mine)
        trial = statistics.median(s for r in mine for s in r["trial_s"])
        summary[mode] = {"wall_s": wall, "median_trial_s": trial}
        rows.append([mode, f"{wall:.1f}", f"{trial:.1f}"])
    ratio_wall = summary["alone-sized"]["wall_s"] / summary["shared"]["wall_s"]
    ratio_trial = summary["alone-sized"]["median_trial_s"] / summary["shared"]["median_trial_s"]
    table = _common.render_table(["torch threads", "wall s", "median s a trial"], rows)
    table += (f"\n\nalone-sized / shared: {ratio_wall:.2f}x the wall time, {ratio_trial:.2f}x the "
              f"seconds a trial ({args.sweeps} sweeps started {args.stagger:g} s apart, "
              f"{args.trials} trials of {args.iterations} iterations, {n} cores)")
    print(table)
    path = _common.write_json("core_share", {
        "benchmark": "core_share", "command": "python benchmarks/bench_core_share.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**info, "load_average_end": _common.machine()["load_average_1_5_15"]},
        "runs": runs, "summary": summary, "ratio_wall": ratio_wall, "ratio_trial": ratio_trial,
        "table": table}, args.out)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
