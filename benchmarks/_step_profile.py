"""Helper of bench_step.py: where a training step's time goes, and prototypes of faster vqlog steps.

- `module_profile`: times every top-level part of the VQVAE (each S4D block, the code-rate head, the
  quantizer, ...) forward and backward inside a real `train_step`, plus the loss, the clipping and
  the AdamW step. Forward: module hooks. Backward: an identity autograd node on each part's input
  and output records when its gradient passes; on one CPU thread the engine runs the chain in
  order, so the gap between a part's output node and its input node is that part's backward.
- `op_profile`: torch.profiler's top operators (self CPU time) over a few steps.
- The prototypes: changes to vqlog's own step that keep its math (same outputs up to float
  rounding), applied to a copy of the model by swapping module classes in place, as
  `vqlog.model.reference.use_reference` does; nothing under vqlog/ is edited. `prototype_table`
  times each against vqlog's step, interleaved round by round.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from vqlog.config import Config
from _assembly import optimizer_for
from vqlog.model.s4d import S4D, S4DBlock, _FFTConv
from vqlog.train import train_step

# --------------------------------------------------------------------------- module profile


def _clock() -> float:
    """perf_counter after the GPU's queued work is done (when CUDA is in use): without it a
    stamp times the kernels' launch, and the work spills into the next stamp's interval."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


class _Mark(torch.autograd.Function):
    """Identity; its backward appends (label, time) to a log."""

    @staticmethod
    def forward(ctx, x, log, label):
        ctx.log, ctx.label = log, label
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.log.append((ctx.label, _clock()))
        return g, None, None


def model_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    e, d = model.encoder, model.decoder
    return ([("enc.in_proj", e.in_proj)]
            + [(f"enc.s4d_block{i}", b) for i, b in enumerate(e.blocks)]
            + [("enc.down", e.down), ("enc.head (BN+MLP H->D)", e.head),
               ("quantizer", model.quantizer), ("dec.pre (MLP D->H)", d.pre), ("dec.up", d.up)]
            + [(f"dec.s4d_block{i}", b) for i, b in enumerate(d.blocks)]
            + [("dec.post (BN+MLP, full rate)", d.post), ("dec.out_proj", d.out_proj)])


# The breakdown's categories: label prefix -> category.
CATEGORIES = [
    ("encoder S4D blocks (+ in_proj 1->H)", ("enc.in_proj", "enc.s4d_block")),
    ("code-rate head: down conv + BN+MLP H->D", ("enc.down", "enc.head")),
    ("quantizer", ("quantizer",)),
    ("decoder MLP D->H (+ up conv)", ("dec.pre", "dec.up")),
    ("decoder S4D blocks", ("dec.s4d_block",)),
    ("full-rate post block BN+MLP (+ out_proj H->1)", ("dec.post", "dec.out_proj")),
    ("MSE loss, zero_grad, autograd glue", ("loss/glue",)),
    ("clip_grad_norm_", ("clip_grad_norm_",)),
    ("AdamW step", ("AdamW.step",)),
]


class _Timer:
    def __init__(self, model: nn.Module):
        self.parts = model_parts(model)
        self.fwd: list[tuple[str, str, float]] = []
        self.bwd: list[tuple[tuple[str, str], float]] = []
        self.handles = []
        for label, mod in self.parts:
            self.handles.append(mod.register_forward_pre_hook(self._pre(label)))
            self.handles.append(mod.register_forward_hook(self._post(label)))

    def remove(self):
        for h in self.handles:
            h.remove()

    def _pre(self, label):
        def hook(mod, args):
            self.fwd.append((label, "start", _clock()))
            if args[0].requires_grad:
                return (_Mark.apply(args[0], self.bwd, ("end", label)),) + tuple(args[1:])
            return None
        return hook

    def _post(self, label):
        def hook(mod, args, out):
            self.fwd.append((label, "end", _clock()))
            if isinstance(out, Tensor):
                return _Mark.apply(out, self.bwd, ("start", label))
            return out._replace(z_q=_Mark.apply(out.z_q, self.bwd, ("start", label)))
        return hook

    def step(self, model, opt, x, grad_clip) -> dict[str, tuple[float, float]]:
        """`vqlog.train.train_step`'s body with time stamps: label -> (forward s, backward s)."""
        self.fwd.clear()
        self.bwd.clear()
        t0 = _clock()
        out = model(x)
        t1 = _clock()
        mse = F.mse_loss(out.recon, x)
        loss = mse + out.quant.loss
        if not torch.isfinite(loss):
            raise RuntimeError("non-finite loss while profiling")
        opt.zero_grad(set_to_none=True)
        t2 = _clock()
        loss.backward()
        t3 = _clock()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        t4 = _clock()
        opt.step()
        t5 = _clock()
        fwd, starts = {}, {}
        for label, kind, t in self.fwd:
            if kind == "start":
                starts[label] = t
            else:
                fwd[label] = fwd.get(label, 0.0) + t - starts.pop(label)
        bwd, bstart = {}, {}
        for (kind, label), t in self.bwd:
            if kind == "start":
                bstart[label] = t
            else:
                bwd[label] = bwd.get(label, 0.0) + t - bstart.pop(label)
        for label, t in bstart.items():  # enc.in_proj: its input needs no grad, ends with backward
            bwd[label] = bwd.get(label, 0.0) + t3 - t
        first = self.bwd[0][1] if self.bwd else t3
        row = {label: (fwd.get(label, 0.0), bwd.get(label, 0.0)) for label, _ in self.parts}
        row["loss/glue"] = ((t1 - t0) - sum(fwd.values()) + (t2 - t1), first - t2)
        row["clip_grad_norm_"] = (t4 - t3, 0.0)
        row["AdamW.step"] = (t5 - t4, 0.0)
        row["total"] = (t5 - t0, 0.0)
        return row


def module_profile(models: dict[str, nn.Module], cfg: Config, x: Tensor, rounds: int) -> dict:
    """Per-part forward/backward medians (ms) of each model's train_step, interleaved by round."""
    state = {n: (m, optimizer_for(m, cfg), _Timer(m)) for n, m in models.items()}
    rows: dict[str, list[dict]] = {n: [] for n in models}
    try:
        for r in range(rounds + 1):  # round 0 warms up
            for n, (m, opt, timer) in state.items():
                row = timer.step(m, opt, x, cfg.grad_clip)
                if r:
                    rows[n].append(row)
    finally:
        for _, _, timer in state.values():
            timer.remove()
    result = {}
    for n, rs in rows.items():
        parts = {k: {"fwd_ms": 1e3 * statistics.median(r[k][0] for r in rs),
                     "bwd_ms": 1e3 * statistics.median(r[k][1] for r in rs)} for k in rs[0]}
        total = parts.pop("total")["fwd_ms"]
        cats = {}
        for cat, prefixes in CATEGORIES:
            ms = sum(v["fwd_ms"] + v["bwd_ms"] for k, v in parts.items() if k.startswith(prefixes))
            cats[cat] = {"ms": ms, "share": ms / total}
        result[n] = {"step_ms_median": total, "parts": parts, "categories": cats}
    return result


def module_table(prof: dict) -> str:
    from _common import render_table

    names = list(prof)
    rows = []
    for cat, _ in CATEGORIES:
        rows.append([cat] + [f"{prof[n]['categories'][cat]['ms']:.1f} ({100 * prof[n]['categories'][cat]['share']:.0f} %)"
                             for n in names])
    rows.append(["whole step (with the probes)"] + [f"{prof[n]['step_ms_median']:.1f}" for n in names])
    detail = []
    for part in prof[names[0]]["parts"]:
        detail.append([part] + [f"{prof[n]['parts'][part]['fwd_ms']:.2f} / {prof[n]['parts'][part]['bwd_ms']:.2f}"
                                for n in names])
    return (render_table(["part of the step", *[f"{n} ms (share)" for n in names]], rows) + "\n\n"
            + render_table(["module", *[f"{n} fwd / bwd ms" for n in names]], detail))


def op_profile(model: nn.Module, cfg: Config, x: Tensor, steps: int = 3, top: int = 15) -> list[dict]:
    """torch.profiler's top operators by self time (CPU time, or on a GPU its kernels' time),
    per step."""
    from torch.profiler import ProfilerActivity, profile

    opt = optimizer_for(model, cfg)
    for _ in range(2):
        train_step(model, opt, x, cfg.grad_clip)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            train_step(model, opt, x, cfg.grad_clip)
    events = prof.key_averages(group_by_input_shape=True)

    def own(e) -> float:  # on a GPU, the kernels' time; the CPU's is mostly their launch
        if not x.is_cuda:
            return e.self_cpu_time_total
        device = getattr(e, "self_device_time_total", None)
        return device if device is not None else e.self_cuda_time_total  # torch < 2.4

    total = sum(own(e) for e in events)
    out = []
    for e in sorted(events, key=lambda e: -own(e))[:top]:
        out.append({"op": e.key, "self_ms_per_step": own(e) / steps / 1e3,
                    "share": own(e) / total, "calls_per_step": e.count // steps,
                    "input_shapes": str(e.input_shapes)[:100]})
    return out


# --------------------------------------------------------------------------- prototypes


class FFTConvVecdot(_FFTConv):
    """`vqlog.model.s4d._FFTConv` with grad_k by torch.linalg.vecdot (which conjugates its first
    argument) over the batch instead of the in-place conj and product."""

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        u_f, k_f = ctx.saved_tensors
        L = grad_y.shape[-1]
        g_f = torch.fft.rfft(grad_y, n=2 * L)  # (B H L+1)
        grad_u = torch.fft.irfft(g_f * k_f.conj_physical(), n=2 * L)[..., :L]
        g_u = torch.linalg.vecdot(u_f, g_f, dim=0)  # Σ_b conj(U)·G, (H L+1)
        return grad_u, torch.fft.irfft(g_u, n=2 * L)[..., :L]


class S4DVecdotFFT(S4D):
    """vqlog's S4D.forward with FFTConvVecdot."""

    def forward(self, u: Tensor) -> Tensor:
        L = u.shape[-1]
        k = self.kernel(L) + F.pad(self.D[:, None], (0, L - 1))  # (H L)
        y = FFTConvVecdot.apply(u, k).transpose(1, 2).contiguous()  # (B L H)
        y = self.dropout(F.gelu(y))
        o = F.linear(y, self.output.weight[:, :, 0], self.output.bias)  # (B L 2H)
        return F.glu(o, dim=-1).transpose(1, 2)


aten = torch.ops.aten


class _FusedBlock(torch.autograd.Function):
    """A whole channel-last S4D block (LayerNorm, FFT convolution, GELU, projection, GLU and the
    residual add) as one autograd node with a hand-written backward: the GLU and the residual
    add are one addcmul, and the backward adds the residual gradient in place."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps, k, W, b):
        B, L, H = x.shape
        n, mu, rstd = torch.native_layer_norm(x, (H,), gamma, beta, eps)  # (B L H)
        u_f = torch.fft.rfft(n.transpose(1, 2), n=2 * L)  # (B H L+1)
        k_f = torch.fft.rfft(k, n=2 * L)  # (H L+1)
        y = torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L].transpose(1, 2).contiguous()  # (B L H)
        a = F.gelu(y)
        o = torch.addmm(b, a.view(-1, H), W.t())  # (BL 2H)
        out = torch.addcmul(x.view(-1, H), o[:, :H], torch.sigmoid(o[:, H:])).view(B, L, H)
        ctx.save_for_backward(x, mu, rstd, gamma, beta, u_f, k_f, y, a, o, W)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, mu, rstd, gamma, beta, u_f, k_f, y, a, o, W = ctx.saved_tensors
        B, L, H = x.shape
        do = aten.glu_backward(g.reshape(-1, H), o, -1)  # (BL 2H)
        dW, db = do.t() @ a.view(-1, H), do.sum(0)
        dy = aten.gelu_backward(do @ W, y.view(-1, H))  # (BL H)
        g_f = torch.fft.rfft(dy.view(B, L, H).transpose(1, 2), n=2 * L)  # (B H L+1)
        du = torch.fft.irfft(g_f * k_f.conj(), n=2 * L)[..., :L]  # (B H L)
        torch.view_as_real(g_f)[..., 1].neg_()
        dk = torch.fft.irfft(g_f.mul_(u_f).sum(0).conj(), n=2 * L)[..., :L]  # (H L)
        dx, dgamma, dbeta = aten.native_layer_norm_backward(
            du.transpose(1, 2), x, (H,), mu, rstd, gamma, beta, [True, True, True])
        return dx.add_(g), dgamma, dbeta, None, dk, dW, db


class FusedS4DBlock(S4DBlock):
    """A channel-last S4DBlock computed by _FusedBlock (no dropout: the seed spec has none)."""

    def forward(self, x: Tensor) -> Tensor:
        s = self.s4d
        L = x.shape[1]
        k = s.kernel(L) + F.pad(s.D[:, None], (0, L - 1))  # (H L)
        return _FusedBlock.apply(x, self.norm.weight, self.norm.bias, self.norm.eps, k,
                                 s.output.weight[:, :, 0], s.output.bias)


def swap(model: nn.Module, s4d: type | None = None, block: type | None = None) -> nn.Module:
    for m in model.modules():
        if s4d is not None and type(m) is S4D:
            m.__class__ = s4d
        elif block is not None and type(m) is S4DBlock and m.channel_last:
            m.__class__ = block
    return model


# name -> (what it changes, model transform). vqlog's channel-last stacks, fused AdamW, in-place
# FFT backward, GEMM output projection, gather straight-through and blocked code search were
# prototypes here and are vqlog's own now.
Transform = Callable[[nn.Module], nn.Module]
PROTOTYPES: dict[str, tuple[str, Transform]] = {
    "fft-bwd-vecdot": ("s4d.py _FFTConv.backward: grad_k by linalg.vecdot, conj_physical(k_f)",
                       lambda m: swap(m, s4d=S4DVecdotFFT)),
    "fused-s4d-block": ("each S4D block one autograd node, GLU + residual as one addcmul",
                        lambda m: swap(m, block=FusedS4DBlock)),
}


def prototype_table(vqlog: nn.Module, baseline: nn.Module, cfg: Config, x: Tensor, rounds: int,
                    check: Callable[[dict, Tensor], dict]) -> dict:
    """Each prototype's step time against vqlog's, interleaved round by round, and the
    baseline's over each of them."""
    models = {"vqlog": vqlog}
    for name, (_, transform) in PROTOTYPES.items():
        models[name] = transform(copy.deepcopy(vqlog))
    models["baseline"] = baseline
    checked = check({k: m for k, m in models.items() if k != "baseline"}, x)
    steppers = {}
    for name, m in models.items():
        opt = optimizer_for(m, cfg)
        steppers[name] = (m, opt)
        train_step(m, opt, x, cfg.grad_clip)  # warm-up
    wall = {k: [] for k in models}
    cpu = {k: [] for k in models}
    for _ in range(rounds):
        for name, (m, opt) in steppers.items():
            w, c = _clock(), time.thread_time()
            train_step(m, opt, x, cfg.grad_clip)
            cpu[name].append(time.thread_time() - c)
            wall[name].append(_clock() - w)
    rows = {}
    for name in models:
        r_wall = [a / b for a, b in zip(wall[name], wall["vqlog"])]
        r_cpu = [a / b for a, b in zip(cpu[name], cpu["vqlog"])]
        rows[name] = {
            "change": PROTOTYPES[name][0] if name in PROTOTYPES else "",
            "ms_per_step_median": 1e3 * statistics.median(wall[name]),
            "time_over_vqlog_median": statistics.median(r_wall),
            "time_over_vqlog_min_max": [min(r_wall), max(r_wall)],
            "cpu_time_over_vqlog_median": statistics.median(r_cpu),
        }
    rows["baseline"]["ratios"] = {}
    for fast in [k for k in models if k != "baseline"]:
        rr = [a / b for a, b in zip(wall["baseline"], wall[fast])]
        rows["baseline"]["ratios"][fast] = {"median": statistics.median(rr),
                                            "min_max": [min(rr), max(rr)]}
    return {"rounds": rounds, "rows": rows, "check": checked}


def prototype_text(proto: dict) -> str:
    from _common import render_table

    rows = []
    for name, r in proto["rows"].items():
        lo, hi = r["time_over_vqlog_min_max"]
        extra = "; ".join(f"baseline / {fast} = {v['median']:.2f}x ({v['min_max'][0]:.2f}-"
                          f"{v['min_max'][1]:.2f})" for fast, v in r.get("ratios", {}).items())
        rows.append([name, f"{r['ms_per_step_median']:.1f}", f"{r['time_over_vqlog_median']:.3f}",
                     f"{lo:.2f}-{hi:.2f}", f"{r['cpu_time_over_vqlog_median']:.3f}", extra])
    return render_table(["variant", "ms/step", "time / vqlog's (wall)", "min-max",
                         "time / vqlog's (CPU)", "ratio"], rows)
