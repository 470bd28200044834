"""saprmarks/dictionary_learning (also SAEBench): ``config.json`` + ``ae.pt``.

``ae.pt`` is a pickled state dict; it is opened ONLY with ``torch.load(weights_only=True)`` -- a file that needs
more raises :class:`~sae_hooks.errors.UnsafeCheckpointError` naming it. ``config.json`` is
``{"trainer": {...}, "buffer": {...}}``; ``trainer.dict_class`` picks the layout:

================================  =================================================================  ==============
dict_class                        tensors (``nn.Linear`` weights are transposed into our layout)      ours
================================  =================================================================  ==============
``AutoEncoder``                   ``bias (D)``, ``encoder.weight (F,D)``, ``encoder.bias``,          relu, x - b_dec
                                  ``decoder.weight (D,F)`` (decoder norms folded into the encoder,
                                  as ``load_dictionary`` does)
``AutoEncoderNew``                ``encoder.*``, ``decoder.weight``, ``decoder.bias``                 relu
``GatedAutoEncoder``              ``decoder_bias``, ``encoder.weight``, ``r_mag``, ``gate_bias``,     gated, x - b_dec
                                  ``mag_bias``, ``decoder.weight``
``JumpReluAutoEncoder``           ``W_enc (D,F)``, ``b_enc``, ``W_dec (F,D)``, ``b_dec``,             jumprelu
                                  ``threshold (F)``
``AutoEncoderTopK``               ``encoder.*``, ``decoder.weight``, ``b_dec``, buffers ``k``,        topk, x - b_dec
                                  ``threshold``
``BatchTopKSAE``                  same as TopK; inference uses the scalar ``threshold``               batchtopk, x - b_dec
``MatryoshkaBatchTopKSAE``        ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``k``, ``threshold``,   batchtopk, x - b_dec
                                  ``group_sizes``
================================  =================================================================  ==============

The hook is ``blocks.{trainer.layer}.hook_resid_post`` (the SAEBench convention SAELens also assumes) unless
``hook=`` is given.
"""

from __future__ import annotations

import re

from pathlib import Path
from typing import Any

import torch

from ...config import SAEConfig
from ...errors import SAEFormatError, UnknownArchitectureError
from ...saes import SAE
from ..._files import expect_object, read_json
from ._common import (
    LoadOptions, build, check_shape, file_dtype, float_state, get, make_site, positive_int, t_, tensor, torch_load_weights,
)

NAME = "dictionary_learning"
CONFIG = "config.json"
WEIGHTS = "ae.pt"

#: dict_class -> (our architecture, apply_b_dec_to_input)
DICT_CLASSES: dict[str, tuple[str, bool]] = {
    "AutoEncoder": ("relu", True),
    "AutoEncoderNew": ("relu", False),
    "GatedAutoEncoder": ("gated", True),
    "JumpReluAutoEncoder": ("jumprelu", False),
    "AutoEncoderTopK": ("topk", True),
    "BatchTopKSAE": ("batchtopk", True),
    "MatryoshkaBatchTopKSAE": ("batchtopk", True),
}


def detect(files: list[str]) -> bool:
    """``config.json`` + ``ae.pt``."""
    return CONFIG in files and WEIGHTS in files


def needed(files: list[str]) -> list[str]:
    return [CONFIG, WEIGHTS]


def read_config(raw: dict[str, Any], source: str = CONFIG) -> dict[str, Any]:
    expect_object(raw, source)
    trainer = raw.get("trainer")
    if not isinstance(trainer, dict):
        raise SAEFormatError(f"{source}: missing 'trainer' object")
    dict_class = get(trainer, "dict_class", str, source)
    if dict_class not in DICT_CLASSES:
        raise UnknownArchitectureError(
            f"{source}: dictionary_learning dict_class {dict_class!r} is not supported; supported: {sorted(DICT_CLASSES)}"
        )
    k = get(trainer, "k", (int, float), source, None)
    if isinstance(k, float):
        if not k.is_integer():
            raise SAEFormatError(f"{source}: trainer.k must be a whole number, got {k!r}")
        k = int(k)
    if k is not None and k <= 0:
        raise SAEFormatError(f"{source}: trainer.k must be positive, got {k!r}")
    layer = get(trainer, "layer", int, source, None)
    lm = get(trainer, "lm_name", str, source, None)
    return {
        "dict_class": dict_class,
        "activation_dim": positive_int(trainer, "activation_dim", source, None),
        "dict_size": positive_int(trainer, "dict_size", source, None),
        "k": k,
        "layer": layer,
        "lm_name": lm,
        "submodule_name": get(trainer, "submodule_name", str, source, None),
    }


def convert(raw: dict[str, Any], dict_class: str, source: str) -> dict[str, torch.Tensor]:
    """A dictionary_learning state dict -> ours (transposes, renames)."""
    s = float_state(raw, source)
    if dict_class == "AutoEncoder":
        # As dictionary_learning's load_dictionary -> AutoEncoder.from_pretrained(normalize_decoder=True): each
        # decoder row (latent) is scaled to unit norm and its norm folded into the encoder row and bias. The
        # reconstruction is unchanged; latents come out in unit-decoder units, as the library returns them.
        W_dec = t_(tensor(s, "decoder.weight", source, 2))
        n = W_dec.norm(dim=-1)
        n = torch.where(n > 0, n, torch.ones_like(n))
        return {"W_enc": t_(tensor(s, "encoder.weight", source, 2)) * n, "b_enc": tensor(s, "encoder.bias", source, 1) * n,
                "W_dec": W_dec / n[:, None], "b_dec": tensor(s, "bias", source, 1)}
    if dict_class == "AutoEncoderNew":
        return {"W_enc": t_(tensor(s, "encoder.weight", source, 2)), "b_enc": tensor(s, "encoder.bias", source, 1),
                "W_dec": t_(tensor(s, "decoder.weight", source, 2)), "b_dec": tensor(s, "decoder.bias", source, 1)}
    if dict_class == "GatedAutoEncoder":
        return {"W_enc": t_(tensor(s, "encoder.weight", source, 2)), "W_dec": t_(tensor(s, "decoder.weight", source, 2)),
                "b_dec": tensor(s, "decoder_bias", source, 1), "b_gate": tensor(s, "gate_bias", source, 1),
                "b_mag": tensor(s, "mag_bias", source, 1), "r_mag": tensor(s, "r_mag", source, 1)}
    if dict_class == "JumpReluAutoEncoder":
        return {k: tensor(s, k, source) for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        out = {"W_enc": t_(tensor(s, "encoder.weight", source, 2)), "b_enc": tensor(s, "encoder.bias", source, 1),
               "W_dec": t_(tensor(s, "decoder.weight", source, 2)), "b_dec": tensor(s, "b_dec", source, 1)}
    else:  # MatryoshkaBatchTopKSAE
        out = {k: tensor(s, k, source) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if dict_class != "AutoEncoderTopK":
        thr = tensor(s, "threshold", source)
        if thr.numel() != 1:
            raise SAEFormatError(f"{source}: {dict_class} threshold must be a scalar, got shape {tuple(thr.shape)}")
        out["threshold"] = thr.reshape(()).to(out["W_enc"].dtype)
    return out


#: dictionary_learning / SAEBench ``submodule_name`` kinds -> TransformerLens hooks.
_SUBMODULES = {"resid_post": "hook_resid_post", "resid_pre": "hook_resid_pre", "resid": "hook_resid_post",
               "mlp_out": "hook_mlp_out", "mlp": "hook_mlp_out", "attn_out": "hook_attn_out", "attn": "hook_attn_out"}


def submodule_hook(submodule_name: str | None, layer: int | None) -> str | None:
    """The hook a dictionary was trained on: ``submodule_name`` (``"mlp_out_layer_3"`` -> ``blocks.3.hook_mlp_out``,
    ``"resid_post_layer_12"``), else ``blocks.{layer}.hook_resid_post`` (SAEBench's convention, which SAELens assumes
    for every file). An unrecognised ``submodule_name`` gives no hook (pass ``hook=``) rather than a guess."""
    if submodule_name:
        m = re.fullmatch(r"(resid_post|resid_pre|resid|mlp_out|mlp|attn_out|attn)_?(?:layer_?)?(\d+)", submodule_name)
        if m is None:
            return None
        return f"blocks.{m.group(2)}.{_SUBMODULES[m.group(1)]}"
    return f"blocks.{layer}.hook_resid_post" if layer is not None else None


def load(folder: str | Path, opts: LoadOptions | None = None) -> SAE:
    opts = opts or LoadOptions()
    folder = Path(folder)
    source = str(folder / CONFIG)
    c = read_config(read_json(folder / CONFIG), source)
    weights = folder / WEIGHTS
    wsrc = str(weights)
    raw = torch_load_weights(weights, opts.map_location)
    if isinstance(raw.get("ae"), dict) and ("optimizer" in raw or "step" in raw):
        raise SAEFormatError(
            f"{wsrc}: a dictionary_learning training backup (keys {sorted(raw)}; step {raw.get('step')!r}), not the "
            "final dictionary: its 'ae' weights are not yet rescaled by the run's norm_factor. Load the ae.pt that "
            "trainSAE writes at the end of the run.")
    arch, apply_b_dec = DICT_CLASSES[c["dict_class"]]
    state = convert(raw, c["dict_class"], wsrc)
    d_in, d_sae = state["W_enc"].shape
    check_shape(state["W_dec"], (d_sae, d_in), "W_dec", wsrc, "decoder must be the encoder's transpose in shape")
    if c["activation_dim"] is not None and c["activation_dim"] != d_in:
        raise SAEFormatError(f"{wsrc}: weights have d_in={d_in} but {CONFIG} says activation_dim={c['activation_dim']}")
    if c["dict_size"] is not None and c["dict_size"] != d_sae:
        raise SAEFormatError(f"{wsrc}: weights have {d_sae} latents but {CONFIG} says dict_size={c['dict_size']}")
    k = None
    if arch in ("topk", "batchtopk"):
        k_buf = raw.get("k")
        k = int(k_buf.item()) if isinstance(k_buf, torch.Tensor) and k_buf.numel() == 1 else c["k"]
        if k is None:
            raise SAEFormatError(f"{wsrc}: {c['dict_class']} needs k (no 'k' buffer and no trainer.k in {CONFIG})")
        if not 0 < k <= d_sae:
            raise SAEFormatError(f"{wsrc}: k={k} must be in [1, {d_sae}]")
    hook = opts.hook or submodule_hook(c["submodule_name"], c["layer"])
    model = opts.model_name or c["lm_name"]
    cfg = SAEConfig(
        architecture=arch,
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        dtype=file_dtype(state, "W_enc"),
        apply_b_dec_to_input=apply_b_dec,
        sites=[make_site(hook, None, model)] if hook else [],
        model_name=model,
        metadata={"source_format": NAME, "dict_class": c["dict_class"],
                  **({"submodule_name": c["submodule_name"]} if c["submodule_name"] else {})},
    )
    return build(cfg, state, wsrc, opts)
