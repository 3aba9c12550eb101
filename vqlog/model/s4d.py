"""S4D: the diagonal state-space layer (Gu et al. 2022, https://arxiv.org/abs/2206.11893).

One SSM per channel h, with N/2 complex modes n (their conjugates are implied, hence the 2·Re):

    x'(t) = A x(t) + B u(t),   y(t) = 2·Re(C x(t)) + D u(t),
    A = -exp(log_A_real) + i·A_imag,   B = 1

Zero-order hold with step Δ_h = exp(log_dt[h]) turns it into a causal convolution kernel

    K[h, l] = 2·Re Σ_n C[h,n] · (exp(Δ_h A[h,n]) − 1) / A[h,n] · exp(Δ_h A[h,n] · l)

which is applied with an FFT. `kernel` computes K by a block-Vandermonde matmul and `fft_conv`
has a hand-written backward; both are tested against the straightforward formulation of
state-spaces/s4 in `vqlog.model.reference`.
Shapes use the paper's names: B batch, H channels (d_model), N state size (d_state; N/2 complex
modes), L length.

C is stored as a real tensor (H, N/2, 2) = view_as_real of the complex C, as everywhere in this
module, so optimizers and state dicts only ever see real parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# Defaults of the timescale init, in one place (S4D paper, sec. 4: Δ log-uniform in [1e-3, 1e-1]).
DT_MIN = 1e-3
DT_MAX = 1e-1


def discretize(
    log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor
) -> tuple[Tensor, Tensor]:
    """ZOH: returns dtA = Δ·A and C' = C·(exp(ΔA) − 1)/A, both complex (H, N/2)."""
    A = torch.complex(-torch.exp(log_A_real), A_imag)  # (H N/2)
    dtA = A * torch.exp(log_dt)[:, None]  # (H N/2)
    C_bar = torch.view_as_complex(C) * (torch.exp(dtA) - 1) / A  # (H N/2)
    return dtA, C_bar


def _powers(dtA: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
    """Re and Im of exp(dtA)**p = exp(dtA·p): dtA (H, N/2), p (P,) -> two (H, N/2, P) tensors."""
    magnitude = torch.exp(dtA.real[:, :, None] * p)  # (H N/2 P)
    phase = dtA.imag[:, :, None] * p  # (H N/2 P)
    return magnitude * torch.cos(phase), magnitude * torch.sin(phase)


def kernel(log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor, L: int) -> Tensor:
    """The kernel K (H, L) in O(H·N·√L) memory plus one batched matmul (the reference
    materialises the whole O(H·N·L) complex Vandermonde tensor).

    Block Vandermonde: write l = a·m + b with a = ⌈√L⌉, 0 <= b < a, 0 <= m < M = ⌈L/a⌉. Then
    z^l = z^(a·m)·z^b, so for every channel h

        K[h, a·m + b] = 2·Re Σ_n P[h,m,n]·Q[h,n,b],   P = C'·z^(a·m)  (M, N/2),   Q = z^b  (N/2, a)

    is a small complex matmul. Re(P·Q) = Re P·Re Q − Im P·Im Q is one real bmm over the stacked
    parts, so no complex (H, N/2, L) tensor is ever built, forward or backward.

    log_dt (H,), log_A_real (H, N/2), A_imag (H, N/2), C (H, N/2, 2) -> K (H, L).
    """
    dtA, C_bar = discretize(log_dt, log_A_real, A_imag, C)
    H = dtA.shape[0]
    a = math.isqrt(L - 1) + 1  # ⌈√L⌉ for L >= 1: balances the sizes of P and Q
    M = -(-L // a)  # ⌈L/a⌉ blocks of a steps cover 0..L-1 (and a little past it)
    steps = torch.arange(max(a, M), device=log_dt.device, dtype=log_dt.dtype)
    z_am_re, z_am_im = _powers(dtA, steps[:M] * a)  # (H N/2 M)
    z_b_re, z_b_im = _powers(dtA, steps[:a])  # (H N/2 a)
    c_re, c_im = C_bar.real[:, :, None], C_bar.imag[:, :, None]  # (H N/2 1)
    P_re = c_re * z_am_re - c_im * z_am_im  # C'·z^(a·m), (H N/2 M)
    P_im = c_re * z_am_im + c_im * z_am_re  # (H N/2 M)
    P = torch.cat([P_re, P_im], dim=1)  # (H N M)
    Q = torch.cat([z_b_re, -z_b_im], dim=1)  # (H N a)
    K = 2 * torch.bmm(P.transpose(1, 2), Q)  # (H M a)
    return K.reshape(H, M * a)[:, :L]  # (H L)


class _FFTConv(torch.autograd.Function):
    """The causal FFT convolution with a hand-written backward: two real FFTs instead of the
    full-length complex FFT plus zero-filled copy that autograd makes of `rfft(u)`'s backward.
    With G = rfft(grad_y), U = rfft(u), K = rfft(k), all zero-padded to 2L:

        grad_u = irfft(G·conj(K))[:L]        (a causal correlation with k)
        grad_k = irfft(Σ_b G·conj(U))[:L]    (summed over the batch before the inverse FFT)

    The padding makes both exact: lags t − s < 0 land in the zero half of the padded k or u.
    """

    @staticmethod
    def forward(ctx, u: Tensor, k: Tensor) -> Tensor:
        L = u.shape[-1]
        u_f = torch.fft.rfft(u, n=2 * L)  # (B H L+1)
        k_f = torch.fft.rfft(k, n=2 * L)  # (H L+1)
        ctx.save_for_backward(u_f, k_f)
        return torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L]  # (B H L)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None]:
        u_f, k_f = ctx.saved_tensors
        L = grad_y.shape[-1]
        g_f = torch.fft.rfft(grad_y, n=2 * L)  # (B H L+1), this backward's own buffer
        grad_u = grad_k = None
        if ctx.needs_input_grad[0]:
            grad_u = torch.fft.irfft(g_f * k_f.conj(), n=2 * L)[..., :L]  # (B H L)
        if ctx.needs_input_grad[1]:
            # Σ_b G·conj(U) = conj(Σ_b conj(G)·U): conjugating and multiplying g_f in place
            # costs no (B, H, L+1) buffer and no conj() copy of the saved u_f, which stays as it
            # was (a second backward through the same graph is still exact).
            torch.view_as_real(g_f)[..., 1].neg_()  # g_f <- conj(g_f)
            batch_dims = tuple(range(g_f.dim() - k_f.dim()))
            g_u = g_f.mul_(u_f).sum(batch_dims).conj()  # (H L+1)
            grad_k = torch.fft.irfft(g_u, n=2 * L)[..., :L]  # (H L)
        return grad_u, grad_k


def fft_conv(u: Tensor, k: Tensor) -> Tensor:
    """Causal convolution y[b,h,t] = Σ_{s<=t} k[h,s]·u[b,h,t−s] in O(L log L): u (B, H, L),
    k (H, L) -> y (B, H, L). Both are zero-padded to 2L so the FFT's circular convolution equals
    the linear one on the first L outputs (no wrap-around from the future)."""
    return _FFTConv.apply(u, k)


class S4DKernel(nn.Module):
    """The SSM parameters of H channels with S4D-Lin init; `forward(L)` returns the kernel (H, L).

    S4D-Lin (paper, section 4): A[h,n] = −0.5 + i·π·n, Δ log-uniform in [DT_MIN, DT_MAX],
    C complex standard normal (variance 0.5 per part). log_dt, log_A_real and A_imag are the
    SSM parameters that `ssm_parameters` collects for their own optimizer group.
    """

    def __init__(self, d_model: int, d_state: int):
        super().__init__()
        if d_state < 2 or d_state % 2:
            raise ValueError(
                f"d_state must be an even number >= 2 (N/2 complex modes), got {d_state}"
            )
        H, N2 = d_model, d_state // 2
        log_dt = torch.rand(H) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)  # (H)
        self.log_dt = nn.Parameter(log_dt)
        self.log_A_real = nn.Parameter(torch.full((H, N2), math.log(0.5)))  # A.real = -0.5
        self.A_imag = nn.Parameter(math.pi * torch.arange(N2).float().repeat(H, 1))  # (H N/2)
        C = torch.randn(H, N2, dtype=torch.cfloat)  # variance 1/2 per part, (H N/2)
        self.C = nn.Parameter(torch.view_as_real(C))  # (H N/2 2)

    def forward(self, L: int) -> Tensor:
        """L -> K (H, L)."""
        return kernel(self.log_dt, self.log_A_real, self.A_imag, self.C, L)


class S4D(nn.Module):
    """One S4D layer: y = GLU(Conv1x1(dropout(GELU(K * u + D·u)))), (B, H, L) -> (B, H, L).

    The result is a (B, H, L) view of channel-last (B, L, H) memory, which is what
    S4DBlock's channel-last stacks add to their residual without a transposed read."""

    def __init__(self, d_model: int, d_state: int, dropout: float = 0.0):
        super().__init__()
        self.kernel = S4DKernel(d_model, d_state)
        self.D = nn.Parameter(torch.randn(d_model))  # skip connection u·D, the SSM's feed-through
        self.dropout = nn.Dropout(dropout)
        # Position-wise mixing of the H channels; the GLU halves 2H back to H.
        self.output = nn.Conv1d(d_model, 2 * d_model, kernel_size=1)

    def forward(self, u: Tensor) -> Tensor:
        """u (B, H, L) -> (B, H, L). The kernel is computed once and shared across the batch."""
        L = u.shape[-1]
        # The skip u·D is lag 0 of the kernel: one convolution, no extra (B H L) pass.
        k = self.kernel(L) + F.pad(self.D[:, None], (0, L - 1))  # (H L)
        # The output 1x1 conv is one GEMM over channel-last rows: the transposed copy of y costs
        # one pass, where oneDNN's 1x1 convolution on (B, H, L) took about 2.7x the GEMMs' time.
        y = fft_conv(u, k).transpose(1, 2).contiguous()  # (B L H)
        y = self.dropout(F.gelu(y))
        o = F.linear(y, self.output.weight[:, :, 0], self.output.bias)  # (B L 2H)
        return F.glu(o, dim=-1).transpose(1, 2)  # (B H L), a view of channel-last memory


class S4DBlock(nn.Module):
    """Pre-norm residual block: x + dropout(S4D(LayerNorm_H(x))), (B, H, L) -> (B, H, L), or
    (B, L, H) -> (B, L, H) with `channel_last` (the parameters and state dict are the same)."""

    def __init__(self, d_model: int, d_state: int, dropout: float = 0.0, channel_last: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.s4d = S4D(d_model, d_state, dropout)
        self.dropout = nn.Dropout(dropout)
        self.channel_last = channel_last

    def forward(self, x: Tensor) -> Tensor:
        """x (B, H, L) -> (B, H, L), or (B, L, H) -> (B, L, H) when channel_last. The norm is per
        time step, so the block stays causal."""
        if self.channel_last:
            # The norm reads the contiguous last dim; the S4D layer gets the (B, H, L) view, whose
            # zero-padding copy for the FFT does the transpose; its result is already channel-last
            # memory, so the residual add reads both operands in order.
            y = self.s4d(self.norm(x).transpose(1, 2))  # (B H L)
            return x + self.dropout(y).transpose(1, 2)  # (B L H)
        z = self.norm(x.transpose(-1, -2)).transpose(-1, -2)  # (B L H) normalised over H -> (B H L)
        return x + self.dropout(self.s4d(z))  # (B H L)


def ssm_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every log_dt, log_A_real and A_imag of the S4DKernels in a module tree.

    The trainer puts these in their own AdamW group (lr <= 1e-3, weight_decay 0), as
    state-spaces/s4 does: they set each mode's timescale and decay, so a large step destabilises
    them, and weight decay would pull log_dt and log_A_real towards 0 (Δ = 1, A.real = −1), which
    has no meaning as a prior. They are found by module type rather than by a flag on the
    Parameter, which a module conversion that swaps Parameters could drop.
    C and D are ordinary weights and are not included.
    """
    return [
        p
        for m in module.modules()
        if isinstance(m, S4DKernel)
        for p in (m.log_dt, m.log_A_real, m.A_imag)
    ]
