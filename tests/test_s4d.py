"""S4D invariants: kernel = recurrence, FFT = direct conv, fast = reference kernel, causality."""

import math

import pytest
import torch
from torch import nn

from vqlog.model.s4d import (
    S4D,
    S4DBlock,
    S4DKernel,
    fft_conv,
    kernel,
    ssm_parameters,
)
from vqlog.model.reference import direct_causal_conv, kernel_reference

KERNELS = [kernel, kernel_reference]


def ssm_params(H, N2, dtype, seed=0):
    """S4D-Lin parameters, jittered so no mode is special, as leaf tensors requiring grad."""
    with torch.random.fork_rng():  # the init draws from the global RNG; keep it reproducible
        torch.manual_seed(seed)
        k = S4DKernel(H, 2 * N2)
        with torch.no_grad():
            k.log_A_real.add_(0.3 * torch.randn(H, N2))
            k.A_imag.add_(torch.rand(H, N2))
    return [p.detach().to(dtype).requires_grad_() for p in (k.log_dt, k.log_A_real, k.A_imag, k.C)]


def recurrence(log_dt, log_A_real, A_imag, C, u):
    """The discrete SSM step by step: x_k = Ā x_{k-1} + B̄ u_k, y_k = 2·Re(C x_k); u (B, H, L)."""
    A = torch.complex(-torch.exp(log_A_real), A_imag)  # (H N/2)
    A_bar = torch.exp(A * torch.exp(log_dt)[:, None])
    B_bar = (A_bar - 1) / A
    Cc = torch.view_as_complex(C)
    x = torch.zeros(u.shape[0], *A.shape, dtype=A.dtype)  # (B H N/2)
    ys = []
    for k in range(u.shape[-1]):
        x = A_bar * x + B_bar * u[:, :, k, None]
        ys.append(2 * (Cc * x).sum(-1).real)  # (B H)
    return torch.stack(ys, dim=-1)  # (B H L)


def assert_close_scaled(actual, expected, rtol):
    """allclose with atol relative to the tensor's scale (gradients vary by orders of magnitude)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("kernel_fn", KERNELS)
@pytest.mark.parametrize("H, N2, L", [(1, 1, 1), (3, 4, 17), (4, 8, 64)])
def test_kernel_is_the_impulse_response_of_the_recurrence(kernel_fn, H, N2, L):
    params = ssm_params(H, N2, torch.float64)
    impulse = torch.zeros(1, H, L, dtype=torch.float64)
    impulse[..., 0] = 1
    response = recurrence(*params, impulse)[0]  # (H L)
    torch.testing.assert_close(kernel_fn(*params, L), response, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel_fn", KERNELS)
@pytest.mark.parametrize("B, H, N2, L", [(2, 3, 4, 19), (1, 2, 16, 50)])
def test_convolving_the_kernel_equals_running_the_recurrence(kernel_fn, B, H, N2, L):
    params = ssm_params(H, N2, torch.float64, seed=1)
    u = torch.randn(B, H, L, dtype=torch.float64)
    y = fft_conv(u, kernel_fn(*params, L))
    torch.testing.assert_close(y, recurrence(*params, u), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("B, H, L", [(1, 1, 1), (2, 3, 7), (3, 4, 64), (2, 5, 101)])
def test_fft_conv_equals_direct_causal_conv(B, H, L):
    u = torch.randn(B, H, L, dtype=torch.float64)
    k = torch.randn(H, L, dtype=torch.float64)
    torch.testing.assert_close(fft_conv(u, k), direct_causal_conv(u, k), rtol=1e-10, atol=1e-12)


def test_direct_causal_conv_matches_its_definition():
    u, k = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    y = direct_causal_conv(u, k)
    for t in (0, 3, 5):
        expected = sum(k[:, s] * u[:, :, t - s] for s in range(t + 1))
        torch.testing.assert_close(y[:, :, t], expected)


@pytest.mark.parametrize(
    "dtype, rtol, atol", [(torch.float32, 1e-4, 1e-5), (torch.float64, 1e-10, 1e-12)]
)
@pytest.mark.parametrize(
    "H, N2, L", [(1, 1, 1), (2, 3, 2), (5, 4, 37), (8, 32, 256), (4, 16, 1000)]
)
def test_fast_kernel_equals_reference(dtype, rtol, atol, H, N2, L):
    params = ssm_params(H, N2, dtype)
    expected = kernel_reference(*params, L)
    torch.testing.assert_close(kernel(*params, L), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-3), (torch.float64, 1e-9)])
@pytest.mark.parametrize("H, N2, L", [(2, 3, 5), (4, 16, 100)])
def test_fast_kernel_gradients_equal_reference(dtype, rtol, H, N2, L):
    weight = torch.randn(H, L, dtype=dtype)  # a generic loss, so every entry of K matters
    base = ssm_params(H, N2, dtype)
    grads = []
    for fn in KERNELS:
        params = [p.detach().clone().requires_grad_() for p in base]
        (fn(*params, L) * weight).sum().backward()
        grads.append([p.grad for p in params])
    for fast, ref in zip(*grads):  # log_dt, log_A_real, A_imag, C
        assert_close_scaled(fast, ref, rtol)


@pytest.mark.parametrize("module_cls", [S4D, S4DBlock])
@pytest.mark.parametrize("B, H, N, L", [(2, 4, 8, 33), (1, 3, 2, 1)])
def test_layer_keeps_shape_and_every_parameter_gets_a_gradient(module_cls, B, H, N, L):
    layer = module_cls(H, N)
    y = layer(torch.randn(B, H, L))
    assert y.shape == (B, H, L)
    (y * torch.randn_like(y)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("module_cls", [S4D, S4DBlock])
@pytest.mark.parametrize("t", [0, 10, 31])
def test_layer_is_causal(module_cls, t):
    layer = module_cls(4, 8).double()
    u = torch.randn(2, 4, 32, dtype=torch.float64)
    u2 = u.clone()
    u2[..., t] += torch.randn(2, 4, dtype=torch.float64)
    y, y2 = layer(u), layer(u2)
    torch.testing.assert_close(y[..., :t], y2[..., :t], rtol=0, atol=1e-12)
    assert (y[..., t] - y2[..., t]).abs().max() > 1e-6  # the change does arrive at t


def test_s4d_lin_init():
    k = S4DKernel(d_model=16, d_state=8)  # Δ log-uniform in [DT_MIN, DT_MAX] = [1e-3, 1e-1]
    assert k.C.shape == (16, 4, 2)
    torch.testing.assert_close(-torch.exp(k.log_A_real), torch.full((16, 4), -0.5))
    torch.testing.assert_close(k.A_imag, math.pi * torch.arange(4.0).expand(16, 4))
    dt = torch.exp(k.log_dt)
    assert dt.shape == (16,) and (dt >= 1e-3 * (1 - 1e-6)).all() and (dt <= 1e-1 * (1 + 1e-6)).all()


def test_odd_state_size_is_rejected():
    with pytest.raises(ValueError, match="d_state must be an even number"):
        S4DKernel(4, 7)


def test_ssm_parameters_are_exactly_dt_and_A():
    stack = nn.Sequential(S4DBlock(4, 8), nn.Conv1d(4, 4, 1), S4DBlock(4, 8))
    expected = {
        id(getattr(block.s4d.kernel, name))
        for block in (stack[0], stack[2])
        for name in ("log_dt", "log_A_real", "A_imag")
    }
    found = ssm_parameters(stack)
    assert len(found) == 6 and {id(p) for p in found} == expected
    names = {n.rsplit(".", 1)[-1] for n, p in stack.named_parameters() if id(p) in expected}
    assert names == {"log_dt", "log_A_real", "A_imag"}
