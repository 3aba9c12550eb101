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
from vqlog.model.quantizer import VQ, QuantizerOutput, nearest_code
from _assembly import optimizer_for
from vqlog.model.s4d import S4D, _FFTConv
from vqlog.train import train_step

# --------------------------------------------------------------------------- module profile


class _Mark(torch.autograd.Function):
    """Identity; its backward appends (label, time) to a log."""

    @staticmethod
    def forward(ctx, x, log, label):
        ctx.log, ctx.label = log, label
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.log.append((ctx.label, time.perf_counter()))
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
            self.fwd.append((label, "start", time.perf_counter()))
            if args[0].requires_grad:
                return (_Mark.apply(args[0], self.bwd, ("end", label)),) + tuple(args[1:])
            return None
        return hook

    def _post(self, label):
        def hook(mod, args, out):
            self.fwd.append((label, "end", time.perf_counter()))
            if isinstance(out, Tensor):
                return _Mark.apply(out, self.bwd, ("start", label))
            return out._replace(z_q=_Mark.apply(out.z_q, self.bwd, ("start", label)))
        return hook

    def step(self, model, opt, x, grad_clip) -> dict[str, tuple[float, float]]:
        """`vqlog.train.train_step`'s body with time stamps: label -> (forward s, backward s)."""
        self.fwd.clear()
        self.bwd.clear()
        t0 = time.perf_counter()
        out = model(x)
        t1 = time.perf_counter()
        mse = F.mse_loss(out.recon, x)
        loss = mse + out.quant.loss
        if not torch.isfinite(loss):
            raise RuntimeError("non-finite loss while profiling")
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        t4 = time.perf_counter()
        opt.step()
        t5 = time.perf_counter()
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
    """torch.profiler's top operators by self CPU time, per step."""
    from torch.profiler import ProfilerActivity, profile

    opt = optimizer_for(model, cfg)
    for _ in range(2):
        train_step(model, opt, x, cfg.grad_clip)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            train_step(model, opt, x, cfg.grad_clip)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    out = []
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        out.append({"op": e.key, "self_ms_per_step": e.self_cpu_time_total / steps / 1e3,
                    "share": e.self_cpu_time_total / total, "calls_per_step": e.count // steps,
                    "input_shapes": str(e.input_shapes)[:100]})
    return out


# --------------------------------------------------------------------------- prototypes


class FFTConvInPlace(torch.autograd.Function):
    """`vqlog.model.s4d._FFTConv` with a backward that works in its own buffers: the saved u_f is
    conjugated in place (no conj() copy of a (B, H, L+1) complex tensor) and both products are
    written in place. The spectrum is consumed, so a second backward through the same graph
    (retain_graph=True) raises instead of returning wrong gradients."""

    @staticmethod
    def forward(ctx, u, k):
        L = u.shape[-1]
        u_f = torch.fft.rfft(u, n=2 * L)  # (B H L+1)
        k_f = torch.fft.rfft(k, n=2 * L)  # (H L+1)
        ctx.save_for_backward(u_f, k_f)
        ctx.consumed = False
        return torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L]  # (B H L)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        if ctx.consumed:
            raise RuntimeError("FFTConvInPlace's backward consumed its saved spectrum: "
                               "a second backward (retain_graph=True) is not supported")
        u_f, k_f = ctx.saved_tensors
        L = grad_y.shape[-1]
        g_f = torch.fft.rfft(grad_y, n=2 * L)  # (B H L+1)
        grad_u = grad_k = None
        if ctx.needs_input_grad[1]:
            ctx.consumed = True
            torch.view_as_real(u_f)[..., 1].neg_()  # u_f <- conj(u_f)
            batch_dims = tuple(range(g_f.dim() - k_f.dim()))
            grad_k = torch.fft.irfft(u_f.mul_(g_f).sum(batch_dims), n=2 * L)[..., :L]  # (H L)
        if ctx.needs_input_grad[0]:
            grad_u = torch.fft.irfft(g_f.mul_(k_f.conj()), n=2 * L)[..., :L]  # (B H L)
        return grad_u, grad_k


class S4DInPlaceFFT(S4D):
    """S4D.forward with FFTConvInPlace (or a subclass's `conv`)."""

    conv = FFTConvInPlace

    def forward(self, u: Tensor) -> Tensor:
        L = u.shape[-1]
        k = self.kernel(L) + F.pad(self.D[:, None], (0, L - 1))  # (H L)
        y = self.dropout(F.gelu(self.conv.apply(u, k)))  # (B H L)
        return F.glu(self.output(y), dim=-2)


class FFTConvVecdot(_FFTConv):
    """`vqlog.model.s4d._FFTConv` (its forward) with the kernel's gradient as one reduction,
    `torch.linalg.vecdot(u_f, g_f)` = sum over the batch of conj(u_f)·g_f (no product tensor,
    no lazy-conj copy), and grad_u's product against a physically conjugated kernel spectrum."""

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        u_f, k_f = ctx.saved_tensors
        L = grad_y.shape[-1]
        g_f = torch.fft.rfft(grad_y, n=2 * L)  # (B H L+1)
        grad_u = grad_k = None
        if ctx.needs_input_grad[1]:
            rows = (-1, *k_f.shape)  # the batch dims as one
            g_u = torch.linalg.vecdot(u_f.reshape(rows), g_f.reshape(rows), dim=0)  # (H L+1)
            grad_k = torch.fft.irfft(g_u, n=2 * L)[..., :L]  # (H L)
        if ctx.needs_input_grad[0]:
            grad_u = torch.fft.irfft(g_f * torch.conj_physical(k_f), n=2 * L)[..., :L]
        return grad_u, grad_k


class S4DVecdotFFT(S4DInPlaceFFT):
    """S4D.forward with FFTConvVecdot."""

    conv = FFTConvVecdot


class _BatchedProj(torch.autograd.Function):
    """A 1x1 conv on (B, C, L) as B GEMMs (baddbmm) instead of oneDNN's convolution."""

    @staticmethod
    def forward(ctx, y, W, b):
        ctx.save_for_backward(y, W)
        return torch.baddbmm(b[:, None].expand(W.shape[0], y.shape[-1]),
                             W.expand(y.shape[0], *W.shape), y)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        y, W = ctx.saved_tensors
        return torch.matmul(W.t(), g), torch.bmm(g, y.transpose(1, 2)).sum(0), g.sum((0, 2))


class S4DBatchedProj(S4DInPlaceFFT):
    """S4DInPlaceFFT with the output projection as baddbmm."""

    def forward(self, u: Tensor) -> Tensor:
        L = u.shape[-1]
        k = self.kernel(L) + F.pad(self.D[:, None], (0, L - 1))
        y = self.dropout(F.gelu(FFTConvInPlace.apply(u, k)))
        o = _BatchedProj.apply(y, self.output.weight[:, :, 0], self.output.bias)
        return F.glu(o, dim=-2)


class _StraightThroughGather(torch.autograd.Function):
    """The VQ's straight-through estimator and losses with the code gather inside: z_q is the
    gathered e itself (no z + (e - z) pass over (B, T, D)), and the codebook gradient is one
    index_add of r into (K, D) (no (B, T, D) grad_e and no embedding backward)."""

    @staticmethod
    def forward(ctx, z, codebook, indices, beta):
        e = codebook.index_select(0, indices).view_as(z)  # (B T D)
        r = e - z
        flat = r.view(-1)
        mse = torch.dot(flat, flat) / flat.numel()
        ctx.save_for_backward(r, indices)
        ctx.beta, ctx.K = beta, codebook.shape[0]
        commitment = mse.detach().clone()
        ctx.mark_non_differentiable(commitment)
        return e, (1 + beta) * mse, commitment

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_zq, grad_loss, _):
        r, indices = ctx.saved_tensors
        scale = grad_loss * (2.0 / r.numel())
        D = r.shape[-1]
        grad_cb = r.new_zeros(ctx.K, D).index_add_(0, indices, r.view(-1, D)).mul_(scale)
        grad_z = torch.addcmul(grad_zq, r, scale, value=-ctx.beta)
        return grad_z, grad_cb, None, None


class VQGather(VQ):
    def forward(self, z: Tensor) -> QuantizerOutput:
        B, T, D = z.shape
        indices = nearest_code(z.reshape(B * T, D).detach(), self.codebook.detach())  # (BT)
        z_q, loss, commitment = _StraightThroughGather.apply(z, self.codebook, indices,
                                                             self.commitment_weight)
        return QuantizerOutput(z_q, indices.view(B, T), loss, commitment)


def nearest_code_chunked(z: Tensor, codebook: Tensor, chunk: int = 512) -> Tensor:
    """nearest_code in row blocks, so the (chunk, K) scores stay in cache."""
    e2 = (codebook * codebook).sum(1)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    buf = z.new_empty(chunk, codebook.shape[0])
    for i in range(0, z.shape[0], chunk):
        zz = z[i:i + chunk]
        s = torch.addmm(e2, zz, codebook.t(), alpha=-2.0, out=buf[: zz.shape[0]])
        torch.argmin(s, dim=1, out=out[i:i + zz.shape[0]])
    return out


class VQGatherChunked(VQ):
    def forward(self, z: Tensor) -> QuantizerOutput:
        B, T, D = z.shape
        indices = nearest_code_chunked(z.reshape(B * T, D).detach(), self.codebook.detach())
        z_q, loss, commitment = _StraightThroughGather.apply(z, self.codebook, indices,
                                                             self.commitment_weight)
        return QuantizerOutput(z_q, indices.view(B, T), loss, commitment)


def swap(model: nn.Module, s4d: type | None = None, vq: type | None = None) -> nn.Module:
    for m in model.modules():
        if s4d is not None and type(m) is S4D:
            m.__class__ = s4d
        elif vq is not None and type(m) is VQ:
            m.__class__ = vq
    return model


# name -> (what it changes, model transform). vqlog's channel-last stacks and fused AdamW were
# prototypes here and are vqlog's own now.
Transform = Callable[[nn.Module], nn.Module]
PROTOTYPES: dict[str, tuple[str, Transform]] = {
    "fft-bwd-inplace": ("s4d.py _FFTConv.backward: conj and products in the saved buffers",
                        lambda m: swap(m, s4d=S4DInPlaceFFT)),
    "fft-bwd-vecdot": ("s4d.py _FFTConv.backward: grad_k by linalg.vecdot, conj_physical(k_f)",
                       lambda m: swap(m, s4d=S4DVecdotFFT)),
    "s4d-proj-baddbmm": ("S4D output 1x1 conv as baddbmm (+ fft-bwd-inplace)",
                         lambda m: swap(m, s4d=S4DBatchedProj)),
    "vq-gather-st": ("quantizer.py: z_q = gathered e, codebook grad by index_add",
                     lambda m: swap(m, vq=VQGather)),
    "vq-chunked-search": ("vq-gather-st + nearest_code in 512-row blocks",
                          lambda m: swap(m, vq=VQGatherChunked)),
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
            w, c = time.perf_counter(), time.thread_time()
            train_step(m, opt, x, cfg.grad_clip)
            cpu[name].append(time.thread_time() - c)
            wall[name].append(time.perf_counter() - w)
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
