"""What a trial's checkpoint costs at the `gpu` spec's largest model shape, measured on the CPU.

    python benchmarks/bench_checkpoint.py [--rounds 5] [--threads 1]

The model is gpu.yaml's fixed values with its largest searched choices (embedding_dim 512,
embedding_num 1024, MLP relu, BN on, batch 64): d_model 128, d_state 64, 4+4 S4D layers, windows
of 512 samples. A few training steps fill AdamW's moments, then each round times, interleaved:
- `step`: one training step (what a checkpoint is amortised over);
- `save`: one checkpoint as a worker makes it: the whole training state (`fit`'s `on_checkpoint`
  payload), written weights-only to a file and logged as the run's `checkpoint/latest.pt` to an
  MLflow store on SQLite (the embedded default).
Reported: the file's size, seconds per save, and a save's share of the `checkpoint_every` steps
between two saves (the spec's eval_every, 250) as the overhead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import _common


def build(threads: int):
    import torch

    from vqlog.config import Config
    from vqlog.study.spec import load_sweep
    from vqlog.train import TrainingRun

    _common.set_threads(threads)
    spec = load_sweep("gpu")
    cfg = Config.from_mapping({"embedding_dim": 512, "embedding_num": 1024, "MLP": "relu",
                               "BN": True, "batch": 64}, base=spec.base_config())
    cfg = dataclasses.replace(cfg, quantizer="vq")
    torch.manual_seed(0)
    run = TrainingRun(cfg, torch.device("cpu"))
    x = torch.randn(cfg.batch, cfg.window)  # (B L)
    return spec, cfg, run, x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="JSON path (default benchmarks/results/checkpoint.json)")
    args = p.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from vqlog.tracking.artifacts import upload_checkpoint
    from vqlog.tracking.client import RetryingClient
    from vqlog.train import train_step

    spec, cfg, run, x = build(args.threads)
    for _ in range(3):  # AdamW's moments exist after the first step
        train_step(run.model, run.opt, x, cfg.grad_clip)
    with tempfile.TemporaryDirectory(prefix="vqlog-bench-ckpt-") as folder:
        client = RetryingClient(MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db"), "bench")
        exp = client.create_experiment("bench", artifact_location=Path(folder, "art").as_uri())
        run_id = client.create_run(exp).info.run_id

        def save():
            assert upload_checkpoint(client, run_id, run.state(3, 0.0))

        def step():
            train_step(run.model, run.opt, x, cfg.grad_clip)

        save()  # warm: the store's first artifact creates its folders
        times = _common.interleave({"step": step, "save": save}, args.rounds)
        size = {"bytes": Path(client.download_artifacts(run_id, "checkpoint/latest.pt",
                                                         folder)).stat().st_size}
    step_s, save_s = _common.median(times["step"]), _common.median(times["save"])
    every = spec.checkpoint_every
    overhead = save_s / (every * step_s)
    params = sum(p.numel() for p in run.model.parameters())
    rows = [["model parameters", f"{params / 1e6:.2f} M"],
            ["checkpoint file", f"{size['bytes'] / 2**20:.1f} MiB"],
            ["seconds per save (state + file + MLflow artifact)", f"{save_s:.2f} s"],
            ["seconds per training step (B 64)", f"{step_s:.2f} s"],
            [f"save / {every} steps (checkpoint_every)", f"{100 * overhead:.2f} %"]]
    table = _common.render_table(["what", "measured"], rows)
    print(table)
    info = _common.machine("cpu", args.threads)
    path = _common.write_json("checkpoint", {
        "benchmark": "bench_checkpoint", "command": " ".join(["python", *sys.argv]),
        "shape": {"d_model": cfg.d_model, "d_state": cfg.d_state, "n_layers": cfg.n_layers,
                  "window": cfg.window, "embedding_dim": cfg.embedding_dim,
                  "embedding_num": cfg.embedding_num, "batch": cfg.batch},
        "machine": info, "rounds": args.rounds, "times_s": times, "bytes": size["bytes"],
        "parameters": params, "save_s": save_s, "step_s": step_s,
        "overhead_at_checkpoint_every": overhead, "table": table}, args.out)
    print(f"\nwritten: {path}  (load average {info['load_average_1_5_15']})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    raise SystemExit(main())
