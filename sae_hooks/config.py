"""SAE configuration: a plain dataclass that round-trips through JSON and rejects unknown keys."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, did_you_mean

#: Version of the native on-disk format written by :func:`sae_hooks.save`.
FORMAT_VERSION = 1

#: Largest width accepted in a config (bounds what a file can make us allocate; real SAEs are < 2**25).
MAX_DIM = 2**31 - 1

#: Input normalisations the Hub formats need. Each is undone after decoding, except for transcoders
#: (whose output lives in another space), where only ``"scale"`` is undone.
NORMALIZATIONS = ("none", "standardize", "norm_rescale", "scale")

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``, ``"torch.bfloat16"`` or a ``torch.dtype`` to a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: str | torch.dtype) -> str:
    return str(parse_dtype(dtype)).removeprefix("torch.")


@dataclass
class Site:
    """Where an SAE reads (and, for transcoders, where it writes).

    ``hook`` is the TransformerLens hook name (``blocks.3.hook_resid_post``); ``module`` the module path
    of the same tensor on the underlying PyTorch model (``transformer.h.3``), when known. Transcoders
    read at ``hook``/``module`` and write at ``hook_out``/``module_out``.
    """

    hook: str | None = None
    module: str | None = None
    hook_out: str | None = None
    module_out: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | str) -> Site:
        if isinstance(data, str):
            return cls(hook=data)
        if not isinstance(data, dict):
            raise ConfigError(f"a site must be a hook name or a JSON object, got {type(data).__name__} {data!r}")
        _check_keys(cls, data, "site")
        bad = {k: v for k, v in data.items() if v is not None and not isinstance(v, str)}
        if bad:
            raise ConfigError(f"site fields must be strings, got {bad!r}")
        return cls(**data)


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE, and where it was trained.

    Attributes:
        architecture: registry name of the activation (``relu``, ``topk``, ``batchtopk``,
            ``jumprelu``, ``gated``).
        d_in: input width.
        d_sae: number of latents.
        d_out: output width; ``None`` means ``d_in`` (an autoencoder). A transcoder sets it.
        k: active latents per token (``topk``) or on average (``batchtopk``).
        dtype: dtype of the weights; inputs are cast to it and outputs cast back.
        apply_b_dec_to_input: subtract ``b_dec`` from the (normalised) input before encoding.
        normalize: input normalisation, one of :data:`NORMALIZATIONS`.
        norm_scale: the constant for ``normalize="scale"`` (input multiplied by it, output divided).
        norm_eps: epsilon of ``standardize``: ``(x - mean) / (std + eps)``, undone as ``y * std + mean``.
        skip: the SAE has a linear skip path ``x @ W_skip`` added to its output (skip transcoders).
        reshape: ``"hook_z"`` flattens ``(..., n_heads, d_head)`` inputs to ``d_in`` and restores them.
        sites: where the SAE was trained (several for a multi-layer SAE).
        model_name: the model it was trained on, when known.
        metadata: free-form extra information (training metrics, source format, ...).
        matryoshka_widths: ``matryoshka`` only: cumulative prefix widths ``m_1 < … < d_sae`` (SAELens's name).
    """

    architecture: str
    d_in: int
    d_sae: int
    d_out: int | None = None
    k: int | None = None
    dtype: str = "float32"
    apply_b_dec_to_input: bool = False
    normalize: str = "none"
    norm_scale: float | None = None
    norm_eps: float = 1e-5
    skip: bool = False
    reshape: str = "none"
    sites: list[Site] = field(default_factory=list)
    model_name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    matryoshka_widths: list[int] | None = None

    def __post_init__(self) -> None:
        self.sites = [s if isinstance(s, Site) else Site.from_dict(s) for s in self.sites]
        self.dtype = dtype_name(self.dtype)
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_DIM:
                raise ConfigError(f"{name} must be a positive integer <= {MAX_DIM}, got {value!r}")
        if self.d_out is not None and (
            not isinstance(self.d_out, int) or isinstance(self.d_out, bool) or not 0 < self.d_out <= MAX_DIM
        ):
            raise ConfigError(f"d_out must be a positive integer <= {MAX_DIM} or None, got {self.d_out!r}")
        if self.k is not None and (
            not isinstance(self.k, int) or isinstance(self.k, bool) or not 0 < self.k <= self.d_sae
        ):
            raise ConfigError(f"k must be an integer in [1, d_sae={self.d_sae}], got {self.k!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(
                f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}"
                + did_you_mean(str(self.normalize), NORMALIZATIONS)
            )
        for name in ("norm_scale", "norm_eps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if self.normalize == "scale" and not self.norm_scale:
            raise ConfigError("normalize='scale' needs a non-zero norm_scale")
        if self.matryoshka_widths is not None:
            w = self.matryoshka_widths
            if not isinstance(w, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in w):
                raise ConfigError(f"matryoshka_widths must be a list of integers, got {w!r}")
        if self.reshape not in ("none", "hook_z"):
            raise ConfigError(f"reshape must be 'none' or 'hook_z', got {self.reshape!r}")
        if self.is_transcoder and self.apply_b_dec_to_input:
            raise ConfigError("apply_b_dec_to_input makes no sense for a transcoder (d_out != d_in)")

    # Convenience views -------------------------------------------------------------------------

    @property
    def output_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None and self.d_out != self.d_in or any(
            s.hook_out or s.module_out for s in self.sites
        )

    @property
    def hook_name(self) -> str | None:
        """The TransformerLens hook name of the first site (``None`` if unknown)."""
        return self.sites[0].hook if self.sites else None

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    # Serialisation -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["sites"] = [s.to_dict() for s in self.sites]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"an SAE config must be a JSON object, got {type(data).__name__}")
        _check_keys(cls, data, "SAE config")
        missing = [f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in data]
        if missing:
            raise ConfigError(f"SAE config is missing required key(s) {missing}")
        data = dict(data)
        sites = data.get("sites") or []
        if not isinstance(sites, list):
            raise ConfigError(f"sites must be a list, got {type(sites).__name__} {sites!r}")
        data["sites"] = [Site.from_dict(s) for s in sites]
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ConfigError(f"metadata must be a JSON object, got {type(metadata).__name__}")
        _check_types(cls, data)
        return cls(**data)

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _check_keys(cls: type, data: dict[str, Any], what: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in known]
    if unknown:
        hints = "".join(did_you_mean(str(k), known, 1) for k in unknown)
        raise ConfigError(f"unknown key(s) {unknown} in {what}.{hints} Known keys: {known}")


def _check_types(cls: type, data: dict[str, Any]) -> None:
    """Reject wrongly typed scalar fields with a message naming the key (JSON has no schema)."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        hint = hints[key]
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if value is None:
            if type(None) not in allowed:
                raise ConfigError(f"config key {key!r} must not be null")
            continue
        scalars = [t for t in allowed if t in (int, float, str, bool)]
        if not scalars or len(scalars) != len([t for t in allowed if t is not type(None)]):
            continue  # containers are checked by their own constructors
        ok = any(
            isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) for t in scalars
        ) or (float in scalars and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            names = " or ".join(t.__name__ for t in scalars)
            raise ConfigError(f"config key {key!r} must be {names}, got {type(value).__name__} {value!r}")
