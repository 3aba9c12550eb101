"""The log's S4D-VQ-VAE.

Encoder: (standardized input) -> 1x1 in-projection -> S4D blocks -> downsample -> BN + MLP -> z
Decoder: MLP -> upsample -> S4D blocks -> BN + MLP -> 1x1 out-projection
The quantizer sits between them; `downsample` samples share one code.

The modules are the usual Conv1d / ConvTranspose1d / BatchNorm1d ones (their parameters and state
dict), but the stacks keep channel-last (B, L, H) memory between them: every 1x1 and strided
convolution is then one GEMM over contiguous rows, and the S4D blocks' LayerNorm needs no
transposed copy. The results are those of the (B, H, L) formulation up to float rounding
(tests/test_model.py checks it against the modules' own forward).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
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

    `conv` is Pointwise at the code rate; the decoder's full-rate block passes conv1x1 (a plain
    Conv1d), which the decoder applies to channel-last rows through `channel_last`.
    """
    if kind == "linear":
        return conv(d_in, d_out)
    return nn.Sequential(conv(d_in, d_out), nn.ReLU(), conv(d_out, d_out))


def conv1x1(d_in: int, d_out: int) -> nn.Conv1d:
    """A plain 1x1 Conv1d (its own forward takes (B, C, L)), for the decoder's full-rate block."""
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
        self.blocks = nn.Sequential(*[S4DBlock(H, cfg.d_state, dropout=cfg.dropout, channel_last=True)
                                      for _ in range(cfg.n_layers)])
        # A strided conv pools `ds` samples into one code position; identity at ds = 1.
        self.down = nn.Conv1d(H, H, ds, stride=ds) if ds > 1 else nn.Identity()
        self.head = bn_mlp(H, cfg.embedding_dim, cfg)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L) standardized windows -> z: (B, T, D)."""
        w = self.in_proj.weight[:, 0, 0]  # (H): a 1x1 conv from one channel is an outer product
        h = torch.addcmul(self.in_proj.bias, x[..., None], w)  # (B L H)
        h = self.blocks(h)  # (B L H)
        if isinstance(self.down, nn.Conv1d):
            # stride = kernel = ds: the (B, T, ds*H) rows of h are the windows, one GEMM.
            H_out, H_in, ds = self.down.weight.shape
            B, L, _ = h.shape
            T = L // ds  # the conv drops a tail shorter than ds
            W = self.down.weight.permute(0, 2, 1).reshape(H_out, ds * H_in)  # [o, k*H + i]
            h = F.linear(h[:, : T * ds].reshape(B, T, ds * H_in), W, self.down.bias)  # (B T H)
        return self.head(h.transpose(1, 2)).transpose(1, 2)  # Pointwise: (B T C) memory throughout


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        H, ds = cfg.d_model, cfg.downsample
        self.pre = mlp(cfg.embedding_dim, H, cfg.MLP)
        self.up = nn.ConvTranspose1d(H, H, ds, stride=ds) if ds > 1 else nn.Identity()
        self.blocks = nn.Sequential(*[S4DBlock(H, cfg.d_state, dropout=cfg.dropout, channel_last=True)
                                      for _ in range(cfg.n_layers)])
        self.post = bn_mlp(H, H, cfg, conv1x1)  # full rate, applied channel-last (channel_last)
        self.out_proj = nn.Conv1d(H, 1, 1)

    def forward(self, z_q: Tensor) -> Tensor:
        """z_q: (B, T, D) -> reconstruction (B, L)."""
        h = self.pre(z_q.transpose(1, 2)).transpose(1, 2)  # Pointwise: (B T H), contiguous
        if isinstance(self.up, nn.ConvTranspose1d):
            # stride = kernel = ds: each code position writes ds samples, one GEMM to (B, T, ds*H).
            H_in, H_out, ds = self.up.weight.shape
            B, T, _ = h.shape
            M = self.up.weight.permute(0, 2, 1).reshape(H_in, ds * H_out)  # [i, k*H + o]
            h = F.linear(h, M.t(), self.up.bias.repeat(ds)).view(B, T * ds, H_out)  # (B L H)
        h = self.blocks(h)  # (B L H)
        h = channel_last(self.post, h)  # (B L H)
        return channel_last(self.out_proj, h).squeeze(-1)  # (B L)


def channel_last(module: nn.Module, x: Tensor) -> Tensor:
    """A block of BatchNorm1d / 1x1 Conv1d / ReLU / Identity modules (nested Sequentials of them)
    applied to channel-last x (..., C): what the module computes on (B, C, L), as GEMMs over rows.
    BatchNorm's statistics are over all rows per channel, as over (B, L) on (B, C, L)."""
    if isinstance(module, nn.Sequential):
        for m in module:
            x = channel_last(m, x)
        return x
    if isinstance(module, nn.Conv1d) and module.kernel_size == (1,) and module.groups == 1:
        return F.linear(x, module.weight[:, :, 0], module.bias)
    if isinstance(module, nn.BatchNorm1d):
        return module(x.reshape(-1, x.shape[-1])).view_as(x)
    if isinstance(module, (nn.ReLU, nn.Identity)):
        return module(x)
    raise TypeError(f"no channel-last form for {type(module).__name__}")


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
