"""Training a Jacobian SAE pair (methods §2.3-2.4).

Per batch of MLP inputs ``x (N, d_model)`` (read at the pair's ``hook_in``)::

    loss = MSE(x_hat, x) + MSE(y_hat, y) + λ(t) · mean|J|,     y = MLP(x)

MSEs are per-element means; ``mean|J|`` is over tokens × k_out × k_in. The output SAE is trained on
``MLP(x)`` of the *true* input (computed with the pair's frozen MLP copy), never on ``MLP(x_hat)``, and
the MLP is linearised at ``x``. λ rises linearly from 0 over ``jacobian_warmup`` (5 %) of the steps.
Adam (β 0.9/0.999), learning-rate warm-up over 1 % and linear decay over the last 20 % of steps,
gradient clipping at norm 1, unit-norm decoder rows (and no gradient parallel to them) for both SAEs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..saes.jacobian import JacobianSAEPair
from .sources import ActivationReader


def _decoder_rows(pair: JacobianSAEPair) -> list[Tensor]:
    return [pair.sae_in.W_dec, pair.sae_out.W_dec]


class JSAETrainer:
    """Optimises both SAEs of a pair; :meth:`step` takes MLP inputs ``(N, d_model)``."""

    def __init__(self, pair: JacobianSAEPair, jacobian_coefficient: float, total_steps: int, lr: float = 5e-4,
                 jacobian_warmup: float = 0.05, lr_warmup: float = 0.01, lr_decay: float = 0.2, grad_clip: float = 1.0):
        self.pair, self.total_steps = pair, max(1, total_steps)
        self.jacobian_coefficient = jacobian_coefficient
        self.params = list(pair.sae_in.parameters()) + list(pair.sae_out.parameters())
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))
        self.lr, self.jacobian_warmup, self.lr_warmup, self.lr_decay, self.grad_clip = lr, jacobian_warmup, lr_warmup, lr_decay, grad_clip
        self.steps = 0
        pair.cfg.jacobian_coefficient = jacobian_coefficient

    def coefficient_at(self, step: int) -> float:
        warm = self.jacobian_warmup * self.total_steps
        return self.jacobian_coefficient * (min(1.0, step / warm) if warm > 0 else 1.0)

    def lr_at(self, step: int) -> float:
        warm, decay_start = self.lr_warmup * self.total_steps, (1 - self.lr_decay) * self.total_steps
        f = min(1.0, (step + 1) / warm) if warm >= 1 else 1.0
        if step >= decay_start and self.lr_decay > 0:
            f *= max(0.0, (self.total_steps - step) / (self.total_steps - decay_start))
        return self.lr * f

    def step(self, x: Tensor) -> dict[str, float]:
        coef = self.coefficient_at(self.steps)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.steps)
        loss, metrics = self.pair.loss(x, coef)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        for W in _decoder_rows(self.pair):
            if W.grad is not None:
                unit = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                W.grad.sub_((W.grad * unit).sum(-1, keepdim=True) * unit)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        with torch.no_grad():
            for W in _decoder_rows(self.pair):
                W.div_(W.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        self.steps += 1
        return {**metrics, "jacobian_coefficient": coef}


def check_mlp_input(model: Any, pair: JacobianSAEPair, tokens: Tensor, hooks: Any = None, rtol: float = 1e-3) -> float:
    """Check that ``pair.mlp(activation at hook_in) == activation at hook_out``; return the relative
    error, raise :class:`ConfigError` naming the hooks when it is off (e.g. a bridge's pre-affine
    ``ln2.hook_normalized``)."""
    reader = ActivationReader(model, [pair.cfg.hook_in, pair.cfg.hook_out], hooks=hooks, bos_token_id=None)
    got = reader.read(tokens)
    with torch.no_grad():
        y = pair.mlp(got[pair.cfg.hook_in])
    ref = got[pair.cfg.hook_out]
    err = ((y - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    if err > rtol:
        raise ConfigError(
            f"the pair's frozen MLP applied to {pair.cfg.hook_in!r} does not give {pair.cfg.hook_out!r} "
            f"(relative error {err:.3g}): {pair.cfg.hook_in!r} is not this MLP's input. On a TransformerLens 4 "
            "bridge use 'blocks.{L}.ln2.hook_out' (ln2.hook_normalized there is before the LayerNorm's affine)"
        )
    return err


def jsae_batches(
    model: Any, pair: JacobianSAEPair, token_batches: Iterable[Tensor], *, hooks: Any = None,
    bos_token_id: int | None = None,
) -> Iterator[Tensor]:
    """MLP inputs ``(N, d_model)`` at ``pair.cfg.hook_in``, one forward pass per token batch (stopped
    right after the site); tokens equal to ``bos_token_id`` are dropped."""
    reader = ActivationReader(model, [pair.cfg.hook_in], hooks=hooks, bos_token_id=bos_token_id)
    for tokens in token_batches:
        yield reader.read(tokens)[pair.cfg.hook_in]


def train_jsae(
    pair: JacobianSAEPair, batches: Iterable[Tensor], steps: int, jacobian_coefficient: float, **trainer_kwargs: Any
) -> list[dict[str, float]]:
    """Train ``pair`` for ``steps`` steps on batches of MLP inputs ``(N, d_model)`` (a list is cycled until ``steps``; an iterator is read once)."""
    trainer = JSAETrainer(pair, jacobian_coefficient, steps, **trainer_kwargs)
    history: list[dict[str, float]] = []
    reusable = isinstance(batches, Sequence)
    while trainer.steps < steps:
        before = trainer.steps
        for x in batches:
            if trainer.steps >= steps:
                break
            history.append(trainer.step(x))
        if not reusable or trainer.steps == before:
            break
    return history
