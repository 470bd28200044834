"""The SAE base class: canonical layout, input normalisation, dtype handling, dense and sparse latents.

Canonical layout (SAELens's): ``W_enc (d_in, d_sae)``, ``b_enc (d_sae)``, ``W_dec (d_sae, d_out)``,
``b_dec (d_out)``, plus ``W_skip (d_in, d_out)`` for skip transcoders. Subclasses implement only
:meth:`SAE.activate` (pre-activations to latents) and add their own parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SAEConfig
from ..errors import ShapeMismatchError
from .kernels import crow_rows, sparse_decode_ragged, sparse_decode_values

@dataclass
class SparseLatents:
    """Latents of a TopK-style SAE: ``k`` values and their indices per token.

    ``values`` and ``indices`` have shape ``(..., k)``; the dense equivalent has shape ``(..., d_sae)``.
    ``pre`` holds the ``(..., d_sae)`` pre-activations (detached) when the encoder ran in training mode
    (AuxK picks dead latents from them); inference leaves it ``None``.

    Ragged (BatchTopK's training latents, a different count per token): ``values``/``indices`` are
    ``(M,)``, token-major, and ``crow (N + 1,)`` holds each token's range; the dense equivalent is
    ``(N, d_sae)``.
    """

    values: Tensor
    indices: Tensor
    d_sae: int
    pre: Tensor | None = None
    crow: Tensor | None = None

    def to_dense(self) -> Tensor:
        if self.crow is not None:
            dense = self.values.new_zeros(self.crow.numel() - 1, self.d_sae)
            return dense.index_put_((crow_rows(self.crow), self.indices), self.values, accumulate=True)
        dense = self.values.new_zeros(*self.values.shape[:-1], self.d_sae)
        return dense.scatter(-1, self.indices, self.values)

    @property
    def shape(self) -> torch.Size:
        if self.crow is not None:
            return torch.Size((self.crow.numel() - 1, self.d_sae))
        return torch.Size((*self.values.shape[:-1], self.d_sae))


class NormState(NamedTuple):
    """What is needed to undo a per-token input normalisation: ``x = x_norm * scale + shift``."""

    scale: Tensor | float = 1.0
    shift: Tensor | float = 0.0


def to_dense(latents: Tensor | SparseLatents) -> Tensor:
    return latents.to_dense() if isinstance(latents, SparseLatents) else latents


class SAE(nn.Module):
    """A sparse autoencoder (or transcoder) in the canonical layout.

    Every method accepts any leading shape: ``x`` is ``(..., d_in)``, latents ``(..., d_sae)``,
    reconstructions ``(..., d_out)``. Inputs in another dtype are cast to the SAE's dtype and
    :meth:`forward` casts its result back.
    """

    architecture: ClassVar[str] = ""
    #: TopK-style SAEs return :class:`SparseLatents` from :meth:`activate`.
    sparse: ClassVar[bool] = False
    #: the config's ``k`` is used (TopK-style SAEs).
    uses_k: ClassVar[bool] = False
    #: Gated SAEs have no ``b_enc``.
    has_encoder_bias: ClassVar[bool] = True

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dtype = cfg.torch_dtype
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.output_dim
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, dtype=dtype))
        if self.has_encoder_bias:
            self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_out, dtype=dtype))
        self.reset_parameters()

    # Initialisation ------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, encoder tied to the decoder (when square), zero biases."""
        w = torch.randn(self.cfg.d_sae, self.cfg.output_dim, generator=generator)
        w /= w.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(w)
        if self.cfg.output_dim == self.cfg.d_in:
            self.W_enc.copy_(w.T)
        else:
            self.W_enc.copy_(torch.randn(self.cfg.d_in, self.cfg.d_sae, generator=generator) / math.sqrt(self.cfg.d_in))
        for name in ("b_enc", "b_dec", "W_skip"):
            if hasattr(self, name):
                getattr(self, name).zero_()

    # Shapes, dtypes, normalisation ---------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def flatten_input(self, x: Tensor) -> Tensor:
        """Flatten ``(..., n_heads, d_head)`` hook_z inputs to ``(..., d_in)``; check the width."""
        if (
            self.cfg.reshape == "hook_z"
            and x.dim() >= 2
            and x.shape[-1] != self.cfg.d_in
            and x.shape[-2] * x.shape[-1] == self.cfg.d_in
        ):
            x = x.flatten(-2)
        if x.shape[-1] != self.cfg.d_in:
            raise ShapeMismatchError(
                f"{type(self).__name__} expects inputs of shape (..., d_in={self.cfg.d_in}), "
                f"got {tuple(x.shape)}"
            )
        return x

    def normalize_input(self, x: Tensor) -> tuple[Tensor, NormState]:
        """Apply the configured input normalisation; return what is needed to undo it."""
        mode = self.cfg.normalize
        if mode == "none":
            return x, NormState()
        if mode == "scale":
            scale = float(self.cfg.norm_scale)  # type: ignore[arg-type]
            return x * scale, NormState(scale=1.0 / scale)
        if mode == "standardize":
            mu = x.mean(dim=-1, keepdim=True)
            centred = x - mu
            std = centred.std(dim=-1, keepdim=True)
            # Undone with std (no eps), as SAELens layer_norm, OpenAI's LN and MLSAE all do.
            return centred / (std + self.cfg.norm_eps), NormState(scale=std, shift=mu)
        if mode == "norm_rescale":
            norm = x.norm(dim=-1, keepdim=True) / math.sqrt(self.cfg.d_in)
            return x / norm, NormState(scale=norm)
        raise AssertionError(mode)

    def denormalize_output(self, y: Tensor, state: NormState | None) -> Tensor:
        if state is None or (isinstance(state.scale, float) and state.scale == 1.0
                             and isinstance(state.shift, float) and state.shift == 0.0):
            return y  # the identity state (no input normalisation): two full passes saved
        if self.cfg.is_transcoder and self.cfg.normalize != "scale":
            # A transcoder's output lives in another space: per-token input statistics don't apply.
            return y
        return y * state.scale + state.shift

    # Encode / decode -----------------------------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations from an already normalised input of shape ``(..., d_in)``."""
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        if not self.has_encoder_bias:
            return x @ self.W_enc
        # The bias rides in the matmul (addmm): one (N, d_sae) tensor instead of two.
        flat = torch.addmm(self.b_enc, x.reshape(-1, x.shape[-1]), self.W_enc)
        return flat.view(*x.shape[:-1], flat.shape[-1])

    def activate(self, pre: Tensor) -> Tensor | SparseLatents:
        """Latents from pre-activations. Implemented by each architecture."""
        raise NotImplementedError

    def encode_normalized(self, x: Tensor, training: bool = False) -> tuple[Tensor | SparseLatents, Tensor | None]:
        """The encoder on an already normalised input ``(..., d_in)``: ``(latents, pre-activations)``.

        One encoder for inference and training: with ``training=True`` an architecture returns the same
        latents with the gradients its loss needs (straight-through thresholds, sparse backward, the
        batch-level top-k of BatchTopK). Latents are dense ``(..., d_sae)`` or :class:`SparseLatents`;
        pre-activations are ``(..., d_sae)`` (the gate's for Gated), or ``None`` where the training
        encoder never forms them (TopK's blocked selection).
        """
        pre = self.pre_acts(x)
        return self.activate(pre), pre

    def encode_with_state(self, x: Tensor) -> tuple[Tensor | SparseLatents, NormState]:
        """Latents (sparse for TopK-style SAEs) and the normalisation state to decode them with."""
        x = self.flatten_input(x).to(self.dtype)
        x, state = self.normalize_input(x)
        return self.encode_normalized(x)[0], state

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents ``(..., d_sae)`` of an input ``(..., d_in)``."""
        return to_dense(self.encode_with_state(x)[0])

    def decode(self, latents: Tensor | SparseLatents, state: NormState | None = None) -> Tensor:
        """Reconstruction ``(..., d_out)`` from latents (dense or sparse).

        Without ``state`` the result is in the SAE's normalised coordinates; pass the state from
        :meth:`encode_with_state` (as :meth:`forward` does) to map it back to the model's. The
        skip path of a skip transcoder needs the input: use :meth:`reconstruct`.
        """
        if isinstance(latents, SparseLatents):
            y = sparse_decode(latents, self.W_dec)
            # Without autograd the bias goes into the fresh gather output: one (N, d_out) tensor, not two.
            y = y + self.b_dec if torch.is_grad_enabled() else y.add_(self.b_dec)
        else:
            y = latents.to(self.dtype) @ self.W_dec + self.b_dec
        return self.denormalize_output(y, state)

    def reconstruct(self, x: Tensor, latents: Tensor | SparseLatents, state: NormState | None) -> Tensor:
        """``decode(latents)`` plus the skip path (``x @ W_skip``) when the SAE has one."""
        y = self.decode(latents, state)
        if self.cfg.skip:
            y = y + self.flatten_input(x).to(self.dtype) @ self.W_skip
        return y

    def forward(self, x: Tensor) -> Tensor:
        """``reconstruct(x, encode(x))`` in the input's dtype; hook_z inputs keep their shape."""
        latents, state = self.encode_with_state(x)
        y = self.reconstruct(x, latents, state).to(x.dtype)
        if y.shape[-1] != x.shape[-1] and self.cfg.reshape == "hook_z" and not self.cfg.is_transcoder:
            y = y.unflatten(-1, x.shape[-2:])
        return y

    def decoder_directions(self, latents: Tensor) -> Tensor:
        """Unit-norm decoder rows ``W_dec[i] / ||W_dec[i]||`` for the given latent indices ``(n,)``."""
        rows = self.W_dec[latents]
        return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    # Persistence ---------------------------------------------------------------------------------

    def save(self, path) -> None:  # noqa: ANN001 - str | PathLike
        """Save in the native format (``cfg.json`` + ``sae.safetensors``), atomically."""
        _native_io("save")(self, path)

    @classmethod
    def load(cls, path, device: str | torch.device | None = None, dtype=None) -> SAE:  # noqa: ANN001
        """Load an SAE saved with :meth:`save`."""
        return _native_io("load")(path, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        cfg = self.cfg
        parts = [f"d_in={cfg.d_in}", f"d_sae={cfg.d_sae}"]
        if cfg.d_out is not None:
            parts.append(f"d_out={cfg.d_out}")
        if cfg.k is not None:
            parts.append(f"k={cfg.k}")
        if cfg.hook_name:
            parts.append(f"hook={cfg.hook_name!r}")
        return ", ".join(parts)


#: The native format's ``save`` / ``load``, registered by :mod:`sae_hooks.native` when it is imported
#: (``import sae_hooks`` does): the SAE layer sits below the format layer and does not import it.
NATIVE_IO: dict[str, Any] = {}


def _native_io(what: str) -> Any:
    if what not in NATIVE_IO:
        import importlib

        importlib.import_module("sae_hooks.native")  # registers itself (importing sae_hooks alone does too)
    return NATIVE_IO[what]


def sparse_decode(latents: SparseLatents, W_dec: Tensor) -> Tensor:
    """``dense(latents) @ W_dec`` by gathering ``k`` rows per token (no ``(N, d_sae)`` matrix, also in
    the backward: :class:`~.kernels.SparseDecode`, or :class:`~.kernels.SparseDecodeRagged`)."""
    if latents.crow is not None:
        return sparse_decode_ragged(latents.values, latents.indices, latents.crow, W_dec)
    lead = latents.values.shape[:-1]
    k = latents.values.shape[-1]
    out = sparse_decode_values(latents.values.reshape(-1, k), latents.indices.reshape(-1, k), W_dec)
    return out.reshape(*lead, W_dec.shape[-1])
