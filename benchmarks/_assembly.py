"""The trunk and optimizer of the model a user would otherwise assemble (bench_step's baseline).

vqlog's encoder and decoder keep channel-last (B, L, H) memory between their modules and train
with a fused AdamW. A user who puts the same modules together writes them the way
state-spaces/s4's examples and torch's Conv1d expect, (B, H, L) from module to module, and
trains with torch.optim.AdamW's defaults. `as_user_assembly` gives a vqlog model (its weights
kept) exactly that trunk and marks it for `optimizer_for`; the S4D layers and the quantizer are
bench_step's business.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vqlog.config import Config
from vqlog.model.s4d import S4DBlock
from vqlog.model.vqvae import Decoder, Encoder
from vqlog.train import build_optimizer


class UserEncoder(Encoder):
    def forward(self, x: Tensor) -> Tensor:
        """x (B, L) -> z (B, T, D): each module's own forward on (B, C, L)."""
        h = self.in_proj(x.unsqueeze(1))  # (B H L)
        h = self.down(self.blocks(h))  # (B H T)
        return self.head(h).transpose(1, 2)  # (B T D)


class UserDecoder(Decoder):
    def forward(self, z_q: Tensor) -> Tensor:
        """z_q (B, T, D) -> (B, L): each module's own forward on (B, C, L)."""
        h = self.up(self.pre(z_q.transpose(1, 2)))  # (B H L)
        h = self.post(self.blocks(h))  # (B H L)
        return self.out_proj(h).squeeze(1)  # (B L)


def as_user_assembly(model: nn.Module) -> nn.Module:
    """The model, in place, with the (B, H, L) trunk above; `optimizer_for` gives it a plain
    AdamW."""
    model.encoder.__class__ = UserEncoder
    model.decoder.__class__ = UserDecoder
    for m in model.modules():
        if isinstance(m, S4DBlock):
            m.channel_last = False
    model.user_assembly = True
    return model


def user_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """build_optimizer's three groups (lr and weight decay as s4 sets them) in torch.optim.AdamW
    with its default implementation."""
    groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay", "lr")}
              for g in build_optimizer(model, cfg).param_groups]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def optimizer_for(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """vqlog's build_optimizer for vqlog's models, user_optimizer for a user's assembly."""
    if getattr(model, "user_assembly", False):
        return user_optimizer(model, cfg)
    return build_optimizer(model, cfg)
