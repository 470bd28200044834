"""Llama Scope (OpenMOSS ``lm-saes`` 0.1, the Llama Scope release): ``hyperparams.json`` + a checkpoint.

Files: ``hyperparams.json`` and, in the authors' order of preference, ``sae_weights.safetensors``,
``sae_weights.pt``, ``checkpoints/pruned.safetensors``, ``checkpoints/pruned.pt``, ``checkpoints/final.safetensors``,
``checkpoints/final.pt`` (``.pt`` files hold ``{"sae": state_dict}`` and are read with ``weights_only=True``).
Tensors are ``nn.Linear`` weights: ``encoder.weight (d_sae, d_in)``, ``encoder.bias (d_sae)``,
``decoder.weight (d_out, d_sae)``, ``decoder.bias (d_out)``.

The models were trained on inputs scaled by ``s_in = sqrt(d_model) / dataset_average_activation_norm.in`` (and the
label by ``s_out`` from ``.out``; equal for an SAE, different for a transcoder). Two conventions turn that into an SAE
on raw activations; both give the same reconstruction when the same latents fire:

``convention="authors"`` (default): what the authors' loader does, ``SparseAutoEncoder.from_pretrained`` in
``src/lm_saes/sae.py`` at OpenMOSS/Language-Model-SAEs@eb5088af (2024-10-30, the Llama Scope release):

1. ``standardize_parameters_of_dataset_activation_scaling``: ``b_enc /= s_in``, ``b_dec /= s_out``,
   ``W_dec *= s_in / s_out``;
2. ``transform_to_unit_decoder_norm`` (when ``sparsity_include_decoder_norm``, their default True): with
   ``n = ||W_dec[j]||`` after step 1, ``W_dec /= n``, ``W_enc *= n``, ``b_enc *= n``;
3. ``act_fn: topk`` with ``jump_relu_threshold > 0``: the loader prints "Converting topk activation to jumprelu" and
   sets ``cfg.act_fn``, but the activation function was built before, so it still computes TopK (our fixture's L0 is
   exactly ``top_k``). We follow what it computes (TopK); pass ``convention="saelens"`` for a JumpReLU reading.
   JumpReLU uses the scalar threshold as is.

So latents come out as ``n * pre / s_out`` (``pre`` = the training pre-activation) and the threshold gates that
quantity; TopK ranks by ``n * pre`` as in training. Missing keys take the authors' defaults
(``apply_decoder_bias_to_pre_encoder: true``, ``norm_activation: token-wise`` -> refused, ``act_fn: relu``).

``convention="saelens"``: SAELens's ``llama_scope`` loader + ``SAE.from_pretrained``: ``W_enc *= s_in``,
``W_dec, b_dec /= s_out``, threshold ``* s_in``, no decoder-norm step, ``apply_b_dec_to_input`` false; latents are
the training pre-activations (Neuronpedia's numbers). With non-unit decoder norms the two differ in which latents
fire.
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
from ._common import LoadOptions, build, check_shape, file_dtype, get, make_site, positive_int, t_, tensor, torch_load_weights

NAME = "llama_scope"
CONFIG = "hyperparams.json"
#: The authors' order of preference (lm_saes/sae.py ``from_config``).
CHECKPOINTS = ("sae_weights.safetensors", "sae_weights.pt", "checkpoints/pruned.safetensors", "checkpoints/pruned.pt",
               "checkpoints/final.safetensors", "checkpoints/final.pt")
CONVENTIONS = ("authors", "saelens")


def detect(files: list[str]) -> bool:
    """``hyperparams.json`` + one of the authors' checkpoint files."""
    return CONFIG in files and any(c in files for c in CHECKPOINTS)


def needed(files: list[str]) -> list[str]:
    return [CONFIG, next(c for c in CHECKPOINTS if c in files)]


def convention_of(opts: LoadOptions) -> str:
    conv = opts.convention or "authors"
    if conv not in CONVENTIONS:
        raise ConfigError(f"convention {conv!r} is not one of {list(CONVENTIONS)}")
    return conv


def scales(norm_mode: str, norms: Any, d_model: int, source: str, key_in: str = "in", key_out: str = "out",
           ) -> tuple[float, float]:
    """(s_in, s_out) of lm-saes ``dataset-wise`` normalisation (1, 1 for ``inference``/``none``)."""
    if norm_mode in ("inference", "none"):
        return 1.0, 1.0
    if norm_mode != "dataset-wise":
        raise SAEFormatError(
            f"{source}: norm_activation {norm_mode!r} is not supported (dataset-wise, inference); a token-wise or "
            "batch-wise normalisation depends on the input and cannot be folded into the weights")
    if not isinstance(norms, dict):
        raise SAEFormatError(f"{source}: norm_activation 'dataset-wise' needs dataset_average_activation_norm "
                             f"{{{key_in!r}, {key_out!r}}}")
    n_in = get(norms, key_in, (int, float), source)
    n_out = get(norms, key_out, (int, float), source, n_in)
    if n_in <= 0 or n_out <= 0:
        raise SAEFormatError(f"{source}: dataset_average_activation_norm must be positive, got {norms!r}")
    return math.sqrt(d_model) / n_in, math.sqrt(d_model) / n_out


def read_config(raw: dict[str, Any], source: str = CONFIG, convention: str = "authors") -> dict[str, Any]:
    """Validated ``hyperparams.json`` fields, with the input/output scale factors computed."""
    expect_object(raw, source)
    authors = convention == "authors"
    d_model = positive_int(raw, "d_model", source)
    d_sae = positive_int(raw, "d_sae", source)
    act_fn = get(raw, "act_fn", str, source, "relu" if authors else "jumprelu").lower()
    if act_fn not in ("jumprelu", "topk", "relu"):
        raise UnknownArchitectureError(f"{source}: act_fn {act_fn!r} is not supported (jumprelu, topk, relu)")
    k = positive_int(raw, "top_k", source, None if not authors else 50) if act_fn == "topk" else None
    if act_fn == "topk" and k is None:
        raise SAEFormatError(f"{source}: act_fn 'topk' needs 'top_k'")
    if get(raw, "use_glu_encoder", bool, source, False):
        raise UnknownArchitectureError(f"{source}: use_glu_encoder (a gated encoder) is not supported")
    jt = float(get(raw, "jump_relu_threshold", (int, float), source, 0.0))
    norm_mode = get(raw, "norm_activation", str, source, "token-wise" if authors else "dataset-wise")
    s_in, s_out = scales(norm_mode, raw.get("dataset_average_activation_norm"), d_model, source)
    hook_in = get(raw, "hook_point_in", str, source, None)
    hook_out = get(raw, "hook_point_out", str, source, hook_in)
    return {
        "d_model": d_model, "d_sae": d_sae, "act_fn": act_fn, "k": k, "jump_relu_threshold": jt,
        "hook_in": hook_in, "hook_out": hook_out, "s_in": s_in, "s_out": s_out,
        "apply_b_dec": get(raw, "apply_decoder_bias_to_pre_encoder", bool, source, authors),
        "use_decoder_bias": get(raw, "use_decoder_bias", bool, source, True),
        "unit_decoder": get(raw, "sparsity_include_decoder_norm", bool, source, True),
        "model_name": get(raw, "model_name", str, source, None),
    }


def read_checkpoint(path: Path, device: str) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path, device)
    obj = torch_load_weights(path, device)
    state = obj.get("sae", obj)
    if not isinstance(state, dict):
        raise SAEFormatError(f"{path}: expected {{'sae': state_dict}}, got {type(state).__name__} under 'sae'")
    return state


def load(folder: str | Path, opts: LoadOptions | None = None) -> SAE:
    opts = opts or LoadOptions()
    folder = Path(folder)
    conv = convention_of(opts)
    c = read_config(read_json(folder / CONFIG), str(folder / CONFIG), conv)
    ckpt = next((folder / n for n in CHECKPOINTS if (folder / n).exists()), None)
    if ckpt is None:
        raise SAEFormatError(f"{folder}: no checkpoint (looked for {list(CHECKPOINTS)})")
    raw = read_checkpoint(ckpt, opts.map_location)
    wsrc = str(ckpt)
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
    b_enc = tensor(raw, "encoder.bias", wsrc, 1)
    check_shape(b_enc, (d_sae,), "encoder.bias", wsrc)
    if "decoder.bias" in raw or c["use_decoder_bias"]:
        b_dec = tensor(raw, "decoder.bias", wsrc, 1)
        check_shape(b_dec, (d_out,), "decoder.bias", wsrc)
    else:
        b_dec = torch.zeros(d_out, dtype=dec.dtype, device=dec.device)
    dtype = file_dtype(raw, "encoder.weight")
    s_in, s_out = c["s_in"], c["s_out"]
    # Work in float32 (the authors' transforms run in the checkpoint dtype; float32 keeps bf16 files exact enough).
    W_enc, W_dec = t_(enc).float(), t_(dec).float()
    b_e, b_d = b_enc.float(), b_dec.float()
    act = c["act_fn"]
    if conv == "authors":
        b_e, b_d, W_dec = b_e / s_in, b_d / s_out, W_dec * (s_in / s_out)
        if c["unit_decoder"]:
            n = W_dec.norm(dim=1)
            if bool((n == 0).any()):
                raise SAEFormatError(f"{wsrc}: a decoder row has zero norm; cannot rescale it to unit norm")
            W_dec, W_enc, b_e = W_dec / n[:, None], W_enc * n[None, :], b_e * n
        threshold = c["jump_relu_threshold"]
        if act == "jumprelu" and threshold < 0:
            raise SAEFormatError(f"{CONFIG}: a negative jump_relu_threshold ({threshold}) lets negative "
                                 "pre-activations through; not supported")
    else:  # SAELens: always JumpReLU with the scalar threshold (its llama_scope loader ignores act_fn)
        W_enc, W_dec, b_d = W_enc * s_in, W_dec / s_out, b_d / s_out
        act = "jumprelu"
        threshold = c["jump_relu_threshold"] * s_in
    wdt = enc.dtype
    state = {"W_enc": W_enc.to(wdt), "b_enc": b_e.to(wdt), "W_dec": W_dec.to(wdt), "b_dec": b_d.to(wdt)}
    if act == "jumprelu":
        state["threshold"] = torch.full((d_sae,), threshold, dtype=wdt, device=enc.device)
    hook_in, hook_out = opts.hook or c["hook_in"], opts.hook_out or c["hook_out"]
    transcoder = bool(hook_out and hook_in and hook_out != hook_in) or d_out != d_in
    model = opts.model_name or c["model_name"]
    apply_b_dec = c["apply_b_dec"] if conv == "authors" else False
    if transcoder and apply_b_dec:
        raise SAEFormatError(f"{CONFIG}: a transcoder with apply_decoder_bias_to_pre_encoder would subtract an "
                             "output-space bias from its input; not supported")
    cfg = SAEConfig(
        architecture=act,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out if transcoder else None,
        k=c["k"] if act == "topk" else None,
        dtype=dtype,
        apply_b_dec_to_input=apply_b_dec,
        sites=[make_site(hook_in, hook_out if transcoder else None, model)] if hook_in else [],
        model_name=model,
        metadata={"source_format": NAME, "convention": conv, "checkpoint": ckpt.name if ckpt.parent == folder
                  else f"{ckpt.parent.name}/{ckpt.name}", "norm_scale_in": s_in, "norm_scale_out": s_out},
    )
    return build(cfg, state, wsrc, opts)
