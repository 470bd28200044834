"""Inference-time encoders that keep an SAE's decoder and replace its ``encode``.

:func:`with_encoder` returns an SAE of the same class, config and (shared) parameters whose encoder is
one of :data:`ENCODERS`; everything that encodes through the SAE -- ``sae(x)``, ``sae.encode``,
``model.add_sae(...)`` capture / splice with the error term / ablation / steering, the evals -- then
uses the better codes. Nothing in the attach layer knows about it.

The encoder sees what the SAE's own encoder sees: the input after the SAE's input normalisation. The
codes it returns decode with the SAE's decoder (``s @ W_dec + b_dec``, then de-normalised), so the
solvers fit ``x_norm − b_dec``. Latents are dense ``(..., d_sae)`` tensors (a TopK SAE's ``k`` does
not bind them; use ``omp``/``mp`` with ``k`` for a hard budget).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..saes.base import SAE, to_dense
from . import solvers


def _sae_codes(sae: SAE, x_norm: Tensor) -> Tensor:
    """The SAE's own (amortised) codes for already normalised inputs ``(N, d_in)``."""
    own = super(InferenceEncoderMixin, sae) if isinstance(sae, InferenceEncoderMixin) else sae
    return to_dense(own.encode_normalized(x_norm)[0])


def _init(sae: SAE, x_norm: Tensor, init: str) -> Tensor | None:
    if init == "sae":
        return _sae_codes(sae, x_norm)
    if init == "zero":
        return None
    raise ConfigError(f"init must be 'sae' or 'zero', got {init!r}")


@dataclass
class ISTA:
    """ISTA on ``0.5||x − sW||² + λ||s||₁`` (:func:`~sae_hooks.encoders.solvers.ista`)."""

    l1_coefficient: float = 0.1
    max_iter: int = 500
    tol: float = 1e-6
    init: str = "zero"
    nonnegative: bool = True

    solver = staticmethod(solvers.ista)  # not a field: the one thing FISTA changes

    def __call__(self, sae: SAE, x_norm: Tensor) -> Tensor:
        return self.solver(x_norm - sae.b_dec, sae.W_dec, self.l1_coefficient, init=_init(sae, x_norm, self.init),
                           max_iter=self.max_iter, tol=self.tol, nonnegative=self.nonnegative,
                           lipschitz=_lipschitz(sae))


@dataclass
class FISTA(ISTA):
    """FISTA on the same objective (:func:`~sae_hooks.encoders.solvers.fista`)."""

    solver = staticmethod(solvers.fista)


@dataclass
class ITO:
    """Inference-time optimisation: Adam on the codes (:func:`~sae_hooks.encoders.solvers.ito`), started
    from the SAE's own codes (``init="sae"``, the paper's SAE + ITO) or from zero."""

    l1_coefficient: float = 0.1
    max_iter: int = 500
    tol: float = 1e-6
    lr: float = 1e-2
    init: str = "sae"
    nonnegative: bool = True

    def __call__(self, sae: SAE, x_norm: Tensor) -> Tensor:
        return solvers.ito(x_norm - sae.b_dec, sae.W_dec, self.l1_coefficient, init=_init(sae, x_norm, self.init),
                           max_iter=self.max_iter, tol=self.tol, lr=self.lr, nonnegative=self.nonnegative)


@dataclass
class MP:
    """Matching pursuit with a budget of ``k`` steps."""

    k: int = 32
    tol: float = 0.0
    nonnegative: bool = True

    solver = staticmethod(solvers.matching_pursuit)  # not a field: the one thing OMP changes

    def __call__(self, sae: SAE, x_norm: Tensor) -> Tensor:
        return self.solver(x_norm - sae.b_dec, sae.W_dec, self.k, nonnegative=self.nonnegative, tol=self.tol)


@dataclass
class OMP(MP):
    """Orthogonal matching pursuit with a budget of ``k`` distinct atoms."""

    solver = staticmethod(solvers.orthogonal_matching_pursuit)


class MLPEncoder(nn.Module):
    """The paper's MLP encoder: ``codes = ReLU(W2 · ReLU(W1 · x + b1) + b2)``, for normalised inputs
    ``(N, d_in)``; train it against a fixed decoder with :func:`fit_mlp_encoder`."""

    def __init__(self, d_in: int, d_sae: int, hidden: int = 256, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.hidden = nn.Linear(d_in, hidden)
        self.out = nn.Linear(hidden, d_sae)
        with torch.no_grad():
            for lin in (self.hidden, self.out):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features**0.5)
                lin.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.out(torch.relu(self.hidden(x))))

    def __call__(self, *args: Any) -> Tensor:  # as an encoder spec: (sae, x_norm); as a module: (x,)
        return super().__call__(args[-1])


def fit_mlp_encoder(
    sae: SAE, batches: Iterable[Tensor], *, hidden: int = 256, steps: int = 2000, lr: float = 1e-3,
    l1_coefficient: float = 0.01, seed: int = 0,
) -> MLPEncoder:
    """Train an :class:`MLPEncoder` on ``mean||x − decode(codes)||² + λ·mean|codes|`` with the SAE's
    decoder frozen (the paper's known-dictionary setting). ``batches``: ``(N, d_in)`` activations,
    cycled for ``steps`` Adam steps."""
    data = [b.reshape(-1, b.shape[-1]) for b in batches]
    if not data:
        raise ValueError("fit_mlp_encoder got no activations")
    enc = MLPEncoder(sae.cfg.d_in, sae.cfg.d_sae, hidden, seed).to(device=sae.device, dtype=sae.dtype)
    opt = torch.optim.Adam(enc.parameters(), lr=lr)
    W, b = sae.W_dec.detach(), sae.b_dec.detach()
    for step in range(steps):
        x, _ = sae.normalize_input(sae.flatten_input(data[step % len(data)].to(sae.device, sae.dtype)))
        with torch.enable_grad():
            s = enc.forward(x)
            loss = (s @ W + b - x).pow(2).mean() + l1_coefficient * s.abs().mean()
            opt.zero_grad()
            loss.backward()
        opt.step()
    return enc.eval().requires_grad_(False)


#: Encoder names accepted by :func:`with_encoder`.
ENCODERS: dict[str, type] = {"ista": ISTA, "fista": FISTA, "ito": ITO, "mp": MP, "omp": OMP}

EncoderFn = Callable[[SAE, Tensor], Tensor]


def _lipschitz(sae: SAE) -> float:
    """The decoder's Lipschitz constant, cached per decoder version (recomputed after training steps)."""
    key = (sae.W_dec.data_ptr(), sae.W_dec._version, sae.W_dec.shape)
    cache = getattr(sae, "_lipschitz_cache", None)
    if cache is None or cache[0] != key:
        cache = (key, solvers.lipschitz_constant(sae.W_dec))
        object.__setattr__(sae, "_lipschitz_cache", cache)
    return cache[1]


class InferenceEncoderMixin:
    """Replaces ``encode_normalized`` (which ``encode``, ``forward`` and the attach layer all use)."""

    inference_encoder: EncoderFn
    sparse = False  # the codes are dense tensors
    #: tokens per solver call: bounds the solver's (tokens, d_sae) working set to ~2^24 floats
    chunk_elements: int = 2**24

    def encode_normalized(self, x: Tensor, training: bool = False) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """``(codes, the SAE's own pre-activations)`` for a normalised input ``(..., d_in)``; ``encode``,
        ``encode_with_state``, ``forward`` and the attach layer all come through here."""
        sae: SAE = self  # type: ignore[assignment]
        if training:
            raise ConfigError("an SAE with an inference-time encoder is not trained; train the SAE itself")
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        step = max(1, self.chunk_elements // sae.cfg.d_sae)
        codes = torch.cat([self.inference_encoder(sae, flat[i : i + step]) for i in range(0, flat.shape[0], step)]) \
            if flat.shape[0] else flat.new_zeros(0, sae.cfg.d_sae)
        return codes.reshape(*lead, sae.cfg.d_sae), sae.pre_acts(x)

    def amortised_encode(self, x: Tensor) -> Tensor:
        """The SAE's own encoder (dense latents), for comparison."""
        sae: SAE = self  # type: ignore[assignment]
        xn, _ = sae.normalize_input(sae.flatten_input(x).to(sae.dtype))
        return _sae_codes(sae, xn)


_CLASSES: dict[type, type] = {}


def _override_class(base: type[SAE]) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"{base.__name__}WithInferenceEncoder", (InferenceEncoderMixin, base), {})
    return _CLASSES[base]


def make_encoder(encoder: str | EncoderFn, **options: Any) -> EncoderFn:
    """An encoder spec from a name in :data:`ENCODERS` and its options (unknown options raise)."""
    if not isinstance(encoder, str):
        if options:
            raise ConfigError(f"options {sorted(options)} are only accepted with an encoder name")
        return encoder
    if encoder not in ENCODERS:
        raise ConfigError(f"unknown encoder {encoder!r}; choose one of {sorted(ENCODERS)} or pass an MLPEncoder / callable")
    cls = ENCODERS[encoder]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"encoder {encoder!r} has no option(s) {unknown}; its options are {sorted(names)}")
    return cls(**options)


def with_encoder(sae: SAE, encoder: str | EncoderFn, **options: Any) -> SAE:
    """An SAE with ``sae``'s decoder, config and parameters (shared, not copied) whose ``encode`` is
    ``encoder``: ``"ista"``, ``"fista"``, ``"ito"``, ``"mp"``, ``"omp"`` (options as keyword arguments,
    e.g. ``l1_coefficient``, ``k``, ``max_iter``, ``tol``, ``init``), a fitted :class:`MLPEncoder`, or
    any callable ``(sae, x_norm (N, d_in)) -> codes (N, d_sae)``.

    ``model.add_sae(with_encoder(sae, "omp", k=16))`` attaches it like any SAE. Saving it saves the SAE
    (the inference encoder is not part of the format)."""
    if sae.cfg.is_transcoder:
        raise ConfigError("inference-time encoders fit the SAE's own input; a transcoder reconstructs another site")
    if isinstance(sae, InferenceEncoderMixin):
        sae = sae.base_sae  # type: ignore[attr-defined]
    fn = make_encoder(encoder, **options)
    new = copy.copy(sae)
    # fresh containers holding the same Parameter objects: weights are shared, registrations are not
    new._parameters = dict(sae._parameters)
    new._buffers = dict(sae._buffers)
    new._modules = dict(sae._modules)
    new.__dict__.pop("_lipschitz_cache", None)
    new.__class__ = _override_class(type(sae))
    new.inference_encoder = fn  # an MLPEncoder registers as a submodule (moves with .to())
    object.__setattr__(new, "base_sae", sae)
    return new
