"""Attribution through SAE latents (the sparse-feature-circuits workflow), on any adapter.

For every attached SAE, with ``f`` its latents ``(..., d_sae)`` and ``e`` its error ``(..., d)`` at the site
(the SAE spliced with its error term, so the model's output is unchanged):

* ``method="atp"`` (attribution patching): ``score_i = f_i * dm/df_i`` and ``error = sum_d e_d * dm/de_d``:
  the first-order estimate of what zero-ablating latent ``i`` (or the error node) removes from the metric
  (``m(ablated) - m ≈ -score``);
* ``method="ig"`` (integrated gradients along the latent path): latents and error are scaled together by
  ``α`` from 0 to 1 (midpoint rule, ``steps`` points); ``score_i = f_i * mean_α dm/df_i(α f)``. Completeness:
  ``sum(scores) + sum(error) ≈ m(α=1) - m(α=0)`` (the site then holds the decoder bias only).

Scores are per token position; the error node is its own entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..saes.base import SAE


@dataclass
class Attribution:
    """Scores for one SAE at one site: ``latents`` ``(..., d_sae)`` and ``error`` ``(...)`` (per position);
    ``activations`` are the latents themselves."""

    latents: Tensor
    error: Tensor
    activations: Tensor


class _Probe:
    """Makes an attachment's latents and error leaves of the graph (scaled by ``alpha``) and keeps them."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.kept: dict[str, Tensor] = {}
        self.raw: dict[str, Tensor] = {}

    def wants(self, name: str) -> bool:
        return name in ("hook_sae_acts_post", "hook_sae_error")

    def __call__(self, name: str, value: Tensor) -> Tensor:
        raw = value.detach()
        leaf = (raw * self.alpha).requires_grad_(True)
        self.raw[name], self.kept[name] = raw, leaf
        return leaf


def attribute(
    model: Any,
    metric: Callable[[Any], Tensor],
    tokens: Any,
    saes: SAE | Sequence[SAE] | None = None,
    *,
    method: Literal["atp", "ig"] = "atp",
    steps: int = 16,
    **forward_kwargs: Any,
) -> dict[str, Attribution]:
    """Per-latent and error-node attribution scores of ``metric(model(tokens))``.

    Args:
        model: a model given the SAE API by an adapter.
        metric: the model's output -> a scalar tensor (e.g. a logit difference).
        tokens: the model's input (passed as the first argument, with ``forward_kwargs``).
        saes: SAEs to attach (with the error term) for this call; ``None``: the attached ones (attach them
            with ``error_term=True`` for the scores to describe the real model).
        method: ``"atp"`` (activation × gradient) or ``"ig"`` (integrated gradients).
        steps: integration points for ``"ig"``.
    Returns:
        ``{attachment name (site): Attribution}``; multi-site SAEs get one entry per site, ``"{site}"``.
    """
    manager = getattr(model, "sae_manager", None)
    if manager is None:
        raise TypeError("attribute needs a model with the SAE API: call an adapter's attach(model) first")
    if method not in ("atp", "ig"):
        raise ValueError(f"method must be 'atp' or 'ig', got {method!r}")
    todo = [] if saes is None else ([saes] if isinstance(saes, SAE) else list(saes))
    with manager._temporarily(todo, True, {"error_term": True} if todo else {}):
        targets = [(att, site, iv) for att in manager.attachments for site, iv in zip(att.sites, att.interventions)]
        if not targets:
            raise ValueError("no SAE attached: pass saes= or attach SAEs first")
        alphas = [1.0] if method == "atp" else [(k + 0.5) / steps for k in range(steps)]
        totals: list[dict[str, Tensor]] = [{} for _ in targets]
        raws: list[dict[str, Tensor]] = [{} for _ in targets]
        for alpha in alphas:
            probes = [_Probe(alpha) for _ in targets]
            for (_, _, iv), probe in zip(targets, probes):
                iv.probe = probe
            try:
                with torch.enable_grad():
                    value = metric(manager.backend.forward(tokens, **forward_kwargs))
                    leaves = [p.kept[n] for p in probes for n in ("hook_sae_acts_post", "hook_sae_error")]
                    grads = torch.autograd.grad(value, leaves, allow_unused=True)
            finally:
                for _, _, iv in targets:
                    iv.probe = None
            for i, probe in enumerate(probes):
                for j, name in enumerate(("hook_sae_acts_post", "hook_sae_error")):
                    g = grads[2 * i + j]
                    g = torch.zeros_like(probe.raw[name]) if g is None else g
                    totals[i][name] = totals[i].get(name, 0) + g / len(alphas)
                    raws[i][name] = probe.raw[name]
    out: dict[str, Attribution] = {}
    for (att, site, _), total, raw in zip(targets, totals, raws):
        key = att.name if len(att.sites) == 1 else site
        f, e = raw["hook_sae_acts_post"], raw["hook_sae_error"]
        out[key] = Attribution(
            latents=f * total["hook_sae_acts_post"],
            error=(e * total["hook_sae_error"]).sum(-1),
            activations=f,
        )
    return out


__all__ = ["Attribution", "attribute"]
