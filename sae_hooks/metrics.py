"""SAE evaluation metrics: reconstruction (FVU, explained variance, L0, dead fraction) and downstream
(CE loss with the SAE spliced in, CE loss recovered against zero ablation, KL to the clean model).

Definitions (``x`` is ``(N, d)`` activations, ``x_hat`` the reconstruction):

* ``fvu = Σ ||x − x_hat||² / Σ ||x − mean(x)||²`` over the whole set (sparsify's / SAELens's explained
  variance is ``1 − fvu``); the mean is the dataset mean per dimension.
* ``l0``: mean number of nonzero latents per token. ``dead_fraction``: latents that never fired on
  the evaluation tokens.
* ``ce_loss_recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean)``: 1 is as good as the clean
  model, 0 as bad as replacing the site's activation with zeros.
* ``kl``: ``KL(p_clean || p_sae)`` per predicted token, averaged over tokens (not ``batchmean``).

The splice metrics run the model through a *splice runner* ``run(input_ids, attention_mask,
replace) -> logits``, where ``replace(x, keep) -> x'`` is applied to the site's activation ``(batch,
seq, d)`` with ``keep (batch, seq)`` marking the positions to edit (not BOS, not padding).
:func:`hooks_splice_runner` builds one from any ``install(site, fn)`` hook layer (a plain module, a
TransformerLens model, an adapter backend); this module imports no framework.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .saes.base import SAE, SparseLatents

Replace = Callable[[Tensor, Tensor], Tensor]
SpliceRunner = Callable[[Tensor, "Tensor | None", "Replace | None"], Tensor]


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained over a set of rows ``(N, d)`` (dataset mean per dimension)."""
    x, x_hat = x.detach().double().reshape(-1, x.shape[-1]), x_hat.detach().double().reshape(-1, x_hat.shape[-1])
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    return 1.0 - fvu(x, x_hat)


def l0(latents: Tensor | SparseLatents) -> float:
    """Mean number of nonzero latents per token."""
    if isinstance(latents, SparseLatents):
        return float((latents.values != 0).sum(-1).float().mean())
    return float((latents != 0).sum(-1).float().mean())


def fired(latents: Tensor | SparseLatents, d_sae: int) -> Tensor:
    """``(d_sae,)`` bool: which latents are nonzero in at least one row."""
    if isinstance(latents, SparseLatents):
        out = torch.zeros(d_sae, dtype=torch.bool, device=latents.values.device)
        out[latents.indices[latents.values != 0]] = True
        return out
    return (latents != 0).reshape(-1, latents.shape[-1]).any(0)


@torch.no_grad()
def reconstruction_metrics(sae: SAE, batches: Iterable[Tensor]) -> dict[str, float]:
    """FVU, explained variance, L0 and dead fraction of ``sae`` on batches of ``(N, d_in)`` activations.

    FVU is computed over all batches together (sums of squares accumulated in float64).
    """
    sq_err = 0.0
    n = 0
    s1: Tensor | None = None
    s2 = 0.0
    l0_sum = 0.0
    alive = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.device)
    for x in batches:
        x = x.reshape(-1, x.shape[-1]).to(sae.device)
        latents, state = sae.encode_with_state(x)
        x_hat = sae.reconstruct(x, latents, state).to(x.dtype)
        xd = x.double()
        sq_err += float((xd - x_hat.double()).pow(2).sum())
        s1 = xd.sum(0) if s1 is None else s1 + xd.sum(0)
        s2 += float(xd.pow(2).sum())
        n += x.shape[0]
        l0_sum += l0(latents) * x.shape[0]
        alive |= fired(latents, sae.cfg.d_sae)
    if n == 0 or s1 is None:
        raise ValueError("reconstruction_metrics got no activations")
    total_var = s2 - float(s1.pow(2).sum()) / n
    f = sq_err / max(total_var, 1e-30)
    return {
        "fvu": f,
        "explained_variance": 1.0 - f,
        "l0": l0_sum / n,
        "dead_fraction": float((~alive).float().mean()),
        "tokens": n,
    }


def next_token_ce(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[float, int]:
    """Summed next-token cross-entropy (nats) and the number of predicted tokens.

    Position ``t`` predicts token ``t + 1``; a prediction counts when token ``t + 1`` is real.
    """
    pred = logits[:, :-1].float()
    target = input_ids[:, 1:]
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none").reshape(target.shape)
    valid = torch.ones_like(target, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].bool()
    return float(ce[valid].sum()), int(valid.sum())


def kl_to_clean(clean_logits: Tensor, logits: Tensor, attention_mask: Tensor | None = None) -> tuple[float, int]:
    """Summed ``KL(p_clean || p)`` over predicting positions (all real positions except the last)."""
    lp_clean = F.log_softmax(clean_logits[:, :-1].float(), -1)
    lp = F.log_softmax(logits[:, :-1].float(), -1)
    kl = (lp_clean.exp() * (lp_clean - lp)).sum(-1)
    valid = (
        torch.ones(kl.shape, dtype=torch.bool, device=kl.device)
        if attention_mask is None
        else attention_mask[:, 1:].bool()
    )
    return float(kl[valid].sum()), int(valid.sum())


def sae_replace(sae: SAE) -> Replace:
    """``replace(x, keep)``: the SAE's reconstruction at kept positions, ``x`` elsewhere."""

    def replace(x: Tensor, keep: Tensor) -> Tensor:
        return torch.where(keep[..., None], sae(x).to(x.dtype), x)

    return replace


def zero_replace(x: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep[..., None], torch.zeros_like(x), x)


def hooks_splice_runner(
    model: Any,
    site: str,
    *,
    hooks: Any = None,
    bos_token_id: int | None = None,
    forward: Callable[[Any, Tensor, Tensor | None], Any] | None = None,
) -> SpliceRunner:
    """A :data:`SpliceRunner` over any ``install(site, fn)`` hook layer (default: chosen for ``model``).

    The forward returns logits (or an object with ``.logits``); ``keep`` excludes padding and, with
    ``bos_token_id``, BOS positions (which SAEs are usually not trained on).
    """
    from .sites import site_hooks
    from .train.sources import default_forward, token_mask

    layer = hooks if hooks is not None else site_hooks(model, [site])
    fwd = forward or default_forward

    @torch.no_grad()
    def run(input_ids: Tensor, attention_mask: Tensor | None, replace: Replace | None) -> Tensor:
        remove = None
        if replace is not None:
            keep = token_mask(input_ids, attention_mask, bos_token_id)
            remove = layer.install(site, lambda x: replace(x, keep.to(x.device)))
        try:
            out = fwd(model, input_ids, attention_mask)
        finally:
            if remove is not None:
                remove()
        return out.logits if hasattr(out, "logits") else out

    return run


@torch.no_grad()
def splice_metrics(run: SpliceRunner, sae: SAE, batches: Iterable[Any]) -> dict[str, float]:
    """CE loss clean / with the SAE spliced in / with the site zero-ablated, CE loss recovered, KL.

    ``batches``: ``(batch, seq)`` token tensors or dicts with ``input_ids`` (+ ``attention_mask``).
    """
    from .train.sources import _split_batch

    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl_sum, n = 0.0, 0
    replace = sae_replace(sae)
    for batch in batches:
        ids, mask = _split_batch(batch)
        clean = run(ids, mask, None)
        spliced = run(ids, mask, replace)
        zeroed = run(ids, mask, zero_replace)
        for key, logits in (("clean", clean), ("sae", spliced), ("zero", zeroed)):
            total, count = next_token_ce(logits, ids.to(logits.device), None if mask is None else mask.to(logits.device))
            ce[key] += total
        n += count
        kl_sum += kl_to_clean(clean, spliced, None if mask is None else mask.to(clean.device))[0]
    if n == 0:
        raise ValueError("splice_metrics got no tokens")
    ce = {k: v / n for k, v in ce.items()}
    denom = ce["zero"] - ce["clean"]
    return {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / denom if denom != 0 else float("nan"),
        "kl": kl_sum / n,
        "predicted_tokens": n,
    }
