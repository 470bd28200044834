"""EleutherAI sparsify (``eai-sparsify``; formerly ``sae``): one folder per hookpoint with ``cfg.json`` + ``sae.safetensors``.

Tensors (``SparseCoder.save_to_disk``): ``encoder.weight (d_sae, d_in)``, ``encoder.bias (d_sae)``,
``W_dec (d_sae, d_in)`` (one row per latent, already our layout), ``b_dec (d_in)``, optional ``W_skip (d_out, d_in)``
(applied as ``x @ W_skip.mT``). Hub files are often bf16; the SAE keeps the file's dtype unless ``dtype`` is given.

Correct semantics, read from sparsify 1.3.3 ``SparseCoder.encode/decode/forward``:

* ``activation="groupmax"``: ``k`` contiguous groups of latents, the max of each (:mod:`sae_hooks.saes.groupmax`).
* encode: ``x - b_dec`` for every non-transcoder (``transcode=False``), whatever ``normalize_decoder`` says; never
  for a transcoder. Then ``relu(x @ encoder.weight.T + encoder.bias)`` and top-k (ReLU before top-k gives the same
  dense latents as our top-k then ReLU).
* decode: ``sum_i acts_i * W_dec[i] + b_dec`` -- ``W_dec`` is **not** transposed.
* skip connection: ``+ x @ W_skip.T``.

SAELens's ``sparsify`` loader gets both wrong: it transposes ``W_dec`` (so any ``d_in != d_sae`` SAE fails to
load) and sets ``apply_b_dec_to_input = not normalize_decoder`` (so the default ``normalize_decoder=True`` SAEs
lose their ``b_dec`` subtraction and reconstruct wrongly).

Folder names are module paths relative to ``model.base_model`` (``layers.N``, ``layers.N.mlp``, ``h.N``,
``embed_tokens``; old Hub revisions ``layer_N``); multi-seed runs nest ``<hookpoint>/seedN/``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from ...config import SAEConfig
from ...errors import SAEFormatError, UnknownArchitectureError
from ...saes import SAE
from ..._files import expect_object
from ._common import LoadOptions, build, check_shape, file_dtype, get, make_site, positive_int, t_, tensor, read_config_and_safetensors

NAME = "sparsify"
CONFIG = "cfg.json"
WEIGHTS = "sae.safetensors"

_LAYER = r"(?:(?:model|gpt_neox|transformer)\.)?(?:layers|h|layer|blocks)[._](\d+)"


def detect(files: list[str], peek: Callable[[str], dict[str, Any] | None] | None = None) -> bool:
    """``cfg.json`` + ``sae.safetensors`` whose ``cfg.json`` is not ours (no ``"format": "sae_hooks"``)."""
    if not (CONFIG in files and WEIGHTS in files):
        return False
    if peek is None:
        return True
    from .native import looks_native

    return not looks_native(peek(CONFIG))


def needed(files: list[str]) -> list[str]:
    return [CONFIG, WEIGHTS]


def hookpoint_of(sae_id: str | None) -> str | None:
    """The hookpoint folder name of an SAE path (``seedN`` nesting and parent folders stripped)."""
    if not sae_id:
        return None
    parts = [p for p in sae_id.replace("\\", "/").split("/") if p]
    while parts and re.fullmatch(r"seed\d+", parts[-1]):
        parts.pop()
    return parts[-1] if parts else None


def tl_hooks(hookpoint: str | None, transcoder: bool) -> tuple[str | None, str | None]:
    """TransformerLens (in, out) hook names of a sparsify hookpoint, or ``(None, None)`` when unknown."""
    if not hookpoint:
        return None, None
    if re.fullmatch(r"(?:(?:model|gpt_neox|transformer)\.)?(?:embed_tokens|embed_in|wte)", hookpoint):
        return "hook_embed", None
    m = re.fullmatch(_LAYER + r"(?:\.(mlp|self_attn|attention|attn))?", hookpoint)
    if not m:
        return None, None
    n, sub = int(m.group(1)), m.group(2)
    if sub is None:
        return (f"blocks.{n}.hook_resid_pre", f"blocks.{n}.hook_resid_post") if transcoder else (f"blocks.{n}.hook_resid_post", None)
    # sparsify hooks the module itself: a transcoder reads the module's *input* (the norm's output, after its
    # scale and shift: ``mlp.hook_in``, not the pre-affine ``ln2.hook_normalized``) and predicts its output
    # (``mlp.hook_out``: on Gemma that is before the post-MLP norm, which ``hook_mlp_out`` is after).
    block = "mlp" if sub == "mlp" else "attn"
    out = f"blocks.{n}.{block}.hook_out"
    return (f"blocks.{n}.{block}.hook_in", out) if transcoder else (out, None)


def read_config(raw: dict[str, Any], source: str = CONFIG) -> dict[str, Any]:
    """Validated sparsify ``cfg.json`` fields: ``d_in``, ``num_latents`` (or ``None``), ``k``, ``transcode``, ``skip``."""
    expect_object(raw, source)
    activation = get(raw, "activation", str, source, "topk")
    if activation not in ("topk", "groupmax"):
        raise UnknownArchitectureError(
            f"{source}: sparsify activation {activation!r} is not supported ('topk', 'groupmax')"
        )
    if get(raw, "signed", bool, source, False):
        raise UnknownArchitectureError(f"{source}: signed sparsify SAEs are not supported")
    d_in = positive_int(raw, "d_in", source)
    num_latents = get(raw, "num_latents", int, source, 0)
    expansion = get(raw, "expansion_factor", int, source, None)
    if num_latents < 0 or (expansion is not None and expansion <= 0):
        raise SAEFormatError(f"{source}: num_latents / expansion_factor must be positive")
    width = num_latents or (d_in * expansion if expansion else None)
    return {
        "d_in": d_in,
        "num_latents": width,
        "k": positive_int(raw, "k", source),
        "activation": activation,
        "transcode": get(raw, "transcode", bool, source, False),
        "skip": get(raw, "skip_connection", bool, source, False),
    }


def load(folder: str | Path, opts: LoadOptions | None = None) -> SAE:
    opts = opts or LoadOptions()
    c, raw, wsrc = read_config_and_safetensors(folder, CONFIG, WEIGHTS, read_config, opts)
    source = str(Path(folder) / CONFIG)
    enc = tensor(raw, "encoder.weight", wsrc, 2)
    d_sae, d_in = enc.shape
    if d_in != c["d_in"]:
        raise SAEFormatError(f"{wsrc}: encoder.weight has d_in={d_in} but {CONFIG} says d_in={c['d_in']}")
    if c["num_latents"] is not None and d_sae != c["num_latents"]:
        raise SAEFormatError(f"{wsrc}: encoder.weight has {d_sae} latents but {CONFIG} implies {c['num_latents']}")
    if c["k"] > d_sae:
        raise SAEFormatError(f"{source}: k={c['k']} exceeds the number of latents {d_sae}")
    if c["activation"] == "groupmax" and d_sae % c["k"]:
        raise SAEFormatError(f"{source}: groupmax needs k={c['k']} to divide the number of latents {d_sae}")
    W_dec = tensor(raw, "W_dec", wsrc, 2)
    if W_dec.shape[0] != d_sae:
        raise SAEFormatError(
            f"{wsrc}: W_dec has shape {tuple(W_dec.shape)}; sparsify stores it as (num_latents={d_sae}, d_out)"
        )
    d_out = W_dec.shape[1]
    transcoder = c["transcode"]
    hookpoint = hookpoint_of(opts.sae_id or folder.as_posix())
    hook_in, hook_out = tl_hooks(hookpoint, transcoder)
    hook_in, hook_out = opts.hook or hook_in, opts.hook_out or hook_out
    state = {
        "W_enc": t_(enc),
        "b_enc": tensor(raw, "encoder.bias", wsrc, 1),
        "W_dec": W_dec,
        "b_dec": tensor(raw, "b_dec", wsrc, 1),
    }
    check_shape(state["b_enc"], (d_sae,), "encoder.bias", wsrc)
    check_shape(state["b_dec"], (d_out,), "b_dec", wsrc)
    if c["skip"]:
        W_skip = tensor(raw, "W_skip", wsrc, 2)
        check_shape(W_skip, (d_out, d_in), "W_skip", wsrc, "sparsify stores the skip as nn.Linear (d_out, d_in)")
        state["W_skip"] = t_(W_skip)
    cfg = SAEConfig(
        architecture=c["activation"],
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out if (transcoder or d_out != d_in) else None,
        k=c["k"],
        dtype=file_dtype(raw, "encoder.weight"),
        apply_b_dec_to_input=not transcoder,
        skip=c["skip"],
        sites=[make_site(hook_in, hook_out, opts.model_name)] if hook_in else [],
        model_name=opts.model_name,
        metadata={"source_format": NAME, "sparsify_hookpoint": hookpoint},
    )
    return build(cfg, state, wsrc, opts)
