"""`vqlog table`: regenerate the experiment table from MLflow alone (any worker, any time)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from pathlib import Path

from vqlog.cli import (TRACKING_HELP, add_debug, check_out_file, default_if_empty, report_stream,
                       url_arg)


def table_command_parser(sub) -> None:
    p = sub.add_parser("table", help="regenerate the experiment table from MLflow")
    p.add_argument("--study", type=default_if_empty,
                   help="study (MLflow experiment) name; default, also when empty: the --config "
                        "spec's name, else the only vqlog study")
    p.add_argument("--config", help="sweep spec (a bundled name or a YAML file) whose study to "
                                    "show when --study is not given, as vqlog-sweep names it")
    p.add_argument("--tracking-uri", default=None, type=url_arg, help=TRACKING_HELP)
    p.add_argument("--lang", default=None, choices=("en", "zh"),
                   help="the table's labels: en or zh, as the original log writes them (default: "
                        "the language the sweep publishes the table in, else en)")
    p.add_argument("--out", help="output file (default results/<study>.md; - for stdout)")
    p.add_argument("--watch", action="store_true", help="keep regenerating as runs finish")
    p.add_argument("--interval", type=float, default=10.0,
                   help="seconds between checks with --watch (default 10)")
    add_debug(p)
    p.set_defaults(func=table_command)


def table_command(args: argparse.Namespace) -> int:
    from vqlog.errors import UserError

    if not 0 < args.interval < float("inf"):  # inf: a watch that never looks again
        raise UserError(f"--interval must be a number of seconds above 0, not {args.interval:g}")
    if args.out is not None and args.out != "-":  # '' is an error, as for train's --save
        check_out_file(args.out, "--out", "table.md", make_folders=True,
                       inputs=[("--config", args.config)] if args.config else [])
    # --watch runs beside a sweep for hours: a locked SQLite store or a restarted server is
    # waited out (RetryingClient), as the sweep's own tracker does; a stop asked meanwhile ends
    # the wait.
    study = args.study  # any name: a shared store may hold studies other tools named
    if args.config:  # checked with --study too: a spec that does not load is an error
        from vqlog.study.spec import load_sweep

        named = load_sweep(args.config).name  # the study `vqlog-sweep --config` makes
        study = study or named
    stop = _Stop()
    try:
        with _ended_by_signals(args.watch, stop):
            client, study = _open_study(args, study, stop)
            if args.out is None:  # the default file, checked as --out is: before any work
                from vqlog.tracking.table import table_path

                check_out_file(str(table_path("results", study)), "--out", "table.md",
                               make_folders=True)
            return _table_loop(args, client, study, stop)
    except KeyboardInterrupt:
        if not args.watch:
            raise  # one table cut short: `Interrupted.`, exit 130, as every command
        return 0  # --watch ends with Ctrl-C or SIGTERM; what was written stays


def _open_study(args, study: str | None, stop: _Stop):
    """(client, study name). Without --watch a missing store, an unreachable server or a missing
    study is an error; --watch waits for them (started before the sweep, or beside `vqlog init`
    in compose), with a line for each thing it waits for."""
    from vqlog.errors import UserError
    from vqlog.tracking.client import (MissingStore, StoreUnreachable, existing_store,
                                       open_client, resolve_tracking_uri)
    from vqlog.urls import mask

    said = None

    def wait(what: str) -> None:
        nonlocal said
        if what != said:
            print(f"table: waiting for {what} (checking every {args.interval:g} s; Ctrl-C to "
                  "stop)", file=sys.stderr, flush=True)  # not into `--out -`'s table
            said = what
        stop.sleep(args.interval)

    while True:
        try:
            client = open_client(existing_store(args.tracking_uri), sleep=stop.sleep)
            break
        except (MissingStore, StoreUnreachable) as exc:
            if not args.watch:
                raise
            where = mask(resolve_tracking_uri(args.tracking_uri))
            kind = "server" if where.lower().startswith(("http://", "https://")) else "store"
            wait(f"the MLflow {kind} {where}" if isinstance(exc, StoreUnreachable)
                 else f"an MLflow store at {where}")
    while True:
        found, missing = _find_study(client, study)
        if found is not None:
            return client, found
        if not args.watch:
            raise UserError(missing)
        wait(f"{'a vqlog study' if study is None else f'the study {study!r}'} in "
             f"{client.describe}")


def _find_study(client, study: str | None) -> tuple[str | None, str]:
    """(the study, "") when it is in the store, (None, why not) while it is not. UserError for
    what waiting cannot mend: several studies and no --study, or a deleted experiment."""
    from vqlog.errors import UserError
    from vqlog.tracking.rows import MissingExperiment, study_experiment
    from vqlog.tracking.runs import study_names

    if study is None:
        names = study_names(client)
        if len(names) > 1:
            raise UserError(f"several studies in {client.describe} ({', '.join(names)}); choose "
                            "one with --study")
        if not names:
            return None, f"no vqlog study in the MLflow store {client.describe}; run vqlog-sweep first"
        study = names[0]
    try:
        study_experiment(client, study)
    except MissingExperiment as exc:
        return None, str(exc)
    return study, ""


class _Stop:
    """A stop asked of --watch. The first Ctrl-C or SIGTERM only sets `asked`: the table being
    read or written is finished (an exception raised inside a database call would leave SQLAlchemy
    printing tracebacks and a file half-written), and the next wait ends at once. A second one
    ends it where it is."""

    def __init__(self):
        self.asked = False

    def signal(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def sleep(self, seconds: float) -> None:
        """time.sleep(seconds), cut short by a stop: KeyboardInterrupt, raised here, between
        calls."""
        end = time.monotonic() + seconds
        while not self.asked:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))
        raise KeyboardInterrupt


@contextlib.contextmanager
def _ended_by_signals(watch: bool, stop: _Stop):
    """--watch ends on Ctrl-C and on SIGTERM (`docker compose stop`), also when it was started
    with them ignored (a background job of a script, nohup). The handlers before are put back
    after."""
    if not watch or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, stop.signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _table_loop(args, client, study: str, stop: _Stop) -> int:
    from vqlog.errors import TrackingUnavailable
    from vqlog.files import write_text
    from vqlog.tracking import table
    from vqlog.tracking.rows import RowCache
    from vqlog.tracking.runs import study_run

    parent = said = lang = None
    publish = True  # until the server refuses this user's edits
    last, cache = None, RowCache(client, study)  # --watch: only the runs that ended since
    rendered = table.RenderCache()  # and only those rendered again
    while True:
        rows = cache.rows()
        parent = parent or study_run(client, study)  # made by the study's first worker
        wanted = args.lang or _sweep_lang(client, parent)
        if wanted != lang:  # nothing worked out in another language is kept
            lang, rendered = wanted, table.RenderCache()
        text = table.render_table(rows, lang=lang, title=study, cache=rendered)
        if text != last:
            if args.out == "-":  # the file's bytes, as written without --out -
                print(text, end="" if text.endswith("\n") else "\n", flush=True)
            else:
                out = Path(args.out) if args.out else table.table_path("results", study)
                write_text(out, text, crash_point="table.write")
                line = f"table: {out} ({_counts(rows, rendered)})"
                if line != said:  # a row changed, not the count: the same line once
                    print(line, flush=True, file=report_stream(out))  # not into /dev/stdout
                said = line
            if parent and publish and not _same_lang(client, parent, lang):
                publish = False  # the sweep's language stays; this --lang is for the file
            try:
                try:
                    if parent and publish:
                        table.publish_table(client, parent, rows, study, lang, text, rendered,
                                            sweep=False)
                except Exception as exc:  # noqa: BLE001 - MLflow's, when the study run was deleted
                    if _forbidden(exc) or isinstance(exc, TrackingUnavailable) or parent == (
                            parent := study_run(client, study)):  # (in the UI)
                        raise  # not that: as it was; else the run a worker made since, if any
                    if parent and _same_lang(client, parent, lang):
                        table.publish_table(client, parent, rows, study, lang, text, rendered,
                                            sweep=False)
            except Exception as exc:  # noqa: BLE001 - raised again unless it is a refusal
                if not _forbidden(exc):
                    raise
                publish = False  # a user the server lets read, not edit: the file is whole
                print("table: not published to the study run: this user may not edit it on the "
                      "tracking server (it answered 403 Forbidden)", file=sys.stderr, flush=True)
            last = text
            rendered.keep(rows)
        if not args.watch:
            return 0
        stop.sleep(args.interval)


def _sweep_lang(client, parent: str | None) -> str:
    """The language the sweep publishes the study's table in (the study run's tag), else en:
    a plain `vqlog table` beside a `--lang zh` sweep rewrote the sweep's own file in English."""
    from vqlog.tracking.table import LANG_TAG

    return (parent and client.get_run(parent).data.tags.get(LANG_TAG)) or "en"


def _same_lang(client, parent: str, lang: str) -> bool:
    """Whether the study run's table is in `lang` (or in none yet, or by a vqlog before the tag):
    a `vqlog table --lang zh` beside an English sweep published Chinese, and the sweep's next
    refresh English again, by turns."""
    from vqlog.tracking.table import LANG_TAG

    published = client.get_run(parent).data.tags.get(LANG_TAG)
    if published in (None, lang):
        return True
    print(f"table: not published to the study run, whose table is in {published} (the sweep's "
          "--lang)", file=sys.stderr, flush=True)
    return False


def _forbidden(exc: BaseException) -> bool:
    """The tracking server refused the edit for this user's permissions (MLflow's basic auth):
    a REST call's PERMISSION_DENIED, or an artifact upload's HTTP 403."""
    response = getattr(exc, "response", None)
    return (getattr(exc, "error_code", None) == "PERMISSION_DENIED"
            or getattr(response, "status_code", None) == 403)


def _counts(rows, cache) -> str:
    """"3 trials": the rows the table shows (finished trials, a trial and its retries as one;
    a trial still running has none), and ", 1 failed" of them: the sweep counts those apart."""
    from vqlog.tracking.table import shown_rows

    shown = shown_rows(rows, cache)
    failed = sum(row.state == "FAIL" for row in shown)
    return f"{len(shown)} trial{'s' * (len(shown) != 1)}" + (f", {failed} failed" if failed else "")
