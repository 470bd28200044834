"""Evaluation of multi-layer SAEs (MLSAE, methods §1.3): per-layer FVU, per-layer ΔCE and KL with the
reconstruction spliced at one layer at a time, and the latents' layer profile.

The CE/KL side goes through the one splice runner (:mod:`sae_hooks.eval.splice`): same kept positions,
same scored predictions, KL keys that name their direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..saes.base import SparseLatents
from ..saes.multilayer import MultiLayerSAE
from .splice import compare_replacements, hooks_splice_runner


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
) -> list[dict[str, Any]]:
    """For each layer ``l``: splice the reconstruction at ``l`` only and compare with the baseline run.

    As in MLSAE, both runs zero the special tokens' residual at layer ``l`` (the baseline is the model
    with only that edit); special tokens are also the positions left out of scoring. Returns per layer
    ``site``, ``ce_clean``, ``ce_sae``, ``delta_ce`` (= ce_sae − ce_clean, mean nats per scored
    prediction), ``kl_sae_clean`` = mean ``KL(p_sae ‖ p_clean)`` (MLSAE's direction; its logged value
    is this times the sequence length, the ``batchmean`` quirk) and ``kl_clean_sae`` (SAELens's).
    """
    sites = list(sites or [s.hook or s.module for s in sae.cfg.sites])
    out = []
    for site in sites:
        run = hooks_splice_runner(model, site, hooks=hooks, bos_token_id=list(special_token_ids))

        def zero_special(x: Tensor, keep: Tensor) -> Tensor:
            return torch.where(keep[..., None], x, torch.zeros_like(x))

        def splice(x: Tensor, keep: Tensor) -> Tensor:
            return torch.where(keep[..., None], sae(x).to(x.dtype), torch.zeros_like(x))

        r = compare_replacements(run, [tokens], {"clean": zero_special, "sae": splice}, "clean")
        ce_c, ce_s = r["ce"]["clean"], r["ce"]["sae"]
        out.append({"site": site, "ce_clean": ce_c, "ce_sae": ce_s, "delta_ce": ce_s - ce_c,
                    "kl_sae_clean": r["kl_to_ref"]["sae"], "kl_clean_sae": r["kl_ref"]["sae"]})
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
