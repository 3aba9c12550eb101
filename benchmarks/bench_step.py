"""Benchmark 1 of issue 6: vqlog's training step against what a user would otherwise assemble.

    python benchmarks/bench_step.py                  # CPU, one torch thread, both shapes
    python benchmarks/bench_step.py --profile        # + where the time goes, + prototypes
    python benchmarks/bench_step.py --device cuda    # the GPU figure (needs a CUDA GPU)

What is timed, for both variants: one `vqlog.train.train_step(model, opt, x, grad_clip)`, exactly
what `fit` runs (forward, MSE + quantizer loss, backward, clip_grad_norm_, an AdamW step), on the
same batch.

- vqlog: `vqlog.model.vqvae.VQVAE` as it is (channel-last stacks, block-Vandermonde S4D kernel,
  hand-written FFT convolution backward, classic VQ with the GEMM nearest-code search and the
  fused straight-through estimator), with `vqlog.train.build_optimizer`'s fused AdamW.
- baseline: the same module tree with the same initial weights, but
  * the trunk written module by module on (B, H, L), as s4's examples and torch's Conv1d expect,
    and torch.optim.AdamW with its defaults (`_assembly.py`),
  * every S4D layer computed as state-spaces/s4 `models/s4/s4d.py` computes it
    (`vqlog.model.reference.use_reference(model, s4d=True, quantizer=False)`: the kernel over a
    materialised complex (H, N/2, L) Vandermonde tensor and an einsum, the FFT convolution
    differentiated by autograd, a separate D skip), and
  * the quantizer replaced by vector-quantize-pytorch's `VectorQuantize(dim=embedding_dim,
    codebook_size=embedding_num, commitment_weight=commitment, learnable_codebook=True,
    ema_update=False, kmeans_init=False, rotation_trick=False)` (a learnable codebook, no EMA,
    the straight-through estimator), started from vqlog's codebook, behind a small adapter that
    returns vqlog's QuantizerOutput.
  With learnable_codebook the library's only quantizer loss is commitment * ||q - z||^2 with the
  gradient going to both the codebook and z, where vqlog's VQ adds the codebook loss
  ||sg(z) - e||^2: the encoder and decoder get the same gradients, the codebook's gradient is
  `commitment` times vqlog's, and the library's loss is commitment / (1 + commitment) of
  vqlog's. The check below verifies exactly that (and equal reconstructions, z and codes)
  before anything is timed; it aborts otherwise.
- `--oracle` adds vqlog's own test oracle (`use_reference(model)`: nearest codes from a full
  (M, K, D) difference tensor); it is not a baseline (seconds per step at the seed shape).

Variants run interleaved, one round at a time (vqlog, baseline, sgemm, vqlog, baseline, ...); the
ratio is baseline's step time over vqlog's in the same round, median and spread over rounds.
Wall time is the headline (the module's `_common.interleave`); the thread's CPU time is recorded
next to it, since on a shared machine wall time also counts time spent waiting for a core.

Roofline: the FLOPs of one vqlog forward + backward are counted with
`torch.utils.flop_counter.FlopCounterMode`, which counts what torch counts (mm, addmm, bmm,
baddbmm, convolutions and their backward, attention) and not FFTs, element-wise ops,
reductions or the optimizer; the achieved GFLOP/s of the step are set against this machine's
one-thread sgemm (torch.mm on 1024 x 1024 float32 on the CPU, 8192 x 8192 on a GPU), timed as one
more variant of the same rounds.

Shapes: `seed` is the seed spec's shape (vqlog/sweeps/seed.yaml: its fixed values and its second
enqueued row: batch 64, d_model 32, d_state 32, window 256, embedding_dim 512, embedding_num 512,
downsample 4, vq, BN no, MLP relu); `default` is the training default (Config() with quantizer vq:
batch 32, d_model 64, d_state 64, window 256, embedding_dim 64, embedding_num 256, downsample 4,
BN yes, MLP relu). Target: baseline / vqlog >= 2 at the seed shape.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import sys
import time
from collections.abc import Callable

import _common
import torch
from _assembly import as_user_assembly, optimizer_for
import torch.nn.functional as F
from torch import Tensor, nn

from vqlog.config import Config
from vqlog.model.quantizer import VQ, QuantizerOutput
from vqlog.model.reference import use_reference
from vqlog.model.vqvae import VQVAE
from vqlog.study.spec import load_sweep
from vqlog.train import train_step

TARGET = 2.0
TARGET_SHAPE = "seed"


def shape_configs() -> dict[str, Config]:
    """`seed`: seed.yaml's fixed values with its second enqueued row; `default`: Config()'s
    training defaults with the classic VQ."""
    spec = load_sweep("seed")
    seq2 = spec.enqueue[1]  # batch 64, embedding_dim 512, embedding_num 512, BN no, MLP relu
    seed = Config.from_mapping(seq2, base=spec.base_config())
    return {"seed": seed, "default": dataclasses.replace(Config(), quantizer="vq")}


def describe(cfg: Config) -> str:
    return (f"B {cfg.batch}, H {cfg.d_model}, N {cfg.d_state}, L {cfg.window}, "
            f"{cfg.n_layers}+{cfg.n_layers} layers, D {cfg.embedding_dim}, K {cfg.embedding_num}, "
            f"ds {cfg.downsample}, BN {'yes' if cfg.BN else 'no'}, MLP {cfg.MLP}")


class LibraryVQ(nn.Module):
    """vector-quantize-pytorch's VectorQuantize as a user would configure a classic VQ with a
    learnable codebook, behind vqlog's quantizer interface (z (B, T, D) -> QuantizerOutput)."""

    def __init__(self, vq: VQ, commitment: float):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        K, D = vq.codebook.shape
        self.vq = VectorQuantize(dim=D, codebook_size=K, commitment_weight=commitment,
                                 learnable_codebook=True, ema_update=False, kmeans_init=False,
                                 rotation_trick=False)
        with torch.no_grad():  # both start from vqlog's codebook
            self.vq._codebook.embed.copy_(vq.codebook[None])  # (1 K D): one codebook
        self.codebook_size = K

    @property
    def codebook(self) -> Tensor:
        return self.vq._codebook.embed[0]  # (K D)

    def forward(self, z: Tensor) -> QuantizerOutput:
        z_q, indices, loss = self.vq(z)  # (B T D), (B T), scalar: commitment * mse(q, z)
        commitment = F.mse_loss(z.detach(), z_q.detach())
        return QuantizerOutput(z_q, indices, loss.reshape(()), commitment)


def build_models(cfg: Config, device: torch.device, oracle: bool = False) -> dict[str, nn.Module]:
    """vqlog, the baseline (and the oracle), all with the same initial weights."""
    torch.manual_seed(cfg.seed)
    fast = VQVAE(cfg).to(device)
    baseline = as_user_assembly(use_reference(copy.deepcopy(fast), s4d=True, quantizer=False))
    baseline.quantizer = LibraryVQ(baseline.quantizer, cfg.commitment).to(device)
    models = {"vqlog": fast, "baseline": baseline}
    if oracle:
        models["oracle (vqlog's test reference, not a baseline)"] = use_reference(
            copy.deepcopy(fast), s4d=True, quantizer=True)
    return models


@contextlib.contextmanager
def no_tf32():
    """Plain float32 on a GPU while checking: TF32 rounds matmul and convolution inputs to 10
    mantissa bits, which would turn the formulations' 1e-6 differences into 1e-3 ones."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|: allclose with atol relative to the tensor's scale."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _forward_backward(model: nn.Module, x: Tensor):
    out = model(x)
    loss = F.mse_loss(out.recon, x) + out.quant.loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return out, loss.detach(), grads


def _check_same_step(model: nn.Module, fast: nn.Module, x: Tensor) -> dict:
    """A variant whose quantizer is vqlog's VQ against vqlog: codes equal for >= 99.9 % of
    positions (float32 may flip a near-tie), outputs and loss within 1e-4 of their scale, every
    gradient within 1e-2 of its scale (at d_model 128 in float32, log_dt's gradient differs by up
    to 8e-4 between the two S4D kernels; tests/test_reference.py checks them in float64)."""
    out, loss, grads = _forward_backward(model, x)
    f_out, f_loss, f_grads = _forward_backward(fast, x)
    same_codes = (out.quant.indices == f_out.quant.indices).float().mean().item()
    # A gradient that is zero in exact arithmetic (a conv bias right before a BatchNorm, with
    # BN yes) is rounding noise in both: its scale is floored at 1e-4 of the largest gradient.
    floor = 1e-4 * max(f.abs().max().item() for f in f_grads)
    worst = {"recon": _rel_err(out.recon, f_out.recon), "z": _rel_err(out.z, f_out.z),
             "loss": _rel_err(loss, f_loss),
             "grad": max(((g - f).abs().max() / max(f.abs().max().item(), floor)).item()
                         for g, f in zip(grads, f_grads))}
    if (same_codes < 0.999 or max(worst["recon"], worst["z"], worst["loss"]) > 1e-4
            or worst["grad"] > 1e-2):
        raise AssertionError(f"differs from vqlog's step: codes equal {same_codes:.4f}, "
                             f"relative errors {worst}")
    return {"same_codes": same_codes, "max_rel_err": worst}


def _check_library_vq(lib: LibraryVQ, vq: VQ, z: Tensor, commitment: float) -> dict:
    """The library's VQ against vqlog's on the same z (B, T, D) and the same upstream gradient:
    codes equal for >= 99.9 % of positions (it ranks by a clamped square-root distance, so a
    near-tie may go the other way); where they agree, z_q equal; its loss commitment/(1 +
    commitment) of vqlog's; grad z equal (straight-through + commitment term); its codebook
    gradient `commitment` times vqlog's on every code no flipped position touches."""
    g = torch.Generator().manual_seed(2)
    upstream = torch.randn(z.shape, generator=g).to(z.device) * 1e-3
    res = {}
    for name, q in (("lib", lib), ("vq", vq)):
        zz = z.detach().clone().requires_grad_()
        out = q(zz)
        grad_z, grad_cb = torch.autograd.grad((out.z_q * upstream).sum() + out.loss, [zz, q.codebook]
                                              if name == "vq" else [zz, q.vq._codebook.embed])
        res[name] = (out, grad_z, grad_cb.reshape(vq.codebook.shape))
    (lo, lgz, lgc), (vo, vgz, vgc) = res["lib"], res["vq"]
    same = lo.indices == vo.indices  # (B T)
    touched = torch.zeros(vq.codebook.shape[0], dtype=torch.bool, device=z.device)
    touched[lo.indices[~same]] = True
    touched[vo.indices[~same]] = True
    worst = {
        "z_q (same codes)": _rel_err(lo.z_q[same], vo.z_q[same]),
        "loss / (commitment / (1 + commitment))": _rel_err(
            lo.loss.detach() * (1 + commitment) / commitment, vo.loss.detach()),
        "grad z (same codes)": _rel_err(lgz[same], vgz[same]),
        "codebook grad / commitment (untouched codes)": _rel_err(
            lgc[~touched] / commitment, vgc[~touched]),
    }
    same_codes = same.float().mean().item()
    if same_codes < 0.999 or max(worst.values()) > 1e-3:
        raise AssertionError(f"the library's VQ differs from vqlog's: codes equal "
                             f"{same_codes:.4f}, relative errors {worst}")
    return {"same_codes": same_codes, "max_rel_err": worst}


def check_outputs(models: dict[str, nn.Module], x: Tensor, commitment: float) -> dict[str, dict]:
    """Checks every variant against vqlog before timing; raises if one disagrees. The baseline
    in two halves: its S4D layers (the baseline's tree with vqlog's VQ put back, against vqlog:
    same outputs and gradients) and its quantizer (against vqlog's VQ on vqlog's z); then the
    whole baseline's codes against vqlog's (>= 99.9 % equal). Any other variant with vqlog's VQ
    (the oracle, the prototypes) is checked whole."""
    fast = models["vqlog"]
    report = {}
    for name, model in models.items():
        if name == "vqlog":
            continue
        if isinstance(model.quantizer, LibraryVQ):
            s4d_half = copy.deepcopy(model)
            s4d_half.quantizer = copy.deepcopy(fast.quantizer)
            z = fast.encoder(x)
            out, f_out = model(x), fast(x)
            same_codes = (out.quant.indices == f_out.quant.indices).float().mean().item()
            report[name] = {
                "S4D layers (with vqlog's VQ)": _check_same_step(s4d_half, fast, x),
                "quantizer (on vqlog's z)": _check_library_vq(model.quantizer, fast.quantizer, z,
                                                              commitment),
                "whole step": {"same_codes": same_codes,
                               "recon_rel_err": _rel_err(out.recon, f_out.recon)},
            }
            if same_codes < 0.999:
                raise AssertionError(f"{name}: codes equal for {same_codes:.4f} of positions")
        else:
            report[name] = _check_same_step(model, fast, x)
    return report


def count_flops(model: nn.Module, x: Tensor) -> int:
    """FLOPs of one forward + backward (the loss as train_step builds it), as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x)
        (F.mse_loss(out.recon, x) + out.quant.loss).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def sgemm_variant(device: torch.device) -> tuple[Callable, int]:
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 4)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)

    def run() -> None:
        for _ in range(reps):
            torch.mm(a, b)

    return run, 2 * n ** 3 * reps


def _cpu_timed(fn, log: list[float]):
    def run() -> None:
        start = time.thread_time()
        fn()
        log.append(time.thread_time() - start)
    return run


def bench_shape(name: str, cfg: Config, device: torch.device, rounds: int, steps: int,
                oracle: bool) -> dict:
    models = build_models(cfg, device, oracle)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch, cfg.window, generator=g).to(device)  # (B L), z-scored like windows
    with no_tf32():
        check = check_outputs(models, x, cfg.commitment)
    flops = count_flops(models["vqlog"], x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    n_steps = {v: 1 if v.startswith("oracle") else steps for v in models}

    def stepper(model: nn.Module, n: int):
        opt = optimizer_for(model, cfg)

        def run() -> None:
            for _ in range(n):
                train_step(model, opt, x, cfg.grad_clip)

        return run

    cpu: dict[str, list[float]] = {v: [] for v in [*models, "sgemm"]}
    variants = {v: _cpu_timed(stepper(m, n_steps[v]), cpu[v]) for v, m in models.items()}
    sgemm, sgemm_flops = sgemm_variant(device)
    variants["sgemm"] = _cpu_timed(sgemm, cpu["sgemm"])
    _common.interleave(variants, 1, sync)  # warm-up: allocator, oneDNN primitives, CUDA context
    for log in cpu.values():
        log.clear()
    times = _common.interleave(variants, rounds, sync)
    per_step = {v: [t / n_steps[v] for t in ts] for v, ts in times.items() if v != "sgemm"}
    cpu_step = {v: [t / n_steps[v] for t in ts] for v, ts in cpu.items() if v != "sgemm"}
    rows = {}
    for v, ts in per_step.items():
        ratios = _common.round_ratios(ts, per_step["vqlog"])
        cpu_ratios = _common.round_ratios(cpu_step[v], cpu_step["vqlog"])
        rows[v] = {
            "ms_per_step_median": 1e3 * _common.median(ts),
            "ms_per_step_min_max": [1e3 * t for t in _common.spread(ts)],
            "cpu_ms_per_step_median": 1e3 * _common.median(cpu_step[v]),
            "ratio_to_vqlog_median": _common.median(ratios),
            "ratio_to_vqlog_min_max": list(_common.spread(ratios)),
            "cpu_ratio_to_vqlog_median": _common.median(cpu_ratios),
            "steps_per_round": n_steps[v],
            "ms_per_step_rounds": [1e3 * t for t in ts],
        }
    sgemm_gflops = [sgemm_flops / t / 1e9 for t in times["sgemm"]]
    step_gflops = [flops / t / 1e9 for t in per_step["vqlog"]]
    roofline = {
        "vqlog_gflop_per_step": flops / 1e9,
        "counted_by": "torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions; "
                      "no FFTs, element-wise ops, reductions or optimizer)",
        "vqlog_step_gflops_median": _common.median(step_gflops),
        "sgemm": f"torch.mm {'8192' if device.type == 'cuda' else '1024'}^2 float32",
        "sgemm_gflops_median": _common.median(sgemm_gflops),
        "fraction_of_sgemm_median": _common.median([a / b for a, b in zip(step_gflops, sgemm_gflops)]),
        "vqlog_step_at_sgemm_speed_ms": 1e3 * flops / 1e9 / _common.median(sgemm_gflops),
    }
    return {"shape": name, "config": describe(cfg), "check": check, "variants": rows,
            "roofline": roofline}


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        for v, s in r["variants"].items():
            lo, hi = s["ms_per_step_min_max"]
            verdict = ""
            if v == "baseline":
                rlo, rhi = s["ratio_to_vqlog_min_max"]
                ratio = s["ratio_to_vqlog_median"]
                verdict = f"{ratio:.2f}x ({rlo:.2f}-{rhi:.2f}; CPU time {s['cpu_ratio_to_vqlog_median']:.2f}x)"
                if r["shape"] == TARGET_SHAPE:
                    verdict += " met" if ratio >= TARGET else f" missed (< {TARGET:g}x)"
            rows.append([r["shape"], v, f"{s['ms_per_step_median']:.1f}", f"{lo:.1f}-{hi:.1f}",
                         f"{s['cpu_ms_per_step_median']:.1f}", verdict])
    return _common.render_table(
        ["shape", "step", "ms/step (median)", "min-max", "CPU ms/step",
         f"baseline / vqlog per round (target >= {TARGET:g}x at {TARGET_SHAPE})"], rows)


def roofline_lines(results: list[dict]) -> str:
    lines = []
    for r in results:
        f = r["roofline"]
        lines.append(
            f"{r['shape']}: vqlog step {f['vqlog_gflop_per_step']:.2f} GFLOP (FlopCounterMode), "
            f"{f['vqlog_step_gflops_median']:.1f} GFLOP/s achieved = "
            f"{100 * f['fraction_of_sgemm_median']:.0f} % of one-thread sgemm "
            f"({f['sgemm']}: {f['sgemm_gflops_median']:.1f} GFLOP/s); at sgemm speed the counted "
            f"FLOPs alone take {f['vqlog_step_at_sgemm_speed_ms']:.0f} ms")
    return "\n".join(lines)


def profile_section(name: str, cfg: Config, device: torch.device, rounds: int) -> tuple[dict, str]:
    """--profile: per-part breakdown of both steps, top operators, and the prototypes."""
    import _step_profile as sp

    models = build_models(cfg, device)
    x = torch.randn(cfg.batch, cfg.window, generator=torch.Generator().manual_seed(0)).to(device)
    modules = sp.module_profile(models, cfg, x, rounds)
    ops = {v: sp.op_profile(copy.deepcopy(m), cfg, x) for v, m in models.items()}
    fresh = build_models(cfg, device)
    proto = sp.prototype_table(fresh["vqlog"], fresh["baseline"], cfg, x, max(rounds, 8),
                               lambda ms, xx: check_outputs(ms, xx, cfg.commitment))
    op_text = "\n\n".join(
        f"top operators, {v} (torch.profiler, self {'GPU' if x.is_cuda else 'CPU'} ms per step):\n"
        + _common.render_table(
            ["op", "ms/step", "share", "calls/step", "input shapes"],
            [[o["op"], f"{o['self_ms_per_step']:.2f}", f"{100 * o['share']:.1f} %",
              o["calls_per_step"], o["input_shapes"]] for o in rows])
        for v, rows in ops.items())
    text = (f"## {name}: where the step's time goes ({describe(cfg)}; medians of {rounds} "
            f"interleaved rounds; the probes add a few ms). vqlog's channel-last encoder and "
            f"decoder apply in_proj, down, up, post and out_proj inside their own forward, not "
            f"as module calls: that time is in vqlog's glue row.\n\n" + sp.module_table(modules)
            + "\n\n" + op_text
            + f"\n\n## {name}: prototypes of vqlog's step ({proto['rounds']} interleaved rounds)\n\n"
            + sp.prototype_text(proto))
    return {"modules": modules, "top_ops": ops, "prototypes": proto}, text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU (default 1: one per sweep worker)")
    p.add_argument("--shapes", nargs="+", default=["seed", "default"], choices=("seed", "default"))
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    p.add_argument("--steps", type=int, default=2, help="steps per variant per round (default 2)")
    p.add_argument("--oracle", action="store_true",
                   help="also time vqlog's own test oracle (one step per round; slow)")
    p.add_argument("--profile", action="store_true",
                   help="also break each shape's steps down by module and time the prototypes")
    p.add_argument("--out", help="JSON path (default benchmarks/results/step[_cuda].json)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("Error: --device cuda needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    _common.set_threads(args.threads)
    torch.set_flush_denormal(True)  # as fit() does
    device = torch.device(args.device)
    # Both variants in full float32 on a GPU: cuDNN would run the baseline's Conv1d in TF32 by
    # default, while every GEMM (vqlog's 1x1 convolutions are GEMMs) stays float32.
    torch.backends.cudnn.allow_tf32 = False
    info = _common.machine(args.device, args.threads)
    configs = shape_configs()
    results = []
    for name in args.shapes:
        print(f"{name}: {describe(configs[name])} ...", flush=True)
        results.append(bench_shape(name, configs[name], device, args.rounds, args.steps,
                                   args.oracle))
    profile, profile_text = None, ""
    if args.profile:
        profile, texts = {}, []
        for name in args.shapes:
            print(f"profile and prototypes, {name} ...", flush=True)
            profile[name], t = profile_section(name, configs[name], device, args.rounds)
            texts.append(t)
        profile_text = "\n\n".join(texts)
    info["load_average_end"] = _common.machine()["load_average_1_5_15"]
    text = table(results)
    roof = roofline_lines(results)
    print(f"\ntraining step, {args.device}, {args.threads} torch thread(s), {args.rounds} rounds "
          f"x {args.steps} steps; torch {info['torch']}, {info['time']}, load average "
          f"{info['load_average_1_5_15']} -> {info['load_average_end']}\n")
    print(text)
    print("\n" + roof)
    if profile_text:
        print("\n" + profile_text)
    name = "step" if args.device == "cpu" else "step_cuda"
    path = _common.write_json(name, {
        "benchmark": "step", "command": "python benchmarks/" + " ".join(
            ["bench_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "target": f"baseline / vqlog >= {TARGET:g} at the {TARGET_SHAPE} shape",
        "compared": __doc__, "machine": info, "rounds": args.rounds,
        "steps_per_round": args.steps, "results": results, "table": text, "roofline": roof,
        "profile": profile, "profile_text": profile_text or None,
    }, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
