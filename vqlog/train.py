"""`fit(config, data)`: train one S4D-VQ-VAE. Knows nothing of Optuna or MLflow beyond its
callbacks: `on_eval` (every evaluation), `on_checkpoint` (the whole training state, every
`checkpoint_every` steps and when asked to stop) and `should_stop`.

The loop syncs the host with the device once per `log_every` steps: the train metrics are summed
on the device and fetched together at each logged point. On the CPU, where a sync costs nothing,
the loss is also checked every step, so a NaN never reaches the weights there; on a GPU the first
non-finite step is remembered on the device and reported at the next logged point.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vqlog import metrics
from vqlog.config import Config
from vqlog.data import Splits
from vqlog.errors import DivergedError, TrainingStopped, UserError
from vqlog.model.s4d import ssm_parameters
from vqlog.model.vqvae import VQVAE, VQVAEOutput
from vqlog.oscillation import early_oscillation_score, oscillation_score, rise_score

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
    resumed_at: int = 0  # the step a resumed fit continued from (0: from the start)
    sample_rate: float | None = None  # the data's rate (Splits.sample_rate), for the model file

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
            "loss_rise": rise_score(losses),
            "iterations_run": float(self.iterations_run),
            "train_seconds": self.seconds,
        }


def _nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def resolve_device(device: str) -> torch.device:
    """auto, cpu, cuda, or cuda:<index> (one GPU of several, as `--workers` places them)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not (index.isdigit() and index.isascii()))):
        raise UserError(f"--device must be auto, cpu or cuda, got '{device}'")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device(device)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with three groups: S4D's (log_dt, A) at lr <= 1e-3 without weight decay, other 1-D
    params (biases, norms) and the codebook without weight decay, the rest with it; fused where
    torch has a fused AdamW for the parameters' device."""
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
    params = decay + no_decay + ssm_params
    # One fused kernel over every parameter where torch has it (CPU, CUDA): the same AdamW update
    # up to float rounding, without a pass per parameter tensor and step.
    fused = bool(params) and all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda")
                                 for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=fused or None)


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
    sq_err = torch.zeros((), dtype=torch.float64, device=windows.device)  # read once, at the end
    counts = None
    for chunk in windows.split(EVAL_CHUNK):
        out = model(chunk)
        sq_err += F.mse_loss(out.recon, chunk, reduction="sum").double()
        if out.quant.indices is not None:
            c = metrics.code_histogram(out.quant.indices, model.codebook_size)
            counts = c if counts is None else counts + c
    model.train()
    return float(sq_err) / windows.numel(), counts


class Encoded(NamedTuple):
    """What a trained model makes of a set of windows."""

    tokens: np.ndarray  # (n_windows, T) int64 code indices
    mse: float  # reconstruction MSE over all the windows
    perplexity: float  # codebook perplexity of the tokens (exp of their usage entropy)
    usage: float  # fraction of the codebook the tokens use


@torch.no_grad()
def encode(model: VQVAE, windows, chunk: int = EVAL_CHUNK) -> Encoded:
    """The code indices of `windows` ((n, window) float array, standardized as the model's
    config says: `vqlog.data.all_windows`), with the reconstruction MSE and the perplexity."""
    if model.codebook_size == 0:
        raise UserError("the model has no quantizer (quantizer none): it makes no tokens")
    model.eval()
    device = next(model.parameters()).device
    x = torch.as_tensor(np.asarray(windows, dtype=np.float32))  # (n L)
    tokens, sq_err, counts = [], 0.0, None
    for part in x.split(chunk):
        part = part.to(device)
        out = model(part)
        sq_err += float(F.mse_loss(out.recon, part, reduction="sum"))
        tokens.append(out.quant.indices.cpu())  # (b T)
        c = metrics.code_histogram(out.quant.indices, model.codebook_size)
        counts = c if counts is None else counts + c
    return Encoded(torch.cat(tokens).numpy().astype(np.int64), sq_err / x.numel(),
                   metrics.perplexity(counts), metrics.usage(counts))


def train_step(model: VQVAE, opt: torch.optim.Optimizer, x: Tensor, grad_clip: float,
               step: int = 0, check: bool = True) -> tuple[VQVAEOutput, Tensor, Tensor]:
    """One optimizer step on the windows x (B, L): forward, backward, gradient clipping, AdamW.

    Returns the model output, the reconstruction MSE and the loss (MSE + quantizer loss). With
    `check`, a NaN/Inf loss raises DivergedError naming iteration `step` before the step could
    spread it into the weights (a host sync: `fit` checks on the CPU only). `fit` runs exactly
    this, and benchmarks/bench_step.py times it.
    """
    out = model(x)
    mse = F.mse_loss(out.recon, x)
    loss = mse + out.quant.loss
    if check and not torch.isfinite(loss):
        raise DivergedError(f"diverged: loss is {loss.item()} at iteration {step}", step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:  # clipping to norm 0 would zero every gradient: 0 means off
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return out, mse, loss


class TrainingRun:
    """The moving parts of one fit: model, optimizer, schedule, batch sampler, what was logged,
    and the device-side sums of the train metrics since the last logged point."""

    def __init__(self, cfg: Config, dev: torch.device):
        self.cfg, self.dev = cfg, dev
        self.model = VQVAE(cfg).to(dev)
        self.opt = build_optimizer(self.model, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg))
        # The batch sampler's generator is on the CPU whatever the device, so a checkpoint's
        # sampler state resumes on any device and a seed draws the same batches on all of them.
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.result = FitResult(config=cfg, model=self.model)
        self.pending: list[TrainPoint] = []  # logged since the last evaluation
        self.sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, mse, commit., ppl
        self.bad_step = torch.zeros((), dtype=torch.long, device=dev)  # first non-finite loss

    def state(self, step: int, seconds: float) -> dict:
        """Everything that decides the rest of the run, as a weights-only checkpoint holds it."""
        from vqlog.checkpoint import training_state

        return training_state(self, step, seconds)

    def restore(self, state: dict) -> int:
        """Continue from a `state()`; returns its step."""
        from vqlog.checkpoint import restore_training_state

        return restore_training_state(self, state)

    def accumulate(self, out: VQVAEOutput, mse: Tensor, loss: Tensor, step: int) -> None:
        """Add this step's metrics to the device-side sums: no host sync."""
        if out.quant.indices is not None:
            # index_add_, not bincount: CUDA's bincount reads the indices' min and max on the host
            # to size its output, two syncs a step. The clamp keeps a diverged step's indices
            # (FSQ's from NaN) in range; its loss is caught at log_point. Whole-number float64
            # sums are exact in any order, so the counts are deterministic.
            K = self.model.codebook_size
            idx = out.quant.indices.reshape(-1).clamp(0, K - 1)
            counts = torch.zeros(K, dtype=torch.float64, device=self.dev).index_add_(
                0, idx, torch.ones(idx.shape, dtype=torch.float64, device=self.dev))  # (K)
            ppl = metrics.perplexity_tensor(counts)
        else:
            ppl = torch.full((), math.nan, dtype=torch.float64, device=self.dev)
        parts = (loss.detach(), mse.detach(), out.quant.commitment.detach(), ppl)
        self.sums += torch.stack([p.to(torch.float64) for p in parts])
        finite = torch.isfinite(loss.detach())
        self.bad_step = torch.where((self.bad_step == 0) & ~finite, step, self.bad_step)

    def log_point(self, step: int) -> TrainPoint:
        """The train point ending at `step`: the one host sync of its `log_every` steps."""
        n = (step - 1) % self.cfg.log_every + 1
        *values, bad = torch.cat([self.sums / n, self.bad_step.double()[None]]).tolist()
        if bad:
            raise DivergedError(f"diverged: loss is {values[0]} at iteration {int(bad)}", int(bad))
        self.sums.zero_()
        point = TrainPoint(step, *values)
        self.pending.append(point)
        self.result.train_points.append(point)
        return point

    def evaluation(self, step: int, valid: Tensor) -> EvalRecord:
        bad = int(self.bad_step)  # a non-finite step since the last train point (one sync)
        if bad:
            raise DivergedError(f"diverged: the training loss is not finite at iteration {bad}", bad)
        val_mse, counts = evaluate(self.model, valid)
        if not math.isfinite(val_mse):
            raise DivergedError(f"diverged: validation MSE is {val_mse} at iteration {step}", step)
        record = EvalRecord(
            step=step,
            val_mse=val_mse,
            val_perplexity=metrics.perplexity(counts) if counts is not None else math.nan,
            val_usage=metrics.usage(counts) if counts is not None else math.nan,
            val_dead_codes=metrics.dead_codes(counts) if counts is not None else 0,
            train_points=tuple(self.pending),
        )
        self.pending = []
        self.result.evals.append(record)
        return record


def fit(
    cfg: Config,
    data: Splits,
    on_eval: Callable[[EvalRecord], bool | None] | None = None,
    device: str = "cpu",
    progress: Callable[[int, TrainPoint | None], None] | None = None,
    *,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_start: Callable[[], None] | None = None,
) -> FitResult:
    """Train `cfg` on `data.train`, evaluating on the whole `data.valid` every `eval_every` steps.

    `on_eval(record)` may return True to stop early (pruning). `progress(step, point)` is called
    after every step, with the train point at logged steps and None between them.
    `on_checkpoint(state)` gets the whole training state (a weights-only checkpoint, see
    `vqlog.checkpoint`) every `checkpoint_every` steps (0: never); `resume=state` continues from
    such a state as if the run had never stopped. When `should_stop()` turns true, the state is
    checkpointed at once and TrainingStopped is raised. Raises DivergedError on a NaN/Inf loss.
    `on_start()` is called as the first step begins, where `FitResult.seconds` starts counting.
    """
    dev = resolve_device(device)
    # The process's RNGs are forked (fit seeds its own, and a resume restores the run's) and put
    # back afterwards. Activations decaying through the S4D stacks reach denormal floats, which
    # made CPU steps much slower; flushing them to zero costs no accuracy, and the default
    # (off) is back once fit returns.
    devices = [dev.index or 0] if dev.type == "cuda" else []
    torch.set_flush_denormal(True)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            return _fit(cfg, data, dev, on_eval, progress, checkpoint_every, on_checkpoint,
                        resume, should_stop, on_start)
    finally:
        torch.set_flush_denormal(False)


def _fit(cfg, data, dev, on_eval, progress, checkpoint_every, on_checkpoint, resume,
         should_stop, on_start) -> FitResult:
    train = torch.as_tensor(data.train, device=dev)  # (N L), moved once
    valid = torch.as_tensor(data.valid, device=dev)  # (M L)
    if train.shape[1] != cfg.window:
        raise UserError(f"data windows have {train.shape[1]} samples but window is {cfg.window}")
    run = TrainingRun(cfg, dev)
    first, spent = 1, 0.0
    if resume is not None:
        first = run.restore(resume) + 1
        spent = float(resume["seconds"])
    result = run.result
    result.sample_rate = getattr(data, "sample_rate", None)
    check = dev.type == "cpu"  # a per-step finiteness check is free on the CPU only
    if on_start is not None:
        on_start()
    start = time.perf_counter()

    def seconds() -> float:
        return spent + time.perf_counter() - start

    for step in range(first, cfg.iteration + 1):
        idx = torch.randint(len(train), (cfg.batch,), generator=run.gen, device="cpu")  # (B)
        if dev.type != "cpu":  # pinned, so the copy is queued without waiting for the device
            idx = idx.pin_memory().to(dev, non_blocking=True)
        out, mse, loss = train_step(run.model, run.opt, train[idx], cfg.grad_clip, step, check)
        run.sched.step()
        run.accumulate(out, mse, loss, step)
        result.iterations_run = step
        point = None
        if step % cfg.log_every == 0 or step == cfg.iteration:
            point = run.log_point(step)
        if progress is not None:
            progress(step, point)
        if step % cfg.eval_every == 0 or step == cfg.iteration:
            record = run.evaluation(step, valid)
            if on_eval is not None and on_eval(record):
                result.stopped_early = True
                break
        stop = should_stop is not None and should_stop()
        if on_checkpoint is not None and step < cfg.iteration and (
                stop or (checkpoint_every and step % checkpoint_every == 0)):
            on_checkpoint(run.state(step, seconds()))
        if stop and step < cfg.iteration:
            raise TrainingStopped(step)

    result.seconds = seconds()
    return result
