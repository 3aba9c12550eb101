"""The fast paths equal their references (vqlog/model/reference.py): the whole VQVAE under
`use_reference` (S4D layers as state-spaces/s4 computes them, the VQ's full difference-tensor search
and the paper's losses by autograd), the hand-written FFT convolution backward, the fused VQ
losses, and the channel-last pointwise convolution."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqlog.config import QUANTIZERS
from vqlog.model.quantizer import VQ, straight_through
from vqlog.model.reference import (ReferenceS4D, ReferenceVQ, direct_causal_conv,
                                   fft_conv_reference, straight_through_reference, use_reference)
from vqlog.model.s4d import S4D, fft_conv
from vqlog.model.vqvae import VQVAE, Pointwise

B, L = 3, 32


def run(model: VQVAE, x: torch.Tensor):
    """Forward in training mode and the gradient of the training loss for every parameter; the
    global RNG is reset first, so vq_ema's k-means init draws the same samples in both models."""
    torch.manual_seed(1)
    out = model(x)
    loss = ((out.recon - x) ** 2).mean() + out.quant.loss
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return out, loss, grads


def assert_close_scaled(actual, expected, rtol):
    """allclose with atol relative to the tensor's scale, floored for gradients that are zero in
    exact arithmetic (a bias just before a BatchNorm) and 1e-18 in floating point."""
    atol = max(rtol * expected.abs().max().item(), 1e-14)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# Every quantizer: the S4D stacks, which the reference replaces, are in every model; for `vq`
# the nearest-code search and the losses are replaced too.
@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("downsample", [1, 4])
def test_whole_model_reference_equals_fast_path(quantizer, downsample, tiny):
    torch.manual_seed(0)
    fast = VQVAE(tiny(quantizer=quantizer, downsample=downsample, n_layers=2)).double()
    x = torch.randn(B, L, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    if quantizer == "vq":  # codes drawn from the latents, so the search has real choices to make
        with torch.no_grad():
            z = fast.encoder(x).reshape(-1, 8)  # (B*T D)
            fast.quantizer.codebook.copy_(z[torch.randperm(len(z))[:16]])
    ref = use_reference(copy.deepcopy(fast))
    (out_f, loss_f, grads_f), (out_r, loss_r, grads_r) = run(fast, x), run(ref, x)
    torch.testing.assert_close(out_r.recon, out_f.recon, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out_r.z, out_f.z, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out_r.quant.z_q, out_f.quant.z_q, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(loss_r, loss_f, rtol=1e-9, atol=1e-12)
    if quantizer != "none":
        assert torch.equal(out_r.quant.indices, out_f.quant.indices)
        assert out_f.quant.indices.unique().numel() > 1
    names = [n for n, _ in fast.named_parameters()]
    for name, g_r, g_f in zip(names, grads_r, grads_f):
        assert (g_r is None) == (g_f is None), name
        if g_f is not None:
            assert_close_scaled(g_r, g_f, 1e-8)


def test_use_reference_switches_every_s4d_layer_and_the_vq_and_back(tiny):
    model = VQVAE(tiny(quantizer="vq", n_layers=2))
    s4d = [m for m in model.modules() if isinstance(m, S4D)]
    assert len(s4d) == 2 * 2  # n_layers in the encoder and again in the decoder
    assert use_reference(model) is model
    assert all(type(m) is ReferenceS4D for m in s4d) and type(model.quantizer) is ReferenceVQ
    use_reference(model, s4d=False)
    assert all(type(m) is S4D for m in s4d) and type(model.quantizer) is ReferenceVQ
    use_reference(model, s4d=False, quantizer=False)
    assert all(type(m) is S4D for m in s4d) and type(model.quantizer) is VQ


# --------------------------------------------------------------------------- FFT convolution


@pytest.mark.parametrize("B, H, L", [(1, 1, 1), (2, 3, 7), (3, 4, 64), (2, 5, 101)])
def test_fft_conv_gradients_equal_the_direct_convolution(B, H, L):
    u = torch.randn(B, H, L, dtype=torch.float64, requires_grad=True)
    k = torch.randn(H, L, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(B, H, L, dtype=torch.float64)  # a generic loss: every output matters
    grads = {}
    for fn in (fft_conv, fft_conv_reference, direct_causal_conv):
        y = fn(u, k)
        grads[fn.__name__] = torch.autograd.grad((y * weight).sum(), (u, k))
    for name in ("fft_conv", "fft_conv_reference"):
        for got, want in zip(grads[name], grads["direct_causal_conv"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_fft_conv_backward_leaves_the_graph_as_it_was():
    """The backward works in place on its own spectrum only: a second backward through the same
    graph (retain_graph) gives the same gradients, which a consumed saved tensor would not."""
    u = torch.randn(3, 4, 32, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    y = fft_conv(u, k)
    weight = torch.randn_like(y)
    first = torch.autograd.grad((y * weight).sum(), (u, k), retain_graph=True)
    second = torch.autograd.grad((y * weight).sum(), (u, k))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_fft_conv_passes_gradcheck():
    u = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fft_conv, (u, k))


def test_fft_conv_gradient_of_one_input_only():
    u = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 16, dtype=torch.float64)  # a constant kernel: no gradient asked for it
    (g,) = torch.autograd.grad(fft_conv(u, k).sum(), u)
    (want,) = torch.autograd.grad(direct_causal_conv(u, k).sum(), u)
    torch.testing.assert_close(g, want)


# --------------------------------------------------------------------------- VQ losses


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("use", ["both", "z_q", "loss"])
def test_fused_straight_through_equals_the_papers_losses(beta, use):
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    codebook0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    # Codes used several times (their gradients add up), once, and not at all (zero gradient).
    indices = torch.tensor([0, 3, 3, 1, 0, 3, 5, 1, 0, 3])
    weight = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)  # a decoder's generic loss

    def reference(z, codebook, indices, beta):
        return straight_through_reference(z, F.embedding(indices, codebook).view_as(z), beta)

    results = []
    for fn in (straight_through, reference):
        z, codebook = z0.clone().requires_grad_(), codebook0.clone().requires_grad_()
        z_q, loss, commitment = fn(z, codebook, indices, beta)
        decoded = (z_q * weight).sum()
        total = {"both": decoded + loss, "z_q": decoded, "loss": loss}[use]
        grads = torch.autograd.grad(total, (z, codebook), allow_unused=True)  # no loss: unused
        grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, (z, codebook))]
        results.append((z_q.detach(), loss.detach(), commitment, *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not results[0][2].requires_grad  # the commitment is for logging only
    if use != "z_q":  # the codebook loss reaches exactly the codes in use
        assert results[0][4][[2, 4]].abs().sum() == 0 and results[0][4][[0, 1, 3, 5]].abs().min() > 0


# --------------------------------------------------------------------------- pointwise conv


@pytest.mark.parametrize("channel_last_input", [False, True])
def test_pointwise_equals_a_1x1_conv1d(channel_last_input):
    torch.manual_seed(0)
    fast = Pointwise(6, 5)
    conv = nn.Conv1d(6, 5, 1)
    conv.load_state_dict(fast.state_dict())  # same parameters, same names and shapes
    x = torch.randn(4, 7, 6).transpose(1, 2) if channel_last_input else torch.randn(4, 6, 7)
    x.requires_grad_()
    y_fast, y_conv = fast(x), conv(x)
    assert y_fast.shape == y_conv.shape == (4, 5, 7)
    torch.testing.assert_close(y_fast, y_conv)
    g = torch.randn(4, 5, 7)
    got = torch.autograd.grad(y_fast, (x, fast.weight, fast.bias), g)
    want = torch.autograd.grad(y_conv, (x, conv.weight, conv.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)

