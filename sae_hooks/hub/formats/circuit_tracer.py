"""circuit-tracer per-layer transcoders: one ``layer_N.safetensors`` per layer (e.g. ``mwhanna/qwen3-4b-transcoders``),
an optional ``config.yaml`` beside them.

Tensors (``SingleLayerTranscoder`` in ``circuit_tracer/transcoder/single_layer_transcoder.py``,
decoderesearch/circuit-tracer@4bb8c0e): ``W_enc (d_sae, d_model)`` used as ``F.linear(x, W_enc, b_enc)`` -> our
``W_enc`` is its transpose; ``W_dec (d_sae, d_model)`` used as ``acts @ W_dec + b_dec`` (our layout); optional
``activation_function.threshold`` (JumpReLU: ``x * (x > threshold)``; without it ReLU, as ``load_transcoder``
decides) and ``W_skip (d_model, d_model)`` used as ``x @ W_skip.T`` (ours: its transpose). A ``k`` tensor (TopK,
``to_safetensors``) is read as TopK ``k``.

Sites: ``config.yaml``'s ``feature_input_hook`` / ``feature_output_hook`` (block-relative TransformerLens names), else
``mlp.hook_in`` -> ``hook_mlp_out`` (SAELens's ``mwhanna_transcoder`` convention); the layer is ``N``. The names mean
what they mean in circuit-tracer (``replacement_model_transformerlens.py`` / ``utils/tl_nnsight_mapping.py``):
``mlp.hook_in`` is the MLP's input (the pre-MLP norm's output, after its scale), ``ln2.hook_normalized`` the norm's
pre-affine value (``pre_feedforward_layernorm.source.self__norm_0`` there; TransformerLens's hook, before the scale).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..._files import read_safetensors
from ...config import SAEConfig
from ...errors import SAEFormatError
from ...saes import SAE
from ._common import LoadOptions, build, check_shape, file_dtype, make_site, read_feature_hooks, t_, tensor

NAME = "circuit_tracer"
FILE = re.compile(r"^layer_(\d+)\.safetensors$")
CONFIG = "config.yaml"
_OTHER = ("cfg.json", "config.json", "hyperparams.json", "params.npz", "params.safetensors")


def detect(files: list[str]) -> bool:
    """Exactly one ``layer_N.safetensors`` (the sae_id names the file) and no other SAE config beside it."""
    layers = [f for f in files if FILE.match(f)]
    return len(layers) == 1 and not any(c in files for c in _OTHER)


def needed(files: list[str]) -> list[str]:
    return [next(f for f in files if FILE.match(f))] + ([CONFIG] if CONFIG in files else [])


def load(path: str | Path, opts: LoadOptions | None = None) -> SAE:
    """``path`` is the ``layer_N.safetensors`` file."""
    opts = opts or LoadOptions()
    path = Path(path)
    m = FILE.match(path.name)
    if m is None:
        raise SAEFormatError(f"{path}: expected a file named layer_N.safetensors")
    layer = int(m.group(1))
    src = str(path)
    raw: dict[str, Any] = read_safetensors(path, opts.map_location)
    W_enc = tensor(raw, "W_enc", src, 2)
    d_sae, d_in = W_enc.shape
    W_dec = tensor(raw, "W_dec", src, 2)
    if W_dec.shape[0] != d_sae:
        raise SAEFormatError(f"{src}: W_dec {tuple(W_dec.shape)} does not match W_enc {tuple(W_enc.shape)} "
                             "(expected (d_sae, d_out))")
    d_out = W_dec.shape[1]
    b_enc, b_dec = tensor(raw, "b_enc", src, 1), tensor(raw, "b_dec", src, 1)
    check_shape(b_enc, (d_sae,), "b_enc", src)
    check_shape(b_dec, (d_out,), "b_dec", src)
    state = {"W_enc": t_(W_enc), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    known = {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip", "k"}
    extra = sorted(set(raw) - known)
    if extra:
        raise SAEFormatError(f"{src}: unexpected tensors {extra}")
    k = None
    arch = "relu"
    if "activation_function.threshold" in raw:
        thr = tensor(raw, "activation_function.threshold", src).float()
        if bool((thr < 0).any()):
            raise SAEFormatError(f"{src}: negative JumpReLU thresholds let negative pre-activations through; "
                                 "not supported")
        state["threshold"] = thr.expand(d_sae).to(W_enc.dtype).contiguous()
        arch = "jumprelu"
    elif "k" in raw:
        k = int(tensor(raw, "k", src).item())
        arch = "topk"
    skip = "W_skip" in raw
    if skip:
        W_skip = tensor(raw, "W_skip", src, 2)
        check_shape(W_skip, (d_out, d_in), "W_skip", src, "applied as x @ W_skip.T")
        state["W_skip"] = t_(W_skip)
    hin, hout = read_feature_hooks(path.parent / CONFIG, "mlp.hook_in", "hook_mlp_out")
    hook, hook_out = opts.hook or f"blocks.{layer}.{hin}", opts.hook_out or f"blocks.{layer}.{hout}"
    model = opts.model_name
    site = make_site(hook, hook_out, model)
    if hook.endswith(".mlp.hook_in") and model:
        # The MLP's input is the pre-MLP norm's output: record that module (same tensor, the norm's path).
        site.module = make_site(hook[: -len("mlp.hook_in")] + "ln2.hook_out", None, model).module
    cfg = SAEConfig(
        architecture=arch,
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        k=k,
        dtype=file_dtype(raw, "W_enc"),
        skip=skip,
        sites=[site],
        model_name=model,
        metadata={"source_format": NAME, "layer": layer},
    )
    return build(cfg, state, src, opts)
