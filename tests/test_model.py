"""The S4D-VQ-VAE: shapes for every downsample and quantizer, gradients through every quantizer,
and the log's BN / MLP switches building the modules they name."""

import pytest
import torch
from torch import nn

from vqlog.config import DOWNSAMPLES, QUANTIZERS
from vqlog.model.vqvae import VQVAE, VQVAEOutput

B, L = 4, 32


def windows(seed=0) -> torch.Tensor:
    return torch.randn(B, L, generator=torch.Generator().manual_seed(seed))  # (B L)


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("downsample", DOWNSAMPLES)
def test_forward_shapes(downsample, quantizer, tiny):
    torch.manual_seed(0)
    cfg = tiny(downsample=downsample, quantizer=quantizer)
    model = VQVAE(cfg)
    out = model(windows())
    T = L // downsample
    assert isinstance(out, VQVAEOutput)
    assert out.recon.shape == (B, L)
    assert out.z.shape == out.quant.z_q.shape == (B, T, cfg.embedding_dim) == (B, cfg.codes_per_window, 8)
    assert torch.isfinite(out.recon).all()
    if quantizer == "none":
        assert out.quant.indices is None and model.codebook_size == 0
    else:
        assert out.quant.indices.shape == (B, T)
        assert 0 <= out.quant.indices.min() and out.quant.indices.max() < model.codebook_size


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_eval_mode_forward_shapes(quantizer, tiny):
    torch.manual_seed(0)
    model = VQVAE(tiny(quantizer=quantizer))
    model(windows())  # train-mode call: BN statistics, k-means init
    model.eval()
    with torch.no_grad():
        out = model(windows(seed=1))
    assert out.recon.shape == (B, L) and torch.isfinite(out.recon).all()


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_gradients_reach_the_encoders_first_layer(quantizer, tiny):
    torch.manual_seed(0)
    model = VQVAE(tiny(quantizer=quantizer))
    x = windows()
    out = model(x)
    loss = ((out.recon - x) ** 2).mean() + out.quant.loss
    loss.backward()
    grad = model.encoder.in_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0  # straight-through / rotation trick / FSQ rounding pass gradients


def test_vq_codebook_gets_gradients_from_its_loss(tiny):
    torch.manual_seed(0)
    model = VQVAE(tiny(quantizer="vq"))
    model(windows()).quant.loss.backward()
    grad = model.quantizer.codebook.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("BN", [True, False])
def test_bn_switch(BN, tiny):
    model = VQVAE(tiny(BN=BN))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    # one BN before the encoder's MLP head, one in the decoder's "BN + MLP"
    assert len(norms) == (2 if BN else 0)
    assert all(n.num_features == 8 for n in norms)


@pytest.mark.parametrize("MLP, convs, relus", [("relu", 2, 1), ("linear", 1, 0)])
def test_mlp_switch(MLP, convs, relus, tiny):
    model = VQVAE(tiny(MLP=MLP, embedding_dim=12))
    for block in (model.encoder.head[1], model.decoder.pre, model.decoder.post[1]):
        mods = list(block.modules()) if isinstance(block, nn.Sequential) else [block]
        assert sum(isinstance(m, nn.Conv1d) for m in mods) == convs
        assert sum(isinstance(m, nn.ReLU) for m in mods) == relus
    assert model.encoder.head[1](torch.randn(2, 8, 5)).shape == (2, 12, 5)  # (B H T) -> (B D T)
    assert model.decoder.pre(torch.randn(2, 12, 5)).shape == (2, 8, 5)  # (B D T) -> (B H T)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_n_layers_s4d_blocks_in_each_stack(n_layers, tiny):
    model = VQVAE(tiny(n_layers=n_layers))
    assert len(model.encoder.blocks) == len(model.decoder.blocks) == n_layers


def test_same_seed_same_weights(tiny):
    torch.manual_seed(3)
    a = VQVAE(tiny()).state_dict()
    torch.manual_seed(3)
    b = VQVAE(tiny()).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _channel_first(model: VQVAE, x: torch.Tensor, z_q: torch.Tensor):
    """The encoder and decoder as their modules compute them on (B, C, L): each module's own
    forward, one after another (the formulation the channel-last stacks must equal)."""
    e, d = model.encoder, model.decoder
    for block in [*e.blocks, *d.blocks]:
        block.channel_last = False
    try:
        z = e.head(e.down(e.blocks(e.in_proj(x.unsqueeze(1))))).transpose(1, 2)  # (B T D)
        h = d.blocks(d.up(d.pre(z_q.transpose(1, 2))))  # (B H L)
        return z, d.out_proj(d.post(h)).squeeze(1)  # (B L)
    finally:
        for block in [*e.blocks, *d.blocks]:
            block.channel_last = True


@pytest.mark.parametrize("downsample", DOWNSAMPLES)
@pytest.mark.parametrize("BN, MLP", [(True, "relu"), (False, "linear"), (True, "linear"), (False, "relu")])
def test_channel_last_stacks_equal_the_modules_own_forward(downsample, BN, MLP, tiny):
    """Encoder and decoder outputs and every parameter's gradient, in train mode (BatchNorm's
    batch statistics) and float64, so that only rounding could tell them apart."""
    torch.manual_seed(0)
    cfg = tiny(downsample=downsample, BN=BN, MLP=MLP)
    model = VQVAE(cfg).double()
    x = windows().double()
    z_q = torch.randn(B, L // downsample, cfg.embedding_dim, dtype=torch.float64)
    got = [model.encoder(x), model.decoder(z_q)]
    want = _channel_first(model, x, z_q)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    grads = []
    for outs in (got, want):
        model.zero_grad()
        sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert ("encoder.down.weight" in grads[0]) == (downsample > 1)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-11, msg=name)
