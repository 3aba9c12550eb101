"""Quantizers behind one interface: `vq`, `vq_ema`, `fsq`, `none`.

Each takes z (B, T, D) and returns a `QuantizerOutput`. `vq` is the log's classic VQ, written here
(it is small, and its fused fast path is tested against the paper's formulation in
`vqlog.model.reference`); `vq_ema` and `fsq` come from vector-quantize-pytorch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from vqlog.config import Config


class QuantizerOutput(NamedTuple):
    z_q: Tensor  # (B, T, D) quantized; gradients pass straight through to z
    indices: Tensor | None  # (B, T) code per position; None for `none`
    loss: Tensor  # scalar the quantizer adds to the reconstruction loss (already weighted)
    commitment: Tensor  # scalar ||z - sg(e)||^2, unweighted, for logging


SEARCH_BLOCK = 1 << 19  # scores per block of the CPU search: 2 MiB of float32, held in cache


def nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest code for every row of z (M, D), codebook (K, D) -> (M,).

    Matmul form: argmin ||z||^2 - 2 z.e + ||e||^2 needs one (M, K) GEMM and no (M, K, D) tensor;
    ||z||^2 is the same for every code, so it is dropped. The index is that of the first minimum
    of a row, as `argmin` gives it.

    On the CPU the rows go in blocks of SEARCH_BLOCK / K, so that a block's scores stay in cache
    between the GEMM that writes them and the pass that reads them, and each block's scores are
    computed transposed and negated, (K, rows) = 2 e.z - ||e||^2: as a channels-last image of
    `rows` channels, one code per pixel, `max_pool2d` over the K pixels returns the best code's
    index with a kernel vectorised across rows. `Tensor.min(dim=1)` on (rows, K) finds the index
    one row at a time. At M 2048 to 8192, K 128 to 1024 (batch 32 to 128 at the seed spec's code
    rate; torch 2.13, one thread) the search takes 0.55x to 0.92x the time of the whole (M, K)
    GEMM and `min` (`benchmarks/bench_nearest.py`). On a GPU it is that GEMM and `min`: one
    kernel each, no host loop. A row holding NaN gets the index of one of its NaN scores, as with
    `min`. No gradient flows through an index, so none is recorded.

    Codes that are the very same vector share the first one's index, as the reference's
    distances make them (`first_of_equal_codes`): a GEMM may round their scores apart, since
    its kernel computes different rows of its output in different orders (MKL on AVX-512 did).
    """
    with torch.no_grad():
        first = first_of_equal_codes(codebook)
    if z.device.type != "cpu":
        scores = torch.addmm((codebook * codebook).sum(1), z, codebook.t(), alpha=-2.0)  # (M K)
        return first[scores.min(dim=1).indices]  # (M)
    K, M = codebook.shape[0], z.shape[0]
    rows = max(1, min(M, max(64, SEARCH_BLOCK // K)))
    indices = torch.empty(M, dtype=torch.long, device=z.device)  # (M)
    with torch.no_grad():
        norms = (codebook * codebook).sum(1)[:, None]  # (K 1)
        block = z.new_empty(K, rows)  # (K rows), reused by every full block
        for start in range(0, M, rows):
            part = z[start:start + rows]  # (m D)
            m = part.shape[0]
            out = block if m == rows else z.new_empty(K, m)  # the last, shorter block
            torch.addmm(norms, codebook, part.t(), beta=-1.0, alpha=2.0, out=out)  # (K m) = -scores
            image = out.view(1, K, 1, m).permute(0, 3, 1, 2)  # (1 m K 1), channels-last memory
            _, best = F.max_pool2d(image, kernel_size=(K, 1), return_indices=True)  # (1 m 1 1)
            indices[start:start + m] = best.view(m)
    return first[indices]


def first_of_equal_codes(codebook: Tensor) -> Tensor:
    """For each code of codebook (K, D), the smallest index of a code that is exactly the same
    vector (itself when it has no twin), (K,). Exactly equal codes have exactly equal squared
    norms, so only codes with the norm of an earlier one are compared, against the first code of
    that norm: O(K log K + K·D), with no host sync on a GPU. (Two different codes of the same
    norm before a twin would hide it; that takes equal float norms of different vectors.)"""
    norms = (codebook * codebook).sum(1)  # (K)
    order = norms.argsort(stable=True)  # equal norms stay in index order
    sorted_norms = norms[order]
    # The first code of each one's norm. A NaN norm (a diverged codebook) sorts last and would
    # be searched one past the end: kept in range, the NaN goes on to the divergence check
    # instead of an out-of-range index (on a GPU a device-side assert that ends the process).
    at = torch.searchsorted(sorted_norms, norms).clamp_(max=len(norms) - 1)
    first = order[at]
    own = torch.arange(len(norms), device=codebook.device)  # (K)
    if codebook.device.type == "cpu":  # only the codes with an earlier code's norm (often none)
        late = (first != own).nonzero().squeeze(1)
        same = (codebook[first[late]] == codebook[late]).all(1)
        return own.index_put_((late,), torch.where(same, first[late], late))
    same = (codebook[first] == codebook).all(1)  # (K): every code, no data-dependent shape
    return torch.where(same, first, own)


class _StraightThrough(torch.autograd.Function):
    """The VQ-VAE's code lookup, straight-through estimator and two losses in one pass over the
    (B, T, D) tensors each way. Both losses are mean((e - z)^2) in value and differ only in where
    the gradient goes, so with r = e - z and n elements: loss = (1 + beta)·|r|^2/n,
    d loss/d e = 2r/n, d loss/d z = -beta·2r/n. z_q is the gathered codes e themselves, and the
    codebook's gradient is one index_add of r into (K, D): no (B, T, D) gradient of e and no
    embedding backward. Autograd of the paper's formulation walks the tensors ~9 times (two MSEs
    and their zero-filled backward buffers, the detached difference, the sum of z's two
    gradients, the embedding's scatter)."""

    @staticmethod
    def forward(ctx, z: Tensor, codebook: Tensor, indices: Tensor,
                beta: float) -> tuple[Tensor, Tensor, Tensor]:
        e = codebook.index_select(0, indices).view_as(z)  # (B T D)
        r = e - z  # (B T D)
        flat = r.reshape(-1)  # (BTD)
        mse = torch.dot(flat, flat) / flat.numel()
        ctx.save_for_backward(r, indices)
        ctx.beta, ctx.codebook_size = beta, codebook.shape[0]
        commitment = mse.detach().clone()
        ctx.mark_non_differentiable(commitment)
        return e, (1 + beta) * mse, commitment

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_zq: Tensor, grad_loss: Tensor,
                 _: Tensor) -> tuple[Tensor, Tensor, None, None]:
        r, indices = ctx.saved_tensors
        D = r.shape[-1]
        scale = grad_loss * (2.0 / r.numel())  # a 0-dim tensor: no device sync on a GPU
        # The codebook loss pulls each used code towards the mean of its z's.
        grad_codebook = r.new_zeros(ctx.codebook_size, D).index_add_(0, indices, r.reshape(-1, D))
        grad_codebook.mul_(scale)
        grad_z = torch.addcmul(grad_zq, r, scale, value=-ctx.beta)  # straight-through + commitment
        return grad_z, grad_codebook, None, None


def straight_through(z: Tensor, codebook: Tensor, indices: Tensor,
                     beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """z (B, T, D), codebook (K, D), indices (B·T,) -> z_q (B, T, D) = the codes e =
    codebook[indices] with the gradient of z, the loss ||sg(z) - e||^2 + beta ||z - sg(e)||^2
    (means over elements) and the commitment ||z - sg(e)||^2 (detached). Fused: see
    _StraightThrough."""
    return _StraightThrough.apply(z, codebook, indices, beta)


class VQ(nn.Module):
    """Classic VQ (van den Oord et al. 2017, arXiv 1711.00937): a learned codebook, the codebook
    loss ||sg(z) - e||^2 plus beta * commitment ||z - sg(e)||^2, and the straight-through estimator.
    """

    def __init__(self, dim: int, codebook_size: int, commitment: float):
        super().__init__()
        self.codebook = nn.Parameter(torch.empty(codebook_size, dim))
        nn.init.uniform_(self.codebook, -1.0 / codebook_size, 1.0 / codebook_size)
        self.commitment_weight = commitment
        self.codebook_size = codebook_size

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (B, T, D) -> QuantizerOutput with z_q (B, T, D), indices (B, T)."""
        B, T, D = z.shape
        flat = z.reshape(B * T, D)  # (BT D)
        indices = nearest_code(flat.detach(), self.codebook.detach())  # (BT)
        z_q, loss, commitment = straight_through(z, self.codebook, indices, self.commitment_weight)
        return QuantizerOutput(z_q, indices.view(B, T), loss, commitment)


class EMAVQ(nn.Module):
    """EMA codebook with k-means init, dead-code expiry and the rotation trick (arXiv 2410.06424),
    all from vector-quantize-pytorch's `VectorQuantize`."""

    def __init__(self, dim: int, codebook_size: int, commitment: float):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.vq = VectorQuantize(
            dim=dim,
            codebook_size=codebook_size,
            decay=0.99,
            kmeans_init=True,
            kmeans_iters=10,
            threshold_ema_dead_code=2,  # codes used < 2 times (EMA count) are re-seeded from the batch
            rotation_trick=True,
            commitment_weight=commitment,
        )
        self.codebook_size = codebook_size

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (B, T, D) -> QuantizerOutput with z_q (B, T, D), indices (B, T)."""
        z_q, indices, loss = self.vq(z)  # (B T D), (B T), scalar (weighted commitment)
        commitment = F.mse_loss(z.detach(), z_q.detach())
        return QuantizerOutput(z_q, indices, loss.reshape(()), commitment)


# FSQ levels per codebook size, from Table 1 of Mentzer et al. 2023 (arXiv 2309.15505) where it
# has a row, else a close product. The effective codebook size is the product of the levels.
# 8..32 are not in the paper; without them a small embedding_num (the smoke sweep's 16 or 32)
# silently got 64 codes. No level is 2: the library needs preserve_symmetry for that.
FSQ_LEVELS = {
    8: (8,),
    16: (4, 4),
    32: (8, 4),
    64: (8, 8),
    128: (8, 4, 4),
    256: (8, 6, 5),
    512: (8, 8, 8),
    1024: (8, 5, 5, 5),
    2048: (8, 8, 6, 5),
    4096: (7, 5, 5, 5, 5),
}


def fsq_levels(embedding_num: int) -> tuple[int, ...]:
    """The FSQ levels whose product is closest to `embedding_num` on a log scale."""
    return min(FSQ_LEVELS.values(), key=lambda lv: abs(math.log(math.prod(lv) / embedding_num)))


class FSQ(nn.Module):
    """Finite scalar quantization: project to a few bounded scalars and round each one. No
    codebook to collapse, no auxiliary loss."""

    def __init__(self, dim: int, embedding_num: int):
        super().__init__()
        from vector_quantize_pytorch import FSQ as _FSQ

        self.levels = fsq_levels(embedding_num)
        self.fsq = _FSQ(levels=list(self.levels), dim=dim)
        self.codebook_size = math.prod(self.levels)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (B, T, D) -> QuantizerOutput with z_q (B, T, D), indices (B, T)."""
        z_q, indices = self.fsq(z)  # (B T D), (B T)
        zero = z.new_zeros(())
        return QuantizerOutput(z_q, indices.long(), zero, zero)


class Identity(nn.Module):
    """`none`: no quantizer, the log's "how well S4D itself works" baseline."""

    codebook_size = 0

    def forward(self, z: Tensor) -> QuantizerOutput:
        zero = z.new_zeros(())
        return QuantizerOutput(z, None, zero, zero)


def build_quantizer(cfg: Config) -> nn.Module:
    """The quantizer a config names; `.codebook_size` is the effective number of codes."""
    if cfg.quantizer == "vq":
        return VQ(cfg.embedding_dim, cfg.embedding_num, cfg.commitment)
    if cfg.quantizer == "vq_ema":
        return EMAVQ(cfg.embedding_dim, cfg.embedding_num, cfg.commitment)
    if cfg.quantizer == "fsq":
        return FSQ(cfg.embedding_dim, cfg.embedding_num)
    return Identity()
