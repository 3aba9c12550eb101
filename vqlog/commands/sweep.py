"""`vqlog-sweep` / `vqlog sweep`: run (or join) a study until it has --trials finished trials."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time

from vqlog.cli import add_data_args, add_debug, add_device_arg, add_study_args


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, default=50,
                   help="finished trials (COMPLETE + PRUNED) the study should reach, counted "
                        "across all workers (default 50)")
    add_study_args(p)
    add_data_args(p, None)
    add_device_arg(p)
    p.add_argument("--timeout", type=float, help="start no new trial after this many seconds from "
                   "the sweep's start (every worker of --workers alike)")
    p.add_argument("--seed", type=int, help="seed for the sampler and for training")
    p.add_argument("--lang", default="en", choices=("en", "zh"), help="language of the table")
    p.add_argument("--workers", default="1", metavar="N|auto",
                   help="worker processes on this host sharing the study, the cores split "
                        "between them; auto: one per core, as many as 2 GiB each fit in free memory "
                        "(one per GPU with --device cuda)")
    p.add_argument("--gpus", metavar="0,1,...",
                   help="with --device cuda and --workers: the GPUs the workers take in turn "
                        "(default: every visible one)")
    add_debug(p)


def sweep_command_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run an Optuna study (the same as vqlog-sweep)")
    add_sweep_args(p)
    p.set_defaults(func=sweep_command)


LONG_ON_A_CPU = 5000  # iterations a trial: the log's own scale, meant for a GPU


def sweep_command(args: argparse.Namespace) -> int:
    from vqlog import api

    # The flags first: a typo is reported before torch and MLflow are imported.
    api.check_options(args.trials, args.timeout, args.seed)
    if str(args.workers) != "auto":
        from vqlog.study.hosts import worker_count

        worker_count(args.workers, "cpu", None)  # a number of workers, or one Error line

    from vqlog.errors import TrackingUnavailable
    from vqlog.urls import mask, mask_urls

    gpus = api.gpu_list(args.gpus)
    spec = api.study_spec(args.config, args.study, args.data, args.sample_rate, args.channel)
    storage, tracker = api.prepare(spec, args.storage, args.tracking_uri, args.lang)
    api.check_table_file(tracker.table_dir, spec.name)
    workers, note = api.worker_plan(args.workers, args.device, gpus)
    from vqlog.study import worker  # torch: after the spec and the stores are checked
    from vqlog.study.existing import check_study
    uri = tracker.given_uri
    stop = worker.StopRequest()
    started = False
    try:
        # Bad data, a deleted experiment, a study of that name with other directions or space:
        # its Error line alone, before the study line.
        data = api.load_data(spec, args.seed)
        tracker.check_experiment(spec.name)
        # and other data than the study's, an experiment holding another study's runs
        check_study(spec, storage, tracker, data.identity())
        if workers > 1:
            data = None  # checked: each worker process loads its own, the parent keeps none
        print(f"study {spec.name}: {args.trials} trial{'s' * (args.trials != 1)}, spec {spec.path}, "
              f"data {spec.source}, "
              f"storage {mask(storage)}, tracking {mask(uri)}"
              + (f", {workers} workers" if workers > 1 else "")
              + (f" ({note})" if note else ""), flush=True)
        if args.device == "auto" and spec.iteration >= LONG_ON_A_CPU:
            import torch

            if not torch.cuda.is_available():  # e.g. --config gpu on a laptop: hours a trial
                print(f"note: no CUDA GPU is visible, so --device auto trains on the CPU, where "
                      f"trials of {spec.iteration} iterations of the seed's model sizes take "
                      "hours each (--device cpu says you mean it; --device cuda requires a GPU)",
                      flush=True)
        start, started = time.perf_counter(), True
        with stop_on_signals(stop, running="each worker's running trial" if workers > 1
                             else "the running trial"):
            result = api.run_sweep(spec, args.trials, storage, tracker, workers, args.device,
                                   gpus, args.timeout, args.seed, stop, cache=data,
                                   data_checked=True)
    except TrackingUnavailable as exc:
        kept = ("Everything finished is kept in the study and MLflow; any trial cut short was "
                "marked FAIL. " if started else "")
        sys.stderr.write(f"Error: {mask_urls(str(exc))}. {kept}Start the tracking server, then "
                         "rerun the same command to resume.\n")
        return 1
    print(summary_text(result, time.perf_counter() - start, storage, uri, tracker.ui_url()))
    if (note := tracker.outage_note()) is not None:
        print(note)
    if result.stopped:
        at = checkpointed_text(result)
        print(f"Stopped ({result.stopped}): {at}everything finished is kept. Rerun the same "
              "command to resume.")
        return EXIT_CODES.get(result.stopped, 1)
    if result.interrupted:
        at = checkpointed_text(result).replace(" and marked FAIL; ", ", ") if \
            result.interrupted_trial else ""
        print("Interrupted: " + (f"{at or 'the running trial was '}marked FAIL and queued again; "
                                 if result.interrupted_trial else "")
              + "everything finished is kept. Rerun the same command to continue.")
        return 130
    return 0


def checkpointed_text(result) -> str:
    """What a clean stop did to the running trials: one, or one per worker of --workers."""
    its = result.stopped_iterations or (
        [result.stopped_at] if result.stopped_at is not None else [])
    if not its:
        return ""
    if len(its) == 1:
        return f"the running trial was checkpointed at iteration {its[0]} and marked FAIL; "
    at = ", ".join(map(str, its[:-1])) + f" and {its[-1]}"
    return f"the {len(its)} running trials were checkpointed at iterations {at} and marked FAIL; "


EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}  # 128 + the signal's number, as shells report it


@contextlib.contextmanager
def stop_on_signals(stop, quiet: bool = False, restore: bool = True,
                    running: str = "the running trial"):
    """SIGTERM (docker compose stop, Kubernetes, Slurm) and SIGINT (Ctrl-C) ask the worker to
    stop cleanly; a second Ctrl-C stops it at once (a second SIGTERM does not: a scheduler's
    repeated notice waits for the checkpoint, and neither does a first Ctrl-C after a stop for
    another reason, a SIGTERM or a worker's error). The handlers before are put back after,
    unless `restore` is False (a worker process of --workers, which sets its own for its exit).
    `quiet`: no line about it (a worker of --workers, whose parent says it once); `running`:
    what that line says is checkpointed."""

    def handle(signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and getattr(stop, "ctrl_c", stop.is_set()):  # Ctrl-C again
            if getattr(stop, "shielded", 0) and not stop.deferred:  # a trial's FAIL and its
                stop.deferred = True  # retry are under way: raised once both are done
                return
            raise KeyboardInterrupt
        if not quiet and (name == "SIGINT" or not stop.is_set()):
            again = " (Ctrl-C again to stop at once)" if name == "SIGINT" else ""  # no terminal
            print(f"{name}: {'already ' * stop.is_set()}stopping after a checkpoint of "
                  f"{running}{again}", file=sys.stderr, flush=True)
        if name == "SIGINT":
            stop.ctrl_c = True
        stop.request(stop.signal or name)

    def unraisable(info, report=sys.unraisablehook):
        """A Ctrl-C again that the handler raised in a finalizer or a garbage collector's
        callback (SQLAlchemy's, in a sweep), where Python only reports it ("Exception ignored"):
        sent again, to be raised where the main thread goes on."""
        if isinstance(info.exc_value, KeyboardInterrupt) and getattr(stop, "ctrl_c", False):
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        else:
            report(info)

    if threading.current_thread() is not threading.main_thread():
        yield stop  # only the main thread may set handlers: the caller stops it by hand
        return
    before = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield stop
    finally:
        for sig, handler in before.items() if restore else ():
            signal.signal(sig, handler)
        if restore:
            sys.unraisablehook = hook


# Where an optuna-dashboard already serves the study, as users open it (compose sets it).
DASHBOARD_URL_ENV = "VQLOG_DASHBOARD_URL"


def summary_text(r, seconds: float, storage: str, uri: str, ui: str) -> str:
    """The sweep's closing lines: what finished, the best trial, and where to look."""
    import shlex

    from vqlog.cli import command_name
    from vqlog.tracking.rows import run_name
    from vqlog.urls import mask, with_psycopg2, without_password

    # A trial stopped by a signal is marked FAIL to be queued again: not a failure of its own
    stopped = min(r.failed_here, r.stopped_here or int(r.stopped_at is not None
                                                      or r.interrupted_trial))
    lines = [
        "",
        f"study {r.study}: "
        + (f"{r.finished}/{r.target} trials finished " if r.finished <= r.target else
           f"{r.finished} trials finished, more than the target of {r.target} ")
        + f"({r.ran_here} ran here{f' by {r.workers} workers' if r.workers > 1 else ''}, "
        f"{r.failed_here - stopped} failed"
        + (f", {stopped} stopped and queued again" if stopped else "")
        + (f"; {r.workers_lost} worker{'s' if r.workers_lost > 1 else ''} died"
           if r.workers_lost else "")
        + f") in {seconds / 60:.1f} min"
        + ("; --timeout reached" if r.timed_out else "")
        + (f"; the grid's {r.grid_points} points are all taken" if r.grid_points else ""),
    ]
    if r.best:
        values = r.best["values"]
        ppl = r.best.get("perplexity")
        lines.append(f"best: {run_name(r.best['number'])}  val mse {values[0]:.4g}"
                     + (f"  perplexity max {ppl:.1f}" if ppl is not None else ""))
        lines.append("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in r.best["params"].items()))
    if r.table_path:
        lines.append(f"table:  {r.table_path}")
    if uri.lower().startswith(("http://", "https://")):
        lines.append(f"mlflow: {ui}")
    else:  # a line to copy: a password is left out (*** would not open), not masked, and a
        # space or a shell's & quoted
        shown = shlex.quote(without_password(uri))
        lines.append(f"mlflow: {command_name('vqlog')} ui --tracking-uri {shown}   "
                     f"then open {ui}{password_note(uri)}")
    dashboard = os.environ.get(DASHBOARD_URL_ENV, "").strip()
    if dashboard:  # one serves the study already (compose's dashboard service)
        lines.append(f"optuna: {mask(dashboard)}")
    else:
        # optuna-dashboard hands the URL to SQLAlchemy as it is: a bare postgresql:// would ask
        # for psycopg (3), which vqlog does not install; psycopg2 comes with it.
        shown = shlex.quote(without_password(with_psycopg2(storage)))  # no ***: left out
        lines.append(f"optuna: {command_name('optuna-dashboard')} {shown}"
                     f"{password_note(storage)}")
    return "\n".join(lines)


def password_note(url: str) -> str:
    """Where the password of a URL shown without it goes: libpq's $PGPASSWORD for PostgreSQL."""
    from vqlog.urls import with_psycopg2, without_password

    if without_password(with_psycopg2(url)) == with_psycopg2(url):
        return ""
    where = "$PGPASSWORD" if url.startswith("postgresql") else "the URL"
    return f"   (with the password in {where})"


def _fmt(v) -> str:
    if isinstance(v, bool):  # as a spec and --set write it (BN: no), not Python's False
        return "yes" if v else "no"
    return f"{v:.3g}" if isinstance(v, float) else str(v)
