"""Custom autograd functions for training: JumpReLU / Heaviside step with straight-through
pseudo-derivatives, and a sparse-backward encoder gather for TopK SAEs.

JumpReLU (Rajamanoharan et al. 2024, methods.md §7.1), rectangle kernel ``K(u) = 1{-1/2 < u < 1/2}``
and bandwidth ``eps``:

* ``JumpReLU_θ(z) = z · H(z − θ)``: ``∂/∂z = H(z − θ)`` (straight through where it fires),
  ``ð/ðθ = −(θ/ε) K((z − θ)/ε)``;
* ``H(z − θ)`` (the L0 term): ``∂/∂z = 0`` (no STE to the input, as in SAELens),
  ``ð/ðθ = −(1/ε) K((z − θ)/ε)``.

Threshold gradients are summed over every leading (batch) dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rectangle(u: Tensor) -> Tensor:
    """``K(u) = 1{-1/2 < u < 1/2}`` in ``u``'s dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to_threshold(t: Tensor, threshold: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).sum(0).reshape(threshold.shape).to(threshold.dtype)


class JumpReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = (z > threshold).to(grad.dtype) * grad
        grad_t = -(threshold / eps) * rectangle((z - threshold) / eps) * grad
        return grad_z, _sum_to_threshold(grad_t, threshold), None


class StepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_t = -(1.0 / eps) * rectangle((z - threshold) / eps) * grad
        return torch.zeros_like(z), _sum_to_threshold(grad_t, threshold), None


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return JumpReLUFunction.apply(z, threshold, bandwidth)


def step(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return StepFunction.apply(z, threshold, bandwidth)


class GatherEncode(torch.autograd.Function):
    """``values[n, j] = x[n] · W_enc[:, idx[n, j]] + b_enc[idx[n, j]]`` with a sparse backward.

    The caller already computed the dense pre-activations (without autograd) to choose ``idx`` and
    passes the selected ``values``, so the forward is free. The backward never builds an
    ``(N, d_sae)`` gradient: the input gradient is an ``embedding_bag`` over the ``k`` selected encoder
    columns, the weight and bias gradients an ``index_add_`` over them (in row chunks to bound
    memory). The weight gradient itself is a dense ``(d_in, d_sae)`` tensor, the size of the
    parameter (Adam updates every column anyway).
    """

    CHUNK_ELEMENTS = 1 << 24

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor | None, idx: Tensor, values: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, W_enc, idx)
        ctx.has_bias = b_enc is not None
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        x, W_enc, idx = ctx.saved_tensors
        n, k = idx.shape
        W_t = W_enc.T
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W_t, per_sample_weights=grad.to(W_t.dtype), mode="sum").to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_Wt = torch.zeros_like(W_t)
            rows = max(1, GatherEncode.CHUNK_ELEMENTS // max(1, k * x.shape[-1]))
            for a in range(0, n, rows):
                g = grad[a : a + rows].reshape(-1, 1).to(W_t.dtype)
                contrib = x[a : a + rows].to(W_t.dtype).repeat_interleave(k, dim=0) * g
                grad_Wt.index_add_(0, idx[a : a + rows].reshape(-1), contrib)
            grad_W = grad_Wt.T
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_t.shape[0], dtype=W_t.dtype, device=W_t.device)
            grad_b.index_add_(0, idx.reshape(-1), grad.reshape(-1).to(W_t.dtype))
        return grad_x, grad_W, grad_b, None, None


def gather_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, idx: Tensor, values: Tensor | None = None) -> Tensor:
    """Pre-activations ``(N, k)`` of the selected latents ``idx (N, k)`` for inputs ``x (N, d_in)``,
    differentiable with a sparse backward. ``values`` are those pre-activations if already computed."""
    if values is None:
        with torch.no_grad():
            values = torch.einsum("nd,nkd->nk", x, W_enc.T[idx])
            if b_enc is not None:
                values = values + b_enc[idx]
    return GatherEncode.apply(x, W_enc, b_enc, idx, values)
