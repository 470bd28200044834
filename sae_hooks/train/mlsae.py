"""Training a multi-layer SAE in place: one forward pass gives every layer's residual, and every
(layer, token) vector is an example for the same SAE (methods §1.2).

The loss is :class:`~sae_hooks.saes.multilayer.MultiLayerTraining`'s and the loop the one trainer's
(:class:`~.trainer.Trainer` with a :class:`~.objectives.MultiLayerObjective` entry, so checkpoints,
``torch.distributed``, progress and logging work as for any SAE). :func:`train_mlsae` is a thin wrapper
with MLSAE's defaults; special tokens are zeroed at every layer
(:func:`~sae_hooks.saes.multilayer.zero_special_tokens`), as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..saes.multilayer import MultiLayerSAE, zero_special_tokens
from .sources import ActivationReader
from .trainer import Trainer, TrainEntry, TrainSettings


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


def mlsae_entry(name: str, sae: MultiLayerSAE, settings: TrainSettings | None = None, sites: Sequence[str] | None = None,
                **kwargs: Any) -> TrainEntry:
    """A :class:`~.trainer.TrainEntry` for ``sae`` over ``sites`` (default: its config's), keeping its weights."""
    return TrainEntry(name, list(sites) if sites else None, sae, settings, init_weights=False, **kwargs)


def train_mlsae(
    model: Any,
    sae: MultiLayerSAE,
    token_batches: Iterable[Tensor],
    special_token_ids: Sequence[int] = (),
    *,
    hooks: Any = None,
    lr: float = 1e-3,
    eps: float = 6.25e-10,
    aux_k: int = 256,
    aux_coefficient: float = 1 / 32,
    dead_steps: int = 76,
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """Train ``sae`` in place on a live model: one forward pass per token batch ``(batch, seq)`` feeds
    every layer. Defaults follow MLSAE (Adam, eps 6.25e-10, constant learning rate, AuxK 256 at 1/32, a
    latent dead after ``dead_steps`` batches without firing, counted in tokens of the first batch) except
    ``lr`` (MLSAE: 1e-4 with 131k-token batches; short runs on small models want more). Returns the
    per-step metrics (``fvu`` is the list over layers). ``fit_kwargs`` go to :meth:`Trainer.fit`
    (``checkpoint_dir``, ``progress``, ``log``...)."""
    sites = [s.hook or s.module for s in sae.cfg.sites]
    stream = iter(token_batches)
    first = next(stream, None)
    if first is None:
        return []

    def batches() -> Iterator[dict[str, Tensor]]:
        for x in mlsae_batches(model, sae, _chain(first, stream), special_token_ids, hooks, sites):
            yield {s: x[i] for i, s in enumerate(sites)}

    settings = TrainSettings(
        lr=lr, eps=eps, warmup_steps=0, decay_fraction=0.0, init_batches=1,
        dead_tokens=(dead_steps - 1) * first.numel(), arch={"aux_k": aux_k, "aux_coefficient": aux_coefficient},
    )
    history: list[dict[str, Any]] = []
    user_log = fit_kwargs.pop("log", None)

    def log(step: int, metrics: dict[str, Any]) -> None:
        m = {k.split("/", 1)[1]: v for k, v in metrics.items()}
        history.append({**{k: v for k, v in m.items() if not k.startswith("fvu_layer")},
                        "fvu": [m[f"fvu_layer{i}"] for i in range(len(sites))]})
        if user_log is not None:
            user_log(step, metrics)

    Trainer([mlsae_entry("mlsae", sae, settings)]).fit(batches(), log=log, log_every=1, **fit_kwargs)
    return history


def _chain(first: Tensor, rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield first
    yield from rest
