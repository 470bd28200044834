"""Feature Choice and Mutual Choice SAEs (Ayonrinde 2024, arXiv 2411.02124).

Sparsification as an allocation on the batch's ``(N tokens × F features)`` matrix of ReLU'd
pre-activations with a total budget of ``k·N`` matches:

* **Mutual Choice** (``mutual_choice``): the ``k·N`` largest entries of the whole matrix survive (the
  same selection as BatchTopK). Tokens get a variable number of latents.
* **Feature Choice** (``feature_choice``): feature ``i`` keeps its ``m_i`` largest entries down the
  batch (its top-``m_i`` tokens); uniform ``m_i = round(k·N/F)`` or Zipf-distributed capacities
  (:func:`zipf_capacities`). Every feature with a positive pre-activation somewhere in the batch
  fires, so none can die.

Only entries > 0 are kept (ReLU), so "exactly ``k·N``" holds whenever the batch has that many positive
pre-activations.

Both selections depend on the batch. **Inference** (a single prompt, splicing, steering) uses learned
thresholds instead, so a token's latents never depend on its neighbours: ``f = ReLU(pre)·1[pre > θ]``,
with one scalar ``θ`` for Mutual Choice (an EMA of the smallest kept value, as BatchTopK) and one ``θ_i``
per feature for Feature Choice (an EMA of the smallest value feature ``i`` kept, i.e. its ``m_i``-th
largest pre-activation in the batch, an estimate of its ``1 − m_i/N`` quantile). The thresholds and the
EMA of each feature's firing density (``feature_density``, used by Zipf capacities and
``aux_zipf_loss``) are persistent buffers, so training resumes exactly and saved SAEs carry them.

Training works on the selected entries only: :class:`CooEncode` / :class:`CooDecode` compute the
``nnz`` selected pre-activations and the reconstruction with a sparse backward (``index_add`` over the
selected rows/columns), so no dense ``(N, F)`` gradient exists; the dense ``(N, F)`` pre-activation
matrix used to choose the entries is computed without autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import SAEConfig
from ..errors import ConfigError
from .base import SAE

#: Chunk size (elements of a ``(chunk, d)`` temporary) of the COO kernels.
CHUNK_ELEMENTS = 1 << 24


class _ChoiceSAE(SAE):
    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.k is None:
            raise ConfigError(f"architecture {cfg.architecture!r} needs k (average active latents per token)")
        super().__init__(cfg)
        self.register_buffer("feature_density", torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype))

    def activate(self, pre: Tensor) -> Tensor:
        """Inference rule: ``ReLU(pre)·1[pre > threshold]`` (no dependence on the rest of the batch)."""
        return torch.relu(pre) * (pre > self.threshold)


class MutualChoiceSAE(_ChoiceSAE):
    architecture = "mutual_choice"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=cfg.torch_dtype))

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training selection on ``pre (N, F)``: ``(rows, cols, values)`` of the ``k·N`` largest positive entries."""
        return mutual_choice_select(pre, int(self.cfg.k))  # type: ignore[arg-type]


class FeatureChoiceSAE(_ChoiceSAE):
    architecture = "feature_choice"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype))

    def select(self, pre: Tensor, capacities: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training selection on ``pre (N, F)``: each feature's top-``capacities[i]`` tokens (positive only);
        ``capacities=None`` is the uniform ``round(k·N/F)`` (at least 1)."""
        if capacities is None:
            capacities = uniform_capacities(self.cfg.d_sae, int(self.cfg.k), pre.shape[0], pre.device)  # type: ignore[arg-type]
        return feature_choice_select(pre, capacities)


# Selections ---------------------------------------------------------------------------------------


@torch.no_grad()
def mutual_choice_select(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k·N`` largest entries of ``pre (N, F)`` that are > 0, as ``(rows, cols, values)`` (each ``(nnz,)``)."""
    n, f = pre.shape
    values, pos = pre.reshape(-1).topk(min(k * n, n * f), sorted=False)
    keep = values > 0
    pos = pos[keep]
    return pos // f, pos % f, values[keep]


@torch.no_grad()
def feature_choice_select(pre: Tensor, capacities: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Feature ``i`` keeps its ``capacities[i]`` largest entries down the batch (those > 0) of ``pre (N, F)``."""
    n, f = pre.shape
    if capacities.shape != (f,):
        raise ConfigError(f"capacities must have shape ({f},), got {tuple(capacities.shape)}")
    m = min(int(capacities.max()), n)
    if m <= 0:
        empty = pre.new_zeros(0, dtype=torch.long)
        return empty, empty, pre.new_zeros(0)
    values, rows = pre.topk(m, dim=0, sorted=True)  # (m, F)
    rank = torch.arange(m, device=pre.device)[:, None]
    keep = (rank < capacities.to(pre.device)[None, :]) & (values > 0)
    cols = torch.arange(f, device=pre.device).expand(m, f)
    return rows[keep], cols[keep], values[keep]


def uniform_capacities(d_sae: int, k: int, n_tokens: int, device: torch.device | str = "cpu") -> Tensor:
    """``m = max(1, round(k·N/F))`` for every feature (the budget ``k·N`` spread evenly)."""
    m = max(1, round(k * n_tokens / d_sae))
    return torch.full((d_sae,), m, dtype=torch.long, device=device)


def zipf_capacities(density: Tensor, total: int, alpha: float) -> Tensor:
    """Zipf-distributed capacities: the feature of density rank ``r`` (1 = most used) gets
    ``max(1, round(total · r^-α / Σ_j j^-α))`` tokens. Ties in ``density`` are broken by index."""
    f = density.shape[0]
    ranks = torch.arange(1, f + 1, dtype=torch.float64, device=density.device)
    w = ranks.pow(-alpha)
    m_by_rank = (total * w / w.sum()).round().clamp_min(1).long()
    order = torch.sort(density.double(), descending=True, stable=True).indices
    out = torch.empty(f, dtype=torch.long, device=density.device)
    out[order] = m_by_rank
    return out


# Sparse kernels -----------------------------------------------------------------------------------


def _chunks(n: int, width: int):  # noqa: ANN202
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    for a in range(0, n, step):
        yield a, min(n, a + step)


class CooEncode(torch.autograd.Function):
    """``values[j] = x[rows[j]] · W_enc[:, cols[j]] + b_enc[cols[j]]`` with a sparse backward.

    The forward takes the already computed (no-grad) ``values``; the backward scatters into the input
    rows and the selected encoder columns only (chunked ``index_add_``), never an ``(N, F)`` tensor.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor | None, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, W_enc, rows, cols)
        ctx.has_bias = b_enc is not None
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        x, W_enc, rows, cols = ctx.saved_tensors
        W_t = W_enc.T
        d = x.shape[-1]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x)
            for a, b in _chunks(rows.numel(), d):
                grad_x.index_add_(0, rows[a:b], (grad[a:b, None] * W_t[cols[a:b]]).to(x.dtype))
        if ctx.needs_input_grad[1]:
            grad_Wt = torch.zeros_like(W_t)
            for a, b in _chunks(rows.numel(), d):
                grad_Wt.index_add_(0, cols[a:b], (grad[a:b, None] * x[rows[a:b]]).to(W_t.dtype))
            grad_W = grad_Wt.T
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_t.shape[0], dtype=W_t.dtype, device=W_t.device).index_add_(0, cols, grad.to(W_t.dtype))
        return grad_x, grad_W, grad_b, None, None, None


class CooDecode(torch.autograd.Function):
    """``out[n] = Σ_{j: rows[j]=n} values[j] · W_dec[cols[j]]`` (``(N, d)``) with a sparse backward."""

    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, rows: Tensor, cols: Tensor, n: int) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(values, W_dec, rows, cols)
        out = W_dec.new_zeros(n, W_dec.shape[1])
        for a, b in _chunks(rows.numel(), W_dec.shape[1]):
            out.index_add_(0, rows[a:b], values[a:b, None].to(W_dec.dtype) * W_dec[cols[a:b]])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        values, W_dec, rows, cols = ctx.saved_tensors
        grad_v = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_v = torch.empty_like(values)
            for a, b in _chunks(rows.numel(), W_dec.shape[1]):
                grad_v[a:b] = (grad[rows[a:b]] * W_dec[cols[a:b]]).sum(-1).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = torch.zeros_like(W_dec)
            for a, b in _chunks(rows.numel(), W_dec.shape[1]):
                grad_W.index_add_(0, cols[a:b], values[a:b, None].to(W_dec.dtype) * grad[rows[a:b]])
        return grad_v, grad_W, None, None, None


def coo_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor | None, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:
    """Differentiable pre-activations ``(nnz,)`` of the selected ``(rows, cols)`` (``values``: their no-grad values)."""
    return CooEncode.apply(x, W_enc, b_enc, rows, cols, values)


def coo_decode(values: Tensor, W_dec: Tensor, rows: Tensor, cols: Tensor, n: int) -> Tensor:
    """``dense(values at (rows, cols)) @ W_dec`` as ``(n, d)`` without building the ``(n, F)`` matrix."""
    return CooDecode.apply(values, W_dec, rows, cols, n)
