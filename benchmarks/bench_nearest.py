"""Benchmark of issue 13: the classic VQ's nearest-code search (`quantizer.nearest_code`).

    python benchmarks/bench_nearest.py               # CPU, one torch thread, the seed spec's sizes
    python benchmarks/bench_nearest.py --device cuda # the GPU (vqlog runs the GEMM + min there)

The search maps M latents (M = batch x window / downsample rows of z) to the index of their
nearest code among K. Timed, on the same z and codebook, interleaved round by round:

- `library`: what vector-quantize-pytorch's `VectorQuantize` runs for a Euclidean codebook, its
  own `cdist` (squared norms, an einsum, clamp and sqrt) then argmax of the negated distances;
- `gemm+min`: one addmm for ||e||^2 - 2 z.e over all (M, K) pairs and `Tensor.min(dim=1)`, what
  vqlog ran before and what a user writing the matmul form by hand would write;
- `vqlog`: `nearest_code` as it is: on the CPU the rows in blocks whose scores stay in cache,
  and the index of each block's best code by `max_pool2d` over a channels-last view.

All three must return the same indices (checked in float64 first; it aborts otherwise). Sizes:
M 2048, 4096 and 8192 (batch 32, 64 and 128 at window 256, downsample 4, the seed spec's), with
the (K, D) pairs of the seed spec's space that cost most and least.
"""

from __future__ import annotations

import argparse
import sys

import _common
import torch

from vqlog.model.quantizer import nearest_code

SIZES = [(M, K, D) for M in (2048, 4096, 8192)
         for K, D in ((128, 64), (256, 128), (512, 512), (1024, 64), (1024, 256))]


def library(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """vector-quantize-pytorch's search: -cdist(z, e) from its module, then argmax."""
    from vector_quantize_pytorch.vector_quantize_pytorch import cdist

    return (-cdist(z[None], codebook[None]))[0].argmax(dim=-1)


def gemm_min(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    scores = torch.addmm((codebook * codebook).sum(1), z, codebook.t(), alpha=-2.0)  # (M K)
    return scores.min(dim=1).indices


VARIANTS = {"library": library, "gemm+min": gemm_min, "vqlog": nearest_code}


def check(device: torch.device) -> None:
    """The three agree exactly where rounding cannot flip a near-tie (float64)."""
    g = torch.Generator().manual_seed(0)
    for M, K, D in [(1000, 1024, 16), (4096, 256, 64)]:
        z = torch.randn(M, D, generator=g, dtype=torch.float64).to(device)
        e = torch.randn(K, D, generator=g, dtype=torch.float64).to(device)
        ref = gemm_min(z, e)
        for name, fn in VARIANTS.items():
            if not torch.equal(fn(z, e), ref):
                sys.exit(f"Error: {name} finds other codes than gemm+min at M {M}, K {K}, D {D}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", help="JSON path (default benchmarks/results/nearest[-cuda].json)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        _common.set_threads(1)
    device = torch.device(args.device)
    info = _common.machine(args.device, 1 if args.device == "cpu" else None)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    check(device)
    g = torch.Generator().manual_seed(1)
    results, rows = [], []
    for M, K, D in SIZES:
        z = torch.randn(M, D, generator=g).to(device)
        e = torch.randn(K, D, generator=g).to(device)
        fns = {name: (lambda fn=fn: fn(z, e)) for name, fn in VARIANTS.items()}
        _common.interleave(fns, 2, sync)  # warm-up
        times = _common.interleave(fns, args.rounds, sync)
        ms = {k: 1000 * _common.median(v) for k, v in times.items()}
        ratios = {k: _common.round_ratios(times[k], times["vqlog"])
                  for k in ("library", "gemm+min")}
        results.append({"M": M, "K": K, "D": D, "seconds": times, "ms_median": ms,
                        "ratio_to_vqlog_median": {k: _common.median(r) for k, r in ratios.items()}})
        cells = [f"{ms[k]:.2f}" for k in VARIANTS]
        cells += [f"{_common.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})" for r in ratios.values()]
        rows.append([M, K, D, *cells])
        print(f"M {M} K {K} D {D}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()),
              flush=True)
    text = _common.render_table(
        ["M", "K", "D", "library ms", "gemm+min ms", "vqlog ms", "library / vqlog",
         "gemm+min / vqlog"], rows)
    print()
    print(text)
    path = _common.write_device_result("nearest", args.device, info, {
        "rounds": args.rounds, "results": results, "table": text}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
