"""Trained weights on disk: `vqlog train --save model.pt` writes them, `load` reads them back.

A checkpoint is a plain dict of tensors and built-in values ({"config": the log's keys,
"state_dict": the model's weights}), so it loads with `torch.load(weights_only=True)`: a file
from elsewhere cannot run code on this machine when it is opened.

    from vqlog.checkpoint import load
    cfg, model = load("model.pt")          # model in eval mode, on the CPU
    out = model(windows)                   # windows: (B, window) float32; out.recon, out.quant
"""

from __future__ import annotations

import os
from pathlib import Path

from vqlog.config import Config
from vqlog.errors import UserError, one_line
from vqlog.files import atomic_write


def save(path: str | os.PathLike, cfg: Config, model) -> None:
    """Write atomically: a temp file beside `path`, then a rename (never a half-written file)."""
    import torch

    state = {"config": cfg.to_params(), "state_dict": model.state_dict()}
    atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | os.PathLike, device: str = "cpu"):
    """(Config, VQVAE in eval mode) from a checkpoint `save` wrote. UserError names the file when
    it is missing, not a vqlog checkpoint, or holds objects a weights-only load refuses."""
    import pickle

    import torch

    from vqlog.model.vqvae import VQVAE

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = one_line(exc, 160)
        raise UserError(
            f"{path} is not a vqlog checkpoint that loads safely (weights only): {first}"
        ) from None
    if not isinstance(ckpt, dict) or set(ckpt) != {"config", "state_dict"}:
        raise UserError(f"{path} is not a vqlog checkpoint (expected keys config and state_dict)")
    cfg = Config.from_mapping(ckpt["config"])
    model = VQVAE(cfg).to(device)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"{path}: weights do not fit its config: {str(exc).splitlines()[0]}") from None
    return cfg, model.eval()
