"""The newer OpenMOSS layout (lm-saes 2.x / ``llamascopium``; Llama Scope R1, Llama Scope 2): ``config.json`` +
``sae_weights.safetensors`` (or ``sae_weights.pt``).

Tensors (``SparseAutoEncoder`` in ``src/llamascopium/models/sae.py``, OpenMOSS/Language-Model-SAEs@95281ac):
``W_E (d_model, d_sae)``, ``b_E (d_sae)``, ``W_D (d_sae, d_model)``, ``b_D (d_model)`` -- our layout -- and, for
JumpReLU, ``activation_function.log_jumprelu_threshold (d_sae)``; the dataset norms are scalars
``dataset_average_activation_norm.<hook point>``. Older files of the same layout (Llama Scope R1) use
``encoder.weight``/``decoder.weight`` (``nn.Linear``) and a top-level ``log_jumprelu_threshold``; both are read.

Only ``sae_type: "sae"`` is a single-site SAE; ``clt``, ``crosscoder``, ``lorsa``, ``molt`` are refused by name.

Conventions. ``convention="authors"`` (default) is what the authors' ``from_pretrained(folder)`` computes by
default (``fold_activation_scale=False``): inputs scaled by ``s_in = sqrt(d_model) / norm[hook_point_in]``
(``normalize_activations``), ``encode``, ``decode``, outputs divided by ``s_out`` (``denormalize_activations``). Their
``encode`` with ``sparsity_include_decoder_norm`` gates ``pre * ||W_D[j]||`` and divides back, so a JumpReLU latent is
``pre`` where ``pre * ||W_D[j]|| > exp(log_threshold[j])``: we store the per-latent threshold
``exp(log_threshold) / ||W_D[j]||``, and ``W_E * s_in``, ``W_D / s_out``, ``b_D / s_out``, and get the authors'
latents (the training units) and reconstructions exactly.

``convention="folded"``: ``from_pretrained(folder, fold_activation_scale=True)``, the authors' "inference mode"
(``standardize_parameters_of_dataset_norm``: ``b_E /= s_in``, ``b_D /= s_out``, ``W_D *= s_in / s_out``). Latents come
out divided by ``s_out``, and since the threshold is not rescaled, JumpReLU SAEs fire differently from the default
(our fixture: reconstructions differ by up to 1.3); offered because it is the authors' documented option.

A TopK SAE with ``sparsity_include_decoder_norm`` ranks by ``pre * ||W_D[j]||``: we fold that norm into the encoder
(latents come out multiplied by it; reconstructions are the authors').
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..._files import expect_object, read_json, read_safetensors
from ...config import SAEConfig
from ...errors import ConfigError, SAEFormatError, UnknownArchitectureError
from ...saes import SAE
from ._common import LoadOptions, build, check_shape, file_dtype, get, make_site, positive_int, t_, tensor
from .llama_scope import read_checkpoint, scales

NAME = "lm_saes"
CONFIG = "config.json"
WEIGHTS = ("sae_weights.safetensors", "sae_weights.pt")
_OTHER_TYPES = ("clt", "crosscoder", "lorsa", "molt")
CONVENTIONS = ("authors", "folded")


def detect(files: list[str]) -> bool:
    """``config.json`` + ``sae_weights.safetensors`` (or ``.pt``)."""
    return CONFIG in files and any(w in files for w in WEIGHTS)


def needed(files: list[str]) -> list[str]:
    return [CONFIG, next(w for w in WEIGHTS if w in files)]


def read_config(raw: dict[str, Any], source: str = CONFIG) -> dict[str, Any]:
    expect_object(raw, source)
    sae_type = get(raw, "sae_type", str, source, "sae")
    if sae_type in _OTHER_TYPES:
        raise UnknownArchitectureError(
            f"{source}: sae_type {sae_type!r} is a multi-site dictionary; only 'sae' is supported by this loader")
    if sae_type != "sae":
        raise UnknownArchitectureError(f"{source}: unknown sae_type {sae_type!r}")
    d_model = positive_int(raw, "d_model", source)
    act_fn = get(raw, "act_fn", str, source, "relu").lower()
    if act_fn not in ("relu", "jumprelu", "topk"):
        raise UnknownArchitectureError(f"{source}: act_fn {act_fn!r} is not supported (relu, jumprelu, topk)")
    if get(raw, "use_glu_encoder", bool, source, False):
        raise UnknownArchitectureError(f"{source}: use_glu_encoder (a gated encoder) is not supported")
    hook_in = get(raw, "hook_point_in", str, source, None)
    return {
        "d_model": d_model, "act_fn": act_fn,
        "k": positive_int(raw, "top_k", source, 50) if act_fn == "topk" else None,
        "norm_mode": get(raw, "norm_activation", str, source, "dataset-wise"),
        "norms": raw.get("dataset_average_activation_norm"),
        "unit_gate": get(raw, "sparsity_include_decoder_norm", bool, source, True),
        "use_decoder_bias": get(raw, "use_decoder_bias", bool, source, True),
        "hook_in": hook_in, "hook_out": get(raw, "hook_point_out", str, source, hook_in),
        "model_name": get(raw, "model_name", str, source, None),
    }


def _pick(raw: dict[str, torch.Tensor], source: str, ours: str, theirs: str, linear: str | None) -> torch.Tensor:
    if ours in raw:
        return tensor(raw, ours, source)
    if linear is not None and linear in raw:
        return t_(tensor(raw, linear, source, 2))
    if theirs in raw:
        return tensor(raw, theirs, source)
    raise SAEFormatError(f"{source}: missing tensor {ours!r}" + (f" (or {linear!r})" if linear else "")
                         + f"; tensors present: {sorted(raw)}")


def load(folder: str | Path, opts: LoadOptions | None = None) -> SAE:
    opts = opts or LoadOptions()
    folder = Path(folder)
    conv = opts.convention or "authors"
    if conv not in CONVENTIONS:
        raise ConfigError(f"{folder}: convention {conv!r} is not one of {list(CONVENTIONS)} for the {NAME} layout")
    c = read_config(read_json(folder / CONFIG), str(folder / CONFIG))
    path = next((folder / w for w in WEIGHTS if (folder / w).exists()), None)
    if path is None:
        raise SAEFormatError(f"{folder}: no weights file (looked for {list(WEIGHTS)})")
    raw = read_safetensors(path, opts.map_location) if path.suffix == ".safetensors" else read_checkpoint(
        path, opts.map_location)
    src = str(path)
    W_E = _pick(raw, src, "W_E", "W_E", "encoder.weight")
    b_E = _pick(raw, src, "b_E", "encoder.bias", None)
    W_D = _pick(raw, src, "W_D", "W_D", "decoder.weight")
    if W_E.dim() != 2 or W_D.dim() != 2:
        raise SAEFormatError(f"{src}: W_E {tuple(W_E.shape)} and W_D {tuple(W_D.shape)} must be matrices")
    d_in, d_sae = W_E.shape
    if d_in != c["d_model"]:
        raise SAEFormatError(f"{src}: W_E has d_model={d_in} but {CONFIG} says d_model={c['d_model']}")
    check_shape(W_D, (d_sae, d_in), "W_D", src, "lm-saes SAEs map d_model -> d_model")
    check_shape(b_E, (d_sae,), "b_E", src)
    if c["use_decoder_bias"]:
        b_D = _pick(raw, src, "b_D", "decoder.bias", None)
        check_shape(b_D, (d_in,), "b_D", src)
    else:
        b_D = torch.zeros(d_in, dtype=W_D.dtype, device=W_D.device)
    norms = {k.split(".", 1)[1]: float(v) for k, v in raw.items() if k.startswith("dataset_average_activation_norm.")}
    if not norms and isinstance(c["norms"], dict):
        norms = c["norms"]
    key_in, key_out = (c["hook_in"], c["hook_out"]) if c["hook_in"] in norms else ("in", "out")
    s_in, s_out = scales(c["norm_mode"], norms or None, d_in, src, key_in, key_out)
    if conv == "folded":
        W_enc, b_enc, W_dec, b_dec = W_E.float(), b_E.float() / s_in, W_D.float() * (s_in / s_out), b_D.float() / s_out
    else:  # the gate sees the raw W_D norms; scales applied on the way in and out
        W_enc, b_enc, W_dec, b_dec = W_E.float() * s_in, b_E.float(), W_D.float() / s_out, b_D.float() / s_out
    gate_dec = W_D.float() * (s_in / s_out) if conv == "folded" else W_D.float()
    n = gate_dec.norm(dim=1) if c["unit_gate"] else torch.ones(d_sae, device=W_dec.device)
    if c["unit_gate"] and bool((n == 0).any()):
        raise SAEFormatError(f"{src}: a decoder row has zero norm")
    act = c["act_fn"]
    state: dict[str, torch.Tensor] = {}
    if act == "jumprelu":
        lt = raw.get("activation_function.log_jumprelu_threshold", raw.get("log_jumprelu_threshold"))
        if lt is None:
            raise SAEFormatError(f"{src}: act_fn 'jumprelu' needs 'activation_function.log_jumprelu_threshold'; "
                                 f"tensors present: {sorted(raw)}")
        state["threshold"] = (torch.exp(lt.float()).expand(d_sae) / n)
    elif act == "topk" and c["unit_gate"]:
        W_enc, b_enc, W_dec = W_enc * n[None, :], b_enc * n, W_dec / n[:, None]
    dt = W_E.dtype
    state.update({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    state = {k: v.to(dt).contiguous() for k, v in state.items()}
    hook_in, hook_out = opts.hook or c["hook_in"], opts.hook_out or c["hook_out"]
    transcoder = bool(hook_in and hook_out and hook_in != hook_out)
    model = opts.model_name or c["model_name"]
    cfg = SAEConfig(
        architecture=act,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_in if transcoder else None,
        k=c["k"],
        dtype=file_dtype(raw, "W_E" if "W_E" in raw else "encoder.weight"),
        sites=[make_site(hook_in, hook_out if transcoder else None, model)] if hook_in else [],
        model_name=model,
        metadata={"source_format": NAME, "convention": conv, "norm_scale_in": s_in, "norm_scale_out": s_out,
                  **({"latents_scaled_by_decoder_norm": True} if act == "topk" and c["unit_gate"] else {})},
    )
    return build(cfg, state, src, opts)
