"""The log's S4D-VQ-VAE.

Encoder: (standardized input) -> 1x1 in-projection -> S4D blocks -> downsample -> BN + MLP -> z
Decoder: MLP -> upsample -> S4D blocks -> BN + MLP -> 1x1 out-projection
The quantizer sits between them; `downsample` samples share one code.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from vqlog.config import Config
from vqlog.model.quantizer import QuantizerOutput, build_quantizer
from vqlog.model.s4d import S4DBlock


class VQVAEOutput(NamedTuple):
    recon: Tensor  # (B, L) reconstruction
    z: Tensor  # (B, T, D) encoder output before quantization, T = L / downsample
    quant: QuantizerOutput


class Pointwise(nn.Conv1d):
    """A 1x1 Conv1d (same parameters, state dict and (B, C, T) interface) computed as one GEMM
    over channel-last memory. Its output is a (B, C, T) view of a contiguous (B, T, C) tensor, so
    a following Pointwise, or the encoder's final transpose to (B, T, D), needs no copy. On the
    code-rate MLPs (T = L / downsample, C up to 512) oneDNN's 1x1 convolution ran as B small
    GEMMs plus layout copies."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, T) -> (B, C_out, T), stored channel-last."""
        y = F.linear(x.transpose(1, 2), self.weight[:, :, 0], self.bias)  # (B T C_out)
        return y.transpose(1, 2)  # (B C_out T)


Conv = Callable[[int, int], nn.Module]  # (d_in, d_out) -> a 1x1 convolution


def mlp(d_in: int, d_out: int, kind: str, conv: Conv = Pointwise) -> nn.Module:
    """The log's "MLP" as pointwise (1x1) convolutions: `relu` = Linear-ReLU-Linear, `linear` = Linear.

    `conv` is Pointwise at the code rate; the decoder's full-rate block passes conv1x1, whose
    oneDNN kernel was as fast or faster on a contiguous (B, H, L) input (Pointwise would copy it).
    """
    if kind == "linear":
        return conv(d_in, d_out)
    return nn.Sequential(conv(d_in, d_out), nn.ReLU(), conv(d_out, d_out))


def conv1x1(d_in: int, d_out: int) -> nn.Conv1d:
    """oneDNN's own 1x1 convolution, for full-rate (B, H, L) inputs."""
    return nn.Conv1d(d_in, d_out, kernel_size=1)


def bn_mlp(d_in: int, d_out: int, cfg: Config, conv: Conv = Pointwise) -> nn.Module:
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
        self.post = bn_mlp(H, H, cfg, conv1x1)  # full rate (B H L)
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
