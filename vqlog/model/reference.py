"""The oracles: every fast path of the model, computed the straightforward way. Tests and
benchmarks import this module; training never does.

- S4D as state-spaces/s4 `models/s4/s4d.py` computes it: the kernel over a materialised complex
  (H, N/2, L) Vandermonde tensor, the FFT convolution differentiated by autograd, a separate
  D skip.
- The classic VQ as the paper writes it: nearest codes from a full (M, K, D) difference tensor,
  codebook and commitment losses as two MSEs through autograd.

`use_reference(model)` switches a whole model to these forwards in place: the same module tree,
the same parameters, each S4D and VQ module's class swapped for its subclass below, and back
with `s4d=False, quantizer=False`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqlog.model.quantizer import VQ, QuantizerOutput
from vqlog.model.s4d import S4D, discretize


def kernel_reference(
    log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor, L: int
) -> Tensor:
    """The kernel the straightforward way: a materialised Vandermonde tensor and an einsum.

    log_dt (H,), log_A_real (H, N/2), A_imag (H, N/2), C (H, N/2, 2) -> K (H, L).
    Memory and time are O(H·N·L) in complex numbers; the oracle of `s4d.kernel`.
    """
    dtA, C_bar = discretize(log_dt, log_A_real, A_imag, C)
    l = torch.arange(L, device=log_dt.device, dtype=log_dt.dtype)
    vandermonde = torch.exp(dtA[:, :, None] * l)  # (H N/2 L)
    return 2 * torch.einsum("hn,hnl->hl", C_bar, vandermonde).real  # (H L)


def fft_conv_reference(u: Tensor, k: Tensor) -> Tensor:
    """`s4d.fft_conv` as state-spaces/s4 writes it, differentiated by autograd through its three
    FFTs: u (B, H, L), k (H, L) -> y (B, H, L)."""
    L = u.shape[-1]
    k_f = torch.fft.rfft(k, n=2 * L)  # (H L+1)
    u_f = torch.fft.rfft(u, n=2 * L)  # (B H L+1)
    return torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L]  # (B H L)


def direct_causal_conv(u: Tensor, k: Tensor) -> Tensor:
    """The O(L²) definition of the causal convolution: u (B, H, L), k (H, L) -> y (B, H, L)."""
    L = u.shape[-1]
    y = torch.zeros_like(u)  # (B H L)
    for s in range(L):  # add the contribution of lag s: k[h,s]·u[b,h,t−s] for t >= s
        y[..., s:] += k[:, s, None] * u[..., : L - s]
    return y


def nearest_code_reference(z: Tensor, codebook: Tensor) -> Tensor:
    """The search over a full (M, K, D) difference tensor: z (M, D), codebook (K, D) -> (M,)."""
    dist = ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)  # (M K)
    return dist.argmin(dim=1)


def straight_through_reference(z: Tensor, e: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """The VQ-VAE's straight-through estimator and losses as the paper writes them, the oracle of
    `quantizer.straight_through` (which gathers e itself): z, e (B, T, D) -> z_q (B, T, D), the loss
    ||sg(z) - e||^2 + beta ||z - sg(e)||^2 and the commitment ||z - sg(e)||^2 (detached)."""
    codebook_loss = F.mse_loss(e, z.detach())
    commitment = F.mse_loss(z, e.detach())
    z_q = z + (e - z).detach()  # straight-through: forward e, backward identity
    return z_q, codebook_loss + beta * commitment, commitment.detach()


class ReferenceS4D(S4D):
    """An S4D layer computed as state-spaces/s4 does; the same parameters as `S4D`."""

    def forward(self, u: Tensor) -> Tensor:
        """u (B, H, L) -> (B, H, L)."""
        L = u.shape[-1]
        k = kernel_reference(self.kernel.log_dt, self.kernel.log_A_real, self.kernel.A_imag,
                             self.kernel.C, L)  # (H L)
        y = fft_conv_reference(u, k) + u * self.D[:, None]  # (B H L)
        y = self.dropout(F.gelu(y))
        return F.glu(self.output(y), dim=-2)  # (B 2H L) -> (B H L)


class ReferenceVQ(VQ):
    """The classic VQ with the full-difference search and the paper's losses."""

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z: (B, T, D) -> QuantizerOutput with z_q (B, T, D), indices (B, T)."""
        B, T, D = z.shape
        indices = nearest_code_reference(z.reshape(B * T, D).detach(), self.codebook.detach())
        e = F.embedding(indices, self.codebook).view(B, T, D)  # (B T D)
        z_q, loss, commitment = straight_through_reference(z, e, self.commitment_weight)
        return QuantizerOutput(z_q, indices.view(B, T), loss, commitment)


def use_reference(model: nn.Module, s4d: bool = True, quantizer: bool = True) -> nn.Module:
    """Switch `model` (in place) to the reference formulation, or back with False: every S4D
    layer, and the classic VQ. Same parameters, same outputs and gradients up to rounding.
    Returns `model`."""
    for m in model.modules():
        if isinstance(m, S4D):
            m.__class__ = ReferenceS4D if s4d else S4D
        elif isinstance(m, VQ):
            m.__class__ = ReferenceVQ if quantizer else VQ
    return model
