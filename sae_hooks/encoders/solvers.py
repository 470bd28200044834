"""Sparse inference over a fixed dictionary: the solvers behind :mod:`sae_hooks.encoders`.

Every solver takes targets ``x (N, d)`` (the SAE's normalised input minus ``b_dec``) and the decoder
``W_dec (F, d)`` and returns codes ``s (N, F)`` with ``x ≈ s @ W_dec``. The penalised solvers (ISTA,
FISTA, ITO) minimise, independently per token,

    0.5 · ||x − s W_dec||² + λ · ||s||₁        (s ≥ 0 when ``nonnegative``, as SAE latents are)

which is scikit-learn's ``Lasso(alpha=λ / d, fit_intercept=False, positive=True)`` on ``X = W_decᵀ``,
``y = x`` (sklearn divides the squared error by ``2 · n_samples`` = ``2d``). The pursuits (MP, OMP)
take a budget of ``k`` atoms instead. All work batched on the decoder's device, with a fixed iteration
budget ``max_iter`` and a tolerance ``tol`` on the relative change of the codes (or of the residual).
"""

from __future__ import annotations

import torch
from torch import Tensor


def lipschitz_constant(W_dec: Tensor) -> float:
    """``L = λ_max(W_dec W_decᵀ)``: the Lipschitz constant of the gradient of ``0.5 ||x − s W_dec||²``.

    Computed from the ``(d, d)`` Gram matrix, so it costs ``F·d²`` whatever the dictionary size."""
    W = W_dec.detach().double()
    return float(torch.linalg.eigvalsh(W.T @ W).max())


def _prox(v: Tensor, thresh: float, nonnegative: bool) -> Tensor:
    if nonnegative:
        return (v - thresh).clamp_min(0)
    return v.sign() * (v.abs() - thresh).clamp_min(0)


def _start(x: Tensor, W_dec: Tensor, init: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(W, s, x)``: the detached decoder, the starting codes ``(N, F)`` (``init`` copied, or zeros) and the
    targets, all in the decoder's dtype and device."""
    W = W_dec.detach()
    s = torch.zeros(x.shape[0], W.shape[0], dtype=W.dtype, device=W.device) if init is None else init.to(W).clone()
    return W, s, x.to(W)


def _converged(new: Tensor, old: Tensor, tol: float) -> bool:
    return tol > 0 and float((new - old).norm()) <= tol * max(float(old.norm()), 1e-12)


@torch.no_grad()
def ista(x: Tensor, W_dec: Tensor, l1_coefficient: float, *, init: Tensor | None = None, max_iter: int = 500,
         tol: float = 1e-6, nonnegative: bool = True, lipschitz: float | None = None) -> Tensor:
    """Iterative shrinkage-thresholding: ``s ← prox_{λ/L}(s − (s W − x) Wᵀ / L)``."""
    W, s, x = _start(x, W_dec, init)
    L = lipschitz or lipschitz_constant(W)
    for _ in range(max_iter):
        new = _prox(s - ((s @ W - x) @ W.T) / L, l1_coefficient / L, nonnegative)
        done = _converged(new, s, tol)
        s = new
        if done:
            break
    return s


@torch.no_grad()
def fista(x: Tensor, W_dec: Tensor, l1_coefficient: float, *, init: Tensor | None = None, max_iter: int = 500,
          tol: float = 1e-6, nonnegative: bool = True, lipschitz: float | None = None) -> Tensor:
    """FISTA (Beck & Teboulle 2009): ISTA steps taken from a Nesterov-extrapolated point."""
    W, s, x = _start(x, W_dec, init)
    L = lipschitz or lipschitz_constant(W)
    y, t = s, 1.0
    for _ in range(max_iter):
        new = _prox(y - ((y @ W - x) @ W.T) / L, l1_coefficient / L, nonnegative)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = new + ((t - 1) / t_next) * (new - s)
        done = _converged(new, s, tol)
        s, t = new, t_next
        if done:
            break
    return s


@torch.no_grad()
def ito(x: Tensor, W_dec: Tensor, l1_coefficient: float, *, init: Tensor | None = None, max_iter: int = 500,
        tol: float = 1e-6, lr: float = 1e-2, nonnegative: bool = True, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8) -> Tensor:
    """Inference-time optimisation (O'Neill et al.): Adam on the codes of every token, projected onto
    ``s ≥ 0``. The gradient is written out (``(s W − x) Wᵀ + λ·sign(s)``), so it runs under
    ``torch.no_grad`` / ``inference_mode`` inside a forward hook."""
    W, s, x = _start(x, W_dec, init)
    m, v = torch.zeros_like(s), torch.zeros_like(s)
    b1, b2 = betas
    for step in range(1, max_iter + 1):
        g = (s @ W - x) @ W.T + l1_coefficient * s.sign()
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        upd = (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
        new = s - lr * upd
        if nonnegative:
            new.clamp_(min=0)
        done = _converged(new, s, tol)
        s = new
        if done:
            break
    return s


def _unit_atoms(W: Tensor) -> tuple[Tensor, Tensor]:
    norms = W.norm(dim=-1).clamp_min(1e-12)
    return W / norms[:, None], norms


@torch.no_grad()
def matching_pursuit(x: Tensor, W_dec: Tensor, k: int, *, nonnegative: bool = True, tol: float = 0.0) -> Tensor:
    """Matching pursuit with a budget of ``k`` steps: pick the atom most correlated with the residual
    (most positively correlated when ``nonnegative``), subtract its projection, repeat. An atom may
    be picked again (its coefficient accumulates). Stops early when ``||r|| ≤ tol·||x||``."""
    W = W_dec.detach()
    U, norms = _unit_atoms(W)
    r = x.to(W).clone()
    s = torch.zeros(x.shape[0], W.shape[0], dtype=W.dtype, device=W.device)
    x_norm = r.norm(dim=-1)
    rows = torch.arange(x.shape[0], device=W.device)
    for _ in range(k):
        c = r @ U.T
        idx = (c if nonnegative else c.abs()).argmax(-1)
        coef = c[rows, idx]
        if nonnegative:
            coef = coef.clamp_min(0)
        s[rows, idx] += coef / norms[idx]
        r -= coef[:, None] * U[idx]
        if tol > 0 and bool((r.norm(dim=-1) <= tol * x_norm).all()):
            break
    return s


@torch.no_grad()
def orthogonal_matching_pursuit(x: Tensor, W_dec: Tensor, k: int, *, nonnegative: bool = True, tol: float = 0.0,
                                ridge: float = 1e-10) -> Tensor:
    """Orthogonal matching pursuit with a budget of ``k`` distinct atoms: pick the atom most correlated
    with the residual (most positively when ``nonnegative``), then refit the coefficients of every
    chosen atom by least squares (normal equations, batched), repeat. With ``nonnegative`` negative
    least-squares coefficients are clipped to 0 (an approximation of non-negative least squares).
    Stops early when every residual satisfies ``||r|| ≤ tol·||x||``."""
    W = W_dec.detach()
    U, _ = _unit_atoms(W)
    x = x.to(W)
    n, F = x.shape[0], W.shape[0]
    k = min(k, F)
    support = torch.zeros(n, 0, dtype=torch.long, device=W.device)
    coef = torch.zeros(n, 0, dtype=W.dtype, device=W.device)
    r = x.clone()
    x_norm = x.norm(dim=-1)
    chosen = torch.zeros(n, F, dtype=torch.bool, device=W.device)
    rows = torch.arange(n, device=W.device)
    for _ in range(k):
        c = r @ U.T
        c = (c if nonnegative else c.abs()).masked_fill(chosen, float("-inf"))
        idx = c.argmax(-1)
        chosen[rows, idx] = True
        support = torch.cat([support, idx[:, None]], 1)
        A = W[support]  # (n, j, d)
        G = A @ A.transpose(1, 2) + ridge * torch.eye(A.shape[1], dtype=W.dtype, device=W.device)
        coef = torch.linalg.solve(G, (A @ x[:, :, None]))[..., 0]
        if nonnegative:
            coef = coef.clamp_min(0)
        r = x - (coef[:, :, None] * A).sum(1)
        if tol > 0 and bool((r.norm(dim=-1) <= tol * x_norm).all()):
            break
    s = torch.zeros(n, F, dtype=W.dtype, device=W.device)
    return s.scatter_add_(1, support, coef)
