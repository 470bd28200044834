"""Feature Choice and Mutual Choice SAEs (Ayonrinde 2024, arXiv 2411.02124).

Sparsification as an allocation on the batch's ``(N tokens × F features)`` matrix of ReLU'd
pre-activations with a total budget of ``k·N`` matches:

* **Mutual Choice** (``mutual_choice``): the ``k·N`` largest entries of the whole matrix survive (the
  same selection as BatchTopK). Tokens get a variable number of latents.
* **Feature Choice** (``feature_choice``): feature ``i`` keeps its ``m_i`` largest entries down the
  batch (its top-``m_i`` tokens); uniform ``m = k·N/F`` (:func:`uniform_capacities`: when not an integer,
  ``⌊m⌋`` each and the rest of the ``k·N`` to the features with the best next match, never below 1) or
  Zipf-distributed capacities (:func:`zipf_capacities`). Every feature with a positive pre-activation
  somewhere in the batch fires, so none can die.

``k`` sets the budget; the training setting ``budget`` (average matches per token, may be fractional)
overrides it, e.g. to match a target mean L0 at inference.

Only entries > 0 are kept (ReLU), so "exactly ``k·N``" holds whenever the batch has that many positive
pre-activations.

Both selections depend on the batch. **Inference** (a single prompt, splicing, steering) uses learned
thresholds instead, so a token's latents never depend on its neighbours: ``f = ReLU(pre)·1[pre > θ]``,
with one scalar ``θ`` for Mutual Choice (an EMA of the smallest kept value, as BatchTopK) and one ``θ_i``
per feature for Feature Choice (an EMA of the smallest value feature ``i`` kept, i.e. its ``m_i``-th
largest pre-activation in the batch, an estimate of its ``1 − m_i/N`` quantile). The thresholds and the
EMA of each feature's firing density (``feature_density``, used by Zipf capacities and
``aux_zipf_loss``) are persistent buffers, so training resumes exactly and saved SAEs carry them.

Training: ``mse_scale · mean ||y − y_hat||²`` (TopK's normalised MSE) on the selection, plus
``aux_coefficient ·`` :func:`aux_zipf_loss` (or OpenAI's AuxK with ``aux="k"``); unit-norm decoder rows.

``aux_zipf_loss`` is OUR definition: the paper's formula (arXiv 2411.02124, body not stored in any source
this project can read; docs/methods.md lists what was searched) is unknown. Its abstract and reviews say only
"generalises aux_k_loss to mitigate dead and underutilised features" and "the Zipf distribution fits the
feature densities except at the lower end". Ours is AuxK exactly when every feature is either dead or
at/above its Zipf-expected density:

1. rank the features by their firing density ``d_i`` (EMA over training batches), rank ``r_i = 1`` the most
   used; fit ``log d = c − α log r`` by least squares on the upper half of the ranks with ``d > 0`` (or fix
   ``α`` and fit ``c`` only): the Zipf curve ``e_i = exp(c)·r_i^-α``;
2. under-use weight ``w_i = clamp(1 − d_i / e_i, 0, 1)`` (1 for a dead feature, 0 at or above the curve);
3. per token, the ``aux_k`` features with the largest ``w_i · ReLU(pre_i)`` among ``w_i > 0`` and not already
   matched with that token by the main allocation (as AuxK's dead latents never are) reconstruct the detached
   residual ``e = y − y_hat``: ``r = Σ_i w_i ReLU(pre_i) W_dec[i]`` (no ``b_dec``);
4. ``aux_zipf_loss = mean ||e − r||² / mean ||e − mean(e)||²`` (OpenAI's normalisation, as our AuxK).

Training works on the selected entries only: sorted token-major (:func:`~sae_hooks.saes.kernels.token_major`),
they go through BatchTopK's ragged kernels (:func:`~sae_hooks.saes.kernels.gather_encode_ragged`,
:func:`~sae_hooks.saes.kernels.sparse_decode_ragged`: the ``nnz`` selected pre-activations and the
reconstruction, with a sparse backward), so no dense ``(N, F)`` gradient exists; the dense ``(N, F)`` pre-activation
matrix used to choose the entries is computed without autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import SAEConfig
from ..errors import ConfigError
from .base import SAE, SparseLatents, sparse_decode
from .kernels import gather_encode, gather_encode_ragged, sparse_decode_ragged, token_major
from .registry import register_sae_class
from .training import AuxKSettings, LossOutput, StepContext, TrainingSpec, auxk_nmse, dead_reconstruction, encoder_input, mse, skip_term

class _ChoiceSAE(SAE):
    uses_k = True

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

    def select(self, pre: Tensor, budget: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training selection on ``pre (N, F)``: ``(rows, cols, values)`` of the ``round(budget·N)`` largest
        positive entries; ``budget`` (average matches per token) defaults to ``k``."""
        return mutual_choice_select(pre, float(self.cfg.k if budget is None else budget))  # type: ignore[arg-type]


class FeatureChoiceSAE(_ChoiceSAE):
    architecture = "feature_choice"

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype))

    def select(self, pre: Tensor, capacities: Tensor | None = None, budget: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training selection on ``pre (N, F)``: each feature's top-``capacities[i]`` tokens (positive only);
        ``capacities=None`` is the uniform ``m = budget·N/F`` of :func:`uniform_capacities` (``budget``, the
        average matches per token, defaults to ``k``)."""
        if capacities is None:
            b = float(self.cfg.k if budget is None else budget)  # type: ignore[arg-type]
            n, f = pre.shape
            total = round(b * n)
            base = max(1, total // f)
            # the (⌊m⌋+1)-th largest value of each feature ranks who takes the fractional part of m
            nxt = pre.topk(base + 1, dim=0).values[-1] if total > base * f and base < n else None
            capacities = uniform_capacities(f, b, n, pre.device, nxt)
        return feature_choice_select(pre, capacities)


# Selections ---------------------------------------------------------------------------------------


@torch.no_grad()
def mutual_choice_select(pre: Tensor, k: float) -> tuple[Tensor, Tensor, Tensor]:
    """The ``round(k·N)`` largest entries of ``pre (N, F)`` that are > 0, as ``(rows, cols, values)`` (each
    ``(nnz,)``); ``k`` (average matches per token) may be fractional."""
    n, f = pre.shape
    values, pos = pre.reshape(-1).topk(min(round(k * n), n * f), sorted=False)
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


def uniform_capacities(d_sae: int, k: float, n_tokens: int, device: torch.device | str = "cpu",
                       next_values: Tensor | None = None) -> Tensor:
    """The budget ``T = round(k·N)`` spread evenly: ``m = T/F`` tokens per feature, never below 1.

    When ``T/F`` is not an integer, every feature gets ``⌊T/F⌋`` and the ``T mod F`` left over go one each to
    the features with the largest ``next_values (F,)`` (their ``(⌊T/F⌋+1)``-th largest pre-activation in the
    batch: the best of the matches not yet taken), so the batch total is exactly ``T``; without
    ``next_values`` the fractional part is rounded (``round(T/F)`` each)."""
    total = round(k * n_tokens)
    base = max(1, total // d_sae)
    rem = total - base * d_sae
    if rem <= 0 or next_values is None:
        m = max(1, round(total / d_sae)) if next_values is None else base
        return torch.full((d_sae,), m, dtype=torch.long, device=device)
    caps = torch.full((d_sae,), base, dtype=torch.long, device=device)
    caps[next_values.topk(rem, sorted=False).indices.to(device)] += 1
    return caps


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


# aux_zipf_loss ------------------------------------------------------------------------------------


@torch.no_grad()
def zipf_expected_density(density: Tensor, alpha: float | None = None) -> Tensor:
    """The Zipf curve ``e_i = exp(c) · r_i^-α`` fitted to ``density (F,)`` (see the module docstring);
    zeros when fewer than two features (one with a fixed ``alpha``) of the upper half have ``d > 0``."""
    f = density.shape[0]
    d = density.double()
    order = torch.sort(d, descending=True, stable=True).indices
    ranks = torch.empty(f, dtype=torch.float64, device=d.device)
    ranks[order] = torch.arange(1, f + 1, dtype=torch.float64, device=d.device)
    fit = (ranks <= max(1, f // 2)) & (d > 0)
    if int(fit.sum()) < (1 if alpha is not None else 2):
        return torch.zeros_like(d)
    lr, ld = ranks[fit].log(), d[fit].log()
    if alpha is None:
        lr_c = lr - lr.mean()
        denom = (lr_c * lr_c).sum()
        a = -(lr_c * (ld - ld.mean())).sum() / denom if float(denom) > 0 else torch.zeros((), dtype=d.dtype, device=d.device)
    else:
        a = torch.tensor(float(alpha), dtype=d.dtype, device=d.device)
    c = (ld + a * lr).mean()
    return torch.exp(c - a * ranks.log())


@torch.no_grad()
def zipf_weights(density: Tensor, alpha: float | None = None) -> Tensor:
    """Under-use weights ``w_i = clamp(1 − d_i/e_i, 0, 1)``; without a fitted curve, 1 for dead features only."""
    expected = zipf_expected_density(density, alpha)
    d = density.double()
    w = torch.where(expected > 0, (1 - d / expected.clamp_min(1e-300)).clamp(0, 1), (d <= 0).double())
    return w.to(density.dtype)


def aux_zipf_loss(
    sae: SAE, x_in: Tensor, pre: Tensor, residual: Tensor, weights: Tensor, aux_k: int,
    aux_denom: Callable[[Tensor], Tensor] | None = None, selected: tuple[Tensor, Tensor] | None = None,
) -> Tensor | None:
    """The auxiliary loss of the module docstring; ``None`` when no feature is under-used.

    ``x_in (N, d_in)`` encoder input, ``pre (N, F)`` its (no-grad) pre-activations, ``residual (N, d)``
    detached, ``weights (F,)`` from :func:`zipf_weights`, ``selected``: the ``(rows, cols)`` of the main
    allocation, which are not auxiliary candidates (training always passes them)."""
    candidates = weights > 0
    k_aux = min(aux_k, int(candidates.sum()))
    if k_aux == 0:
        return None
    with torch.no_grad():
        score = (torch.relu(pre) * weights).masked_fill(~candidates, float("-inf"))
        if selected is not None:  # entries already in the main reconstruction are not auxiliary candidates
            score[selected[0], selected[1]] = float("-inf")
        idx = score.topk(k_aux, dim=-1, sorted=False).indices
        values = pre.gather(-1, idx)
    b_enc = sae.b_enc if sae.has_encoder_bias else None
    acts = torch.relu(gather_encode(x_in, sae.W_enc, b_enc, idx, values)) * weights[idx]
    return auxk_nmse(sparse_decode(SparseLatents(acts, idx, sae.cfg.d_sae), sae.W_dec), residual, aux_denom)


# Training -----------------------------------------------------------------------------------------


@dataclass
class ChoiceSettings(AuxKSettings):
    """``aux``: ``zipf`` (:func:`aux_zipf_loss`) or ``k`` (AuxK on dead latents); ``zipf_alpha``: the Zipf
    exponent (``None``: fitted; Zipf capacities then use 1.0); ``threshold_lr``, ``density_lr``: EMA rates
    of the inference thresholds and of the feature densities; ``budget``: average matches per token of the
    training allocation (``round(budget·N)`` per batch; ``None``: ``k``; may be fractional). ``aux_k`` defaults to 32, not AuxK's 256:
    the under-used set of ``aux_zipf_loss`` is large (up to half the features), so 256 auxiliary latents
    per token would cost 16x the main selection at k = 16."""

    aux_k: int = 32
    aux: str = "zipf"
    zipf_alpha: float | None = None
    threshold_lr: float = 0.01
    density_lr: float = 0.01
    budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is not None and not self.budget > 0:
            raise ConfigError(f"{type(self).__name__}.budget must be > 0 (average matches per token), got {self.budget!r}")
        if self.aux not in ("zipf", "k"):
            raise ConfigError(f"{type(self).__name__}.aux must be 'zipf' or 'k', got {self.aux!r}")


@dataclass
class FeatureChoiceSettings(ChoiceSettings):
    """Plus ``capacities``: ``uniform`` (``round(k·N/F)``) or ``zipf`` (:func:`zipf_capacities` by density rank)."""

    capacities: str = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.capacities not in ("uniform", "zipf"):
            raise ConfigError(f"FeatureChoiceSettings.capacities must be 'uniform' or 'zipf', got {self.capacities!r}")


class ChoiceTraining(TrainingSpec):
    settings = ChoiceSettings
    synced_buffers = ("threshold", "feature_density")

    def select(self, sae: _ChoiceSAE, pre: Tensor, settings: ChoiceSettings, first: bool) -> tuple[Tensor, Tensor, Tensor]:
        return sae.select(pre, budget=settings.budget)  # type: ignore[attr-defined]

    def loss(self, sae: _ChoiceSAE, x: Tensor, target: Tensor | None, settings: ChoiceSettings, ctx: StepContext) -> LossOutput:
        y = x if target is None else target
        x_in = encoder_input(sae, x)
        b_enc = sae.b_enc if sae.has_encoder_bias else None
        n = x.shape[0]
        first = ctx.step == 0
        with torch.no_grad():
            pre = x_in @ sae.W_enc
            if b_enc is not None:
                pre = pre + b_enc
            rows, cols, values = self.select(sae, pre, settings, first)
            weights = zipf_weights(sae.feature_density, settings.zipf_alpha) if settings.aux == "zipf" and not first else None
        sel = token_major(rows, cols, values, n)
        acts = torch.relu(gather_encode_ragged(x_in, sae.W_enc, b_enc, sel))
        y_hat = sparse_decode_ragged(acts, sel.cols, sel.crow, sae.W_dec) + sae.b_dec + skip_term(sae, x)
        err = mse(y, y_hat)
        loss = ctx.mse_scale * err
        aux = torch.zeros((), dtype=err.dtype, device=err.device)
        if settings.aux_coefficient:
            residual = (y - y_hat).detach()
            if settings.aux == "zipf":
                a = (aux_zipf_loss(sae, x_in, pre, residual, weights, settings.aux_k, ctx.aux_denom, (rows, cols))
                     if weights is not None else None)
            else:
                recon = dead_reconstruction(sae, x_in, pre, ctx.dead, settings.aux_k)
                a = None if recon is None else auxk_nmse(recon, residual, ctx.aux_denom)
            if a is not None:
                aux = settings.aux_coefficient * a
                loss = loss + aux
        with torch.no_grad():
            fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
            fired[cols] = True
            l0 = torch.tensor(rows.numel() / max(n, 1), device=x.device)
        return LossOutput(loss, fired, {"mse": err.detach(), "aux": aux.detach(), "l0": l0},
                          {"cols": cols, "values": values.detach(), "n": torch.tensor(n)})

    @torch.no_grad()
    def after_step(self, sae: _ChoiceSAE, settings: ChoiceSettings, out: LossOutput, first: bool) -> None:
        cols, values, n = out.updates["cols"], out.updates["values"], int(out.updates["n"])
        f = sae.cfg.d_sae
        counts = torch.bincount(cols, minlength=f).to(sae.feature_density.dtype) / max(n, 1)
        if first:
            sae.feature_density.copy_(counts)
        else:
            sae.feature_density.add_(settings.density_lr * (counts - sae.feature_density))
        if not values.numel():
            return
        lr = settings.threshold_lr
        if sae.threshold.dim() == 0:
            low = values.min().to(sae.threshold.dtype)
            sae.threshold.copy_(low if first else sae.threshold + lr * (low - sae.threshold))
            return
        low = torch.full((f,), float("inf"), dtype=values.dtype, device=values.device).scatter_reduce(0, cols, values, reduce="amin")
        hit = torch.isfinite(low)
        low = low.to(sae.threshold.dtype)
        sae.threshold[hit] = low[hit] if first else sae.threshold[hit] + lr * (low[hit] - sae.threshold[hit])


class FeatureChoiceTraining(ChoiceTraining):
    settings = FeatureChoiceSettings

    def select(self, sae: FeatureChoiceSAE, pre: Tensor, settings: FeatureChoiceSettings, first: bool) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        caps = None
        if settings.capacities == "zipf" and not first:
            alpha = settings.zipf_alpha if settings.zipf_alpha is not None else 1.0
            budget = float(sae.cfg.k if settings.budget is None else settings.budget)  # type: ignore[arg-type]
            caps = zipf_capacities(sae.feature_density, round(budget * pre.shape[0]), alpha)
        return sae.select(pre, caps, budget=settings.budget)


register_sae_class(MutualChoiceSAE, spec=ChoiceTraining())
register_sae_class(FeatureChoiceSAE, spec=FeatureChoiceTraining())
