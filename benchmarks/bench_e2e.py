"""Benchmarks 5 of issue 6 and 7 of issue 13: `vqlog-sweep --trials 50` end to end.

    python benchmarks/bench_e2e.py                       # the embedded defaults (seed spec)
    python benchmarks/bench_e2e.py --threads 1           # with OMP_NUM_THREADS=1
    python benchmarks/bench_e2e.py -- --config smoke     # anything after -- goes to vqlog-sweep

Runs the command a user runs after `make install`, in a fresh temporary folder (so the default
./optuna.db, ./mlflow.db, ./mlartifacts and ./results start empty), under GNU `/usr/bin/time -v`,
and reports its wall time and the worker's peak resident memory. Targets (2-core CPU): 30 minutes
and under 2 GiB per worker. The sweep's own output is streamed and saved beside the JSON.

    python benchmarks/bench_e2e.py --compare 3           # issue 13: `make sweep` against 3 singles

`--compare K` runs what `make sweep` runs, `vqlog-sweep --trials 50 --workers auto`, and K
single-worker sweeps `vqlog-sweep --trials 50 --workers 1 --seed k` (k = 1..K, the spread a
single worker's search has), each in its own fresh folder, in the order single 1, auto,
single 2, ... Targets (2-core CPU): the `--workers auto` sweep in at most 10 minutes, and its
best val MSE (the lowest final val MSE of a COMPLETE trial) within the singles' min-max. The
singles' results do not depend on the load (seeded, with the same threads), their wall times
do: `--compare-after N` starts at the N-th single the runs whose wall time is not reported
as a measurement (the machine was busy then), still checked for their MSE.
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
AUTO_TARGET_MINUTES = 10  # issue 13: `make sweep` (--workers auto), 2-core CPU
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


def sweep_once(cmd: list[str], env: dict, keep: bool) -> dict:
    """One sweep in a fresh folder under GNU time: wall, peak RSS, exit code, output and the
    study's best val MSE (read from the folder's ./optuna.db)."""
    folder = Path(tempfile.mkdtemp(prefix="vqlog-bench-e2e-"))
    report = folder / "time-v.txt"
    print(f"in {folder}: {' '.join(cmd)}", flush=True)
    log_lines: list[str] = []
    with subprocess.Popen([TIME, "-v", "-o", str(report), *cmd], cwd=folder, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            log_lines.append(line)
    measured = {**parse_time_v(report.read_text()), "exit_code": proc.returncode,
                "best_val_mse": best_mse(folder / "optuna.db"),
                "sweep_command": " ".join(["vqlog-sweep", *cmd[1:]])}
    if keep:
        print(f"kept {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return {**measured, "log": "".join(log_lines)}


def best_mse(path: Path) -> float | None:
    """The lowest final val MSE of a COMPLETE trial of the (one) study in an Optuna file."""
    if not path.exists():
        return None
    import optuna

    from vqlog.study.worker import best_trial

    storage = f"sqlite:///{path}"
    names = optuna.get_all_study_names(storage)
    if len(names) != 1:
        return None
    best = best_trial(optuna.load_study(study_name=names[0], storage=storage))
    return None if best is None else best.values[0]


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
    p.add_argument("--compare", type=int, metavar="K",
                   help="`--workers auto` against K single-worker sweeps (issue 13)")
    p.add_argument("--compare-after", type=int, metavar="N",
                   help="singles from the N-th on ran on a busy machine: MSE only")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder(s)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/e2e.json, "
                                 "or e2e-compare.json with --compare)")
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
    base = [str(sweep_bin), "--trials", str(args.trials), *extra]
    if args.compare:
        return compare(args, base, env, info)
    one = sweep_once(base, env, args.keep)
    minutes = one["wall_s"] / 60
    gib = one["max_rss_kib"] / 2**20
    rows = [
        ["wall time", f"{minutes:.1f} min", f"<= {TARGET_MINUTES} min",
         "met" if minutes <= TARGET_MINUTES else f"missed by {minutes - TARGET_MINUTES:.1f} min"],
        ["peak RSS (the worker)", f"{gib:.2f} GiB", f"< {TARGET_GIB} GiB",
         "met" if gib < TARGET_GIB else f"missed by {gib - TARGET_GIB:.2f} GiB"],
    ]
    text = _common.render_table(["measure", "value", "target", "verdict"], rows)
    print(f"\n{one['sweep_command']} (exit {one['exit_code']}), "
          f"OMP_NUM_THREADS={info['OMP_NUM_THREADS']}\n")
    print(text)
    log = one.pop("log")
    out = _common.write_json("e2e", {
        "benchmark": "e2e", "command": "python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:]),
        "target": f"wall <= {TARGET_MINUTES} min, peak RSS < {TARGET_GIB} GiB per worker",
        "machine": {**info, "load_average_end": _common.machine()["load_average_1_5_15"]},
        **one, "table": text, "output_tail": "".join(log.splitlines(True)[-15:])}, args.out)
    out.with_suffix(".log").write_text(log)
    print(f"\nwrote {out} and {out.with_suffix('.log')}")
    return one["exit_code"]


def compare(args, base: list[str], env: dict, info: dict) -> int:
    """`--workers auto` (what `make sweep` runs) against K seeded single-worker sweeps."""
    plan = [("single 1", [*base, "--workers", "1", "--seed", "1"]),
            ("auto", [*base, "--workers", "auto"])]
    plan += [(f"single {k}", [*base, "--workers", "1", "--seed", str(k)])
             for k in range(2, args.compare + 1)]
    runs, logs = {}, []
    for label, cmd in plan:
        busy = (args.compare_after is not None and label.startswith("single")
                and int(label.split()[1]) >= args.compare_after)
        load = _common.machine()["load_average_1_5_15"]
        one = sweep_once(cmd, env, args.keep)
        logs.append(f"### {label}: {one['sweep_command']}\n{one.pop('log')}")
        runs[label] = {**one, "load_before": load, "wall_reported": not busy}
        print(f"{label}: {one['wall_s'] / 60:.1f} min, best val MSE {one['best_val_mse']}",
              flush=True)
    singles = [r["best_val_mse"] for k, r in runs.items() if k != "auto"]
    auto = runs["auto"]
    lo, hi = min(singles), max(singles)
    within = lo <= auto["best_val_mse"] <= hi
    minutes = auto["wall_s"] / 60
    rows = [[label, " ".join(r["sweep_command"].split()[1:]),
             f"{r['wall_s'] / 60:.1f} min" if r["wall_reported"] else
             f"({r['wall_s'] / 60:.1f} min, busy machine)",
             f"{r['best_val_mse']:.5f}", f"{r['max_rss_kib'] / 2**20:.2f} GiB", r["exit_code"]]
            for label, r in runs.items()]
    text = _common.render_table(["run", "command", "wall", "best val MSE", "peak RSS", "exit"],
                                rows)
    verdicts = _common.render_table(["target", "value", "verdict"], [
        [f"--workers auto in <= {AUTO_TARGET_MINUTES} min", f"{minutes:.1f} min",
         "met" if minutes <= AUTO_TARGET_MINUTES else "missed"],
        ["its best val MSE within the singles' min-max", f"{auto['best_val_mse']:.5f} in "
         f"[{lo:.5f}, {hi:.5f}]", "met" if within else
         "below the spread (better than every single)" if auto["best_val_mse"] < lo else "missed"]])
    print("\n" + text + "\n\n" + verdicts)
    out = _common.write_json("e2e-compare", {
        "benchmark": "e2e-compare",
        "command": "python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:]),
        "target": f"--workers auto <= {AUTO_TARGET_MINUTES} min; its best val MSE within the "
                  f"spread of {args.compare} single-worker sweeps",
        "machine": {**info, "load_average_end": _common.machine()["load_average_1_5_15"]},
        "runs": runs, "auto_within_singles": within, "table": text, "verdicts": verdicts},
        args.out)
    out.with_suffix(".log").write_text("\n".join(logs))
    print(f"\nwrote {out} and {out.with_suffix('.log')}")
    return max(r["exit_code"] for r in runs.values())


if __name__ == "__main__":
    sys.exit(main())
