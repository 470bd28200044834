"""The one CE/KL runner: the model's next-token loss with an SAE spliced in at a site.

Definitions, used by every splice metric in :mod:`sae_hooks.eval` (single-site, multi-layer, JSAE):

* **Kept positions** ``keep (batch, seq)``: real tokens (``attention_mask`` 1) that are not BOS /
  special tokens (``bos_token_id``: one id or several). Every replacement (SAE reconstruction,
  zero ablation) acts at kept positions only; the others keep the model's activation.
* **Scored predictions** ``scored (batch, seq-1)``: the prediction made at position ``t`` (of token
  ``t+1``) counts when ``t`` is kept and token ``t+1`` is real -- SAELens's ``ignore_tokens`` rule
  (the prediction *from* a BOS position is not scored) plus padding. CE and KL are means over
  scored predictions.
* ``ce_loss_score = (CE_zero − CE_sae) / (CE_zero − CE_clean)`` (SAELens's key and definition,
  ``sae_lens.evals``: 1 is as good as the clean model, 0 as bad as zero-ablating the site). The CEs
  are ``ce_clean`` / ``ce_sae`` / ``ce_zero`` (SAELens: ``ce_loss_without_sae`` / ``ce_loss_with_sae``
  / ``ce_loss_with_ablation``).
* KL keys name their direction: ``kl_clean_sae`` is ``KL(p_clean ‖ p_sae)`` (SAELens's
  ``kl_div_with_sae``), ``kl_sae_clean`` the reverse (MLSAE's ``LayerwiseLogitKLDiv``), per scored
  prediction, averaged over predictions (not summed over positions). ``kl_div_score =
  (KL_zero − KL_sae) / KL_zero`` with KLs from the clean distribution.

A splice runner ``run(input_ids, attention_mask, replace) -> logits`` applies ``replace(x, keep) ->
x'`` to the site's activation ``(batch, seq, d)``; :func:`hooks_splice_runner` builds one over any
``install(site, fn)`` hook layer. This module imports no framework.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..saes.base import SAE
from ..sites import site_hooks
from ..train.sources import _split_batch as split_batch

Replace = Callable[[Tensor, Tensor], Tensor]


def keep_mask(input_ids: Tensor, attention_mask: Tensor | None = None, bos_token_id: int | Sequence[int] | None = None) -> Tensor:
    """``(batch, seq)`` bool: real tokens that are not BOS (or any of the given special token ids)."""
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(input_ids.device).bool()
    if bos_token_id is not None:
        ids = [bos_token_id] if isinstance(bos_token_id, int) else list(bos_token_id)
        for i in ids:
            keep = keep & (input_ids != i)
    return keep


def scored_mask(keep: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``(batch, seq-1)`` bool: predictions from kept positions of real next tokens."""
    real = torch.ones_like(keep) if attention_mask is None else attention_mask.to(keep.device).bool()
    return keep[:, :-1] & real[:, 1:]


def next_token_ce(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Per-prediction next-token cross-entropy in nats, ``(batch, seq-1)`` float32: position ``t``
    predicts token ``t + 1``. Select scored predictions with :func:`scored_mask`."""
    pred = logits[:, :-1].float()
    target = input_ids[:, 1:].to(pred.device)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none").view(target.shape)


def kl_div(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """``KL(p ‖ q)`` per position, ``(batch, seq)`` float32, from two logit tensors ``(batch, seq, vocab)``."""
    lp, lq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def sae_replace(sae: SAE | Callable[[Tensor], Tensor]) -> Replace:
    """``replace(x, keep)``: the SAE's reconstruction at kept positions, ``x`` elsewhere."""

    def replace(x: Tensor, keep: Tensor) -> Tensor:
        return torch.where(keep[..., None], sae(x).to(x.dtype), x)

    return replace


def zero_replace(x: Tensor, keep: Tensor) -> Tensor:
    """Zero ablation at kept positions."""
    return torch.where(keep[..., None], torch.zeros_like(x), x)


def _default_forward(model: Any, input_ids: Tensor, attention_mask: Tensor | None) -> Any:
    return model(input_ids) if attention_mask is None else model(input_ids, attention_mask=attention_mask)


class SpliceRunner:
    """Runs ``model`` with ``replace`` applied at ``site`` (through any ``install(site, fn)`` hook layer).

    ``runner(input_ids, attention_mask, replace) -> logits (batch, seq, vocab)``; ``replace=None`` is
    the clean run. :meth:`keep` is the one position mask used for splicing and scoring.
    """

    def __init__(
        self,
        model: Any,
        site: str,
        *,
        hooks: Any = None,
        bos_token_id: int | Sequence[int] | None = None,
        forward: Callable[[Any, Tensor, Tensor | None], Any] | None = None,
    ):
        self.model, self.site, self.bos_token_id = model, site, bos_token_id
        self.hooks = hooks if hooks is not None else site_hooks(model, [site])
        self.forward = forward or _default_forward

    def keep(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return keep_mask(input_ids, attention_mask, self.bos_token_id)

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None, replace: Replace | None) -> Tensor:
        remove = None
        if replace is not None:
            keep = self.keep(input_ids, attention_mask)
            remove = self.hooks.install(self.site, lambda x: replace(x, keep.to(x.device)))
        try:
            out = self.forward(self.model, input_ids, attention_mask)
        finally:
            if remove is not None:
                remove()
        return out.logits if hasattr(out, "logits") else out


def hooks_splice_runner(
    model: Any,
    site: str,
    *,
    hooks: Any = None,
    bos_token_id: int | Sequence[int] | None = None,
    forward: Callable[[Any, Tensor, Tensor | None], Any] | None = None,
) -> SpliceRunner:
    """A :class:`SpliceRunner` at ``site`` of ``model`` (hooks chosen for the model unless given).

    The forward returns logits (or an object with ``.logits``); kept positions exclude padding and,
    with ``bos_token_id``, BOS (which SAEs are usually not trained on)."""
    return SpliceRunner(model, site, hooks=hooks, bos_token_id=bos_token_id, forward=forward)


@torch.no_grad()
def compare_replacements(
    run: SpliceRunner, batches: Iterable[Any], replacements: dict[str, Replace | None], reference: str
) -> dict[str, Any]:
    """Mean CE of each replacement and KLs against the ``reference`` one, over scored predictions.

    Returns ``{"ce": {name: nats}, "kl_ref": {name: KL(p_ref ‖ p_name)}, "kl_to_ref": {name: KL(p_name ‖
    p_ref)}, "predicted_tokens": n}`` (the KL dicts leave out the reference itself).
    """
    ce = dict.fromkeys(replacements, 0.0)
    others = [k for k in replacements if k != reference]
    kl_ref, kl_to = dict.fromkeys(others, 0.0), dict.fromkeys(others, 0.0)
    n = 0
    for batch in batches:
        ids, mask = split_batch(batch)
        logits = {name: run(ids, mask, rep) for name, rep in replacements.items()}
        ref = logits[reference][:, :-1]
        scored = scored_mask(run.keep(ids.to(ref.device), mask), mask)
        n += int(scored.sum())
        for name, lg in logits.items():
            ce[name] += float(next_token_ce(lg, ids)[scored].sum())
            if name != reference:
                kl_ref[name] += float(kl_div(ref, lg[:, :-1])[scored].sum())
                kl_to[name] += float(kl_div(lg[:, :-1], ref)[scored].sum())
    if n == 0:
        raise ValueError("no scored predictions: every batch is empty, padding or BOS")
    return {"ce": {k: v / n for k, v in ce.items()}, "kl_ref": {k: v / n for k, v in kl_ref.items()},
            "kl_to_ref": {k: v / n for k, v in kl_to.items()}, "predicted_tokens": n}


def _score(worst: float, value: float, best: float) -> float:
    return (worst - value) / (worst - best) if worst != best else float("nan")


@torch.no_grad()
def splice_metrics(run: SpliceRunner, sae: SAE | Callable[[Tensor], Tensor], batches: Iterable[Any]) -> dict[str, float]:
    """CE loss clean / with the SAE spliced in / with the site zero-ablated, ``ce_loss_score``, KLs.

    ``batches``: ``(batch, seq)`` token tensors or dicts with ``input_ids`` (+ ``attention_mask``).
    Keys: ``ce_clean``, ``ce_sae``, ``ce_zero``, ``ce_loss_score``, ``kl_clean_sae``,
    ``kl_clean_zero``, ``kl_div_score``, ``predicted_tokens`` (definitions in the module docstring).
    """
    r = compare_replacements(run, batches, {"clean": None, "sae": sae_replace(sae), "zero": zero_replace}, "clean")
    ce, kl = r["ce"], r["kl_ref"]
    return {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "ce_loss_score": _score(ce["zero"], ce["sae"], ce["clean"]),
        "kl_clean_sae": kl["sae"],
        "kl_clean_zero": kl["zero"],
        "kl_div_score": _score(kl["zero"], kl["sae"], 0.0),
        "predicted_tokens": r["predicted_tokens"],
    }
