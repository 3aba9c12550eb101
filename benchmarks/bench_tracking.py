"""Benchmark 2 of issue 6: what MLflow tracking adds to a trial's wall time.

    python benchmarks/bench_tracking.py

One trial of the seed spec (300 iterations, an evaluation every 50, vqlog/sweeps/seed.yaml's
fixed values) at a moderate row (batch 32, embedding_dim 128, embedding_num 256, BN, relu MLP),
run by `vqlog.sweep.run` exactly as `vqlog-sweep --trials 1` runs it, three ways:

- `none`:   tracker=None (Optuna's SQLite storage only),
- `sqlite`: a Tracker on an MLflow SQLite store (the default `sqlite:///mlflow.db`),
- `server`: a Tracker on a local `mlflow server` process (SQLite backend, proxied artifacts).

Each variant gets a fresh study per round; rounds interleave the variants (rotating the order).
Reported: (1) the wall time of the whole one-trial sweep relative to `none` (median of per-round
ratios); (2) the seconds spent inside tracker calls, by call, and from them the overhead per
trial of a 50-trial sweep: every trial's own calls (run creation, one metrics batch per
evaluation, summary and two figures, table refresh), plus the study-level calls (experiment and
parent run, Optuna's study plots at most once a minute and at the end) spread over 50 trials.
The table refresh is also timed with 50 runs in the store (bench_scale.py times it with up to
10,000). Target:
<= 3% of the trial's wall time. torch runs one intra-op thread (as one sweep worker per core).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import _common
from vqlog.study.spec import load_sweep
from vqlog.study.worker import run
from vqlog.tracking.runs import STUDY_PLOTS_SECONDS, Tracker

TARGET = 0.03
SWEEP_TRIALS = 50  # the sweep size the per-trial overhead is spread over
ROW = {"batch": 32, "lr": 1.0e-3, "embedding_dim": 128, "embedding_num": 256, "BN": True,
       "MLP": "relu", "En-De": "s4d-all"}


class TimedTracker(Tracker):
    """A Tracker that adds up the seconds spent in each of its calls (and its runs' calls)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def _timed(self, key, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[key] += time.perf_counter() - start
            self.calls[key] += 1

    def start_study(self, study, spec, db=None):  # db: the worker's retrying reads
        return self._timed("start_study", super().start_study, study, spec, db)

    def start_trial(self, *args, **kwargs):  # the worker's tags and a retry's kwargs too
        trial_run = self._timed("start_trial", super().start_trial, *args, **kwargs)
        for name, key in (("log_eval", "log_eval"), ("finish", "trial_finish")):
            method = getattr(trial_run, name)
            setattr(trial_run, name,
                    lambda *a, _m=method, _k=key, **k: self._timed(_k, _m, *a, **k))
        return trial_run

    def after_trial(self, study, table_lock=None):
        return self._timed("after_trial", super().after_trial, study, table_lock)

    def finish_study(self, study):
        return self._timed("finish_study", super().finish_study, study)

    def refresh_study_plots(self, study):  # called inside after_trial / finish_study
        return self._timed("study_plots", super().refresh_study_plots, study)


def one_trial(spec, folder: Path, tracking_uri: str | None) -> dict:
    """`vqlog-sweep --trials 1` in-process; returns wall seconds, fit seconds and tracker times."""
    # table_seconds=0: the table after every trial, as a sweep of trials longer than its 10 s
    # throttle refreshes it
    tracker = (TimedTracker(tracking_uri, table_dir=folder / "results", table_seconds=0)
               if tracking_uri is not None else None)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints a "View run" line per run
        summary = run(spec, 1, f"sqlite:///{folder / (spec.name + '.db')}", tracker=tracker,
                      out=lambda line: None)
    wall = time.perf_counter() - start
    if summary.finished != 1 or summary.failed_here:
        raise RuntimeError(f"the trial did not finish: {summary}")
    return {"wall_s": wall, "tracker_s": dict(tracker.seconds) if tracker else {},
            "tracker": tracker}


def table_with_many_runs(tracker: TimedTracker, spec, folder: Path, runs: int) -> float:
    """Seconds of `after_trial` (reconcile + table refresh) once the study has `runs` runs: the
    last trial of a 50-trial sweep. The extra runs replay the finished trial's params and metrics
    through the tracker (no training, no figures)."""
    import optuna

    from vqlog.train import EvalRecord

    storage = f"sqlite:///{folder / (spec.name + '.db')}"
    study = optuna.load_study(study_name=spec.name, storage=storage)
    trial = study.trials[0]
    cfg = spec.suggest(optuna.trial.FixedTrial(trial.params))
    record = EvalRecord(step=spec.iteration, val_mse=trial.value, val_perplexity=10.0,
                        val_usage=0.5, val_dead_codes=0, train_points=())
    summary = {k: v for k, v in trial.user_attrs.items() if isinstance(v, float)}
    with contextlib.redirect_stdout(io.StringIO()):
        for number in range(1, runs):
            trial_run = Tracker.start_trial(tracker, number, cfg)
            trial_run.log_eval(record)
            trial_run.finish("COMPLETE", summary)
        times = []
        for _ in range(3):  # the median of three: one SQLite fsync stall read as 0.66 s once
            start = time.perf_counter()
            Tracker.after_trial(tracker, study)
            times.append(time.perf_counter() - start)
        return sorted(times)[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--iterations", type=int, help="override the spec's 300 iterations (quick runs)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/tracking.json)")
    args = p.parse_args(argv)
    _common.set_threads(1)
    info = _common.machine("cpu", 1)
    base = load_sweep("seed")
    if args.iterations:
        base = dataclasses.replace(base, iteration=args.iterations)
    results: dict[str, list[dict]] = {"none": [], "sqlite": [], "server": []}
    with tempfile.TemporaryDirectory(prefix="vqlog-bench-tracking-") as tmp:
        root = Path(tmp)
        sqlite_uri = f"sqlite:///{root / 'mlflow.db'}"
        Tracker(sqlite_uri).client.search_experiments()  # create + migrate the store once, untimed
        with _common.mlflow_server(root / "server") as server_url:
            uris = {"none": None, "sqlite": sqlite_uri, "server": server_url}
            names = list(uris)
            for r in range(args.rounds + 1):  # round 0 (short) warms up imports and both stores
                order = names[r % 3:] + names[:r % 3]
                for variant in order:
                    spec = dataclasses.replace(base, name=f"bench-{variant}-{r}", enqueue=(ROW,))
                    if r == 0:
                        spec = dataclasses.replace(spec, iteration=20, eval_every=10)
                    folder = root / variant
                    folder.mkdir(exist_ok=True)
                    res = one_trial(spec, folder, uris[variant])
                    res["round"], res["spec"] = r, spec
                    print(f"round {r} {variant:6s} {res['wall_s']:6.1f} s", flush=True)
                    if r > 0:
                        results[variant].append(res)
            last = results["sqlite"][-1]
            many = table_with_many_runs(last["tracker"], last["spec"], root / "sqlite",
                                        SWEEP_TRIALS)
    payload = summarize(results, many, args, info)
    print()
    print(payload["table"])
    path = _common.write_json("tracking", payload, args.out)
    print(f"\nwrote {path}")
    return 0


def summarize(results: dict[str, list[dict]], after_trial_50: float, args, info: dict) -> dict:
    base = [r["wall_s"] for r in results["none"]]
    rows, out = [], {}
    for variant, runs in results.items():
        walls = [r["wall_s"] for r in runs]
        ratios = _common.round_ratios(walls, base)
        entry = {"wall_s_rounds": walls, "wall_ratio_median": _common.median(ratios),
                 "wall_ratio_min_max": list(_common.spread(ratios))}
        if variant != "none":
            secs = defaultdict(list)
            for r in runs:
                for k, v in r["tracker_s"].items():
                    secs[k].append(v)
            med = {k: _common.median(v) for k, v in secs.items()}
            trial_wall = _common.median(base)
            plots = med.get("study_plots", 0.0)
            per_trial = sum(med.get(k, 0.0) for k in ("start_trial", "log_eval", "trial_finish"))
            # after_trial grows with the runs it tables: average its cost at 1 run and at 50 runs
            after = (med.get("after_trial", 0.0) + after_trial_50) / 2 if variant == "sqlite" \
                else med.get("after_trial", 0.0)
            per_study = med.get("start_study", 0.0) + med.get("finish_study", 0.0) - plots
            # drawn at most every STUDY_PLOTS_SECONDS, and once more at the end
            n_plots = math.floor(SWEEP_TRIALS * trial_wall / STUDY_PLOTS_SECONDS) + 1
            amortized = per_trial + after + (per_study + plots * n_plots) / SWEEP_TRIALS
            entry.update({"tracker_s_median": med, "after_trial_s_at_50_runs": after_trial_50
                          if variant == "sqlite" else None,
                          "per_trial_overhead_s_in_50_trial_sweep": amortized,
                          "per_trial_overhead_fraction": amortized / trial_wall})
        out[variant] = entry
        lo, hi = entry["wall_ratio_min_max"]
        overhead = entry["wall_ratio_median"] - 1
        frac = entry.get("per_trial_overhead_fraction")
        verdict = ""
        if frac is not None:
            verdict = ("met" if frac <= TARGET
                       else f"missed ({100 * frac:.1f}% > {100 * TARGET:.0f}%)")
        rows.append([variant, f"{_common.median(walls):.1f}",
                     f"{100 * overhead:+.1f}% ({100 * (lo - 1):+.1f}..{100 * (hi - 1):+.1f})",
                     "" if frac is None
                     else f"{entry['per_trial_overhead_s_in_50_trial_sweep']:.2f} s",
                     "" if frac is None else f"{100 * frac:.1f}%", verdict])
    text = _common.render_table(
        ["tracking", "1-trial sweep wall s", "wall vs none (min..max)",
         f"tracker s/trial ({SWEEP_TRIALS}-trial sweep)", "of a trial",
         f"target <= {100 * TARGET:.0f}%"],
        rows)
    return {"benchmark": "tracking", "command": "python benchmarks/bench_tracking.py",
            "target": f"tracking adds <= {100 * TARGET:.0f}% wall time per trial", "machine": {
                **info, "load_average_end": _common.machine()["load_average_1_5_15"]},
            "row": ROW, "rounds": args.rounds, "iterations": args.iterations or 300,
            "results": out, "table": text}


if __name__ == "__main__":
    sys.exit(main())
