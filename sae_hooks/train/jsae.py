"""Training a Jacobian SAE pair (methods §2.3-2.4) with the one trainer.

The pair, its loss and its format live in :mod:`sae_hooks.saes.jacobian`; a pair trains as a
:class:`~.objectives.JacobianObjective` entry of :class:`~.trainer.Trainer` (checkpoints,
``torch.distributed``, progress and logging as for any SAE). This module reads MLP inputs from a model
(:func:`jsae_batches`), checks the input site (:func:`check_mlp_input`) and has the thin wrapper
:func:`train_jsae` with the paper's schedule: Adam (β 0.9/0.999), learning-rate warm-up over 1 % and
linear decay over the last 20 % of steps, gradient clipping at norm 1, λ warm-up over 5 %.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, HookNotFoundError
from ..saes.jacobian import JacobianSAEPair
from .sources import ActivationReader
from .trainer import Trainer, TrainEntry, TrainSettings


def check_mlp_input(model: Any, pair: JacobianSAEPair, tokens: Tensor, hooks: Any = None, rtol: float = 1e-3) -> float:
    """Check that ``pair.mlp(activation at hook_in) == activation at hook_out``; return the relative
    error, raise :class:`ConfigError` naming the sites that do match when it is off. Sites are any spelling
    the site layer takes (TL names work on Hugging Face models too). The usual mistakes:
    ``lnN.hook_normalized`` is *before* the norm's scale and shift (use ``blocks.L.ln2.hook_out``), and
    Gemma's ``hook_mlp_out`` is *after* its post-MLP norm (use ``blocks.L.mlp.hook_out``)."""
    layer = pair.cfg.layer
    alt_in, alt_out = f"blocks.{layer}.ln2.hook_out", f"blocks.{layer}.mlp.hook_out"
    sites = list(dict.fromkeys([pair.cfg.hook_in, pair.cfg.hook_out, alt_in, alt_out]))
    try:
        got = ActivationReader(model, sites, hooks=hooks, bos_token_id=None, stop_early=False).read(tokens)
    except HookNotFoundError:  # the alternatives do not exist on this model: check the pair's own sites
        got = ActivationReader(model, [pair.cfg.hook_in, pair.cfg.hook_out], hooks=hooks, bos_token_id=None).read(tokens)

    def rel(site_in: str, site_out: str) -> float:
        with torch.no_grad():
            y = pair.mlp(got[site_in])
        ref = got[site_out]
        return ((y - ref).norm() / ref.norm().clamp_min(1e-12)).item()

    err = rel(pair.cfg.hook_in, pair.cfg.hook_out)
    if err > rtol:
        fits = [(i, o) for i in dict.fromkeys([pair.cfg.hook_in, alt_in]) for o in dict.fromkeys([pair.cfg.hook_out, alt_out])
                if i in got and o in got and rel(i, o) <= rtol]
        hint = (f" The frozen MLP maps {fits[0][0]!r} to {fits[0][1]!r}: make the pair with "
                f"hook_in={fits[0][0]!r}, hook_out={fits[0][1]!r}.") if fits else ""
        raise ConfigError(
            f"the pair's frozen MLP applied to {pair.cfg.hook_in!r} does not give {pair.cfg.hook_out!r} "
            f"(relative error {err:.3g}).{hint} (lnN.hook_normalized is before the norm's scale and shift; "
            "Gemma's hook_mlp_out is after its post-MLP norm: make the pair with "
            "post_norm=<the layer's post_feedforward_layernorm> to include it.)"
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


def jsae_settings(steps: int, jacobian_coefficient: float, *, lr: float = 5e-4, jacobian_warmup: float = 0.05,
                  lr_warmup: float = 0.01, lr_decay: float = 0.2, grad_clip: float = 1.0) -> TrainSettings:
    """The paper's training settings for a run of ``steps`` steps."""
    warm = lr_warmup * max(1, steps)
    return TrainSettings(
        lr=lr, betas=(0.9, 0.999), warmup_steps=int(warm) if warm >= 1 else 0, decay_fraction=lr_decay,
        total_steps=max(1, steps), grad_clip=grad_clip,
        arch={"jacobian_coefficient": jacobian_coefficient, "jacobian_warmup": jacobian_warmup},
    )


def train_jsae(
    pair: JacobianSAEPair, batches: Iterable[Tensor], steps: int, jacobian_coefficient: float, *,
    lr: float = 5e-4, jacobian_warmup: float = 0.05, lr_warmup: float = 0.01, lr_decay: float = 0.2,
    grad_clip: float = 1.0, **fit_kwargs: Any,
) -> list[dict[str, float]]:
    """Train ``pair`` for ``steps`` steps on batches of MLP inputs ``(N, d_model)`` (a list is cycled
    until ``steps``; an iterator is read once). Returns the per-step metrics. ``fit_kwargs`` go to
    :meth:`Trainer.fit` (``checkpoint_dir``, ``progress``, ``log``...)."""
    settings = jsae_settings(steps, jacobian_coefficient, lr=lr, jacobian_warmup=jacobian_warmup,
                             lr_warmup=lr_warmup, lr_decay=lr_decay, grad_clip=grad_clip)
    data = itertools.cycle(batches) if isinstance(batches, Sequence) and len(batches) else batches
    site = pair.cfg.hook_in
    history: list[dict[str, float]] = []
    user_log = fit_kwargs.pop("log", None)

    def log(step: int, metrics: dict[str, Any]) -> None:
        history.append({k.split("/", 1)[1]: v for k, v in metrics.items()})
        if user_log is not None:
            user_log(step, metrics)

    entry = TrainEntry("jsae", None, pair, settings)
    Trainer([entry]).fit(({site: x} for x in data), max_steps=steps, log=log, log_every=1, **fit_kwargs)
    return history
