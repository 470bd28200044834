"""Training a multi-layer SAE in place: one forward pass gives every layer's residual, and every
(layer, token) vector is an example for the same SAE (methods §1.2).

Loss (MLSAE's ``MSELoss`` + ``AuxiliaryLoss``), with ``x_l`` the raw residuals of layer ``l`` in the batch
and ``x_hat`` the de-standardised reconstruction::

    loss = mean_l( mean((x_hat_l - x_l)^2) / var(x_l) ) + aux_coefficient * AuxK

``var`` is the unbiased scalar variance of all of the layer's entries in the batch. AuxK (Gao et al.):
``e = x - x_hat`` (detached, raw space); ``r`` = decode of the top-``aux_k`` pre-activations among dead
latents, mapped to raw space by the per-vector scale (no bias); ``AuxK = mean((e - r)^2) / mean((e -
mean_d e)^2)``. Deviation from the MLSAE code, on purpose: its ``r`` stays in standardised space and
carries ``+ b_pre`` (a quirk methods §1.2 flags). A latent is dead after ``dead_steps`` steps without
being in a TopK set with value > 1e-3 (counted in optimizer steps, not forward calls).

After every backward pass the gradient parallel to each decoder row is removed; after every step
decoder rows are renormalised to unit norm. ``b_dec`` (MLSAE's ``pre_encoder_bias``) starts at the
geometric median of the first batch's *standardised* inputs, pooled over layers -- the space where it
is used (MLSAE's code uses the raw inputs, a quirk we do not copy). Special tokens are zeroed at every
layer (:func:`~sae_hooks.saes.multilayer.zero_special_tokens`), as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ShapeMismatchError
from ..saes.base import SparseLatents, sparse_decode
from ..saes.multilayer import MultiLayerSAE, zero_special_tokens
from ..saes.kernels import gather_encode
from .sources import ActivationReader
from .trainer import geometric_median


def _unit_norm_decoder(sae: MultiLayerSAE) -> None:
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def _remove_parallel_grad(W: Tensor) -> None:
    if W.grad is None:
        return
    unit = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    W.grad.sub_((W.grad * unit).sum(-1, keepdim=True) * unit)


class MLSAETrainer:
    """Adam on an :class:`~sae_hooks.saes.multilayer.MultiLayerSAE`; :meth:`step` takes ``(n_layers, N, d)``.

    Defaults follow MLSAE (Adam, eps 6.25e-10, AuxK 256 at 1/32) except ``lr`` (MLSAE: 1e-4 with
    131k-token batches; short runs on small models want more).
    """

    def __init__(self, sae: MultiLayerSAE, lr: float = 1e-3, eps: float = 6.25e-10, aux_k: int = 256,
                 aux_coefficient: float = 1 / 32, dead_steps: int = 76):
        self.sae = sae
        self.opt = torch.optim.Adam(sae.parameters(), lr=lr, eps=eps)
        self.aux_k, self.aux_coefficient, self.dead_steps = aux_k, aux_coefficient, dead_steps
        self.since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.device)
        self.steps = 0

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Loss and metrics for raw residuals ``x (n_layers, N, d)`` (special tokens already zeroed)."""
        sae = self.sae
        if x.dim() != 3 or x.shape[-1] != sae.cfg.d_in:
            raise ShapeMismatchError(f"MLSAE training batches are (n_layers, N, d_in={sae.cfg.d_in}), got {tuple(x.shape)}")
        x = x.to(sae.dtype)
        L, N, d = x.shape
        xs, state = sae.normalize_input(x.reshape(L * N, d))
        x_in = xs - sae.b_dec
        with torch.no_grad():
            pre = x_in @ sae.W_enc
            values, idx = pre.topk(sae.k, dim=-1, sorted=False)
        acts = torch.relu(gather_encode(x_in, sae.W_enc, None, idx, values))
        x_hat = (sparse_decode(SparseLatents(acts, idx, sae.cfg.d_sae), sae.W_dec) + sae.b_dec) * state.scale + state.shift
        x_hat = x_hat.reshape(L, N, d)
        mse_l = (x_hat - x).pow(2).mean((1, 2))
        var_l = x.reshape(L, -1).var(-1).clamp_min(1e-12)
        fvu_l = mse_l / var_l
        loss = fvu_l.mean()
        with torch.no_grad():
            fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
            fired[idx[acts > 1e-3]] = True
        dead = self.since_fired >= self.dead_steps
        aux = torch.zeros((), device=x.device)
        k_aux = min(self.aux_k, int(dead.sum()))
        if self.aux_coefficient and k_aux:
            e = (x - x_hat).reshape(L * N, d).detach()
            with torch.no_grad():
                dv, di = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
            dacts = torch.relu(gather_encode(x_in, sae.W_enc, None, di, dv))
            r = sparse_decode(SparseLatents(dacts, di, sae.cfg.d_sae), sae.W_dec) * state.scale
            aux = (e - r).pow(2).mean() / (e - e.mean(-1, keepdim=True)).pow(2).mean().clamp_min(1e-12)
            loss = loss + self.aux_coefficient * aux
        metrics = {"loss": loss.item(), "fvu": [v.item() for v in fvu_l], "aux": aux.item(),
                   "dead": int(dead.sum()), "l0": (acts > 1e-3).sum(-1).float().mean().item()}
        return loss, {"fired": fired, **metrics}

    def step(self, x: Tensor) -> dict[str, Any]:
        """One optimizer step on ``x (n_layers, N, d)``; returns metrics (``fvu`` is per layer)."""
        sae = self.sae
        if self.steps == 0:
            with torch.no_grad():
                xs, _ = sae.normalize_input(x.to(sae.dtype).reshape(-1, x.shape[-1]))
                sae.b_dec.copy_(geometric_median(xs[: 4096]).to(sae.dtype))
            _unit_norm_decoder(sae)
        loss, metrics = self.loss(x)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        _remove_parallel_grad(sae.W_dec)
        self.opt.step()
        _unit_norm_decoder(sae)
        fired = metrics.pop("fired")
        self.since_fired += 1
        self.since_fired[fired] = 0
        self.steps += 1
        return metrics


def mlsae_batches(
    model: Any,
    sae: MultiLayerSAE,
    token_batches: Iterable[Tensor],
    special_token_ids: Sequence[int] = (),
    hooks: Any = None,
    sites: Sequence[str] | None = None,
) -> Iterator[Tensor]:
    """``(n_layers, batch*seq, d)`` residuals per token batch, all layers from ONE forward pass (which
    stops after the deepest layer), special tokens zeroed at every layer. ``sites`` default to the
    SAE's (``blocks.{i}.hook_resid_post``); ``hooks`` is any ``install(site, fn)`` object (e.g. an
    adapter's backend: ``model.sae_manager.backend``), else found from the model."""
    sites = list(sites or [s.hook or s.module for s in sae.cfg.sites])
    reader = ActivationReader(model, sites, hooks=hooks, bos_token_id=None)
    for tokens in token_batches:
        got = reader.read(tokens)
        x = torch.stack([got[s] for s in sites])  # (L, B*S, d), order of tokens.reshape(-1)
        yield zero_special_tokens(x[:, None], tokens.reshape(1, -1), special_token_ids)[:, 0]


def train_mlsae(
    model: Any,
    sae: MultiLayerSAE,
    token_batches: Iterable[Tensor],
    special_token_ids: Sequence[int] = (),
    *,
    hooks: Any = None,
    trainer: MLSAETrainer | None = None,
    **trainer_kwargs: Any,
) -> list[dict[str, Any]]:
    """Train ``sae`` in place on a live model: one forward pass per token batch ``(batch, seq)`` feeds
    every layer. Returns the per-step metrics."""
    trainer = trainer or MLSAETrainer(sae, **trainer_kwargs)
    return [trainer.step(x) for x in mlsae_batches(model, sae, token_batches, special_token_ids, hooks)]
