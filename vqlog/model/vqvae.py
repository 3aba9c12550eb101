"""The log's S4D-VQ-VAE.

Encoder: (standardized input) -> 1x1 in-projection -> S4D blocks -> downsample -> BN + MLP -> z
Decoder: MLP -> upsample -> S4D blocks -> BN + MLP -> 1x1 out-projection
The quantizer sits between them; `downsample` samples share one code.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from vqlog.config import Config
from vqlog.model.quantizer import QuantizerOutput, build_quantizer
from vqlog.model.s4d import S4DBlock


class VQVAEOutput(NamedTuple):
    recon: Tensor  # (B, L) reconstruction
    z: Tensor  # (B, T, D) encoder output before quantization, T = L / downsample
    quant: QuantizerOutput


def mlp(d_in: int, d_out: int, kind: str) -> nn.Module:
    """The log's "MLP" as pointwise (1x1) convolutions: `relu` = Linear-ReLU-Linear, `linear` = Linear."""
    if kind == "linear":
        return nn.Conv1d(d_in, d_out, 1)
    return nn.Sequential(nn.Conv1d(d_in, d_out, 1), nn.ReLU(), nn.Conv1d(d_out, d_out, 1))


def bn_mlp(d_in: int, d_out: int, cfg: Config) -> nn.Module:
    """The log's "BN + MLP" block; BN is switched by the `BN` column."""
    norm = nn.BatchNorm1d(d_in) if cfg.BN else nn.Identity()
    return nn.Sequential(norm, mlp(d_in, d_out, cfg.MLP))


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
        self.post = bn_mlp(H, H, cfg)
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
