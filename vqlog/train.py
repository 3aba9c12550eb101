"""`fit(config, data)`: train one S4D-VQ-VAE. Knows nothing of Optuna or MLflow beyond `on_eval`."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vqlog import metrics
from vqlog.config import Config
from vqlog.data import Splits
from vqlog.errors import DivergedError, UserError
from vqlog.model.s4d import ssm_parameters
from vqlog.model.vqvae import VQVAE, VQVAEOutput
from vqlog.oscillation import early_oscillation_score, oscillation_score

SSM_MAX_LR = 1e-3  # S4D's A and dt are unstable above this (Gu et al. 2022, sec. 4)
EVAL_CHUNK = 512  # windows per forward pass during evaluation


@dataclass(frozen=True)
class TrainPoint:
    """Train metrics averaged over the `log_every` steps ending at `step`."""

    step: int
    loss: float
    mse: float
    commitment: float
    perplexity: float  # per-batch code perplexity (biased low; see metrics.perplexity)


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation on the whole valid split, with the train points logged since the last one."""

    step: int
    val_mse: float
    val_perplexity: float
    val_usage: float
    val_dead_codes: int
    train_points: tuple[TrainPoint, ...]


@dataclass
class FitResult:
    config: Config
    evals: list[EvalRecord] = field(default_factory=list)
    train_points: list[TrainPoint] = field(default_factory=list)
    iterations_run: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    model: torch.nn.Module | None = None

    @property
    def best_val_mse(self) -> float:
        return min((e.val_mse for e in self.evals), default=math.nan)

    @property
    def final_val_mse(self) -> float:
        return self.evals[-1].val_mse if self.evals else math.nan

    def summary(self) -> dict[str, float]:
        """The summary metrics of the MLflow contract."""
        best_ppl = max(self.evals, key=lambda e: _nan_low(e.val_perplexity), default=None)
        if best_ppl is not None and math.isnan(best_ppl.val_perplexity):
            best_ppl = None  # no codes (quantizer none): no peak, and no step of one
        losses = [p.loss for p in self.train_points]
        return {
            "best_val_mse": self.best_val_mse,
            "final_val_mse": self.final_val_mse,
            "max_val_perplexity": best_ppl.val_perplexity if best_ppl else math.nan,
            "max_val_perplexity_step": float(best_ppl.step) if best_ppl else math.nan,
            "final_val_perplexity": self.evals[-1].val_perplexity if self.evals else math.nan,
            "final_val_usage": self.evals[-1].val_usage if self.evals else math.nan,
            "loss_oscillation": oscillation_score(losses),
            "early_loss_oscillation": early_oscillation_score(losses),
            "iterations_run": float(self.iterations_run),
            "train_seconds": self.seconds,
        }


def _nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got '{device}'")
    return torch.device(device)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with three groups: S4D's (log_dt, A) at lr <= 1e-3 without weight decay, other 1-D
    params (biases, norms) and the codebook without weight decay, the rest with it."""
    ssm = {id(p) for p in ssm_parameters(model)}
    decay, no_decay, ssm_params = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in ssm:
            ssm_params.append(p)
        elif p.ndim < 2 or "codebook" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": ssm_params, "weight_decay": 0.0, "lr": min(cfg.lr, SSM_MAX_LR)},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `iteration`."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.iteration - cfg.warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(model: VQVAE, windows: Tensor) -> tuple[float, Tensor | None]:
    """Reconstruction MSE over all of `windows` (N, L) and the code histogram (K,) or None."""
    model.eval()
    sq_err, counts = 0.0, None
    for chunk in windows.split(EVAL_CHUNK):
        out = model(chunk)
        sq_err += float(F.mse_loss(out.recon, chunk, reduction="sum"))
        if out.quant.indices is not None:
            c = metrics.code_histogram(out.quant.indices, model.codebook_size)
            counts = c if counts is None else counts + c
    model.train()
    return sq_err / windows.numel(), counts


def train_step(
    model: VQVAE, opt: torch.optim.Optimizer, x: Tensor, grad_clip: float, step: int = 0
) -> tuple[VQVAEOutput, Tensor, Tensor]:
    """One optimizer step on the windows x (B, L): forward, backward, gradient clipping, AdamW.

    Returns the model output, the reconstruction MSE and the loss (MSE + quantizer loss). Raises
    DivergedError naming iteration `step` on a NaN/Inf loss, before the step could spread it into
    the weights. `fit` runs exactly this, and benchmarks/bench_step.py times it.
    """
    out = model(x)
    mse = F.mse_loss(out.recon, x)
    loss = mse + out.quant.loss
    if not torch.isfinite(loss):
        raise DivergedError(f"diverged: loss is {loss.item()} at iteration {step}", step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:  # clipping to norm 0 would zero every gradient: 0 means off
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return out, mse, loss


def fit(
    cfg: Config,
    data: Splits,
    on_eval: Callable[[EvalRecord], bool | None] | None = None,
    device: str = "cpu",
    progress: Callable[[int, dict], None] | None = None,
) -> FitResult:
    """Train `cfg` on `data.train`, evaluating on the whole `data.valid` every `eval_every` steps.

    `on_eval(record)` may return True to stop early (pruning); `progress(step, stats)` is called
    after every step for a progress bar. Raises DivergedError on a NaN/Inf loss.
    """
    dev = resolve_device(device)
    # Activations decaying through the S4D stacks reach denormal floats, which made CPU steps
    # up to 6x slower (measured with quantizer none); flushing them to zero costs no accuracy.
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    train = torch.as_tensor(data.train, device=dev)  # (N L), moved once
    valid = torch.as_tensor(data.valid, device=dev)  # (M L)
    if train.shape[1] != cfg.window:
        raise UserError(f"data windows have {train.shape[1]} samples but window is {cfg.window}")
    model = VQVAE(cfg).to(dev)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    result = FitResult(config=cfg, model=model)
    pending: list[TrainPoint] = []
    acc = np.zeros(4)  # running sums of loss, mse, commitment, batch perplexity
    start = time.perf_counter()

    for step in range(1, cfg.iteration + 1):
        idx = torch.randint(len(train), (cfg.batch,), generator=gen).to(dev)
        x = train[idx]  # (B L)
        out, mse, loss = train_step(model, opt, x, cfg.grad_clip, step)
        sched.step()

        acc_loss = loss.item()
        batch_ppl = math.nan
        if out.quant.indices is not None:
            batch_ppl = metrics.perplexity(
                metrics.code_histogram(out.quant.indices, model.codebook_size)
            )
        acc += (loss.item(), mse.item(), out.quant.commitment.item(), batch_ppl)
        result.iterations_run = step
        if step % cfg.log_every == 0 or step == cfg.iteration:
            n = (step - 1) % cfg.log_every + 1
            point = TrainPoint(step, *(acc / n).tolist())
            pending.append(point)
            result.train_points.append(point)
            acc[:] = 0
        if progress is not None:
            progress(step, {"loss": acc_loss})

        if step % cfg.eval_every == 0 or step == cfg.iteration:
            val_mse, counts = evaluate(model, valid)
            if not math.isfinite(val_mse):
                raise DivergedError(f"diverged: validation MSE is {val_mse} at iteration {step}", step)
            record = EvalRecord(
                step=step,
                val_mse=val_mse,
                val_perplexity=metrics.perplexity(counts) if counts is not None else math.nan,
                val_usage=metrics.usage(counts) if counts is not None else math.nan,
                val_dead_codes=metrics.dead_codes(counts) if counts is not None else 0,
                train_points=tuple(pending),
            )
            pending = []
            result.evals.append(record)
            if on_eval is not None and on_eval(record):
                result.stopped_early = True
                break

    result.seconds = time.perf_counter() - start
    return result
