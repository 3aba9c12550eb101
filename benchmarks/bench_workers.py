"""Benchmark of issues 6 and 13: one `vqlog-sweep --workers N` on a shared study, N = 1 to 16.

    python benchmarks/bench_workers.py      # needs PostgreSQL on 127.0.0.1:5432, user postgres

Each run is one `vqlog-sweep --trials T --workers N` process, as a user starts it, on a fresh
study in PostgreSQL storage with an `mlflow server` backed by PostgreSQL (throw-away databases,
created here and dropped at the end; the MLflow schema is migrated before any timing). The
trials are cheap on purpose (the smoke spec cut to one configuration, no pruning, 40
iterations, well under a second of training): what grows with the number of workers is then
the per-trial overhead (process start-up, Optuna, MLflow, the table), not the training.

Runs of every worker count alternate within a round (the order rotating from round to round),
so that other load on the machine hits them alike. Reported per worker count:

- trials per minute over the wall time from the launch to the parent's exit (what a user waits
  for, start-up included), and between the first trial's start and the last trial's end in the
  storage (the steady state);
- the per-trial overhead: a trial's seconds in the storage beyond its training (median), and the
  worker seconds a finished trial costs (workers x steady span / trials) beyond its training;
- the checks: exactly T finished, no trial number twice, one MLflow run per finished trial with
  Optuna's state, no run of an unknown trial, and a table with one row per trial.

The curve goes to benchmarks/results/workers.png. On the 2-core machine the CPU is full at two
workers: more workers than cores only adds contention, which the curve shows. Target (issue 6):
2 workers >= 1.8x the trials per minute of 1.
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
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import yaml

import _common

TARGET = 1.8
COUNTS = (1, 2, 4, 8, 16)
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
    raw["budget"] = {"iteration": iterations, "eval_every": iterations // 2}
    # Every trial the same work (one configuration, no pruning): the runs then differ only in
    # how many workers share them, not in which configurations were sampled.
    raw.update(sampler="random", pruner="none")
    raw["fixed"].update(embedding_dim=8, embedding_num=16, lr=3e-3)
    raw["space"] = {"batch": [16]}
    path = folder / "workers.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def sweep(workers: int, trials: int, study: str, spec: Path, storage: str, tracking: str,
          folder: Path) -> dict:
    """`vqlog-sweep --workers N`; wall seconds from the launch to its exit, then the checks."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)  # --workers splits the cores itself
    cmd = [str(SWEEP_BIN), "--trials", str(trials), "--config", str(spec), "--study", study,
           "--storage", storage, "--tracking-uri", tracking, "--workers", str(workers),
           "--device", "cpu"]
    log = folder / f"{study}.log"
    start = time.perf_counter()
    with open(log, "wb") as out:
        code = subprocess.run(cmd, cwd=folder, env=env, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{study} exited with {code}:\n{log.read_text(errors='replace')[-3000:]}")
    return {"wall_s": wall, **steady_state(storage, study, workers),
            "checks": check(storage, tracking, study, trials, folder)}


def check(storage: str, tracking: str, study: str, trials: int, folder: Path) -> dict:
    """Exactly `trials` finished, no trial twice or lost, in Optuna, MLflow and the table."""
    import optuna
    from mlflow.tracking import MlflowClient

    from vqlog.tracking import table
    from vqlog.tracking.rows import TRIAL_ROLE, search_all, study_experiment

    frozen = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    finished = {t.number: t.state.name for t in frozen if t.state.name in ("COMPLETE", "PRUNED")}
    client = MlflowClient(tracking_uri=tracking)
    runs = search_all(client, study_experiment(client, study).experiment_id, TRIAL_ROLE)
    numbers = Counter(int(r.data.tags["optuna.trial_number"]) for r in runs)
    settled = [(int(r.data.tags["optuna.trial_number"]), r.data.tags.get("optuna.state"))
               for r in runs if r.data.tags.get("optuna.state") in ("COMPLETE", "PRUNED")]
    text = table.table_path(folder / "results", study).read_text()
    table_rows = [line for line in text.splitlines() if line.startswith("| Seq")]
    result = {
        "finished": len(finished),
        "exactly_n": len(finished) == trials,
        "numbers_unique": len({t.number for t in frozen}) == len(frozen),
        # a finished trial has exactly one run in a finished state, with Optuna's state
        "one_run_per_finished_trial": sorted(settled) == sorted(finished.items()),
        "no_unknown_runs": set(numbers) <= {t.number for t in frozen},
        "table_one_row_per_trial": len(table_rows) == len(numbers),
    }
    result["ok"] = all(v for k, v in result.items() if k != "finished")
    if not result["ok"]:
        raise RuntimeError(f"{study}: checks failed: {result}")
    return result


def steady_state(storage: str, study: str, workers: int) -> dict:
    """Finished trials, and their rate between the first start and the last end in the storage."""
    import optuna
    from optuna.trial import TrialState

    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    span = (max(t.datetime_complete for t in done)
            - min(t.datetime_start for t in done)).total_seconds()
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    training = [t.user_attrs.get("train_seconds", 0.0) for t in done]
    fit = statistics.median(training)
    return {"finished": len(done), "pruned": sum(t.state == TrialState.PRUNED for t in done),
            "span_s": span, "trials_per_min_steady": 60 * len(done) / span,
            "overhead_in_trial_s": statistics.median(d - f for d, f in zip(durations, training)),
            "overhead_worker_s": workers * span / len(done) - fit,
            # a trial's duration in the storage, and the part of it spent in fit(): if both
            # grow with 2 workers, the workers are short of CPU, not waiting on each other
            "trial_s_median": statistics.median(durations),
            "train_s_median": statistics.median(training)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=64, help="finished trials per run (default 64)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each worker count (default 2)")
    p.add_argument("--iterations", type=int, default=40, help="iterations per trial (default 40)")
    p.add_argument("--counts", default=",".join(map(str, COUNTS)),
                   help="worker counts (default 1,2,4,8,16)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/workers.json)")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    import optuna

    from _servers import mlflow_server

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    info = _common.machine("cpu", None)
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="vqlog-bench-workers-") as tmp, \
            throwaway_databases("vqlog_bench_optuna", "vqlog_bench_mlflow") as (storage, backend):
        folder = Path(tmp)
        spec = write_spec(folder, args.iterations)
        with mlflow_server(folder / "server", backend_uri=backend, extra=[
                "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts"]) as srv:
            sweep(2, 2, "warm-up", spec, storage, srv.url, folder)  # schemas, caches
            for r in range(args.rounds):
                order = counts[r % len(counts):] + counts[:r % len(counts)]
                for n in order:
                    res = sweep(n, args.trials, f"workers{n}-{r}", spec, storage, srv.url, folder)
                    res["trials_per_min_wall"] = 60 * args.trials / res["wall_s"]
                    runs[n].append(res)
                    print(f"{n:2d} worker(s): {res['wall_s']:5.1f} s wall, "
                          f"{res['trials_per_min_wall']:5.1f} trials/min (wall), "
                          f"{res['trials_per_min_steady']:5.1f} (steady); overhead per trial "
                          f"{res['overhead_in_trial_s']:.2f} s in the trial, "
                          f"{res['overhead_worker_s']:.2f} s of worker time; fit "
                          f"{res['train_s_median']:.2f} s; checks ok", flush=True)
    payload = summarize(runs, counts, args, info)
    print()
    print(payload["table"])
    plot(payload, RESULTS_PNG if args.out is None else Path(args.out).with_suffix(".png"))
    path = _common.write_json("workers", payload, args.out)
    print(f"\nwrote {path}")
    return 0


RESULTS_PNG = _common.RESULTS / "workers.png"


def summarize(runs: dict[int, list[dict]], counts: list[int], args, info: dict) -> dict:
    med = {n: {k: _common.median([r[k] for r in runs[n]])
               for k in ("trials_per_min_wall", "trials_per_min_steady", "overhead_in_trial_s",
                         "overhead_worker_s", "train_s_median", "wall_s")} for n in counts}
    rows = []
    for n in counts:
        # each run against the 1-worker run of its round (neighbours in time)
        ratio = (_common.median(_common.round_ratios(
            [r["trials_per_min_wall"] for r in runs[n]],
            [r["trials_per_min_wall"] for r in runs[counts[0]]])) if counts[0] == 1 else None)
        med[n]["speedup_wall"] = ratio
        rows.append([n, f"{med[n]['trials_per_min_wall']:.1f}",
                     f"{med[n]['trials_per_min_steady']:.1f}",
                     "" if ratio is None else f"{ratio:.2f}x",
                     f"{med[n]['train_s_median']:.2f}", f"{med[n]['overhead_in_trial_s']:.2f}",
                     f"{med[n]['overhead_worker_s']:.2f}",
                     "yes" if all(r["checks"]["ok"] for r in runs[n]) else "NO"])
    text = _common.render_table(
        ["workers", "trials/min (wall)", "trials/min (steady)", "vs 1 (wall)", "fit s",
         "overhead s in a trial", "overhead worker s/trial", "exactly N, no duplicate"], rows)
    two = med.get(2, {}).get("speedup_wall")
    verdict = None if two is None else ("met" if two >= TARGET else f"missed ({two:.2f}x)")
    return {"benchmark": "workers", "command": "python benchmarks/bench_workers.py",
            "target": f"2 workers >= {TARGET}x the trials per minute of 1: {verdict}",
            "machine": {**info, "load_average_end": _common.machine()["load_average_1_5_15"]},
            "trials_per_run": args.trials, "iterations": args.iterations, "counts": counts,
            "runs": runs, "medians": med, "table": text}


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = payload["counts"]
    med = payload["medians"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("trials_per_min_wall", "wall (start-up included)"),
                       ("trials_per_min_steady", "steady state")):
        left.plot(counts, [med[n][key] for n in counts], marker="o", label=label)
    left.set(xscale="log", xlabel="workers (--workers N)", ylabel="finished trials per minute",
             title="throughput")
    for key, label in (("overhead_in_trial_s", "in a trial, beyond training"),
                       ("overhead_worker_s", "worker seconds per trial, beyond training")):
        right.plot(counts, [med[n][key] for n in counts], marker="o", label=label)
    right.set(xscale="log", xlabel="workers (--workers N)", ylabel="seconds", title="overhead per trial")
    for ax in (left, right):
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = payload["machine"]
    fig.suptitle(f"vqlog-sweep --workers N, {payload['iterations']}-iteration trials, PostgreSQL + "
                 f"mlflow server; {m['cpu_cores']} cores, {m['date']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
