"""Custom autograd functions and kernels for training: JumpReLU / Heaviside step with straight-through
pseudo-derivatives; for TopK-family SAEs a blocked top-k selection, a sparse-backward encoder gather
and decoder, and the in-place decoder constraint (see "Sparse TopK kernels" below).

JumpReLU (Rajamanoharan et al. 2024, methods.md §7.1), rectangle kernel ``K(u) = 1{-1/2 < u < 1/2}``
and bandwidth ``eps``:

* ``JumpReLU_θ(z) = z · H(z − θ)``: ``∂/∂z = H(z − θ)`` (straight through where it fires),
  ``ð/ðθ = −(θ/ε) K((z − θ)/ε)``;
* ``H(z − θ)`` (the L0 term): ``∂/∂z = 0`` (no STE to the input, as in SAELens),
  ``ð/ðθ = −(1/ε) K((z − θ)/ε)``.

Threshold gradients are summed over every leading (batch) dimension.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

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


# Sparse TopK kernels -------------------------------------------------------------------------------
#
# A TopK step touches ``N·k`` of the ``N·d_sae`` (token, latent) pairs. Everything below works on that
# pattern only: the selection materialises one ``(rows, d_sae)`` block of pre-activations at a time,
# and every gradient is a sparse-times-dense product whose output is written once, in the layout of
# the parameter it belongs to (so autograd's accumulation never re-lays it out).
#
# On CPU the weight gradients are CSR matrix products (``torch.sparse``; MKL when present): 3-4x
# faster than ``index_add_`` into a contiguous buffer and ~7x faster than into a transposed one. On
# CUDA (atomics are cheap there) the encoder weight gradient is an ``index_add_`` into a
# ``(d_sae, d_in)`` buffer, as in sparsify; the rest is the same code.

#: Pre-activation block size (elements) of :func:`topk_select`: 2**26 fp32 = 256 MiB.
SELECT_BLOCK_ELEMENTS = 1 << 26
#: Row-chunk size (elements of the ``(rows, k, d)`` gather) of the decoder's value gradient.
GATHER_BLOCK_ELEMENTS = 1 << 24
_CSR_DTYPES = (torch.float32, torch.float64)


def _use_csr(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _CSR_DTYPES


def rows_csr(idx: Tensor, values: Tensor, d_sae: int) -> Tensor:
    """The ``(N, d_sae)`` CSR matrix with ``values[n, j]`` at ``(n, idx[n, j])`` (duplicates add up)."""
    n, k = idx.shape
    crow = torch.arange(0, n * k + 1, k, device=idx.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, idx.reshape(-1), values.reshape(-1), (n, d_sae))


class LatentMajor:
    """The transpose of a ``(N, k)`` selection pattern, latent-major: build once, reuse per value set.

    ``csr(values)`` is the ``(d_sae, N)`` CSR matrix with ``values[n, j]`` at ``(idx[n, j], n)``.
    Indices are int32 when they fit (what MKL takes; saves two conversions per product).
    """

    def __init__(self, idx: Tensor, d_sae: int, rows: Tensor | None = None, n_rows: int | None = None):
        """``idx (N, k)``; or a ragged pattern: ``idx (M,)`` latents with their token-sorted ``rows (M,)``
        out of ``n_rows`` tokens (BatchTopK)."""
        flat = idx.reshape(-1)
        # Stable: each latent's tokens stay in ascending order (sorted CSR columns, what MKL expects).
        self.order = torch.sort(flat, stable=True).indices
        index_dtype = torch.int32 if max(flat.numel(), d_sae) < 2**31 - 1 else torch.long
        if rows is None:
            self.tokens = torch.div(self.order, idx.shape[1], rounding_mode="floor").to(index_dtype)
            n_rows = idx.shape[0]
        else:
            self.tokens = rows[self.order].to(index_dtype)
        counts = torch.bincount(flat, minlength=d_sae)
        self.crow = torch.zeros(d_sae + 1, dtype=index_dtype, device=idx.device)
        torch.cumsum(counts, 0, out=self.crow[1:])
        self.shape = (d_sae, int(n_rows))  # type: ignore[arg-type]

    def csr(self, values: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(self.crow, self.tokens, values.reshape(-1)[self.order], self.shape)


def _t_matmul(pattern: LatentMajor, values: Tensor, dense: Tensor, like: Tensor, latent_major: bool) -> Tensor:
    """``S^T @ dense`` with ``S (N, d_sae)`` sparse (pattern and values), ``dense (N, d)``: the
    gradient of the parameter ``like``, ``(d_sae, d)`` when ``latent_major`` (a decoder) else
    ``(d, d_sae)`` (an encoder), with ``like``'s strides. Computed latent-major (the layout of the
    CSR product); an encoder stored ``(d, d_sae)``-contiguous pays one transposing copy, one stored
    latent-major (:func:`latent_major_`) none."""
    st = pattern.csr(values.to(dense.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Accumulate into zeros (beta=1): torch's beta=0 CSR path computes into a temporary and copies
        # it over (a parameter-sized copy, ~3x slower in total); the zero fill is cheaper.
        out = dense.new_zeros(st.shape[0], dense.shape[1]).addmm_(st, dense)
    if not latent_major:
        out = out.T
    return out if _same_layout(out, like) else torch.empty_like(like).copy_(out)


@torch.no_grad()
def latent_major_(param: Tensor) -> Tensor:
    """Re-lay a ``(d_in, d_sae)`` encoder weight in place so that each latent's column is contiguous
    (storage ``(d_sae, d_in)``, as ``nn.Linear`` stores it): its sparse gradient is then written
    without a transposing copy. Values, shape and ``x @ W_enc`` are unchanged. Returns ``param``."""
    if param.dim() == 2 and param.stride(0) != 1:
        param.data = param.data.T.contiguous().T
    return param


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every optimiser state tensor its parameter's strides (a ``load_state_dict`` post-hook).

    Checkpoints store state contiguous; a parameter stored otherwise (:func:`latent_major_`) must
    get state with its own layout, or the fused Adam kernel would pair mismatched elements.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, t in optimizer.state.get(p, {}).items():
                if isinstance(t, Tensor) and t.shape == p.shape and t.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=t.dtype).copy_(t)


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride()


def encoder_weight_grad(x: Tensor, idx: Tensor, grad: Tensor, W_enc: Tensor, pattern: LatentMajor | None = None) -> Tensor:
    """``∂/∂W_enc`` of ``Σ grad[n, j] · x[n] · W_enc[:, idx[n, j]]``: a ``(d_in, d_sae)`` tensor with
    ``W_enc``'s strides. ``x (N, d_in)``, ``idx``/``grad (N, k)``. Never builds ``(N, d_sae)``."""
    d_sae = W_enc.shape[1]
    x = x.to(W_enc.dtype)
    if _use_csr(W_enc):
        pattern = pattern if pattern is not None else LatentMajor(idx, d_sae)
        return _t_matmul(pattern, grad, x, W_enc, latent_major=False)
    n, k = idx.shape
    buf = torch.zeros(d_sae, x.shape[1], dtype=W_enc.dtype, device=W_enc.device)
    rows = max(1, GATHER_BLOCK_ELEMENTS // max(1, k * x.shape[-1]))
    for a in range(0, n, rows):
        g = grad[a : a + rows].reshape(-1, 1).to(W_enc.dtype)
        buf.index_add_(0, idx[a : a + rows].reshape(-1), x[a : a + rows].repeat_interleave(k, dim=0) * g)
    out = buf.T
    return out if _same_layout(out, W_enc) else out.contiguous()


def latent_sum(idx: Tensor, grad: Tensor, d_sae: int, dtype: torch.dtype) -> Tensor:
    """``(d_sae,)``: ``Σ grad[n, j]`` over the entries with ``idx[n, j] = i`` (a bias gradient)."""
    out = torch.zeros(d_sae, dtype=dtype, device=grad.device)
    return out.index_add_(0, idx.reshape(-1), grad.reshape(-1).to(dtype))


def gather_rows_t(idx: Tensor, weights: Tensor, W: Tensor) -> Tensor:
    """``(N, d)``: ``Σ_j weights[n, j] · W[:, idx[n, j]]`` for ``W (d, d_sae)`` (columns, any layout)."""
    if W.stride(0) == 1 or not _use_csr(W):  # columns are contiguous rows of W.T
        return F.embedding_bag(idx, W.T, per_sample_weights=weights.to(W.dtype), mode="sum")
    return rows_csr(idx, weights.to(W.dtype), W.shape[1]) @ W.T


class GatherEncode(torch.autograd.Function):
    """``values[n, j] = x[n] · W_enc[:, idx[n, j]] + b_enc[idx[n, j]]`` with a sparse backward.

    The caller already computed the pre-activations (without autograd, e.g. :func:`topk_select`) to
    choose ``idx`` and passes the selected ``values``, so the forward is free. The backward never
    builds an ``(N, d_sae)`` gradient: the input gradient is a sparse ``(N, d_sae) @ W_encᵀ``, the
    weight gradient the sparse ``xᵀ @ G`` written once in ``W_enc``'s layout
    (:func:`encoder_weight_grad`), the bias gradient a 1-D ``index_add_``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor | None, idx: Tensor, values: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, W_enc, idx)
        ctx.has_bias = b_enc is not None
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        x, W_enc, idx = ctx.saved_tensors
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = gather_rows_t(idx, grad, W_enc).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = encoder_weight_grad(x, idx, grad, W_enc)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = latent_sum(idx, grad, W_enc.shape[1], W_enc.dtype)
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


class SparseDecode(torch.autograd.Function):
    """``out[n] = Σ_j values[n, j] · W_dec[idx[n, j]]`` (an ``embedding_bag``) with a sparse backward.

    ``∂/∂values[n, j] = W_dec[idx[n, j]] · grad[n]`` (a sampled product at the ``N·k`` entries on
    CPU; elsewhere row-chunked gathers, at most :data:`GATHER_BLOCK_ELEMENTS` at a time);
    ``∂/∂W_dec = Sᵀ @ grad`` with ``S`` the sparse
    ``(N, d_sae)`` latents: a CSR product on CPU written straight into a ``(d_sae, d_out)`` tensor,
    the native ``embedding_bag`` backward elsewhere.
    """

    @staticmethod
    def forward(ctx, values: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(values, idx, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        values, idx, W_dec = ctx.saved_tensors
        grad = grad.to(W_dec.dtype)
        grad_v = grad_W = None
        if ctx.needs_input_grad[0]:
            n, k = idx.shape
            if _use_csr(W_dec):  # sampled dense-dense product at the k entries per row
                pattern = rows_csr(idx, torch.zeros(n, k, dtype=W_dec.dtype, device=W_dec.device), W_dec.shape[0])
                grad_v = torch.sparse.sampled_addmm(pattern, grad, W_dec.T, beta=0).values().view(n, k)
            else:
                grad_v = torch.empty(n, k, dtype=W_dec.dtype, device=W_dec.device)
                rows = max(1, GATHER_BLOCK_ELEMENTS // max(1, k * W_dec.shape[1]))
                for a in range(0, n, rows):
                    torch.bmm(W_dec[idx[a : a + rows]], grad[a : a + rows, :, None], out=grad_v[a : a + rows, :, None])
            grad_v = grad_v.to(values.dtype)
        if ctx.needs_input_grad[2]:
            if _use_csr(W_dec):
                grad_W = _t_matmul(LatentMajor(idx, W_dec.shape[0]), values, grad, W_dec, latent_major=True)
            else:
                with torch.enable_grad():
                    w = W_dec.detach().requires_grad_(True)
                    out = F.embedding_bag(idx, w, per_sample_weights=values.detach().to(w.dtype), mode="sum")
                    (grad_W,) = torch.autograd.grad(out, w, grad)
        return grad_v, None, grad_W


def sparse_decode_values(values: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """``dense(values, idx) @ W_dec`` for ``(N, k)`` values/indices: ``(N, d_out)``, sparse backward."""
    if torch.is_grad_enabled() and (values.requires_grad or W_dec.requires_grad):
        return SparseDecode.apply(values, idx, W_dec)
    return F.embedding_bag(idx, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


class TopKSelection(NamedTuple):
    """What :func:`topk_select` chose: ``(N, k)`` pre-activations and latent indices, and the AuxK
    candidates among dead latents (``(N, k_aux)`` each, or ``None``)."""

    values: Tensor
    indices: Tensor
    aux_values: Tensor | None = None
    aux_indices: Tensor | None = None
    #: the ``(N, d_sae)`` pre-activations when they fit in one block (``keep_pre=True``), else ``None``.
    pre: Tensor | None = None


@torch.no_grad()
def topk_select(
    x: Tensor, W_enc: Tensor, b_enc: Tensor | None, k: int, *, dead: Tensor | None = None, aux_k: int = 0,
    block_elements: int | None = None, keep_pre: bool = False,
) -> TopKSelection:
    """The top ``k`` pre-activations ``x @ W_enc + b_enc`` per row of ``x (N, d_in)``, computed in row
    blocks so that at most one ``(rows, d_sae)`` block (``block_elements``, default
    :data:`SELECT_BLOCK_ELEMENTS`) exists at a time; no autograd.

    With ``dead`` (``(d_sae,)`` bool) and ``aux_k > 0``, also the top ``min(aux_k, n_dead)`` among the
    dead latents (live ones masked with −inf, as in SAELens), from the same block. Under autocast the
    matmul runs in the autocast dtype (bf16 halves its time on CPUs with AVX512-BF16 / AMX).
    With ``keep_pre`` and a single block (``N · d_sae <= block_elements``), that block is returned as
    ``pre`` (it exists anyway); larger inputs never keep one.
    """
    n, d_sae = x.shape[0], W_enc.shape[1]
    budget = block_elements or SELECT_BLOCK_ELEMENTS
    rows = max(1, min(n, budget // max(1, d_sae)))
    k_aux = min(aux_k, int(dead.sum())) if dead is not None and aux_k > 0 else 0
    values = torch.empty(n, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.long, device=x.device)
    aux_v = torch.empty(n, k_aux, dtype=x.dtype, device=x.device) if k_aux else None
    aux_i = torch.empty(n, k_aux, dtype=torch.long, device=x.device) if k_aux else None
    live = ~dead if k_aux else None
    kept = None
    # One buffer for all blocks: a fresh 256 MiB tensor per block is a fresh mmap whose pages the
    # kernel faults in and zeroes again each time. (Not under autocast, which skips ``out=`` calls.)
    reuse = rows < n and not torch.is_autocast_enabled(x.device.type)
    block = torch.empty(rows, d_sae, dtype=torch.result_type(x, W_enc), device=x.device) if reuse else None
    for a in range(0, n, rows):
        xb = x[a : a + rows]
        out = None if block is None else block[: xb.shape[0]]
        pre = torch.mm(xb, W_enc, out=out) if b_enc is None else torch.addmm(b_enc, xb, W_enc, out=out)
        if keep_pre and rows >= n:
            kept = pre.clone() if k_aux else pre
        v, i = pre.topk(k, dim=-1, sorted=False)
        values[a : a + rows] = v
        indices[a : a + rows] = i
        if k_aux:
            v, i = pre.masked_fill_(live, float("-inf")).topk(k_aux, dim=-1, sorted=False)
            aux_v[a : a + rows] = v  # type: ignore[index]
            aux_i[a : a + rows] = i  # type: ignore[index]
    return TopKSelection(values, indices, aux_v, aux_i, kept)


# Ragged (batch-level) selections: BatchTopK ---------------------------------------------------------
#
# BatchTopK keeps the ``k·N`` largest activations of the whole batch, so tokens keep different numbers
# of latents. Such a selection is token-major CSR: ``cols (M,)`` the latents, sorted by token then
# latent, and ``crow (N + 1,)`` each token's range. The kernels mirror the TopK ones above: a gather
# with a sparse backward for the encoder, an ``embedding_bag`` with offsets for the decoder, weight
# gradients as CSR products written in the parameter's layout; no ``(N, d_sae)`` tensor or gradient.


def crow_rows(crow: Tensor) -> Tensor:
    """``(M,)``: the token of every entry of a token-major selection with row pointers ``crow``."""
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())


def _ragged_csr(crow: Tensor, cols: Tensor, values: Tensor, d_sae: int) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, (crow.numel() - 1, d_sae))


class BatchSelection(NamedTuple):
    """What :func:`batch_topk_select` chose: ``values``/``cols (M,)`` token-major, ``crow (N + 1,)``."""

    values: Tensor
    cols: Tensor
    crow: Tensor


@torch.no_grad()
def batch_topk_select(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, n_keep: int, *,
                      block_elements: int | None = None) -> BatchSelection:
    """The ``n_keep`` largest ``ReLU(x @ W_enc + b_enc)`` entries of the whole batch ``x (N, d_in)``,
    positive ones only (a kept zero contributes nothing, forward or backward), token-major.

    Computed in row blocks (at most one ``(rows, d_sae)`` block of ``block_elements``, default
    :data:`SELECT_BLOCK_ELEMENTS`, at a time) with a running top-``n_keep`` of the candidates: the
    batch's top ``n_keep`` is within the union of every block's top ``n_keep``.
    """
    n, d_sae = x.shape[0], W_enc.shape[1]
    rows = max(1, min(n, (block_elements or SELECT_BLOCK_ELEMENTS) // max(1, d_sae)))
    best_v = best_i = None
    for a in range(0, n, rows):
        pre = x[a : a + rows] @ W_enc if b_enc is None else torch.addmm(b_enc, x[a : a + rows], W_enc)
        flat = pre.relu_().view(-1)
        v, i = flat.topk(min(n_keep, flat.numel()), sorted=False)
        i += a * d_sae
        if best_v is not None:
            v, i = torch.cat([best_v, v]), torch.cat([best_i, i])  # type: ignore[list-item]
            if v.numel() > n_keep:
                v, j = v.topk(n_keep, sorted=False)
                i = i[j]
        best_v, best_i = v, i
    assert best_v is not None and best_i is not None
    keep = best_v > 0
    flat_idx, order = best_i[keep].sort()
    values = best_v[keep][order].to(x.dtype)
    tokens = torch.div(flat_idx, d_sae, rounding_mode="floor")
    return BatchSelection(values, flat_idx - tokens * d_sae, row_pointers(tokens, n))


def row_pointers(tokens: Tensor, n: int) -> Tensor:
    """``(n + 1,)`` row pointers of token-major entries whose tokens are ``tokens (M,)`` (non-decreasing)."""
    crow = torch.zeros(n + 1, dtype=torch.long, device=tokens.device)
    torch.cumsum(torch.bincount(tokens, minlength=n), 0, out=crow[1:])
    return crow


def token_major(rows: Tensor, cols: Tensor, values: Tensor, n: int) -> BatchSelection:
    """A selection given as ``(rows, cols, values)`` entries ``(M,)`` in any order (the choice SAEs'), sorted
    token-major for :func:`gather_encode_ragged` / :func:`sparse_decode_ragged`."""
    order = rows.argsort(stable=True)
    return BatchSelection(values[order], cols[order], row_pointers(rows[order], n))


class GatherEncodeRagged(torch.autograd.Function):
    """:class:`GatherEncode` for a token-major selection: ``values[m] = x[row m] · W_enc[:, cols[m]] +
    b_enc[cols[m]]`` (forward free: the selection's values), sparse backward."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor | None, cols: Tensor, crow: Tensor, values: Tensor) -> Tensor:  # noqa: ANN001, E501
        ctx.save_for_backward(x, W_enc, cols, crow)
        ctx.has_bias = b_enc is not None
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        x, W_enc, cols, crow = ctx.saved_tensors
        grad_x = grad_W = grad_b = None
        d_sae = W_enc.shape[1]
        g = grad.to(W_enc.dtype)
        rows = crow_rows(crow)
        if ctx.needs_input_grad[0]:
            if W_enc.stride(0) == 1 or not _use_csr(W_enc):
                grad_x = F.embedding_bag(cols, W_enc.T, crow[:-1], per_sample_weights=g, mode="sum")
            else:
                grad_x = _ragged_csr(crow, cols, g, d_sae) @ W_enc.T
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            xd = x.to(W_enc.dtype)
            if _use_csr(W_enc):
                grad_W = _t_matmul(LatentMajor(cols, d_sae, rows, x.shape[0]), g, xd, W_enc, latent_major=False)
            else:
                buf = torch.zeros(d_sae, x.shape[1], dtype=W_enc.dtype, device=W_enc.device)
                step = max(1, GATHER_BLOCK_ELEMENTS // max(1, x.shape[1]))
                for a in range(0, cols.numel(), step):
                    buf.index_add_(0, cols[a : a + step], xd[rows[a : a + step]] * g[a : a + step, None])
                grad_W = buf.T if _same_layout(buf.T, W_enc) else buf.T.contiguous()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = torch.zeros(d_sae, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, cols, g)
        return grad_x, grad_W, grad_b, None, None, None


class SparseDecodeRagged(torch.autograd.Function):
    """:class:`SparseDecode` for a token-major selection: ``out[n] = Σ_{m in row n} values[m] ·
    W_dec[cols[m]]`` (``embedding_bag`` with offsets), sparse backward."""

    @staticmethod
    def forward(ctx, values: Tensor, cols: Tensor, crow: Tensor, W_dec: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(values, cols, crow, W_dec)
        return F.embedding_bag(cols, W_dec, crow[:-1], per_sample_weights=values.to(W_dec.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        values, cols, crow, W_dec = ctx.saved_tensors
        grad = grad.to(W_dec.dtype)
        d_sae = W_dec.shape[0]
        rows = crow_rows(crow)
        grad_v = grad_W = None
        if ctx.needs_input_grad[0]:
            if _use_csr(W_dec):  # sampled dense-dense product at the selected entries
                pattern = _ragged_csr(crow, cols, torch.zeros(cols.numel(), dtype=W_dec.dtype, device=W_dec.device), d_sae)
                grad_v = torch.sparse.sampled_addmm(pattern, grad, W_dec.T, beta=0).values()
            else:
                grad_v = torch.empty(cols.numel(), dtype=W_dec.dtype, device=W_dec.device)
                step = max(1, GATHER_BLOCK_ELEMENTS // max(1, W_dec.shape[1]))
                for a in range(0, cols.numel(), step):
                    grad_v[a : a + step] = (W_dec[cols[a : a + step]] * grad[rows[a : a + step]]).sum(-1)
            grad_v = grad_v.to(values.dtype)
        if ctx.needs_input_grad[3]:
            if _use_csr(W_dec):
                grad_W = _t_matmul(LatentMajor(cols, d_sae, rows, grad.shape[0]), values, grad, W_dec, latent_major=True)
            else:
                grad_W = torch.zeros_like(W_dec).index_add_(0, cols, grad[rows] * values.to(W_dec.dtype)[:, None])
        return grad_v, None, None, grad_W


def gather_encode_ragged(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, sel: BatchSelection) -> Tensor:
    """The selected pre-activations ``(M,)`` of :func:`batch_topk_select`, differentiable (sparse backward)."""
    return GatherEncodeRagged.apply(x, W_enc, b_enc, sel.cols, sel.crow, sel.values)


def sparse_decode_ragged(values: Tensor, cols: Tensor, crow: Tensor, W_dec: Tensor) -> Tensor:
    """``(N, d_out)``: each token's selected decoder rows weighted by ``values (M,)``; sparse backward."""
    if torch.is_grad_enabled() and (values.requires_grad or W_dec.requires_grad):
        return SparseDecodeRagged.apply(values, cols, crow, W_dec)
    return F.embedding_bag(cols, W_dec, crow[:-1], per_sample_weights=values.to(W_dec.dtype), mode="sum")


# Decoder constraint ---------------------------------------------------------------------------------


@torch.no_grad()
def remove_parallel_component_(grad: Tensor, W: Tensor) -> Tensor:
    """In place: ``grad[i] -= (grad[i]·û_i) û_i`` with ``û_i = W[i] / ||W[i]||`` (rows), without a
    full-size temporary (row dots by a batched matmul, the update by ``addcmul_``)."""
    dots = torch.bmm(grad.unsqueeze(1), W.unsqueeze(2)).reshape(-1, 1)  # (rows, 1): grad[i]·W[i]
    sq = torch.bmm(W.unsqueeze(1), W.unsqueeze(2)).reshape(-1, 1).clamp_min(1e-24)
    return grad.addcmul_(W, dots / sq, value=-1.0)


@torch.no_grad()
def normalize_rows_(W: Tensor, eps: float = 1e-12) -> Tensor:
    """In place: every row of ``W`` to unit L2 norm (rows with norm < ``eps`` divided by ``eps``)."""
    return W.div_(torch.linalg.vector_norm(W, dim=-1, keepdim=True).clamp_min(eps))
