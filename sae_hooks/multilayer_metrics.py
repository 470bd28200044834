"""Evaluation of multi-site SAEs: MLSAE per-layer FVU, ΔCE and KL, the latents' layer profile
(methods §1.3), and CE loss recovered for each SAE of a JSAE pair (methods §2.5).

Model access is framework-free: sites are hooked through any ``install(site, fn)`` object (an adapter's
backend, or :func:`sae_hooks.sites.site_hooks`), and logits come from ``model(tokens)`` (``.logits``
when the output has it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .saes.base import SAE, SparseLatents
from .saes.multilayer import MultiLayerSAE, zero_special_tokens


def _hooks(model: Any, sites: Sequence[str], hooks: Any) -> Any:
    if hooks is not None:
        return hooks
    from .sites import site_hooks

    return site_hooks(model, list(sites))


def model_logits(model: Any, tokens: Tensor) -> Tensor:
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-token next-token cross-entropy ``(batch, seq-1)``."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none").view(
        tokens.shape[0], -1
    )


@contextlib.contextmanager
def _installed(hooks: Any, site_fns: Sequence[tuple[str, Callable[[Tensor], Tensor | None]]]) -> Iterator[None]:
    removers = []
    try:
        for site, fn in site_fns:
            removers.append(hooks.install(site, fn))
        yield
    finally:
        for r in reversed(removers):
            r()


# MLSAE ------------------------------------------------------------------------------------------------


@torch.no_grad()
def mlsae_fvu_per_layer(sae: MultiLayerSAE, x: Tensor) -> list[float]:
    """MLSAE's FVU per layer for residuals ``x (n_layers, N, d)``: ``mean((x_hat - x)^2) / var(x_l)``
    (unbiased scalar variance of the layer's entries; one batch)."""
    x_hat = sae(x)
    mse = (x_hat - x).pow(2).mean((1, 2))
    return (mse / x.reshape(x.shape[0], -1).var(-1)).tolist()


@torch.no_grad()
def mlsae_layerwise_ce(
    model: Any, sae: MultiLayerSAE, tokens: Tensor, special_token_ids: Sequence[int] = (), *, hooks: Any = None,
    sites: Sequence[str] | None = None,
) -> list[dict[str, float]]:
    """For each layer ``l``: splice the reconstruction at ``l`` only and compare with the clean run.

    Both runs zero the special tokens' residual at layer ``l`` (as MLSAE does). Returns per layer
    ``ce_clean``, ``ce_sae``, ``delta_ce`` (= ce_sae - ce_clean, mean nats per predicted token) and
    ``kl`` = mean over predicted positions of KL(p_sae ‖ p_clean) (MLSAE's ``kl_div`` direction; its
    logged value is this times the sequence length, its ``batchmean`` quirk).
    """
    sites = list(sites or [s.hook or s.module for s in sae.cfg.sites])
    hooks = _hooks(model, sites, hooks)
    out = []
    for site in sites:
        def zero(x: Tensor) -> Tensor:
            return zero_special_tokens(x, tokens, special_token_ids)

        def splice(x: Tensor) -> Tensor:
            return zero_special_tokens(sae(x), tokens, special_token_ids)

        with _installed(hooks, [(site, zero)]):
            clean = model_logits(model, tokens)
        with _installed(hooks, [(site, splice)]):
            spliced = model_logits(model, tokens)
        lp_clean = clean[:, :-1].float().log_softmax(-1)
        lp_sae = spliced[:, :-1].float().log_softmax(-1)
        kl = (lp_sae.exp() * (lp_sae - lp_clean)).sum(-1).mean()
        ce_c, ce_s = next_token_ce(clean, tokens).mean().item(), next_token_ce(spliced, tokens).mean().item()
        out.append({"site": site, "ce_clean": ce_c, "ce_sae": ce_s, "delta_ce": ce_s - ce_c, "kl": kl.item()})
    return out


@torch.no_grad()
def layer_profile(latents: SparseLatents | Tensor) -> dict[str, float]:
    """How the latents spread over layers, for latents ``(n_layers, n_tokens, d_sae)`` (dense or sparse).

    With ``a[l, t, f] >= 0`` and ``p[l, t, f] = a[l, t, f] / Σ_l a[l, t, f]`` (0 where the sum is 0), and
    ``var(q) = Σ_l l² q_l − (Σ_l l q_l)²`` (MLSAE ``analysis/variances.py``):

    * ``exp_var_l_tf`` = mean over (t, f) of ``var(p[:, t, f])`` -- spread over layers of one token;
    * ``exp_var_l_f`` = mean over f of ``var(mean_t p[:, t, f])`` -- spread after aggregating tokens;
    * ``var_l`` = ``var(mean_{t,f} p)``; ``rel_var_t = exp_var_l_tf / exp_var_l_f`` (the paper: ≈ 1/100);
      ``rel_var_f = exp_var_l_f / var_l``.

    And two counts that say the same in words:

    * ``single_layer_share_per_token``: of the (token, latent) pairs active at some layer, the share
      active at exactly one layer;
    * ``single_layer_share_across_tokens``: of the latents active anywhere, the share active at exactly
      one layer over all tokens.
    """
    a = latents.to_dense() if isinstance(latents, SparseLatents) else latents
    a = a.float().clamp_min(0)
    L = a.shape[0]
    layers = torch.arange(L, dtype=a.dtype, device=a.device).view(L, *([1] * (a.dim() - 1)))

    def var(q: Tensor) -> Tensor:
        lay = layers.view(L, *([1] * (q.dim() - 1)))
        return (lay**2 * q).sum(0) - (lay * q).sum(0) ** 2

    p = (a / a.sum(0, keepdim=True)).nan_to_num_(0.0)
    e_tf = var(p).mean()
    e_f = var(p.mean(1)).mean()
    v_l = var(p.mean((1, 2)))
    active = a > 0
    n_tok_lat = active.sum(0)  # (T, F): layers at which each (token, latent) is active
    any_tok = n_tok_lat > 0
    per_latent_layers = active.any(1).sum(0)  # (F,)
    any_lat = per_latent_layers > 0
    return {
        "exp_var_l_tf": e_tf.item(), "exp_var_l_f": e_f.item(), "var_l": v_l.item(),
        "rel_var_t": (e_tf / e_f).item() if e_f > 0 else float("nan"),
        "rel_var_f": (e_f / v_l).item() if v_l > 0 else float("nan"),
        "single_layer_share_per_token": ((n_tok_lat == 1).sum() / any_tok.sum().clamp_min(1)).item(),
        "single_layer_share_across_tokens": ((per_latent_layers == 1).sum() / any_lat.sum().clamp_min(1)).item(),
    }


# JSAE --------------------------------------------------------------------------------------------------


@torch.no_grad()
def ce_loss_recovered(model: Any, sae: SAE, site: str, tokens: Tensor, *, hooks: Any = None) -> dict[str, float]:
    """JSAE's CE-loss score at one site: ``(CE_zero − CE_sae) / (CE_zero − CE_clean)``, with the SAE's
    reconstruction spliced at ``site`` vs the activation there zero-ablated. Also returns the CEs."""
    hooks = _hooks(model, [site], hooks)
    ce_clean = next_token_ce(model_logits(model, tokens), tokens).mean().item()
    with _installed(hooks, [(site, lambda x: sae(x))]):
        ce_sae = next_token_ce(model_logits(model, tokens), tokens).mean().item()
    with _installed(hooks, [(site, torch.zeros_like)]):
        ce_zero = next_token_ce(model_logits(model, tokens), tokens).mean().item()
    score = (ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan")
    return {"ce_clean": ce_clean, "ce_sae": ce_sae, "ce_zero": ce_zero, "ce_loss_score": score}
