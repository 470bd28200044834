"""Llama Scope (OpenMOSS ``lm-saes``): ``hyperparams.json`` + ``checkpoints/final.safetensors``.

Tensors are ``nn.Linear`` weights: ``encoder.weight (d_sae, d_in)``, ``encoder.bias (d_sae)``,
``decoder.weight (d_out, d_sae)``, ``decoder.bias (d_out)`` -> transposed into our layout.

Convention (SAELens's ``llama_scope`` loader + ``from_pretrained``, which Neuronpedia's numbers follow): the SAEs
were trained on inputs scaled to norm ``sqrt(d_model)`` on average (``norm_activation: dataset-wise``), i.e.
``x' = x * s_in`` with ``s_in = sqrt(d_model) / dataset_average_activation_norm.in``. The loader folds this
constant into the weights so raw model activations go in and come out:

* ``W_enc *= s_in`` (``b_enc`` unchanged), ``W_dec /= s_out``, ``b_dec /= s_out`` (``s_out`` from ``.out``; equal to
  ``s_in`` for an SAE, different for a transcoder whose output is another activation);
* the scalar ``jump_relu_threshold`` becomes a per-latent ``threshold = jump_relu_threshold * s_in`` (SAELens scales
  it "to match fold_activation_norm_scaling_factor");
* a per-latent ``log_jumprelu_threshold`` tensor (newer lm-saes) is ``exp``-ed and kept unscaled, since it is
  compared with the pre-activation of the normalised input, which the fold leaves unchanged.

``apply_decoder_bias_to_pre_encoder`` (default False, as SAELens assumes) sets ``apply_b_dec_to_input``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ...config import SAEConfig
from ...errors import SAEFormatError, UnknownArchitectureError
from ...saes import SAE
from ..._files import expect_object
from ._common import LoadOptions, build, check_shape, file_dtype, get, make_site, positive_int, t_, tensor, read_config_and_safetensors

NAME = "llama_scope"
CONFIG = "hyperparams.json"
WEIGHTS = "checkpoints/final.safetensors"


def detect(files: list[str]) -> bool:
    """``hyperparams.json`` + ``checkpoints/final.safetensors``."""
    return CONFIG in files and WEIGHTS in files


def needed(files: list[str]) -> list[str]:
    return [CONFIG, WEIGHTS]


def read_config(raw: dict[str, Any], source: str = CONFIG) -> dict[str, Any]:
    """Validated ``hyperparams.json`` fields, with the input/output scale factors computed."""
    expect_object(raw, source)
    d_model = positive_int(raw, "d_model", source)
    d_sae = positive_int(raw, "d_sae", source)
    act_fn = get(raw, "act_fn", str, source, "jumprelu").lower()
    if act_fn not in ("jumprelu", "topk", "relu"):
        raise UnknownArchitectureError(f"{source}: act_fn {act_fn!r} is not supported (jumprelu, topk, relu)")
    k = positive_int(raw, "top_k", source, None) if act_fn == "topk" else None
    if act_fn == "topk" and k is None:
        raise SAEFormatError(f"{source}: act_fn 'topk' needs 'top_k'")
    jt = get(raw, "jump_relu_threshold", (int, float), source, 0.0)
    norm_mode = get(raw, "norm_activation", str, source, "dataset-wise")
    hook_in = get(raw, "hook_point_in", str, source, None)
    hook_out = get(raw, "hook_point_out", str, source, hook_in)
    s_in = s_out = 1.0
    if norm_mode == "dataset-wise":
        norms = raw.get("dataset_average_activation_norm")
        if not isinstance(norms, dict):
            raise SAEFormatError(f"{source}: norm_activation 'dataset-wise' needs dataset_average_activation_norm {{in, out}}")
        n_in = get(norms, "in", (int, float), source)
        n_out = get(norms, "out", (int, float), source, n_in)
        if n_in <= 0 or n_out <= 0:
            raise SAEFormatError(f"{source}: dataset_average_activation_norm must be positive, got {norms!r}")
        s_in, s_out = math.sqrt(d_model) / n_in, math.sqrt(d_model) / n_out
    elif norm_mode not in ("inference", "none"):
        raise SAEFormatError(
            f"{source}: norm_activation {norm_mode!r} is not supported (dataset-wise, inference, none); a "
            "token-wise normalisation cannot be folded into the weights"
        )
    return {
        "d_model": d_model, "d_sae": d_sae, "act_fn": act_fn, "k": k, "jump_relu_threshold": float(jt),
        "hook_in": hook_in, "hook_out": hook_out, "s_in": s_in, "s_out": s_out,
        "apply_b_dec": get(raw, "apply_decoder_bias_to_pre_encoder", bool, source, False),
        "model_name": get(raw, "model_name", str, source, None),
    }


def load(folder: str | Path, opts: LoadOptions | None = None) -> SAE:
    opts = opts or LoadOptions()
    c, raw, wsrc = read_config_and_safetensors(folder, CONFIG, WEIGHTS, read_config, opts)
    enc = tensor(raw, "encoder.weight", wsrc, 2)
    dec = tensor(raw, "decoder.weight", wsrc, 2)
    d_sae, d_in = enc.shape
    if d_sae != c["d_sae"]:
        raise SAEFormatError(f"{wsrc}: encoder.weight has {d_sae} latents but {CONFIG} says d_sae={c['d_sae']}")
    if d_in != c["d_model"]:
        raise SAEFormatError(f"{wsrc}: encoder.weight has d_in={d_in} but {CONFIG} says d_model={c['d_model']}")
    if dec.shape[1] != d_sae:
        raise SAEFormatError(f"{wsrc}: decoder.weight has shape {tuple(dec.shape)}, expected (d_out, {d_sae})")
    d_out = dec.shape[0]
    dtype = file_dtype(raw, "encoder.weight")
    s_in, s_out = c["s_in"], c["s_out"]
    b_enc = tensor(raw, "encoder.bias", wsrc, 1)
    b_dec = tensor(raw, "decoder.bias", wsrc, 1)
    check_shape(b_enc, (d_sae,), "encoder.bias", wsrc)
    check_shape(b_dec, (d_out,), "decoder.bias", wsrc)
    state = {
        "W_enc": (t_(enc).float() * s_in).to(enc.dtype),
        "b_enc": b_enc,
        "W_dec": (t_(dec).float() / s_out).to(dec.dtype),
        "b_dec": (b_dec.float() / s_out).to(b_dec.dtype),
    }
    arch = {"jumprelu": "jumprelu", "topk": "topk", "relu": "relu"}[c["act_fn"]]
    if arch == "jumprelu":
        if "log_jumprelu_threshold" in raw:
            lt = tensor(raw, "log_jumprelu_threshold", wsrc)
            state["threshold"] = torch.exp(lt.float()).expand(d_sae).to(enc.dtype).contiguous()
        else:
            state["threshold"] = torch.full((d_sae,), c["jump_relu_threshold"] * s_in, dtype=enc.dtype, device=enc.device)
    hook_in, hook_out = opts.hook or c["hook_in"], opts.hook_out or c["hook_out"]
    transcoder = bool(hook_out and hook_in and hook_out != hook_in) or d_out != d_in
    model = opts.model_name or c["model_name"]
    cfg = SAEConfig(
        architecture=arch,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out if transcoder else None,
        k=c["k"],
        dtype=dtype,
        apply_b_dec_to_input=c["apply_b_dec"] and not transcoder,
        sites=[make_site(hook_in, hook_out if transcoder else None, model)] if hook_in else [],
        model_name=model,
        metadata={"source_format": NAME, "norm_scale_in_folded": s_in, "norm_scale_out_folded": s_out},
    )
    return build(cfg, state, wsrc, opts)
