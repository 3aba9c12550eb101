"""Benchmark of issue 13, item 2: the training loop's host syncs.

    python benchmarks/bench_syncs.py                 # CPU, one torch thread
    python benchmarks/bench_syncs.py --device cuda   # the GPU figure (needs a CUDA GPU)
    python benchmarks/bench_syncs.py --shapes default --rounds 1 --steps 5   # a quick check

`vqlog.train.fit` sums the train metrics on the device and syncs the host once per `log_every`
steps. The usual way to write the loop, and vqlog's own before issue 13, fetches them every step:
`loss.item()`, `mse.item()`, the commitment's `.item()` and the batch's code histogram on the
host, four to five syncs a step, each of which waits for the device to finish the step.

Both variants run `fit` itself on the same config, data and seed (no evaluation but the last):
- `vqlog`: fit as it is;
- `per-step`: fit with the per-step fetches added after each step's device-side sums (the
  metrics it logs are the same; only the syncs differ).

Rounds interleave the variants; the figure is per-step's seconds over vqlog's in each round
(median and spread). On the CPU a sync costs next to nothing, so the target there is that
vqlog's loop is not slower (ratio >= 0.98 within the noise); on a GPU the ratio is the gain.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import torch

import _common
from bench_step import describe, shape_configs
from vqlog import metrics
from vqlog.data import Splits
from vqlog.train import TrainingRun, fit

STEPS = 40


def per_step_accumulate(original):
    def accumulate(self, out, mse, loss, step):
        original(self, out, mse, loss, step)
        loss.item(), mse.item(), out.quant.commitment.item()
        if out.quant.indices is not None:
            counts = torch.bincount(out.quant.indices.reshape(-1),
                                    minlength=self.model.codebook_size).cpu()
            metrics.perplexity(counts.double())
    return accumulate


def synthetic(cfg, n: int = 512) -> Splits:
    """Pulses in noise, (n, window) float32 windows: only their shape matters here."""
    rng = np.random.default_rng(0)
    t = np.linspace(0, 8 * np.pi, cfg.window, dtype=np.float32)
    x = np.sin(t[None] + rng.uniform(0, 6.3, (n, 1))).astype(np.float32) ** 9
    x += 0.05 * rng.standard_normal(x.shape).astype(np.float32)
    return Splits(train=x, valid=x[:64], test=x[:64], sample_rate=None, info={})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--shapes", nargs="+", default=["seed", "default"], choices=("seed", "default"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=STEPS, help=f"steps per fit (default {STEPS})")
    p.add_argument("--out", help="JSON path (default benchmarks/results/syncs[-cuda].json)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        _common.set_threads(1)
    info = _common.machine(args.device, 1 if args.device == "cpu" else None)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    original = TrainingRun.accumulate
    results, rows = {}, []
    configs = shape_configs()
    for name in args.shapes:
        cfg = dataclasses.replace(configs[name], iteration=args.steps, eval_every=args.steps,
                                  log_every=50)
        data = synthetic(cfg)

        def vqlog_fit():
            fit(cfg, data, device=args.device)

        def per_step_fit():
            TrainingRun.accumulate = per_step_accumulate(original)
            try:
                fit(cfg, data, device=args.device)
            finally:
                TrainingRun.accumulate = original

        vqlog_fit(), per_step_fit()  # warm-up
        times = _common.interleave({"vqlog": vqlog_fit, "per-step": per_step_fit}, args.rounds,
                                   sync)
        ratios = _common.round_ratios(times["per-step"], times["vqlog"])
        ratio = _common.median(ratios)
        lo, hi = _common.spread(ratios)
        results[name] = {"config": describe(cfg), "seconds": times, "ratios": ratios,
                         "ratio_median": ratio}
        ms = {k: 1000 * _common.median(v) / args.steps for k, v in times.items()}
        verdict = "" if args.device != "cpu" else ("met" if ratio >= 0.98 else "missed")
        rows.append([name, f"{ms['vqlog']:.1f}", f"{ms['per-step']:.1f}",
                     f"{ratio:.3f}x ({lo:.3f}-{hi:.3f})", verdict])
        print(f"{name}: {ms['vqlog']:.1f} vs {ms['per-step']:.1f} ms/step", flush=True)
    text = _common.render_table(
        ["shape", "vqlog ms/step", "per-step syncs ms/step", "per-step / vqlog (min-max)",
         "CPU target: vqlog not slower"], rows)
    print()
    print(text)
    path = _common.write_device_result("syncs", args.device, info, {
        "steps": args.steps, "rounds": args.rounds, "results": results, "table": text}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
