"""The log's S4D-VQ-VAE.

Encoder: (standardized input) -> 1x1 in-projection -> S4D blocks -> downsample -> BN + MLP -> z
Decoder: MLP -> upsample -> S4D blocks -> BN + MLP -> 1x1 out-projection
The quantizer sits between them; `downsample` samples share one code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from vqlog.config import Config
from vqlog.model.quantizer import VQ, QuantizerOutput, build_quantizer
from vqlog.model.s4d import S4D, S4DBlock


class VQVAEOutput(NamedTuple):
    recon: Tensor  # (B, L) reconstruction
    z: Tensor  # (B, T, D) encoder output before quantization, T = L / downsample
    quant: QuantizerOutput


class Pointwise(nn.Conv1d):
    """A 1x1 Conv1d (same parameters, state dict and (B, C, T) interface) computed as one GEMM
    over channel-last memory. Its output is a (B, C, T) view of a contiguous (B, T, C) tensor, so
    a following Pointwise, or the encoder's final transpose to (B, T, D), needs no copy. On the
    code-rate MLPs (T = L / downsample, C up to 512) oneDNN's 1x1 convolution ran as B small
    GEMMs plus layout copies: forward + backward at B 64, T 64, 32 -> 512 took 19 ms vs 9 ms."""

    def __init__(self, d_in: int, d_out: int, kernel_size: int = 1):
        if kernel_size != 1:
            raise ValueError(f"Pointwise is a 1x1 convolution, got kernel_size {kernel_size}")
        super().__init__(d_in, d_out, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, T) -> (B, C_out, T), stored channel-last."""
        y = F.linear(x.transpose(1, 2), self.weight[:, :, 0], self.bias)  # (B T C_out)
        return y.transpose(1, 2)  # (B C_out T)


def mlp(d_in: int, d_out: int, kind: str, conv: type[nn.Conv1d] = Pointwise) -> nn.Module:
    """The log's "MLP" as pointwise (1x1) convolutions: `relu` = Linear-ReLU-Linear, `linear` = Linear.

    `conv` is Pointwise at the code rate; the decoder's full-rate block passes nn.Conv1d, whose
    oneDNN kernel was as fast or faster on a contiguous (B, H, L) input (Pointwise would copy it).
    """
    if kind == "linear":
        return conv(d_in, d_out, 1)
    return nn.Sequential(conv(d_in, d_out, 1), nn.ReLU(), conv(d_out, d_out, 1))


def bn_mlp(d_in: int, d_out: int, cfg: Config, conv: type[nn.Conv1d] = Pointwise) -> nn.Module:
    """The log's "BN + MLP" block; BN is switched by the `BN` column."""
    norm = nn.BatchNorm1d(d_in) if cfg.BN else nn.Identity()
    return nn.Sequential(norm, mlp(d_in, d_out, cfg.MLP, conv))


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        H, ds = cfg.d_model, cfg.downsample
        self.in_proj = nn.Conv1d(1, H, 1)
        self.blocks = nn.Sequential(
            *[S4DBlock(H, cfg.d_state, dropout=cfg.dropout) for _ in range(cfg.n_layers)]
        )
        # A strided conv pools `ds` samples into one code position; identity at ds = 1.
        self.down = nn.Conv1d(H, H, ds, stride=ds) if ds > 1 else nn.Identity()
        self.head = bn_mlp(H, cfg.embedding_dim, cfg)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L) standardized windows -> z: (B, T, D)."""
        h = self.in_proj(x.unsqueeze(1))  # (B H L)
        h = self.blocks(h)  # (B H L)
        h = self.down(h)  # (B H T)
        return self.head(h).transpose(1, 2)  # (B T D)


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        H, ds = cfg.d_model, cfg.downsample
        self.pre = mlp(cfg.embedding_dim, H, cfg.MLP)
        self.up = nn.ConvTranspose1d(H, H, ds, stride=ds) if ds > 1 else nn.Identity()
        self.blocks = nn.Sequential(
            *[S4DBlock(H, cfg.d_state, dropout=cfg.dropout) for _ in range(cfg.n_layers)]
        )
        self.post = bn_mlp(H, H, cfg, nn.Conv1d)  # full rate (B H L)
        self.out_proj = nn.Conv1d(H, 1, 1)

    def forward(self, z_q: Tensor) -> Tensor:
        """z_q: (B, T, D) -> reconstruction (B, L)."""
        h = self.pre(z_q.transpose(1, 2))  # (B H T)
        h = self.up(h)  # (B H L)
        h = self.blocks(h)  # (B H L)
        h = self.post(h)  # (B H L)
        return self.out_proj(h).squeeze(1)  # (B L)


class VQVAE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.quantizer = build_quantizer(cfg)
        self.decoder = Decoder(cfg)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def forward(self, x: Tensor) -> VQVAEOutput:
        """x: (B, L) -> VQVAEOutput(recon (B, L), z (B, T, D), quantizer output)."""
        z = self.encoder(x)  # (B T D)
        quant = self.quantizer(z)
        recon = self.decoder(quant.z_q)  # (B L)
        return VQVAEOutput(recon, z, quant)


def use_reference(model: nn.Module, s4d: bool = True, quantizer: bool = True) -> nn.Module:
    """Switch `model` (in place) to the reference formulation, or back with False: every S4D
    layer computes its kernel and convolution as state-spaces/s4 does, the classic VQ searches a
    full (M, K, D) difference tensor and takes the paper's losses through autograd. Same
    parameters, same outputs and gradients up to rounding: the tests' oracle for the fast path
    (tests/test_reference.py) and the baseline of benchmarks/bench_step.py. Returns `model`."""
    for m in model.modules():
        if isinstance(m, S4D):
            m.reference = s4d
        elif isinstance(m, VQ):
            m.reference = quantizer
    return model
