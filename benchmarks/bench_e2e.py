"""Benchmark 5 of issue 6: `vqlog-sweep --trials 50` end to end, wall time and peak memory.

    python benchmarks/bench_e2e.py                       # the embedded defaults (seed spec)
    python benchmarks/bench_e2e.py --threads 1           # with OMP_NUM_THREADS=1
    python benchmarks/bench_e2e.py -- --config smoke     # anything after -- goes to vqlog-sweep

Runs the command a user runs after `make install`, in a fresh temporary folder (so the default
./optuna.db, ./mlflow.db, ./mlartifacts and ./results start empty), under GNU `/usr/bin/time -v`,
and reports its wall time and the worker's peak resident memory. Targets (2-core CPU): 30 minutes
and under 2 GiB per worker. The sweep's own output is streamed and saved beside the JSON.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import _common

TARGET_MINUTES = 30
TARGET_GIB = 2.0
TIME = "/usr/bin/time"


def parse_time_v(text: str) -> dict:
    """Wall seconds and peak RSS (KiB) from GNU time -v's report."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not wall or not rss:
        raise ValueError(f"not a GNU time -v report:\n{text[-2000:]}")
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = 60 * seconds + float(part)
    return {"wall_s": seconds, "max_rss_kib": int(rss.group(1))}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--threads", type=int,
                   help="export OMP_NUM_THREADS for the sweep (default: the environment's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--out", help="JSON path (default benchmarks/results/e2e.json)")
    args = p.parse_args(argv)
    if not Path(TIME).exists():
        print(f"Error: {TIME} not found; install GNU time (apt-get install time)", file=sys.stderr)
        return 2
    sweep_bin = Path(sys.executable).with_name("vqlog-sweep")
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    info = _common.machine("cpu", None)
    info["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "(unset: torch uses every core)")
    folder = Path(tempfile.mkdtemp(prefix="vqlog-bench-e2e-"))
    report = folder / "time-v.txt"
    cmd = [str(sweep_bin), "--trials", str(args.trials), *extra]
    print(f"in {folder}: {' '.join(cmd)}", flush=True)
    log_lines: list[str] = []
    with subprocess.Popen([TIME, "-v", "-o", str(report), *cmd], cwd=folder, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            log_lines.append(line)
    measured = parse_time_v(report.read_text())
    minutes = measured["wall_s"] / 60
    gib = measured["max_rss_kib"] / 2**20
    rows = [
        ["wall time", f"{minutes:.1f} min", f"<= {TARGET_MINUTES} min",
         "met" if minutes <= TARGET_MINUTES else f"missed by {minutes - TARGET_MINUTES:.1f} min"],
        ["peak RSS (the worker)", f"{gib:.2f} GiB", f"< {TARGET_GIB} GiB",
         "met" if gib < TARGET_GIB else f"missed by {gib - TARGET_GIB:.2f} GiB"],
    ]
    text = _common.render_table(["measure", "value", "target", "verdict"], rows)
    print(f"\nvqlog-sweep --trials {args.trials} {' '.join(extra)} (exit {proc.returncode}), "
          f"OMP_NUM_THREADS={info['OMP_NUM_THREADS']}\n")
    print(text)
    out = _common.write_json("e2e", {
        "benchmark": "e2e", "command": "python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:]),
        "sweep_command": " ".join(["vqlog-sweep", *cmd[1:]]), "exit_code": proc.returncode,
        "target": f"wall <= {TARGET_MINUTES} min, peak RSS < {TARGET_GIB} GiB per worker",
        "machine": {**info, "load_average_end": _common.machine()["load_average_1_5_15"]},
        **measured, "table": text, "output_tail": "".join(log_lines[-15:])}, args.out)
    out.with_suffix(".log").write_text("".join(log_lines))
    print(f"\nwrote {out} and {out.with_suffix('.log')}")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"kept {folder}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
