"""`vqlog encode`: signals in, tokens out, with a trained model (a file, or the study's
registered model `models:/<study>@best`)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import tempfile
from pathlib import Path

from vqlog.cli import (TRACKING_HELP, add_data_args, add_debug, add_device_arg, check_out_file,
                       data_inputs, report_stream, url_arg)


def encode_command_parser(sub) -> None:
    p = sub.add_parser("encode", help="turn signals into tokens with a trained model")
    p.add_argument("--model", required=True,
                   help="a model file (vqlog export, vqlog train --save) or a registered "
                        "model: models:/<study>@<alias> (e.g. @best) or models:/<study>/<version>")
    add_data_args(p, None, required=True)
    p.add_argument("--tracking-uri", default=None, type=url_arg, help=TRACKING_HELP)
    add_device_arg(p)
    p.add_argument("--out", required=True,
                   help="the file of code indices to write: an int64 array in .npy format, or "
                        "for a name ending .csv text (a header row code0,code1,..., then one row "
                        "per window)")
    p.add_argument("--stride", type=int, default=None,
                   help="samples between two windows' starts (default: the model's stride; the "
                        "model's window for tokens that cover the signal once)")
    p.add_argument("--index", default=None, metavar="FILE.csv",
                   help="also write where each row of tokens comes from: its recording, first "
                        "sample and time, the rate it was cut at, and its time from the start "
                        "of the file or record")
    add_debug(p)
    p.set_defaults(func=encode_command)


def encode_command(args: argparse.Namespace) -> int:
    import numpy as np

    from vqlog import checkpoint
    from vqlog.data import indexed_windows
    from vqlog.errors import DataError, RateError, UserError
    from vqlog.files import atomic_write_all
    from vqlog.train import encode, resolve_device

    if not args.data:
        raise UserError("--data is required: ppg, synthetic or a data file")
    out = check_out_file(args.out, "--out", "tokens.npy", inputs=_inputs(args))
    index_file = check_out_file(args.index, "--index", "tokens.csv", inputs=_inputs(args)) \
        if args.index is not None else None
    if index_file is not None and index_file.resolve() == out.resolve():
        raise UserError(f"--out and --index are one file ({args.out}); give each its own, e.g. "
                        "--out tokens.npy --index tokens.csv")
    if index_file is not None and index_file.suffix.lower() not in ("", ".csv"):
        raise UserError(f"--index {args.index}: the index is CSV text; give a .csv file, e.g. "
                        f"--index {index_file.with_suffix('.csv').name}")
    if args.stride is not None and args.stride < 1:
        raise UserError(f"--stride must be a number of samples >= 1, got {args.stride}")
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="vqlog-encode-") as folder:
        path, what = _model_file(args, folder)
        shown = None if path == args.model else f"the weights file of {what}"  # not a temp path
        cfg, model = checkpoint.load(path, device=str(device), name=shown)
    if cfg.quantizer == "none":
        raise UserError(f"{what} has no quantizer (quantizer none): it makes no tokens")
    # load's config cuts other data at the model's rate, also one trained at its data's native
    # rate (resample_hz null): a 250 Hz ECG into a 100 Hz model is resampled to 100 Hz.
    if args.stride is not None:  # where windows start: no part of the model
        cfg = dataclasses.replace(cfg, stride=args.stride)
    try:
        windows, where = indexed_windows(args.data, cfg, sample_rate=args.sample_rate,
                                         channel=args.channel)
    except RateError as exc:  # its advice is for training, which sets resample_hz
        raise DataError(f"{exc.what}; {_rate_advice(exc, cfg)}") from None
    result = encode(model, windows)
    if out.suffix.lower() == ".csv":
        outputs = [(out, lambda f: f.write(_tokens_csv(result.tokens).encode()))]
    else:
        outputs = [(out, lambda f: np.save(f, result.tokens, allow_pickle=False))]
    if index_file is not None:
        outputs.append((index_file, lambda f: f.write(_index_csv(where).encode())))
    atomic_write_all(outputs)  # both or neither: a full disk leaves no tokens without an index
    n, t = result.tokens.shape
    at = f" at {cfg.resample_hz:g} Hz" if cfg.resample_hz else " at the data's own rate"
    say = report_stream(out, index_file)
    print(f"tokens: {n} windows x {t} codes ({cfg.window} samples{at}, {cfg.downsample} per "
          f"code) from {args.data} -> {out}", file=say)
    print(f"reconstruction MSE {result.mse:.4g}; codebook perplexity {result.perplexity:.1f} "
          f"of {model.codebook_size} codes ({100 * result.usage:.1f}% in use)", file=say)
    if index_file is not None:
        print(f"index: where each row comes from -> {index_file}", file=say)
    return 0


def _rate_advice(exc, cfg) -> str:
    """How to fix a rate error when the model, not a spec, sets the rate."""
    if exc.kind == "unknown":
        return "pass --sample-rate HZ, the rate it was recorded at" + (
            f" (it is resampled to the model's {cfg.resample_hz:g} Hz)" if cfg.resample_hz else "")
    if exc.kind == "given":
        return ("drop --sample-rate (the data's own rate is used" +
                (f", resampled to the model's {cfg.resample_hz:g} Hz)" if cfg.resample_hz else ")"))
    return (f"the model takes {cfg.resample_hz:g} Hz: check the data's sample rate "
            "(--sample-rate for a file without one)")


def _tokens_csv(tokens) -> str:
    """The codes as text: a header row code0..code{T-1}, then one row per window."""
    text = io.StringIO()
    rows = csv.writer(text, lineterminator="\n")
    rows.writerow([f"code{t}" for t in range(tokens.shape[1])])
    rows.writerows(tokens.tolist())
    return text.getvalue()


def _index_csv(where: list[tuple[str, int, float, float]]) -> str:
    """Row i of the tokens: its recording, its first sample and second in that recording, the
    rate, and its second from the start of the source (another for a record's later stretch)."""
    text = io.StringIO()
    rows = csv.writer(text, lineterminator="\n")
    rows.writerow(["row", "recording", "start_sample", "start_seconds", "sample_rate",
                   "source_seconds"])
    for i, (recording, start, rate, at) in enumerate(where):
        rows.writerow([i, recording, start, f"{start / rate:.9g}", f"{rate:g}", f"{at:.9g}"])
    return text.getvalue()


def _inputs(args: argparse.Namespace) -> list[tuple[str, object]]:
    """The files encode reads: the model file, and those of --data (`cli.data_inputs`)."""
    found = [] if args.model.startswith("models:/") else [("--model", Path(args.model))]
    return found + data_inputs(args.data)


def _model_file(args: argparse.Namespace, folder: str) -> tuple[str, str]:
    """(a local model file, how to name it): the file given, or a registered model's weights."""
    if not args.model.startswith("models:/"):
        return args.model, args.model
    from vqlog.tracking.artifacts import run_of_model_uri, weights_of_run
    from vqlog.tracking.client import existing_store, open_client

    client = open_client(existing_store(args.tracking_uri))
    run_id, what = run_of_model_uri(client, args.model)
    return str(weights_of_run(client, run_id, folder, what)), what
