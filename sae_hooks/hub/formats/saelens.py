"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (v6 and pre-6 configs).

Layout (SAELens's, same as ours): ``W_enc (d_in, d_sae)``, ``W_dec (d_sae, d_out)``, ``b_enc``, ``b_dec``,
``threshold`` (jumprelu), ``b_gate``/``b_mag``/``r_mag`` (gated, no ``b_enc``), ``W_skip (d_out, d_in)`` (skip
transcoders: transposed here to our ``(d_in, d_out)``).

Numerics folded at load so that our plain forward pass reproduces SAELens's:

* ``topk`` with ``rescale_acts_by_decoder_norm``: SAELens computes ``pre * ||W_dec[i]||`` and decodes
  ``acts / ||W_dec[i]||``; with ``n = ||W_dec[i]||`` we store ``W_enc * n``, ``b_enc * n``, ``W_dec / n``: the same
  latents and the same reconstruction, with no per-call norm.
* ``normalize_activations``: ``none``; ``layer_norm`` -> our ``standardize`` (SAELens: ``(x - mean) / (std + 1e-5)``,
  unbiased std, undone on output); ``constant_norm_rescale`` -> our ``norm_rescale`` (``x * sqrt(d_in) / ||x||``,
  undone on output); ``expected_average_only_in`` is the identity inside SAELens's SAE: the constant ``s`` is
  applied outside and folded at load (``W_enc *= s``, ``W_dec /= s``, ``b_dec /= s``) when the caller or the
  release registry supplies it (``norm_scaling_factor``); without it the weights are used as they are (what
  SAELens does, with the same warning).
* ``log_threshold`` -> ``threshold = exp(log_threshold)``; a ``scaling_factor`` tensor that is all ones is dropped,
  another one is folded into ``W_dec`` (``(f * s) @ W_dec == f @ (s[:, None] * W_dec)``, pre-v6 fine-tuning).
* BatchTopK / Matryoshka SAEs are saved by SAELens as ``jumprelu`` (a per-latent threshold) and load as such; a
  training checkpoint (``batchtopk`` with a scalar ``topk_threshold``) loads as our ``batchtopk``.
* Pre-6 configs (no ``sae_lens_version`` >= 6): ``hook_point`` -> ``hook_name``, ``activation_fn(_str)`` ``topk``
  with ``activation_fn_kwargs.k`` -> ``topk``, boolean ``normalize_activations``, ``apply_b_dec_to_input`` default
  True, ``hook_z`` in the hook name -> ``reshape="hook_z"`` (SAELens's ``handle_pre_6_0_config``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ...config import SAEConfig, parse_dtype
from ...errors import ConfigError, SAEFormatError, UnknownArchitectureError
from ...saes import SAE
from ..._files import expect_object, read_json, read_safetensors
from ._common import LoadOptions, build, get, make_site, positive_int, t_, tensor

NAME = "saelens"
CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"

#: SAELens architecture -> (our architecture, has W_skip, is a transcoder)
ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "gated": ("gated", False, False),
    "batchtopk": ("batchtopk", False, False),
    "matryoshka_batchtopk": ("batchtopk", False, False),
    "transcoder": ("relu", False, True),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", False, True),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
    "topk_transcoder": ("topk", False, True),
    "topk_skip_transcoder": ("topk", True, True),
}
UNSUPPORTED = {"abstopk", "matching_pursuit", "temporal"}
NORMALIZATIONS = {
    "none": "none",
    "layer_norm": "standardize",
    "constant_norm_rescale": "norm_rescale",
    "expected_average_only_in": "none",  # folded, see module docstring
}


def detect(files: list[str]) -> bool:
    """``cfg.json`` next to ``sae_weights.safetensors``."""
    return CONFIG in files and WEIGHTS in files


def needed(files: list[str]) -> list[str]:
    return [CONFIG, WEIGHTS]


def _version_major(v: Any) -> int | None:
    if not isinstance(v, str):
        return None
    head = v.strip().lstrip("v").split(".")[0]
    return int(head) if head.isdigit() else None


def normalize_config(raw: dict[str, Any], source: str = CONFIG) -> dict[str, Any]:
    """A v6-shaped config dict (``architecture`` + ``metadata``) from a v6 or pre-6 ``cfg.json``."""
    expect_object(raw, source)
    data = dict(raw)
    meta = data.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise SAEFormatError(f"{source}: 'metadata' must be a JSON object, got {type(meta).__name__}")
    meta = dict(meta)
    version = data.get("sae_lens_version", meta.get("sae_lens_version"))
    major = _version_major(version)
    if major is None or major < 6:
        # Pre-6 flat config (also what third-party converters emit).
        for old, new in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index"),
                         ("activation_fn_str", "activation_fn")):
            if old in data and new not in data:
                data[new] = data.pop(old)
        data.setdefault("apply_b_dec_to_input", True)
        if data.get("architecture") is None:
            data["architecture"] = "standard"
        act = data.get("activation_fn")
        if act == "topk":
            kwargs = data.get("activation_fn_kwargs") or {}
            if not isinstance(kwargs, dict) or "k" not in kwargs:
                raise SAEFormatError(f"{source}: activation_fn 'topk' needs activation_fn_kwargs.k")
            data["architecture"] = "topk"
            data["k"] = kwargs["k"]
        elif act not in (None, "relu"):
            raise UnknownArchitectureError(f"{source}: unsupported pre-6 activation_fn {act!r} (known: relu, topk)")
        norm = data.get("normalize_activations")
        if isinstance(norm, bool) or norm is None:
            data["normalize_activations"] = "expected_average_only_in" if norm else "none"
        hook = data.get("hook_name")
        if data.get("reshape_activations") is None:
            data["reshape_activations"] = "hook_z" if isinstance(hook, str) and "hook_z" in hook else "none"
        for key in ("model_name", "hook_name", "hook_name_out", "hook_head_index", "context_size", "prepend_bos",
                    "dataset_path", "neuronpedia_id", "sae_lens_training_version"):
            if key in data and key not in meta:
                meta[key] = data[key]
    else:
        for key in ("model_name", "hook_name", "hook_name_out"):
            if key in data and key not in meta:
                meta[key] = data[key]
    data["metadata"] = meta
    return data


def read_config(raw: dict[str, Any], source: str = CONFIG, opts: LoadOptions | None = None) -> tuple[SAEConfig, dict[str, Any]]:
    """Our :class:`SAEConfig` plus the SAELens-only flags the weight conversion needs.

    Raises :class:`SAEFormatError` / :class:`ConfigError` (never another type) for any malformed input.
    """
    opts = opts or LoadOptions()
    data = normalize_config(raw, source)
    meta = data["metadata"]
    arch_name = get(data, "architecture", str, source)
    if arch_name in UNSUPPORTED or arch_name not in ARCHITECTURES:
        raise UnknownArchitectureError(
            f"{source}: SAELens architecture {arch_name!r} is not supported; supported: {sorted(ARCHITECTURES)}"
        )
    arch, skip, transcoder = ARCHITECTURES[arch_name]
    d_in = positive_int(data, "d_in", source)
    d_sae = positive_int(data, "d_sae", source)
    d_out = positive_int(data, "d_out", source, None) if transcoder else None
    k = None
    if arch in ("topk", "batchtopk"):
        k_raw = get(data, "k", (int, float), source, 100)
        if isinstance(k_raw, float):
            if not k_raw.is_integer():
                raise SAEFormatError(f"{source}: k must be a whole number here, got {k_raw!r}")
            k_raw = int(k_raw)
        k = k_raw
    norm_name = get(data, "normalize_activations", str, source, "none")
    if norm_name not in NORMALIZATIONS:
        raise SAEFormatError(
            f"{source}: normalize_activations {norm_name!r} is not supported (supported: {sorted(NORMALIZATIONS)})"
        )
    reshape = get(data, "reshape_activations", str, source, "none")
    if reshape not in ("none", "hook_z"):
        raise SAEFormatError(f"{source}: reshape_activations {reshape!r} is not supported")
    try:
        dtype = str(parse_dtype(get(data, "dtype", str, source, "float32"))).removeprefix("torch.")
    except ConfigError as e:
        raise SAEFormatError(f"{source}: {e}") from None
    hook = opts.hook or (meta.get("hook_name") if isinstance(meta.get("hook_name"), str) else None)
    hook_out = opts.hook_out or (meta.get("hook_name_out") if isinstance(meta.get("hook_name_out"), str) else None)
    model = opts.model_name or (meta.get("model_name") if isinstance(meta.get("model_name"), str) else None)
    apply_b_dec = get(data, "apply_b_dec_to_input", bool, source, True) and not transcoder
    cfg = SAEConfig(
        architecture=arch,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        k=k,
        dtype=dtype,
        apply_b_dec_to_input=apply_b_dec,
        normalize=NORMALIZATIONS[norm_name],
        norm_eps=1e-5,
        skip=skip,
        reshape=reshape,
        sites=[make_site(hook, hook_out if transcoder else None, model)] if hook else [],
        model_name=model,
        metadata={"source_format": NAME, "saelens_architecture": arch_name, "saelens": meta},
    )
    flags = {
        "rescale_acts_by_decoder_norm": bool(get(data, "rescale_acts_by_decoder_norm", bool, source, False)),
        "normalize_activations": norm_name,
        "finetuning_scaling_factor": raw.get("finetuning_scaling_factor") is True,
    }
    return cfg, flags


def convert_state(state: dict[str, torch.Tensor], cfg: SAEConfig, flags: dict[str, Any], source: str,
                  norm_scaling_factor: float | None = None) -> dict[str, torch.Tensor]:
    """SAELens tensors -> our canonical state dict (see the module docstring for each fold)."""
    state = dict(state)
    state.pop("sparsity", None)
    if "log_threshold" in state and "threshold" not in state:
        state["threshold"] = torch.exp(state.pop("log_threshold"))
    if "finetuning_scaling_factor" in state:
        # SAELens 4-5 fine-tuned SAEs: decode((f * s)) when cfg.finetuning_scaling_factor is true (sae.py v5.11
        # ``apply_finetuning_scaling_factor``); folded into W_dec like the legacy ``scaling_factor`` below.
        if not flags.get("finetuning_scaling_factor"):
            raise SAEFormatError(f"{source}: tensor 'finetuning_scaling_factor' but cfg.json's finetuning_scaling_factor "
                                 "is not true; SAELens would not load this file")
        state["scaling_factor"] = state.pop("finetuning_scaling_factor")
    if "scaling_factor" in state:
        s = tensor(state, "scaling_factor", source).float()
        state.pop("scaling_factor")
        if not torch.all(s == 1):
            W_dec = tensor(state, "W_dec", source, 2)
            state["W_dec"] = (W_dec.float() * s[:, None]).to(W_dec.dtype)
    if cfg.architecture == "batchtopk":
        if "topk_threshold" in state:
            state["threshold"] = state.pop("topk_threshold").reshape(())
        elif "threshold" in state and state["threshold"].dim() == 1:
            # saved as a per-latent vector: equal entries -> scalar
            state["threshold"] = state["threshold"][0].reshape(())
    if cfg.skip and "W_skip" in state:
        state["W_skip"] = t_(tensor(state, "W_skip", source, 2))  # SAELens (d_out, d_in) -> ours (d_in, d_out)
    if flags.get("rescale_acts_by_decoder_norm") and cfg.architecture == "topk":
        W_dec = tensor(state, "W_dec", source, 2)
        n = W_dec.float().norm(dim=-1)
        safe = torch.where(n > 0, n, torch.ones_like(n))
        state["W_enc"] = (tensor(state, "W_enc", source, 2).float() * n).to(state["W_enc"].dtype)
        state["b_enc"] = (tensor(state, "b_enc", source, 1).float() * n).to(state["b_enc"].dtype)
        state["W_dec"] = (W_dec.float() / safe[:, None]).to(W_dec.dtype)
    if flags.get("normalize_activations") == "expected_average_only_in":
        if norm_scaling_factor is None:
            warnings.warn(
                f"{source}: normalize_activations='expected_average_only_in' but no norm_scaling_factor was given; "
                "using the weights as they are (inputs must then be scaled by the caller).",
                stacklevel=3,
            )
        else:
            fold_input_scale(state, float(norm_scaling_factor), transcoder=cfg.is_transcoder)
            cfg.metadata["norm_scaling_factor_folded"] = float(norm_scaling_factor)
    return state


def fold_input_scale(state: dict[str, torch.Tensor], s: float, *, transcoder: bool = False) -> None:
    """Fold ``x -> s * x`` into the weights: ``W_enc *= s``; for an autoencoder also ``W_dec /= s``, ``b_dec /= s``.

    (SAELens ``fold_activation_norm_scaling_factor``.) A transcoder's output space is not scaled.
    """
    state["W_enc"] = state["W_enc"] * s
    if not transcoder:
        state["W_dec"] = state["W_dec"] / s
        state["b_dec"] = state["b_dec"] / s


def load(folder: str | Path, opts: LoadOptions | None = None) -> SAE:
    opts = opts or LoadOptions()
    folder = Path(folder)
    source = str(folder / CONFIG)
    cfg, flags = read_config(read_json(folder / CONFIG), source, opts)
    weights = folder / WEIGHTS
    state = read_safetensors(weights, opts.map_location)
    scale = opts.norm_scaling_factor
    state = convert_state(state, cfg, flags, str(weights), scale)
    return build(cfg, state, str(weights), opts)
