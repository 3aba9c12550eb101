"""Weights and training states on disk, all loaded with `torch.load(weights_only=True)`: plain dicts
of tensors and built-in values, so a file from elsewhere cannot run code when it is opened.

A model file ({"config": the log's keys, "state_dict": the weights, "sample_rate": the rate its
windows were cut at, where one rate was common to its data}) is what `vqlog train --save`,
`vqlog export` and every COMPLETE trial's `model/model.pt` artifact hold:

    from vqlog.checkpoint import load
    cfg, model = load("model.pt")          # model in eval mode, on the CPU
    out = model(windows)                   # windows: (B, window) float32; out.recon, out.quant
    tokens = out.quant.indices             # (B, T) code indices
    model.sample_rate                      # Hz, or None (recordings at several native rates)

A training state (`training_state`) holds everything that decides the rest of a run: the model,
the optimizer, the schedule, the quantizer's buffers (EMA statistics, the k-means flag), every
RNG (torch's, CUDA's, the batch sampler's), the step, and the curves so far. A running trial
keeps its latest one as an MLflow artifact; a retry continues from it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import IO

from vqlog.config import Config
from vqlog.errors import UserError, one_line
from vqlog.files import atomic_write

STATE_FORMAT = "vqlog.training-state/1"
MODEL_KEYS = {"config", "state_dict", "sample_rate"}  # a model file's; sample_rate is optional


def save(path: str | os.PathLike, cfg: Config, model, sample_rate: float | None = None) -> None:
    """A model file, written atomically (a temp file beside `path`, then a rename). The weights
    are stored as CPU tensors, so a plain `torch.load` of a GPU-trained model works on a host
    without a GPU too. `sample_rate`: the rate of the windows it was trained on (None: unknown,
    or several native rates)."""
    import torch

    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = {"config": cfg.to_params(), "state_dict": weights}
    if sample_rate is not None:
        state["sample_rate"] = float(sample_rate)
    atomic_write(path, lambda f: torch.save(state, f))


def _torch_load(path: Path, device: str, what: str, name: str | None = None):
    import pickle
    import zipfile

    import torch

    local = name is None  # else a download, named as the user knows it (a registered model)
    name = name or str(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {name}")
    try:
        path.open("rb").close()  # is_zipfile says False, not why, where the file cannot be read
    except OSError as exc:
        raise UserError(f"{name} cannot be read: {exc.strerror or exc}") from None
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; vqlog writes no other kind
        with open(path, "rb") as f:
            kind = "a NumPy array" if f.read(6) == b"\x93NUMPY" else "not a file torch.save wrote"
        hint = ("; give the file of vqlog train --save or vqlog export"
                if what == "checkpoint" and local else "")
        raise UserError(f"{name} is not a vqlog {what} ({kind}){hint}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        why = "it holds objects a weights-only load refuses" if "eights only" in str(exc) \
            else one_line(exc, 120)
        raise UserError(f"{name} is not a vqlog {what} that loads safely ({why})") from None


def load(path: str | os.PathLike, device: str = "cpu", name: str | None = None):
    """(Config, VQVAE in eval mode) from a model file. UserError names the file when it is
    missing, not a vqlog model, or holds objects a weights-only load refuses. A model trained
    at its data's own rate (resample_hz null) that records the rate gets it as resample_hz.
    `name` is how messages name the file (a registered model's URI for its downloaded weights)."""
    from vqlog.model.vqvae import VQVAE

    path = Path(path)
    ckpt = _torch_load(path, device, "checkpoint", name)
    shown = name or path
    if not isinstance(ckpt, dict) or not {"config", "state_dict"} <= set(ckpt) <= MODEL_KEYS:
        raise UserError(f"{shown} is not a vqlog checkpoint (expected keys config and state_dict)")
    rate = ckpt.get("sample_rate")
    if rate is not None and not (isinstance(rate, float) and rate > 0 and rate != float("inf")):
        raise UserError(f"{shown} is not a vqlog checkpoint (its sample_rate is {rate!r})")
    for key in ("config", "state_dict"):
        if not isinstance(ckpt[key], dict):
            raise UserError(f"{shown} is not a vqlog checkpoint (its {key} is a "
                            f"{type(ckpt[key]).__name__}, not a mapping)")
    try:
        cfg = Config.from_mapping(ckpt["config"])
    except UserError as exc:
        raise UserError(f"{shown} is not a vqlog checkpoint: {exc}") from None
    model = VQVAE(cfg).to(device)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        # torch's first line only says "Error(s) in loading state_dict"; the next names the key
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc)]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise UserError(f"{shown}: weights do not fit its config: {one_line(lines[0], 300)}{more}") from None
    model.sample_rate = rate  # a plain attribute: not in the state dict, not a buffer
    if cfg.resample_hz is None and rate is not None:
        # Trained at its data's native rate: the config cuts other data at that rate, so that a
        # window spans the time the model learned on (`all_windows`, `vqlog encode`).
        cfg = dataclasses.replace(cfg, resample_hz=rate)
    return cfg, model.eval()


# ---------------------------------------------------------------------------- training states


def training_state(run, step: int, seconds: float) -> dict:
    """The state of `train.TrainingRun` `run` after `step` steps and `seconds` of training."""
    import torch

    cuda = run.dev.type == "cuda"
    result = run.result
    return {
        "format": STATE_FORMAT,
        "config": run.cfg.to_params(),
        "step": step,
        "seconds": seconds,
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        # The training device's own generator only: a retry may run on another GPU index, or
        # on a host with fewer GPUs.
        "rng": {"torch": torch.get_rng_state(), "sampler": run.gen.get_state(),
                "cuda": torch.cuda.get_rng_state(run.dev) if cuda else None},
        "sums": run.sums.cpu(),
        "bad_step": int(run.bad_step),
        "evals": [_eval_dict(e) for e in result.evals],
        "train_points": [_point_list(p) for p in result.train_points],
        "pending": [_point_list(p) for p in run.pending],
    }


def restore_training_state(run, state: dict) -> int:
    """Put `state` into a freshly built `train.TrainingRun` of the same config; returns its step."""
    import torch

    if state.get("format") != STATE_FORMAT:
        raise UserError(f"not a vqlog training state (format {state.get('format')!r})")
    if Config.from_mapping(state["config"]) != run.cfg:
        raise UserError("the training state was saved for another configuration")
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"].cpu())
    sampler = rng["sampler"].cpu()
    if sampler.numel() == run.gen.get_state().numel():
        run.gen.set_state(sampler)
    else:  # a CUDA generator's state, from a version that sampled on the device: a fixed reseed
        run.gen.manual_seed(run.cfg.seed + state["step"])
    cuda = rng.get("cuda")
    if isinstance(cuda, list):  # one state per visible GPU, from an earlier version
        index = (run.dev.index or 0) if run.dev.type == "cuda" else None
        cuda = cuda[index] if index is not None and index < len(cuda) else None
    if run.dev.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda.cpu(), run.dev)
    run.sums.copy_(state["sums"])
    run.bad_step.fill_(state["bad_step"])
    result = run.result
    result.train_points = [_point(p) for p in state["train_points"]]
    result.evals = history(state)
    run.pending = [_point(p) for p in state["pending"]]
    result.iterations_run = result.resumed_at = state["step"]
    return state["step"]


def history(state: dict) -> list:
    """The evaluations of a training state (`train.EvalRecord`s, with their train points)."""
    from vqlog.train import EvalRecord

    return [EvalRecord(**{**e, "train_points": tuple(map(_point, e["train_points"]))})
            for e in state["evals"]]


def write_state(file: str | os.PathLike | IO[bytes], state: dict) -> None:
    """A training state to a path (atomically) or an open binary file."""
    import torch

    if isinstance(file, (str, os.PathLike)):
        atomic_write(file, lambda f: torch.save(state, f))
    else:
        torch.save(state, file)


def read_state(path: str | os.PathLike, device: str = "cpu") -> dict:
    """A training state `write_state` wrote; UserError if the file is anything else."""
    path = Path(path)
    state = _torch_load(path, device, "training state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path} is not a vqlog training state")
    return state


def _point(values: list):
    from vqlog.train import TrainPoint

    return TrainPoint(*values)


def _point_list(p) -> list:
    return [p.step, p.loss, p.mse, p.commitment, p.perplexity]


def _eval_dict(e) -> dict:
    return {"step": e.step, "val_mse": e.val_mse, "val_perplexity": e.val_perplexity,
            "val_usage": e.val_usage, "val_dead_codes": e.val_dead_codes,
            "train_points": [_point_list(p) for p in e.train_points]}

