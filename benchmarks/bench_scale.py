"""Benchmark of issue 13: a worker's tracking seconds per trial as the study grows.

    python benchmarks/bench_scale.py     # needs PostgreSQL on 127.0.0.1:5432, user postgres

Six stores, each holding one study with N existing trial runs (N = 100, 1,000, 10,000), for
the two topologies a user runs:

- `sqlite`: the embedded default, an MLflow SQLite store and an Optuna SQLite file;
- `server`: an `mlflow server` process backed by PostgreSQL (proxied artifacts), and an Optuna
  study on PostgreSQL (throw-away databases, dropped at the end).

Each store starts from one real trial (the smoke spec, cut to 40 iterations and random
sampling), whose Optuna trial and MLflow run (tags, params, metrics) are then copied until the
study has N of each. The existing runs are then read once by the measuring worker, as any worker
reads them once when it starts (reconcile at `start_study`, whose read also gives the table its
first rows); that start and the worker's first table are reported apart.

A round then runs one more trial in every store in turn (sizes and topologies interleaved, so
that other load hits them alike) with `vqlog.study.worker.run`, exactly as `vqlog-sweep` runs
it, with a Tracker whose table refresh is forced after every trial (`table_seconds=0`: the
worst case; a sweep refreshes it at most every 10 s). Per trial it adds up the seconds spent in
every tracker call the trial makes: its run (`start_trial`), dataset, evaluations, checkpoints,
`finish` (summary metrics, figures, weights), the registry alias (`register_best`) and
`after_trial` (reconcile, the table regenerated and published). Target: at most 0.5 s per trial
at 10,000 runs, and within 1.5x of the 100-run figure. A run sends its metric batches and
checkpoint uploads from a thread of its own while the trial trains; what `finish` waits for of
them is in the figure, and their own seconds on that thread are reported beside it.

Optuna's study plots read every trial and are not part of that figure: a worker draws them at
most once a minute and never more than a tenth of its time (see Tracker.after_trial). They are
timed once per store and reported next to it, with what they would add per trial if drawn
after every trial.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _common
import bench_tracking
from bench_workers import throwaway_databases
from vqlog.study.spec import load_sweep
from vqlog.study.worker import run
from vqlog.tracking.rows import RowCache
from vqlog.tracking.runs import Tracker

TARGET_S, TARGET_RATIO = 0.5, 1.5
SIZES = (100, 1000, 10000)
SENDER = "sender"  # seconds of the runs' background sends, reported beside the trial's calls
TRIAL_CALLS = ("start_trial", "log_dataset", "log_eval", "log_history", "log_checkpoint",
               "finish", "register_best", "latest_checkpoint", "after_trial")


class TimedTracker(bench_tracking.TimedTracker):
    """bench_tracking's timed Tracker (start_study and after_trial timed there), timing every
    call a trial makes (its runs' calls too)."""

    def start_trial(self, *args, **kwargs):
        # Tracker's own, not bench_tracking's (which wraps fewer of the run's calls)
        trial_run = self._timed("start_trial", Tracker.start_trial.__get__(self), *args, **kwargs)
        for name in ("log_dataset", "log_eval", "log_history", "log_checkpoint", "finish"):
            method = getattr(trial_run, name)
            setattr(trial_run, name, lambda *a, _m=method, _k=name, **k: self._timed(_k, _m, *a, **k))
        # the sends a run makes from its own thread while the trial trains (metric batches,
        # checkpoint uploads): not in the trial's calls above unless `finish` waits for them
        send = trial_run._send
        trial_run._send = lambda call: send(lambda: self._timed(SENDER, call))
        return trial_run

    def register_best(self, *args, **kwargs):
        return self._timed("register_best", super().register_best, *args, **kwargs)

    def latest_checkpoint(self, *args, **kwargs):
        return self._timed("latest_checkpoint", super().latest_checkpoint, *args, **kwargs)

    def finish_study(self, study):
        """Once per worker: the table (timed apart); the study plots are timed on their own."""
        self._timed("finish_study", self.reconcile, study)
        return self._timed("finish_study", self.refresh_table)

    def take(self) -> dict[str, float]:
        seconds, self.seconds = dict(self.seconds), defaultdict(float)
        return seconds


def bench_spec(name: str):
    spec = load_sweep("smoke")
    return dataclasses.replace(spec, name=name, iteration=40, eval_every=10, sampler="random",
                               pruner="none", enqueue=())


def quiet_run(spec, trials: int, storage: str, tracker: Tracker):
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run(spec, trials, storage, tracker=tracker, out=lambda line: None, bar=False)
    if summary.finished != trials:
        raise RuntimeError(f"{spec.name}: {summary.finished} of {trials} trials finished")
    return summary


@dataclasses.dataclass
class Store:
    topology: str
    size: int
    storage: str  # the Optuna storage
    tracking: str  # what the worker tracks to: the SQLite store, or the server's URL
    folder: Path
    backend: str | None = None  # the server's PostgreSQL database (filled directly)
    tracker: TimedTracker | None = None
    trials: int = 0

    @property
    def name(self) -> str:
        return f"scale-{self.topology}-{self.size}"


def fill(store: Store, threads: int) -> None:
    """One real trial, then copies of its Optuna trial and MLflow run up to `store.size`.

    Preparing 10,000 runs one commit at a time takes most of an hour on this machine's disk, so
    the copies are written where commits are cheap, and the stores are then put back as a worker
    finds them: the SQLite files are filled on tmpfs and copied back; the PostgreSQL databases
    are filled directly (not through the server) with synchronous_commit off, reset afterwards."""
    spec = bench_spec(store.name)
    quiet_run(spec, 1, store.storage, Tracker(store.tracking, table_dir=store.folder / "results"))
    if store.topology == "sqlite":
        with tempfile.TemporaryDirectory(prefix="vqlog-bench-fill-", dir="/dev/shm") as shm:
            for name in ("optuna.db", "mlflow.db"):
                shutil.copy2(store.folder / name, Path(shm) / name)
            copy_trials(store, f"sqlite:///{shm}/optuna.db", f"sqlite:///{shm}/mlflow.db", 1)
            for name in ("optuna.db", "mlflow.db"):
                shutil.copy2(Path(shm) / name, store.folder / name)
    else:
        with fast_commits(store.storage, store.backend):
            copy_trials(store, store.storage, store.backend, threads)
    store.trials = store.size


@contextlib.contextmanager
def fast_commits(*urls: str):
    import psycopg2
    from sqlalchemy.engine import make_url

    from bench_workers import ADMIN_URL

    names = [make_url(u).database for u in urls]
    admin = psycopg2.connect(ADMIN_URL)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        yield
    finally:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'ALTER DATABASE "{name}" RESET synchronous_commit')
        admin.close()


def copy_trials(store: Store, storage: str, tracking: str, threads: int) -> None:
    import optuna
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from vqlog.tracking.rows import run_name

    study = optuna.load_study(study_name=store.name, storage=storage)
    template = study.trials[0]
    study.add_trials([optuna.trial.create_trial(
        params=template.params, distributions=template.distributions, values=template.values,
        user_attrs=template.user_attrs, intermediate_values=template.intermediate_values)
        for _ in range(store.size - 1)])

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name(store.name)
    run = client.search_runs([experiment.experiment_id], "tags.`vqlog.role` = 'trial'")[0]
    params = [Param(k, v) for k, v in run.data.params.items()]
    tags = {k: v for k, v in run.data.tags.items() if k != "mlflow.runName"}
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in run.data.metrics.items()]
    ended = now - RowCache.SLACK_MS - 1000

    def copy(number: int) -> None:
        made = client.create_run(experiment.experiment_id, start_time=ended - 1000,
                                 run_name=run_name(number),
                                 tags={**tags, "optuna.trial_number": str(number)})
        client.log_batch(made.info.run_id, params=params, metrics=metrics)
        # ended before RowCache's slack: the measuring worker's first look reads them all and
        # its later looks none, as for the runs of a study that has been going for a while
        client.set_terminated(made.info.run_id, "FINISHED", end_time=ended)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(copy, range(1, store.size)))


def open_stores(stack: contextlib.ExitStack, root: Path, sizes, topologies) -> list[Store]:
    from _servers import mlflow_server

    stores = []
    if "server" in topologies:
        urls = stack.enter_context(throwaway_databases(
            *[f"vqlog_bench_{kind}_{n}" for n in sizes for kind in ("optuna", "mlflow")]))
    for i, size in enumerate(sizes):
        if "sqlite" in topologies:
            folder = root / f"sqlite-{size}"
            folder.mkdir()
            stores.append(Store("sqlite", size, f"sqlite:///{folder / 'optuna.db'}",
                                f"sqlite:///{folder / 'mlflow.db'}", folder))
        if "server" in topologies:
            folder = root / f"server-{size}"
            storage, backend = urls[2 * i], urls[2 * i + 1]
            server = stack.enter_context(mlflow_server(
                folder, backend_uri=backend,
                extra=["--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts"]))
            stores.append(Store("server", size, storage, server.url, folder, backend))
    return stores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="measured trials per store (default 5)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)),
                   help="existing trial runs per store (default 100,1000,10000)")
    p.add_argument("--topologies", default="sqlite,server", help="default sqlite,server")
    p.add_argument("--out", help="JSON path (default benchmarks/results/scale.json)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    topologies = args.topologies.split(",")
    import optuna

    from vqlog.cli import configure_process

    configure_process()  # as vqlog-sweep runs: MLflow's and Optuna's INFO lines off
    _common.set_threads(1)
    info = _common.machine("cpu", 1)
    per_trial: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    plots: dict[str, dict[int, float]] = defaultdict(dict)
    start_s: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    with tempfile.TemporaryDirectory(prefix="vqlog-bench-scale-") as tmp, \
            contextlib.ExitStack() as stack:
        stores = open_stores(stack, Path(tmp), sizes, topologies)
        for store in stores:
            began = time.perf_counter()
            fill(store, threads=8)
            print(f"{store.name}: {store.size} trial runs in {time.perf_counter() - began:.0f} s",
                  flush=True)
        for store in stores:
            # the measuring worker: every trial's table refresh forced, study plots apart
            store.tracker = TimedTracker(store.tracking, table_dir=store.folder / "results",
                                         table_seconds=0, plots_seconds=math.inf)
            store.trials += 1
            quiet_run(bench_spec(store.name), store.trials, store.storage, store.tracker)
            seconds = store.tracker.take()
            # a worker's start, and its first table (which takes its rows from the start's read)
            start_s[store.topology][store.size] = (seconds.get("start_study", 0.0),
                                                   seconds.get("after_trial", 0.0))
        for r in range(args.rounds):
            order = stores[r % len(stores):] + stores[:r % len(stores)]
            for store in order:
                store.trials += 1
                quiet_run(bench_spec(store.name), store.trials, store.storage, store.tracker)
                seconds = store.tracker.take()
                seconds["total"] = sum(seconds.get(k, 0.0) for k in TRIAL_CALLS)
                per_trial[store.topology][store.size].append(seconds)
            print(f"round {r + 1}: " + ", ".join(
                f"{s.name} {per_trial[s.topology][s.size][-1]['total']:.3f} s" for s in stores),
                flush=True)
        for store in stores:
            study = optuna.load_study(study_name=store.name, storage=store.storage)
            began = time.perf_counter()
            store.tracker.refresh_study_plots(study)
            plots[store.topology][store.size] = time.perf_counter() - began
    payload = summarize(per_trial, plots, start_s, sizes, args, info)
    print()
    print(payload["table"])
    path = _common.write_json("scale", payload, args.out)
    print(f"\nwrote {path}")
    return 0


def summarize(per_trial, plots, start_s, sizes, args, info) -> dict:
    rows, results = [], {}
    for topology, by_size in per_trial.items():
        base = _common.median([t["total"] for t in by_size[sizes[0]]])
        results[topology] = {}
        for size in sizes:
            trials = by_size[size]
            totals = [t["total"] for t in trials]
            median = _common.median(totals)
            calls = {k: _common.median([t.get(k, 0.0) for t in trials]) for k in TRIAL_CALLS}
            sender = _common.median([t.get(SENDER, 0.0) for t in trials])
            ratio = median / base
            ok = median <= TARGET_S and (size == sizes[0] or ratio <= TARGET_RATIO)
            results[topology][size] = {"per_trial_s": totals, "per_trial_s_median": median,
                                       "ratio_to_smallest": ratio, "calls_s_median": calls,
                                       "calls_s_rounds": [{k: t.get(k, 0.0) for k in TRIAL_CALLS}
                                                          for t in trials],
                                       "sender_s_median": sender,
                                       "sender_s_rounds": [t.get(SENDER, 0.0) for t in trials],
                                       "worker_start_s": start_s[topology][size][0],
                                       "first_after_trial_s": start_s[topology][size][1],
                                       "study_plots_s": plots[topology][size]}
            top = sorted(calls.items(), key=lambda kv: -kv[1])[:3]
            rows.append([topology, f"{size:,}", f"{median:.3f}",
                         f"{min(totals):.3f}-{max(totals):.3f}", f"{ratio:.2f}x",
                         ", ".join(f"{k} {v:.3f}" for k, v in top), f"{sender:.3f}",
                         "{:.1f} + {:.1f}".format(*start_s[topology][size]),
                         f"{plots[topology][size]:.1f}",
                         "met" if ok else "missed"])
    text = _common.render_table(
        ["store", "trial runs", "tracking s/trial", "min-max", f"vs {sizes[0]:,}",
         "largest calls (s)", "run's sender thread s/trial", "worker start + first table s", "study plots s",
         f"target <= {TARGET_S} s and <= {TARGET_RATIO}x"], rows)
    return {"benchmark": "scale", "command": "python benchmarks/bench_scale.py",
            "target": f"tracking <= {TARGET_S} s per trial at 10,000 trial runs, and <= "
                      f"{TARGET_RATIO}x the 100-run figure",
            "machine": {**info, "load_average_end": _common.machine()["load_average_1_5_15"]},
            "rounds": args.rounds, "sizes": sizes, "results": results, "table": text}


if __name__ == "__main__":
    sys.exit(main())
