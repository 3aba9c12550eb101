"""Command line: `vqlog train|sweep|table|ui` and `vqlog-sweep`.

The library raises narrow exceptions; here a `UserError` becomes one `Error: ...` line and exit 2,
anything else exit 1 (with a traceback only under --debug).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Callable, Sequence


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line `Error:` and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"Error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _data_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--data",
        default=default,
        help="ppg (heartpy's real PPG recordings), synthetic, or a .npy/.csv/.parquet file",
    )
    p.add_argument("--sample-rate", type=float, help="sample rate in Hz of a user data file")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


# ---------------------------------------------------------------------------------------- train


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one configuration and print a summary")
    p.add_argument("--config", help="YAML file of config keys (the log's names)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set lr=1e-3 --set BN=no")
    _data_args(p, "ppg")
    _device_arg(p)
    p.add_argument("--save", metavar="PATH", help="write the trained weights and config here")
    _common(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from vqlog import checkpoint
    from vqlog.config import Config, load_config_file, parse_overrides
    from vqlog.data import prepare
    from vqlog.errors import DivergedError, UserError
    from vqlog.train import fit, resolve_device

    values = load_config_file(args.config) if args.config is not None else {}
    values.update(parse_overrides(args.set))
    cfg = Config.from_mapping(values)
    resolve_device(args.device)  # a missing GPU is bad input: say so before loading data
    if args.save:
        _check_writable(args.save)
    data = prepare(args.data, cfg, sample_rate=args.sample_rate)
    print(
        f"data: {args.data}: {len(data.train)} train / {len(data.valid)} valid / "
        f"{len(data.test)} test windows of {cfg.window} samples"
        + (f" at {data.sample_rate:g} Hz" if data.sample_rate else "")
    )
    bar = _Progress(cfg.iteration, "train")
    try:
        result = fit(cfg, data, on_eval=bar.on_eval, device=args.device, progress=bar.update)
    except DivergedError as exc:
        raise UserError(
            f"training {exc}; lower lr (now {cfg.lr:g}) or keep grad_clip > 0 (now {cfg.grad_clip:g})"
        ) from None
    finally:
        bar.close()
    s = result.summary()
    print(_summary_text(cfg, s))
    if args.save:
        checkpoint.save(args.save, cfg, result.model)
        print(f"saved: {args.save}")
    return 0


def _summary_text(cfg, s: dict) -> str:
    quantized = cfg.quantizer != "none"
    lines = [
        "",
        f"  quantizer      {cfg.quantizer}  (embedding_num {cfg.embedding_num}, "
        f"embedding_dim {cfg.embedding_dim}, downsample {cfg.downsample})",
        f"  iterations     {int(s['iterations_run'])}",
        f"  val MSE        final {s['final_val_mse']:.4f}  best {s['best_val_mse']:.4f}",
    ]
    if quantized:
        lines += [
            f"  perplexity     final {s['final_val_perplexity']:.1f}  max "
            f"{s['max_val_perplexity']:.1f} @ {int(s['max_val_perplexity_step'])}",
            f"  code usage     {100 * s['final_val_usage']:.1f}% of the codebook",
        ]
    osc = s["loss_oscillation"]
    lines += [
        f"  oscillation    {osc:.3f}" if osc == osc else "  oscillation    n/a (too few points)",
        f"  time           {s['train_seconds']:.1f} s",
    ]
    return "\n".join(lines)


def _check_writable(path: str) -> None:
    from pathlib import Path

    from vqlog.errors import UserError

    target = Path(path)
    if target.is_dir():
        raise UserError(f"--save {path} is a folder; give a file name such as {target / 'model.pt'}")
    parent = target.resolve().parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise UserError(f"cannot write {path}: {parent} {what}")


class _Progress:
    """A tqdm bar on a terminal; a plain line per evaluation otherwise (logs, CI)."""

    def __init__(self, total: int, desc: str):
        self.tty = sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="it", leave=False, dynamic_ncols=True)
        self.start = time.perf_counter()

    def update(self, step: int, stats: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0:
                self.bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)

    def on_eval(self, record) -> None:
        ppl = "" if record.val_perplexity != record.val_perplexity else (
            f"  perplexity {record.val_perplexity:6.1f}  usage {100 * record.val_usage:5.1f}%"
        )
        line = (f"step {record.step:6d}  val mse {record.val_mse:.4f}{ppl}"
                f"  ({time.perf_counter() - self.start:.0f} s)")
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        return None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------- sweep

DEFAULT_SPEC = "seed"  # sweeps/seed.yaml: the log's search space on a CPU budget
DEFAULT_STORAGE = "sqlite:///optuna.db"


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trials", type=int, default=50,
                   help="finished trials (COMPLETE + PRUNED) the study should reach, counted "
                        "across all workers (default 50)")
    p.add_argument("--config", default=DEFAULT_SPEC,
                   help="sweep spec: a YAML file or a bundled name (seed, quantizers, baseline, "
                        "smoke, gpu); default seed")
    p.add_argument("--study", help="study name (default: the spec's name)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="Optuna storage URL; PostgreSQL to share a study between workers "
                        f"(default {DEFAULT_STORAGE})")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default sqlite:///mlflow.db; http://host:5000 for a server)")
    _data_args(p, None)
    _device_arg(p)
    p.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    p.add_argument("--seed", type=int, help="seed for the sampler and for training")
    p.add_argument("--lang", default="en", choices=("en", "zh"), help="language of the table")
    _common(p)


def cmd_sweep(args: argparse.Namespace) -> int:
    import dataclasses

    from vqlog.errors import UserError

    # The flags first: a typo is reported before torch and MLflow are imported.
    if args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    if args.timeout is not None and not args.timeout > 0:  # NaN too
        raise UserError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")

    from vqlog import sweep, tracking
    from vqlog.retry import TrackingUnavailable
    from vqlog.spec import load_sweep
    from vqlog.storage import mask, parse_url

    spec = load_sweep(args.config)
    changes = {}
    if args.study:
        changes["name"] = args.study
    if args.data:
        changes.update(source=args.data, sample_rate=args.sample_rate)
    elif args.sample_rate is not None:
        changes["sample_rate"] = args.sample_rate
    spec = dataclasses.replace(spec, **changes)
    parse_url(args.storage)
    uri = args.tracking_uri or tracking.DEFAULT_TRACKING_URI
    tracker = tracking.Tracker(uri, lang=args.lang)
    print(f"study {spec.name}: {args.trials} trials, spec {spec.path}, data {spec.source}, "
          f"storage {mask(args.storage)}, tracking {mask(uri)}", flush=True)
    start = time.perf_counter()
    try:
        result = sweep.run(spec, args.trials, args.storage, tracker=tracker, device=args.device,
                           timeout=args.timeout, seed=args.seed)
    except TrackingUnavailable as exc:
        sys.stderr.write(
            f"Error: {_mask_urls(str(exc))}. Everything finished is kept in the study and MLflow; "
            "a trial cut short was marked FAIL. Start the tracking server, then rerun the same "
            "command to resume.\n"
        )
        return 1
    print(_sweep_summary(result, time.perf_counter() - start, args.storage, uri))
    if (ridden := tracker.close()) is not None:
        print(ridden)
    if result.interrupted:
        print("Interrupted: the running trial was marked FAIL; everything finished is kept. "
              "Rerun the same command to continue.")
        return 130
    return 0


def _sweep_summary(r, seconds: float, storage: str, uri: str) -> str:
    from vqlog.storage import mask

    lines = [
        "",
        f"study {r.study}: {r.finished}/{r.target} trials finished "
        f"({r.ran_here} ran here, {r.failed_here} failed) in {seconds / 60:.1f} min"
        + ("; --timeout reached" if r.timed_out else ""),
    ]
    if r.best:
        values = r.best["values"]
        ppl = r.best.get("perplexity")
        lines.append(f"best: Seq{r.best['number'] + 1}  val mse {values[0]:.4f}"
                     + (f"  perplexity max {ppl:.1f}" if ppl is not None else ""))
        lines.append("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in r.best["params"].items()))
    if r.table_path:
        lines.append(f"table:  {r.table_path}")
    if uri.startswith("sqlite:///"):
        lines.append(f"mlflow: vqlog ui --tracking-uri {uri}   (then open http://127.0.0.1:5000)")
    else:
        lines.append(f"mlflow: {mask(uri)}")
    lines.append(f"optuna: optuna-dashboard {mask(storage)}")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="run an Optuna study (the same as vqlog-sweep)")
    _sweep_args(p)
    p.set_defaults(func=cmd_sweep)


def sweep_main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="vqlog-sweep", description="Run (or join) an Optuna study of the S4D-VQ-VAE.")
    _sweep_args(parser)
    args = parser.parse_args(argv)
    return run(cmd_sweep, args)


# ---------------------------------------------------------------------------------------- table


def _add_table(sub) -> None:
    p = sub.add_parser("table", help="regenerate the experiment table from MLflow")
    p.add_argument("--study", help="study (MLflow experiment) name; default: the only vqlog study")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--lang", default="en", choices=("en", "zh"))
    p.add_argument("--out", help="output file (default results/<study>.md; - for stdout)")
    p.add_argument("--watch", action="store_true", help="keep regenerating as runs finish")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between checks with --watch")
    _common(p)
    p.set_defaults(func=cmd_table)


def cmd_table(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from vqlog import retry, tracking
    from vqlog.storage import mask

    uri = _existing_store(args.tracking_uri)
    tracking.quiet_mlflow()
    # --watch runs beside a sweep for hours: a locked SQLite store or a restarted server is
    # waited out (vqlog.retry), as the sweep's own tracker does.
    retry.quiet_http_retries(uri)
    client = retry.RetryingClient(MlflowClient(tracking_uri=uri), mask(uri))
    study = args.study or _only_study(client)
    parent = _parent_run_id(client, study)
    try:
        return _table_loop(args, client, study, parent)
    except KeyboardInterrupt:
        return 0  # --watch ends with Ctrl-C; what was written stays


def _existing_store(uri: str | None) -> str:
    """The tracking URI, absolute for SQLite, refusing a SQLite file that does not exist (MLflow
    would silently create an empty store there)."""
    from pathlib import Path

    from vqlog import tracking
    from vqlog.errors import UserError

    given = uri or tracking.DEFAULT_TRACKING_URI
    uri = tracking.absolute_sqlite_uri(given)
    tracking.check_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri.split(":///", 1)[1].split("?")[0]).is_file():
        raise UserError(f"no MLflow store at {given}; run vqlog-sweep first or pass --tracking-uri")
    return uri


def _table_loop(args, client, study: str, parent: str | None) -> int:
    from pathlib import Path

    from vqlog import table, tracking

    last = None
    while True:
        rows = table.fetch_rows(client, study)
        text = table.render_table(rows, lang=args.lang, title=study)
        if text != last:
            if args.out == "-":
                print(text, flush=True)
            else:
                out = Path(args.out or f"results/{study}.md")
                table.write_atomic(out, text)
                print(f"table: {out} ({len(rows)} trials)", flush=True)
            if parent:
                tracking.publish_table(client, parent, text)
            last = text
        if not args.watch:
            return 0
        time.sleep(args.interval)


def _only_study(client) -> str:
    from vqlog.errors import UserError

    names = sorted({r.data.tags.get("optuna.study") for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`vqlog.role` = 'study'")} - {None})
    if len(names) == 1:
        return names[0]
    if not names:
        raise UserError("no vqlog study in this MLflow store; run vqlog-sweep first")
    raise UserError(f"several studies here ({', '.join(names)}); choose one with --study")


def _parent_run_id(client, study: str) -> str | None:
    exp = client.get_experiment_by_name(study)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`vqlog.role` = 'study'",
                              max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


# ------------------------------------------------------------------------------------------- ui


def _add_ui(sub) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on the local store")
    p.add_argument("--tracking-uri", default=None, help="backend store (default sqlite:///mlflow.db)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    _common(p)
    p.set_defaults(func=cmd_ui)


def cmd_ui(args: argparse.Namespace) -> int:
    import os
    import shutil

    from vqlog.errors import UserError

    uri = _existing_store(args.tracking_uri)
    beside = os.path.join(os.path.dirname(sys.executable), "mlflow")  # the same environment's
    mlflow = beside if os.access(beside, os.X_OK) else shutil.which("mlflow")
    if mlflow is None:
        raise UserError("the mlflow command is not on PATH; activate the environment vqlog is installed in")
    cmd = [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    if uri.startswith("sqlite:///"):
        root = os.path.join(os.path.dirname(os.path.abspath(uri.split(":///", 1)[1])), "mlartifacts")
        cmd += ["--default-artifact-root", root]
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    os.execv(mlflow, cmd)
    return 0  # pragma: no cover - execv does not return


# ------------------------------------------------------------------------------------ plumbing


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vqlog", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_train(sub)
    _add_sweep(sub)
    _add_table(sub)
    _add_ui(sub)
    return parser


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    from vqlog.errors import UserError, VqlogError

    try:
        return func(args)
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"Error: {_mask_urls(str(exc))}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        return 130
    except VqlogError as exc:  # raised on purpose (an outage past its limit, ...): the message says it
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"Error: {_mask_urls(' '.join(str(exc).split()))}\n")
        return 1
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            traceback.print_exc()
        message = _mask_urls(" ".join(str(exc).split()))
        sys.stderr.write(f"Error: {type(exc).__name__}: {message} (rerun with --debug for a traceback)\n")
        return 1


def _mask_urls(text: str) -> str:
    """Library errors quote URLs whole ("API request to http://user:pw@host/... failed")."""
    import re

    return re.sub(r"(\w[\w+.-]*://[^/@:\s]*):[^/@\s]*@", r"\1:***@", text)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
