"""The notebook API, as `import vqlog` exposes it:

    import vqlog
    summary = vqlog.sweep(trials=20, config="smoke", study="try-1")   # what vqlog-sweep does
    df = vqlog.results("try-1")                                       # one row per trial
    df.sort_values("metrics.final_val_mse").head()

`sweep` takes the command line's options as arguments and returns its summary; neither it nor
`results` sets a log level, a warning filter, an environment variable or a signal handler. Stop a
running `sweep` cleanly from another thread with `stop=vqlog.study.worker.StopRequest()` and
`stop.request("manual")`; Ctrl-C in a notebook interrupts it (the running trial ends FAIL, and
is queued again for the next run).
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Callable

from vqlog.config import SEED_MAX
from vqlog.errors import UserError, VqlogError

DEFAULT_SPEC = "seed"  # sweeps/seed.yaml: the log's search space on a CPU budget


def check_options(trials: int, timeout: float | None, seed: int | None) -> None:
    """The sweep's numbers, checked before anything slow is imported or created (a NumPy
    integer counts as one: a notebook's values often are)."""
    for name, value in (("trials", trials), ("seed", seed)):
        if (value is not None or name == "trials") and not _integer(value):
            raise UserError(f"--{name} must be a whole number, got {value!r}")
    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)):
        raise UserError(f"--timeout must be a number of seconds, got {timeout!r}")
    if timeout is not None and not timeout > 0:  # NaN too
        raise UserError(f"--timeout must be a positive number of seconds, got {timeout:g}")
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed must be from 0 to {SEED_MAX} (2**32 - 1), got {seed}")
    check_environment()


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_environment() -> None:
    """The environment's tuning knobs, read later by the workers and by `vqlog init`'s storage:
    a bad one is bad input now, before any file is created."""
    from vqlog.config import env_number

    for name, integer in (("VQLOG_HEARTBEAT_INTERVAL", True), ("VQLOG_HEARTBEAT_GRACE", True),
                          ("VQLOG_DB_OUTAGE_LIMIT", False), ("VQLOG_TRACKING_OUTAGE_LIMIT", False)):
        env_number(name, 1, integer)
    from vqlog.config import grace_period, heartbeat_interval

    if grace_period() <= heartbeat_interval():  # every trial taken for dead between two beats
        raise UserError(f"$VQLOG_HEARTBEAT_GRACE ({grace_period()} s) must be longer than "
                        f"$VQLOG_HEARTBEAT_INTERVAL ({heartbeat_interval()} s), e.g. 4 times it: "
                        "a live worker's trial would be failed as a dead one's between two beats")


def study_spec(config: str = DEFAULT_SPEC, study: str | None = None, data: str | None = None,
               sample_rate: float | None = None, channel: str | None = None):
    """The spec `config` names (a bundled name or a YAML file), with the study name and the data
    source replaced where given."""
    from vqlog.study.spec import check_study_name, load_sweep

    if study is not None:
        check_study_name(study)  # before the spec: the option is what is wrong
    spec = load_sweep(config)
    changes = {}
    if study:
        changes["name"] = study
    if data and not _same_source(data, spec.source):  # another source: the spec's rate and
        changes.update(source=data, sample_rate=sample_rate, channel=channel)  # channel are not its
    else:  # the spec's own source (given again): its rate and channel hold, the flags over them
        if sample_rate is not None:
            changes["sample_rate"] = sample_rate
        if channel is not None:
            changes["channel"] = channel
    return dataclasses.replace(spec, **changes)


def _same_source(data: str, source: str) -> bool:
    """Whether `--data` names the spec's own source (the same name, or the same file)."""
    from pathlib import Path

    from vqlog.cli import same_file

    def where(name: str) -> Path:  # a WFDB record's path names no file: compared as a path
        return Path(name).expanduser().resolve()

    try:
        return data == source or where(data) == where(source) or same_file(data, source)
    except RuntimeError:  # ~nosuchuser: no home to expand, so neither is the other
        return False


def prepare(spec, storage: str | None, tracking_uri: str | None, lang: str = "en"):
    """(storage URL, Tracker) for a sweep of `spec`: flag or argument, else $OPTUNA_STORAGE and
    $MLFLOW_TRACKING_URI, else the embedded files; both checked before anything is created."""
    from vqlog.study.storage import check_reachable, check_writable, resolve_storage
    from vqlog.tracking.client import check_writable_store
    from vqlog.tracking.runs import Tracker
    from vqlog.urls import mask, same_database

    from vqlog.oscillation import check_lang

    check_lang(lang)  # the table's, first written after a trial
    for name, value in (("storage", storage), ("tracking_uri", tracking_uri)):
        if value is not None and not value.strip():  # the command line refuses it too (url_arg)
            raise UserError(f"{name} needs a URL, got an empty value (an unset variable?); give "
                            "None for the default")
    storage = resolve_storage(storage)
    check_writable(storage)  # first: SQLAlchemy warns of an SQLite URL's options on connecting
    check_reachable(storage)
    tracker = Tracker(tracking_uri, lang=lang)
    if same_database(storage, tracker.uri):  # both keep their schema version in alembic_version
        raise UserError(f"the Optuna storage and the MLflow store are one database "
                        f"({mask(storage)}); give each its own, e.g. --storage "
                        "sqlite:///optuna.db --tracking-uri sqlite:///mlflow.db")
    check_writable_store(tracker.uri)
    return storage, tracker


def check_table_file(folder, study: str) -> None:
    """The sweep's table, `<folder>/<study>.md`, checked as an output file is before any work
    (a sweep's, not `vqlog init`'s, which writes none): a file named `results` in the folder
    ended every sweep after its first trial."""
    from vqlog.cli import check_out_file
    from vqlog.tracking.table import table_path

    path = table_path(folder, study)
    hint = "the sweep writes its table there: move what is in the way, or sweep in another folder"
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder ({hint})")
    try:
        check_out_file(str(path), "the table", path.name, make_folders=True)
    except UserError as exc:
        raise UserError(f"{exc} ({hint})") from None


def gpu_list(text: str | list[int] | None) -> list[int] | None:
    """--gpus 0,1,... as GPU indices (from Python, a list of them too)."""
    if text is None:
        return None
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        ids = [int(x) if _integer(x) else int(str(x).strip()) for x in items
               if _integer(x) or str(x).strip()]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise UserError(f"--gpus must be GPU indices like 0,1, got {text!r}")
    return ids


def worker_count(workers, device: str, gpus: list[int] | None) -> int:
    """--workers N or auto (one per core as the memory allows; one per GPU with CUDA)."""
    return worker_plan(workers, device, gpus)[0]


def placed_gpus(device: str, gpus: list[int] | None) -> list[int] | None:
    """The GPUs the workers take: `gpus`, else GPU k for device "cuda:k" (every worker there, as
    the one worker of a plain run would be), else None (every visible GPU, or the CPU)."""
    kind, _, index = str(device).partition(":")
    if not gpus and kind == "cuda" and index.isdigit() and index.isascii():
        return [int(index)]
    return gpus


def worker_plan(workers, device: str, gpus: list[int] | None) -> tuple[int, str | None]:
    """The number of workers for --workers N or auto, and for auto cut by the memory, a note
    that says so."""
    from vqlog.study import hosts
    from vqlog.train import resolve_device

    kind = resolve_device(device).type
    gpus = placed_gpus(device, gpus)
    check_gpus(gpus, kind)
    if str(workers) == "auto":
        n, note = hosts.auto_workers(kind, gpus)
        if n > 1:
            hosts.open_files_for(n)
        return n, note
    return hosts.worker_count(workers, kind, gpus), None


def check_gpus(gpus: list[int] | None, kind: str) -> None:
    """--gpus names GPUs this sweep can use: it asks for CUDA, and each index is a visible GPU."""
    if gpus is None:
        return
    import torch

    given = ",".join(map(str, gpus))
    if kind != "cuda":
        raise UserError(f"--gpus {given} was given, but the sweep runs on the CPU: add --device "
                        "cuda (and check that a CUDA GPU is visible), or leave --gpus out")
    count = torch.cuda.device_count()
    missing = [i for i in gpus if i >= count]
    if missing:
        raise UserError(f"--gpus {given}: GPU {missing[0]} is not visible here, only "
                        f"{count} GPU{'s' if count != 1 else ''} (0 to {count - 1})")


def run_sweep(spec, trials: int, storage: str, tracker, workers: int = 1, device: str = "auto",
              gpus: list[int] | None = None, timeout: float | None = None,
              seed: int | None = None, stop=None, out: Callable[[str], None] = print,
              cache=None, data_checked: bool = False):
    """One worker in this process (its torch threads its share of the host's cores), or `workers`
    worker processes (vqlog.study.pool). `cache`: the data `load_data` loaded, for the one
    worker here; `data_checked`: `load_data` has checked it (the workers of --workers load
    their own, so the parent need not check it again)."""
    from vqlog.study import pool, worker

    if workers == 1:
        if gpus:  # the one worker takes the first GPU named, as the first of several would
            device = f"cuda:{gpus[0]}"
        from vqlog.study.cores import core_share

        with core_share() as share:  # the host's cores, with other vqlog processes on it
            return worker.run(spec, trials, storage, tracker=tracker, device=device,
                              timeout=timeout, seed=seed, out=out, stop=stop, cache=cache,
                              cores=share)
    from vqlog.train import resolve_device

    return pool.sweep(spec, trials, storage, tracker, workers, resolve_device(device).type,
                      placed_gpus(device, gpus), timeout, seed, stop, out, data_checked=data_checked)


def load_data(spec, seed: int | None = None):
    """The spec's data, loaded and windowed for the base config and every categorical window
    the space holds: bad data is one error before the sweep says anything. Returns the
    `DataCache` for `run_sweep`, so that the data is read once."""
    from vqlog.data import DataCache
    from vqlog.errors import RateError

    cache = DataCache(spec.source, spec.sample_rate, spec.channel)
    try:
        cache.check(spec, seed)
    except RateError as exc:
        if exc.kind != "unknown":
            raise
        raise RateError(exc.what, f"{exc.advice}, or give it in the spec (data: {{source: "
                                  f"{spec.source}, sample_rate: HZ}})", exc.kind) from None
    return cache


def sweep(trials: int = 50, config: str = DEFAULT_SPEC, *, study: str | None = None,
          storage: str | None = None, tracking_uri: str | None = None, data: str | None = None,
          sample_rate: float | None = None, channel: str | None = None, device: str = "auto",
          timeout: float | None = None, seed: int | None = None, lang: str = "en",
          workers: int | str = 1, gpus: str | None = None,
          out: Callable[[str], None] = print, stop=None):
    """Run (or join) a study until it has `trials` finished trials: `vqlog-sweep` in-process,
    with the same options. Returns the `SweepSummary` (finished, best, table path, ...). Its
    errors name these arguments (`sample_rate`), where the command's name its flags."""
    if _importing_main_again():
        from vqlog.study.child import UNGUARDED

        raise SystemExit(UNGUARDED)  # a worker of this very call: the caller's process says why
    try:
        check_options(trials, timeout, seed)
        trials = int(trials)  # NumPy's are taken, and torch's generators take Python's
        seed = None if seed is None else int(seed)
        timeout = None if timeout is None else float(timeout)
        gpu_ids = gpu_list(gpus)
        spec = study_spec(config, study, data, sample_rate, channel)
        storage, tracker = prepare(spec, storage, tracking_uri, lang)
        check_table_file(tracker.table_dir, spec.name)
        from vqlog.study.existing import check_study

        n = worker_count(workers, device, gpu_ids)
        cache = load_data(spec, seed)  # what the sweep command checks before it starts
        tracker.check_experiment(spec.name)
        check_study(spec, storage, tracker, cache.identity())
        if n > 1:
            cache = None  # checked: each worker process loads its own, this one keeps none
        return run_sweep(spec, trials, storage, tracker, n, device, gpu_ids, timeout, seed, stop,
                         out, cache=cache, data_checked=True)
    except VqlogError as exc:
        exc.args = (in_arguments(str(exc)),)
        raise


def _importing_main_again() -> bool:
    """Whether this call comes from the top level of the caller's script as a process started by
    multiprocessing's spawn imports it again (as `__mp_main__`): a script without the main
    guard, whose every worker of `workers=N` would start a sweep of its own."""
    import inspect

    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__":
            return True
        frame = frame.f_back
    return False


# vqlog-sweep's flags, as `sweep`'s arguments: where a word begins (not in a path or URL),
# with the value after it where one follows (a number, a path or URL, a placeholder as HZ)
_FLAGS = re.compile(r"(?<![^\s(])--(trials|config|study|storage|tracking-uri|data|sample-rate|"
                    r"channel|device|timeout|seed|lang|workers|gpus)(?![\w-])"
                    r"(?: ((?=[\d.~/]|[A-Z]+\b|\S*[:/])[^\s,;)]+))?")


def in_arguments(message: str) -> str:
    """An error message of the sweep command in `vqlog.sweep`'s terms: its arguments for the
    flags (`--sample-rate HZ`: `sample_rate=HZ`), a call for the command. A command quoted in
    backticks, one to run, is left as it is."""
    def argument(m: re.Match) -> str:
        name = m.group(1).replace("-", "_")
        return f"{name}={m.group(2)}" if m.group(2) else name

    parts = message.split("`")
    parts[::2] = [_FLAGS.sub(argument, part) for part in parts[::2]]
    return "`".join(parts).replace("rerun the same command", "call vqlog.sweep again as before")


def results(study: str, tracking_uri: str | None = None):
    """The study's trials as a pandas DataFrame, one row per trial run, by trial number:
    `number`, `run` (Seq<n>), `state`, `run_id`, `retry_of`, `resumed_at`, then `params.<name>`
    and `metrics.<name>` (the summary metrics) in MLflow's column naming."""
    import pandas as pd

    from vqlog.tracking.client import existing_store, open_client
    from vqlog.tracking.rows import fetch_rows, run_name

    rows = fetch_rows(open_client(existing_store(tracking_uri)), study)
    records = []
    for row in rows:
        record = {"number": row.number, "run": run_name(row.number), "state": row.state,
                  "run_id": row.run_id, "retry_of": row.retry_of, "resumed_at": row.resumed_at}
        record.update({f"params.{k}": _value(v) for k, v in sorted(row.params.items())})
        record.update({f"metrics.{k}": v for k, v in sorted(row.metrics.items()) if "/" not in k})
        records.append(record)
    columns = ["number", "run", "state", "run_id", "retry_of", "resumed_at"]
    df = pd.DataFrame.from_records(records, columns=None if records else columns)
    for key in ("retry_of", "resumed_at"):  # trial numbers and steps, with gaps: not floats
        df[key] = df[key].astype("Int64")
    return df


def _value(text: str):
    """A logged param back as a number or a bool where it reads as one (MLflow stores text)."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if text == "None" else text
