"""Benchmark 4 of issue 6: finished trials per hour with 1 and with 2 worker processes.

    python benchmarks/bench_workers.py      # needs PostgreSQL on 127.0.0.1:5432, user postgres

Each worker is a `vqlog-sweep` process, started as a user starts one (OMP_NUM_THREADS=1: one
torch thread per worker), all workers of a run sharing one study on PostgreSQL storage and one
MLflow store on PostgreSQL (two throw-away databases, created here and dropped at the end; the
MLflow schema is migrated once before any timing). The spec is the smoke spec (tiny model,
synthetic pulses) cut to one configuration without pruning, with 400 iterations instead of 20:
every trial does the same work, about 2.5 s of training, so the runs differ only in how many
workers share it.

A run asks for --trials N (60) finished trials in a fresh study, with 1 or with 2 workers; runs
alternate (1, 2, 2, 1, 1, 2, ...) so that other load on the machine hits both alike. Throughput
is N per hour of wall time from the launch to the last worker's exit (what a user waits for,
with process start-up), and finished trials per hour between the first trial's start and the last
trial's end in the storage (the steady state). Target: 2 workers >= 1.8x the trials per hour of 1.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

import _common

TARGET = 1.8
ADMIN_URL = os.environ.get("VQLOG_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
SWEEP_BIN = Path(sys.executable).with_name("vqlog-sweep")


@contextmanager
def throwaway_databases(*prefixes: str):
    """PostgreSQL databases `<prefix>_<random>`, dropped on exit; yields their URLs."""
    import psycopg2
    from sqlalchemy.engine import make_url

    try:
        admin = psycopg2.connect(ADMIN_URL, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        raise SystemExit(f"Error: no PostgreSQL at {ADMIN_URL} ({' '.join(str(exc).split())}); "
                         "start one or set VQLOG_BENCH_POSTGRES to an admin URL") from None
    admin.autocommit = True
    names = [f"{p}_{secrets.token_hex(4)}" for p in prefixes]
    try:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'CREATE DATABASE "{name}"')
        # psycopg2 explicitly: SQLAlchemy 2.1 picks psycopg (3) for a bare postgresql://, which
        # vqlog's storage rewrites but MLflow and optuna.load_study do not
        url = make_url(ADMIN_URL).set(drivername="postgresql+psycopg2")
        yield [url.set(database=n).render_as_string(hide_password=False) for n in names]
    finally:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def write_spec(folder: Path, iterations: int) -> Path:
    from vqlog.study.spec import resolve_spec_path

    raw = yaml.safe_load(resolve_spec_path("smoke").read_text())
    raw["budget"] = {"iteration": iterations, "eval_every": iterations // 4}
    # Every trial the same work (one configuration, no pruning): the runs with 1 and with 2
    # workers then differ only in how the trials are spread, not in which ones were sampled or
    # how early the pruner stopped them (with median pruning, a trial's median fit time varied
    # 0.8-2.4 s between runs).
    raw.update(sampler="random", pruner="none")
    raw["fixed"].update(embedding_dim=8, embedding_num=16, lr=3e-3)
    raw["space"] = {"batch": [16]}
    path = folder / "workers.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sweep(workers: int, trials: int, study: str, spec: Path, storage: str, tracking: str,
          folder: Path) -> dict:
    """`workers` vqlog-sweep processes on one study; wall seconds from launch to the last exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(SWEEP_BIN), "--trials", str(trials), "--config", str(spec), "--study", study,
           "--storage", storage, "--tracking-uri", tracking]
    start = time.perf_counter()
    procs = []
    for i in range(workers):
        log = open(folder / f"{study}-w{i}.log", "wb")
        procs.append((subprocess.Popen(cmd, cwd=folder, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        proc.wait()
        log.close()
    wall = time.perf_counter() - start
    for i, (proc, _) in enumerate(procs):
        if proc.returncode != 0:
            text = (folder / f"{study}-w{i}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker {i} of {study} exited with {proc.returncode}:\n{text}")
    return {"wall_s": wall, **steady_state(storage, study)}


def steady_state(storage: str, study: str) -> dict:
    """Finished trials, and their rate between the first start and the last end in the storage."""
    import optuna
    from optuna.trial import TrialState

    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    span = (max(t.datetime_complete for t in done)
            - min(t.datetime_start for t in done)).total_seconds()
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    training = [t.user_attrs.get("train_seconds", 0.0) for t in done]
    return {"finished": len(done), "pruned": sum(t.state == TrialState.PRUNED for t in done),
            "span_s": span, "trials_per_hour_steady": 3600 * len(done) / span,
            # a trial's duration in the storage, and the part of it spent in fit(): if both
            # grow with 2 workers, the workers are short of CPU, not waiting on each other
            "trial_s_median": statistics.median(durations),
            "train_s_median": statistics.median(training)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=60, help="finished trials per run (default 60)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each worker count (default 2)")
    p.add_argument("--iterations", type=int, default=400, help="iterations per trial (default 400)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/workers.json)")
    args = p.parse_args(argv)
    import optuna
    from mlflow.tracking import MlflowClient

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    info = _common.machine("cpu", 1)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="vqlog-bench-workers-") as tmp, \
            throwaway_databases("vqlog_bench_optuna", "vqlog_bench_mlflow") as (storage, tracking):
        folder = Path(tmp)
        spec = write_spec(folder, args.iterations)
        MlflowClient(tracking_uri=tracking).search_experiments()  # migrate the schema, untimed
        order = []
        for r in range(args.rounds):
            order += [1, 2] if r % 2 == 0 else [2, 1]
        sweep(1, 2, "warm-up", spec, storage, tracking, folder)  # Optuna tables, caches
        for i, n in enumerate(order):
            res = sweep(n, args.trials, f"workers{n}-{i}", spec, storage, tracking, folder)
            res["trials_per_hour_wall"] = 3600 * args.trials / res["wall_s"]
            runs[n].append(res)
            print(f"{n} worker(s): {res['wall_s']:.1f} s wall, "
                  f"{res['trials_per_hour_wall']:.0f} trials/h (wall), "
                  f"{res['trials_per_hour_steady']:.0f} trials/h (steady); a trial "
                  f"{res['trial_s_median']:.2f} s, of which fit {res['train_s_median']:.2f} s "
                  f"(medians)", flush=True)
    rows, summary = [], {}
    for kind in ("wall", "steady"):
        key = f"trials_per_hour_{kind}"
        one = [r[key] for r in runs[1]]
        two = [r[key] for r in runs[2]]
        # pair the runs of each round (they ran next to each other)
        ratios = _common.round_ratios(two, one)
        ratio = _common.median(ratios)
        summary[kind] = {"one_worker": one, "two_workers": two, "ratios": ratios,
                         "ratio_median": ratio}
        verdict = "met" if ratio >= TARGET else f"missed ({ratio:.2f}x < {TARGET}x)"
        rows.append([kind, f"{_common.median(one):.0f}", f"{_common.median(two):.0f}",
                     f"{ratio:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})", verdict])
    text = _common.render_table(
        ["trials/h measured over", "1 worker", "2 workers", "2 / 1 (min-max)",
         f"target >= {TARGET}x"], rows)
    print()
    print(text)
    path = _common.write_json("workers", {
        "benchmark": "workers", "command": "python benchmarks/bench_workers.py",
        "target": f"2 workers >= {TARGET}x the finished trials per hour of 1",
        "machine": {**info, "load_average_end": _common.machine()["load_average_1_5_15"]},
        "trials_per_run": args.trials, "iterations": args.iterations, "runs": runs,
        "summary": summary, "table": text}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
