"""`vqlog train`: train one configuration, print a summary, optionally save the weights."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

from vqlog.cli import (add_data_args, add_debug, add_device_arg, check_out_file, data_inputs,
                       report_stream)


# The config keys that size a training step's tensors, as an out-of-memory error names them.
MEMORY_KEYS = ("batch", "window", "d_model", "d_state", "embedding_dim", "embedding_num")


def train_command_parser(sub) -> None:
    p = sub.add_parser("train", help="train one configuration and print a summary")
    p.add_argument("--config", help="YAML file of config keys (the log's names)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set lr=1e-3 --set BN=no")
    add_data_args(p, "ppg")
    add_device_arg(p)
    p.add_argument("--save", metavar="PATH", help="write the trained weights and config here")
    add_debug(p)
    p.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    from vqlog.config import Config, load_config_file, parse_overrides
    from vqlog.errors import UserError

    if args.config is not None and not Path(args.config).is_file():
        from vqlog.study.spec import bundled_specs

        if args.config in bundled_specs():  # a sweep spec's name, as vqlog-sweep --config takes
            raise UserError(f"config file not found: {args.config}; vqlog train --config takes a "
                            f"YAML file of config keys, and '{args.config}' names a sweep spec: "
                            f"vqlog-sweep --config {args.config}")
    values = load_config_file(args.config) if args.config is not None else {}
    from vqlog.config import known_keys
    from vqlog.study.spec import TOP_KEYS

    sections = [k for k in TOP_KEYS if k in values and k not in known_keys()]  # a sweep spec's
    if sections:
        shown = ", ".join(sections[:3]) + (", ..." if len(sections) > 3 else "")
        raise UserError(f"{args.config} is a sweep spec (it has {shown}), not a "
                        f"file of config keys: run it with vqlog-sweep --config {args.config}, "
                        "or put the keys of the point to train in a file of their own")
    values.update(parse_overrides(args.set))
    cfg = Config.from_mapping(values)
    from vqlog.train import resolve_device  # torch: after a typo in the config is reported
    resolve_device(args.device)  # a missing GPU is bad input: say so before loading data
    if args.save is not None:  # (an empty one too: it is not "no file")
        config = [("--config", args.config)] if args.config else []
        check_out_file(args.save, "--save", "model.pt", inputs=config + data_inputs(args.data))
    # `--save /dev/stdout | tool`: the model alone on stdout, the lines about it on stderr
    with contextlib.redirect_stdout(report_stream(args.save)):
        return _train(args, cfg)


def _train(args: argparse.Namespace, cfg) -> int:
    from vqlog import checkpoint
    from vqlog.data import prepare
    from vqlog.errors import DivergedError, UserError, out_of_memory
    from vqlog.train import fit

    data = prepare(args.data, cfg, sample_rate=args.sample_rate, channel=args.channel)
    print(
        f"data: {args.data}: {len(data.train)} train / {len(data.valid)} valid / "
        f"{len(data.test)} test windows of {cfg.window} samples"
        + (f" at {data.sample_rate:g} Hz" if data.sample_rate else "")
    )
    bar = Progress(cfg.iteration, "train")
    from vqlog.study.cores import core_share

    share = core_share()  # its share of the host's cores, beside sweeps and other runs
    try:
        share.apply()
        result = fit(cfg, data, on_eval=bar.on_eval, device=args.device, progress=bar.update,
                     on_start=bar.started)
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if (oom := out_of_memory(exc)) is None:
            raise
        sizes = ", ".join(f"{k} {getattr(cfg, k)}" for k in MEMORY_KEYS)
        raise UserError(f"training ran {oom}: lower one of {sizes}") from None
    except DivergedError as exc:
        raise UserError(
            f"training {exc}; lower lr (now {cfg.lr:g}) or keep grad_clip > 0 (now {cfg.grad_clip:g})"
        ) from None
    finally:
        bar.close()
        share.close()
    s = result.summary()
    print(summary_text(cfg, s, result.model.codebook_size))
    if args.save:
        checkpoint.save(args.save, cfg, result.model, result.sample_rate)
        print(f"saved: {args.save}")
    return 0


def summary_text(cfg, s: dict, codes: int | None = None) -> str:
    """The closing lines of `vqlog train`; `codes`: the model's number of codes, which for fsq
    is the product of its levels, not embedding_num (256 gives 8x6x5 = 240)."""
    quantized = cfg.quantizer != "none"
    codes = cfg.embedding_num if codes is None else codes
    sizes = (f"embedding_num {cfg.embedding_num}, " if cfg.quantizer != "fsq" else
             f"{codes} codes, the nearest FSQ size to embedding_num {cfg.embedding_num}; ") \
        + f"embedding_dim {cfg.embedding_dim}, " if quantized else ""
    lines = [
        "",
        f"  quantizer      {cfg.quantizer}  ({sizes}downsample {cfg.downsample})",
        f"  iterations     {int(s['iterations_run'])}",
        f"  val MSE        final {s['final_val_mse']:.4f}  best {s['best_val_mse']:.4f}",
    ]
    if quantized:
        lines += [
            f"  perplexity     final {s['final_val_perplexity']:.1f}  max "
            f"{s['max_val_perplexity']:.1f} @ {int(s['max_val_perplexity_step'])}",
            f"  code usage     {100 * s['final_val_usage']:.1f}% of the "
            + ("codebook" if codes == cfg.embedding_num else f"{codes} codes"),
        ]
    osc = s["loss_oscillation"]
    lines += [
        "  oscillation    n/a (too few points)" if math.isnan(osc) else f"  oscillation    {osc:.3f}",
        f"  time           {s['train_seconds']:.1f} s",
    ]
    return "\n".join(lines)


class Progress:
    """A tqdm bar on a terminal; a plain line per evaluation otherwise (logs, CI)."""

    def __init__(self, total: int, desc: str):
        self.tty = sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="it", leave=False, dynamic_ncols=True)
        self.start = time.perf_counter()

    def started(self) -> None:
        """Training begins: the lines' seconds count from here, as the summary's time does."""
        self.start = time.perf_counter()

    def update(self, step: int, point) -> None:
        """Every step; `point` is the train point at logged steps (the loss to show), else None."""
        if self.bar is not None:
            self.bar.update(1)
            if point is not None:
                self.bar.set_postfix(loss=f"{point.loss:.4f}", refresh=False)

    def on_eval(self, record) -> None:
        ppl = "" if math.isnan(record.val_perplexity) else (
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
