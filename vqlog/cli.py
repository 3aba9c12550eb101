"""Command line: `vqlog train|sweep|table|ui|init|export|encode|best|trials` and `vqlog-sweep`.

Each subcommand is a `<name>_command_parser(subparsers)` + `<name>_command(args)` pair in its own
module under `vqlog/commands/`. The library raises narrow exceptions; `run` turns a `UserError`
into one `Error: ...` line and exit 2, anything else into exit 1 (a traceback only with --debug).
Process-wide settings (log levels, warning filters, MLflow's HTTP retries, the plot backend) are
made here, for the commands, and never on import of the library.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, Sequence

DEFAULT_SPEC = "seed"  # sweeps/seed.yaml: the log's search space on a CPU budget (= api's)
STORAGE_HELP = ("Optuna storage URL; PostgreSQL to share a study between workers (default: "
                "$OPTUNA_STORAGE, else sqlite:///optuna.db)")
TRACKING_HELP = ("MLflow tracking URI, e.g. http://host:5000 for a server (default: "
                 "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def command_name(name: str) -> str:
    """How to type `name`, a command this environment installs, in a hint the user copies: the
    bare name where the shell finds this environment's copy, else its path (relative to the
    working directory when it lies inside it, as `.venv/bin/vqlog` after `make install`)."""
    import os
    import shlex
    import shutil
    from pathlib import Path

    here = Path(sys.executable).parent / name  # the environment's bin folder, not resolved
    if not here.is_file():
        return name
    found = shutil.which(name)
    if found and os.path.samefile(found, here):
        return name
    try:
        path = str(here.relative_to(Path.cwd()))
    except ValueError:
        path = str(here)
    return shlex.quote(path if os.sep in path else os.path.join(".", path))


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line `Error:` and exit code 2. No abbreviated flags: a
    typo (`--trial 3`, `--watc`) must not quietly be taken for another flag. An unknown flag
    after a command points to that command's help."""

    commands: dict[str, argparse.ArgumentParser] = {}

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            here = self.commands.get(getattr(parsed, "command", None) or "", self)
            here.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> None:  # type: ignore[override]
        from vqlog.urls import mask_urls  # a URL given to a command that does not take it

        sys.stderr.write(f"Error: {mask_urls(message)} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def add_data_args(p: argparse.ArgumentParser, default: str | None, required: bool = False) -> None:
    p.add_argument(
        "--data",
        default=default,
        required=required,
        help="ppg (heartpy's real PPG recordings), synthetic, a .npy/.csv/.parquet file, a WFDB "
             "record (its path without .hea) or an EDF/BDF file",
    )
    p.add_argument("--sample-rate", type=float, help="sample rate in Hz of a user data file")
    p.add_argument("--channel", help="the signal of a multi-channel file: a WFDB or EDF/BDF "
                                     "channel, or a CSV/Parquet column (name or 0-based index)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def add_study_args(p: argparse.ArgumentParser) -> None:
    """--config, --study, --storage and --tracking-uri: which study, where (sweep and init)."""
    p.add_argument("--config", default=DEFAULT_SPEC,
                   help="sweep spec: a YAML file or a bundled name (seed, quantizers, baseline, "
                        f"smoke, gpu); default {DEFAULT_SPEC}")
    p.add_argument("--study", type=default_if_empty,
                   help="study name (default, also when empty: the spec's name)")
    p.add_argument("--storage", default=None, type=url_arg, help=STORAGE_HELP)
    p.add_argument("--tracking-uri", default=None, type=url_arg, help=TRACKING_HELP)


def default_if_empty(value: str) -> str | None:
    """An optional name given as '' means the default: compose passes `--study ""` where `STUDY`
    is left empty in `.env`."""
    return value or None


def url_arg(value: str) -> str:
    """--storage and --tracking-uri: an empty value is refused, not taken for the default. A
    worker started as `--storage "$PG_URL"` with the variable unset ran a study of its own in
    ./optuna.db, beside the shared one."""
    if not value.strip():
        raise argparse.ArgumentTypeError("needs a URL, got an empty value (an unset variable?); "
                                         "leave the flag out for the default")
    return value


def check_out_file(out: str, flag: str, example: str, make_folders: bool = False,
                   inputs: Sequence[tuple[str, object]] = ()):
    """The Path of an output file whose folder exists (or, with `make_folders`, can be made
    where the nearest existing one is) and that this user may replace: checked before any work,
    so that bad input writes nothing. `example` is a file name to suggest for a folder;
    `inputs` are (flag, path) of the files the command reads, which the output must not be."""
    import errno
    import os
    import stat
    import tempfile
    from pathlib import Path

    from vqlog.errors import UserError
    from vqlog.files import write_target, writes_through

    if not out.strip():
        raise UserError(f"{flag} needs a file name, e.g. {flag} {example}")
    if out == "-":
        raise UserError(f"{flag} - : this command writes a file, not standard output; give a "
                        f"file name such as {flag} {example}")
    path = Path(out)
    if path.is_dir():
        raise UserError(f"{flag} {out} is a folder; give a file name such as {path / example}")
    if out.endswith(("/", os.sep)):  # Path() drops the slash: "new/" would be written as a file
        raise UserError(f"{flag} {out} names a folder, which does not exist; give a file name "
                        f"such as {path / example}")
    if path.is_block_device() or path.is_socket():
        raise UserError(f"{flag} {out} is a device or socket, not a file; give a file name such "
                        f"as {example}")
    if writes_through(path):
        return path  # /dev/null, /dev/stdout (a terminal, a pipe, a file): written as it is
    if is_sqlite_database(path):
        raise UserError(f"{flag} {out} is an SQLite database (a study's Optuna or MLflow store?), "
                        f"which the output would replace; give another file name such as {example}")
    for given, read in inputs:
        if same_file(read, path):
            raise UserError(f"{flag} {out} is the {given} file, which it would overwrite; give "
                            f"another file name such as {example}")
    target = write_target(path.absolute())  # where the write lands (a link of this user's: its
    parent = target.parent                   # file; another user's link: the link itself)
    while make_folders and not parent.exists() and parent != parent.parent:
        if os.path.islink(parent):  # mkdir would fail on it after the work
            raise UserError(f"cannot write {out}: {parent} is a link to {os.readlink(parent)}, "
                            "which does not exist")
        parent = parent.parent  # the write makes the folders below it
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise UserError(f"cannot write {out}: {parent} {what}")
    try:  # an unnamed file, gone when closed: what the write will need, tried before the work
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        why = f" ({exc.strerror})" if exc.strerror and exc.errno != errno.ENOENT else ""
        raise UserError(f"cannot write {out}: {parent} is not writable{why}") from None
    # In a shared folder with the sticky bit (/tmp), only the owner of a file or link (or of the
    # folder) may replace it: another user's would fail at the rename, after all the work.
    me = os.geteuid()
    if me and os.path.lexists(target) and target.parent.stat().st_mode & stat.S_ISVTX and \
            me not in (os.lstat(target).st_uid, target.parent.stat().st_uid):
        raise UserError(f"cannot write {out}: it belongs to another user, and only its owner may "
                        f"replace it in {target.parent} (a shared folder); give another file name")
    return path


def data_inputs(data: str | None) -> list[tuple[str, object]]:
    """("--data", path) of the files `--data` reads: the data file, or a WFDB record's header and
    the signal files it names (`data/100`: data/100.hea, data/100.dat); none for a built-in
    source."""
    from pathlib import Path

    from vqlog.records import is_wfdb_record
    from vqlog.sources import SOURCES

    if not data or data in SOURCES:
        return []
    path = Path(data).expanduser()
    if path.is_file() or not is_wfdb_record(data):
        return [("--data", path)]
    record = path.with_suffix("") if path.suffix.lower() == ".hea" else path
    found: list[tuple[str, object]] = [("--data", Path(f"{record}.hea"))]
    try:
        import wfdb

        header = wfdb.rdheader(str(record))
        found += [("--data", record.parent / name)
                  for name in dict.fromkeys(getattr(header, "file_name", None) or [])]
    except Exception:  # noqa: BLE001 - a header wfdb cannot read fails later, with its message
        pass
    return found


def same_file(a, b) -> bool:
    """Whether a and b are one existing file, however each is named (a link, a hard link)."""
    import os

    try:
        return os.path.samefile(os.path.expanduser(a), os.path.expanduser(b))
    except OSError:  # one of them does not exist
        return False


def report_stream(*outputs):
    """Where a command's summary lines go: standard error where an output file is standard
    output (`--out /dev/stdout | tool`), so that they do not run into the file; else stdout."""
    import sys

    from vqlog.files import is_open_as

    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):  # captured (a notebook, a test): no descriptor
        return sys.stdout
    return sys.stderr if any(o is not None and is_open_as(o, fd) for o in outputs) else sys.stdout


def is_sqlite_database(path) -> bool:
    """Whether `path` (a link followed) is an SQLite database file, by its 16-byte header."""
    from pathlib import Path

    try:
        if not Path(path).is_file():  # a FIFO is not opened: reading it would wait for a writer
            return False
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def build_parser() -> argparse.ArgumentParser:
    from vqlog.commands import best, encode, export, init, sweep, table, train, trials, ui

    parser = Parser(prog="vqlog", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for module in (train, sweep, table, ui, init, export, encode, best, trials):
        getattr(module, f"{module.__name__.rsplit('.', 1)[1]}_command_parser")(sub)
    parser.commands = dict(sub.choices)
    return parser


def configure_process() -> None:
    """What a command line wants and a library must not impose on its host process.

    vqlog prints its own line per trial; Optuna's INFO lines, its WARNING with the whole
    traceback of every failed trial, the ExperimentalWarnings of the heartbeat API it
    recommends, and MLflow's and alembic's lines per schema migration would drown them. And
    glibc's malloc keeps freed memory for the next training step (`vqlog.alloc`)."""
    import logging
    import os
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # MLflow's own warnings too (a tag cut at its length limit, the system-metrics monitor
    # during a tracking outage): what matters, vqlog says itself, in one line.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # read when mlflow is imported
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Against a tracking server MLflow writes "View run ... / View experiment ..." to stdout each
    # time a run ends (two lines per trial in the sweep's output), and reads the run back for
    # them: one more request per trial. vqlog prints the UI's link once, at the end.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):  # in case it already was
        logging.getLogger(name).setLevel(logging.ERROR)
    # vector-quantize-pytorch's k-means init warns through loguru, in the middle of the trial
    # lines, when a first batch holds fewer vectors than the codebook has codes ("duplicates
    # will be sampled"): usual with a small batch and a large codebook, and the codes that stay
    # unused show as the trial's dead codes and perplexity.
    from loguru import logger

    logger.disable("vector_quantize_pytorch")
    from vqlog.tracking.client import quiet_http_retries

    quiet_http_retries()
    from vqlog.alloc import keep_freed_memory

    keep_freed_memory()


# Flags whose default comes from an environment variable: (flag, argparse dest, variable).
FROM_ENVIRONMENT = (("--storage", "storage", "OPTUNA_STORAGE"),
                    ("--tracking-uri", "tracking_uri", "MLFLOW_TRACKING_URI"))


def from_environment(message: str, args: argparse.Namespace) -> str:
    """An error about a flag's value that the user did not give, but the environment did, names
    the variable: "--storage: folder ..." would send them looking for a flag they never typed."""
    import os

    for flag, dest, variable in FROM_ENVIRONMENT:
        if (message.startswith(flag) and hasattr(args, dest) and not getattr(args, dest)
                and os.environ.get(variable)):
            return f"${variable} (the default of {flag}){message[len(flag):]}"
    return message


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`func(args)`, its errors as one `Error:` line: exit 2 for bad input, 1 for the rest."""
    from vqlog.errors import UserError, VqlogError, one_line
    from vqlog.urls import mask_urls

    try:
        configure_process()
        return func(args)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"Error: {mask_urls(from_environment(str(exc), args))}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        return 130
    except VqlogError as exc:  # raised on purpose (an outage past its limit, ...): the message says it
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"Error: {mask_urls(one_line(exc))}\n")
        return 1
    except BrokenPipeError:  # the reader went away (`vqlog best | head -3`): quietly, as the
        import os            # shell's tools do when SIGPIPE ends them (exit 128 + 13)

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush too
        return 141
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"Error: {type(exc).__name__}: {mask_urls(one_line(exc))} "
                         "(rerun with --debug for a traceback)\n")
        return 1


def start_tuned(argv: Sequence[str] | None) -> None:
    """A command line (argv None: the process's own) starts again with glibc's malloc tuned and
    huge pages (`vqlog.alloc.restart_tuned`); a call with arguments, from Python, runs as it is."""
    if argv is None:
        from vqlog.alloc import restart_tuned

        restart_tuned()


def main(argv: Sequence[str] | None = None) -> int:
    start_tuned(argv)
    args = build_parser().parse_args(argv)
    return run(args.func, args)


def sweep_main(argv: Sequence[str] | None = None) -> int:
    """`vqlog-sweep`: the same as `vqlog sweep`."""
    start_tuned(argv)
    from vqlog.commands import sweep

    parser = Parser(prog="vqlog-sweep", description="Run (or join) an Optuna study of the S4D-VQ-VAE.")
    sweep.add_sweep_args(parser)
    args = parser.parse_args(argv)
    return run(sweep.sweep_command, args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
