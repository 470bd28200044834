"""Gemma Scope 1 (``params.npz``) and Gemma Scope 2 (``params.safetensors`` [+ ``config.json``]) JumpReLU SAEs.

Gemma Scope 1 (``google/gemma-scope-{2b,9b,27b}-pt-{res,mlp,att}``, ``...-transcoders``): ``params.npz`` with
``W_enc (d_in, d_sae)``, ``W_dec (d_sae, d_out)``, ``b_enc``, ``b_dec``, ``threshold`` -- our layout, no transposes
(lower-case ``w_*`` accepted). Forward: ``pre = x W_enc + b_enc``; ``f = relu(pre) * 1[pre > threshold]``;
``x_hat = f W_dec + b_dec``; no input normalisation, ``b_dec`` not subtracted. ``att`` SAEs read ``attn.hook_z``
flattened (``reshape="hook_z"``). Embedding SAEs were trained on embeddings *before* Gemma's ``sqrt(d_model)``
scaling, so ``W_enc /= sqrt(d_model)`` and ``W_dec, b_dec *= sqrt(d_model)`` make them read and write the scaled
``hook_embed``.
The npz is read with ``allow_pickle=False``.

Gemma Scope 2 (``google/gemma-scope-2-*``): ``params.safetensors`` with ``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``,
``threshold`` and, for affine transcoders, ``affine_skip_connection (d_in, d_out)`` (our ``W_skip`` as is);
``config.json`` (optional) with ``architecture: "jump_relu"``, ``model_name``, ``hf_hook_point_in/out``,
``affine_connection``. Dimensions always come from the tensor shapes, never from folder names.

The hook is inferred from the repo name / path (``res`` / ``mlp`` / ``att`` / ``transcoders``; Gemma Scope 2 folder
kinds ``resid_post`` / ``mlp_out`` / ``attn_out`` / ``transcoder``) and the layer from ``layer_N``; pass ``hook=``
(or load through the release registry) when the path does not say it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ...config import SAEConfig
from ...errors import SAEFormatError, UnknownArchitectureError
from ...saes import SAE
from ..._files import expect_object, read_json, read_safetensors
from ._common import LoadOptions, build, check_shape, file_dtype, get, make_site, read_npz, tensor

NAME_1 = "gemma_scope"
NAME_2 = "gemma_scope_2"
NPZ = "params.npz"
SAFETENSORS = "params.safetensors"
CONFIG_2 = "config.json"

_ALIASES = {
    "W_enc": ("W_enc", "w_enc", "Wenc", "wenc", "W_e", "w_e"),
    "W_dec": ("W_dec", "w_dec", "Wdec", "wdec", "W_d", "w_d"),
    "b_enc": ("b_enc", "benc", "b_e"),
    "b_dec": ("b_dec", "bdec", "b_d"),
    "threshold": ("threshold",),
}


def detect_1(files: list[str]) -> bool:
    """``params.npz``."""
    return NPZ in files


def detect_2(files: list[str]) -> bool:
    """``params.safetensors`` (``config.json`` optional)."""
    return SAFETENSORS in files


def needed_1(files: list[str]) -> list[str]:
    return [NPZ]


def needed_2(files: list[str]) -> list[str]:
    return [SAFETENSORS] + ([CONFIG_2] if CONFIG_2 in files else [])


def _canonical(raw: dict[str, torch.Tensor], source: str, extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Our names for the five JumpReLU tensors; ``scaling_factor`` folded; any other array refused by name."""
    out: dict[str, torch.Tensor] = {}
    used = set()
    for ours, names in _ALIASES.items():
        key = next((n for n in names if n in raw), None)
        if key is None:
            raise SAEFormatError(f"{source}: missing tensor {ours!r} (looked for {list(names)}; present: {sorted(raw)})")
        out[ours] = raw[key]
        used.add(key)
    if "scaling_factor" in raw:
        # SAELens 4-5's fine-tuning scale (its gemma_2 loader renames a non-unit one finetuning_scaling_factor):
        # decode((f * s)) = f @ (s[:, None] * W_dec). All ones: nothing to do.
        s = raw["scaling_factor"].float()
        if s.shape != (out["W_dec"].shape[0],):
            raise SAEFormatError(f"{source}: scaling_factor has shape {tuple(s.shape)}, expected ({out['W_dec'].shape[0]},)")
        if not torch.all(s == 1):
            out["W_dec"] = (out["W_dec"].float() * s[:, None]).to(out["W_dec"].dtype)
        used.add("scaling_factor")
    left = sorted(set(raw) - used - set(extra))
    if left:
        raise SAEFormatError(f"{source}: unexpected arrays {left} (a Gemma Scope file holds W_enc, W_dec, b_enc, b_dec, "
                             "threshold and optionally scaling_factor); refusing to ignore them")
    return out


def _shapes(state: dict[str, torch.Tensor], source: str) -> tuple[int, int, int]:
    W_enc = tensor(state, "W_enc", source, 2)
    W_dec = tensor(state, "W_dec", source, 2)
    d_in, d_sae = W_enc.shape
    if W_dec.shape[0] != d_sae:
        raise SAEFormatError(f"{source}: W_dec {tuple(W_dec.shape)} does not match W_enc {tuple(W_enc.shape)} "
                             f"(expected ({d_sae}, d_out))")
    d_out = W_dec.shape[1]
    check_shape(state["b_enc"], (d_sae,), "b_enc", source)
    check_shape(state["b_dec"], (d_out,), "b_dec", source)
    check_shape(state["threshold"], (d_sae,), "threshold", source)
    return d_in, d_sae, d_out


def _where(opts: LoadOptions, folder: Path) -> str:
    return "/".join(p for p in (opts.repo_id or "", opts.sae_id or "", str(folder)) if p)


def gemma1_hooks(where: str, layer: int | None) -> tuple[str | None, str | None, str]:
    """(hook, hook_out, reshape) from a Gemma Scope 1 repo/path string."""
    embedding = re.search(r"(?:^|/)embedding(?:/|$)", where) is not None
    m = re.search(r"gemma-scope-[\w.-]+?-(res|mlp|att|transcoders)(?:[-/]|$)", where)
    kind = m.group(1) if m else None
    if embedding:
        return "hook_embed", None, "none"
    if layer is None or kind is None:
        return None, None, "none"
    if kind == "res":
        return f"blocks.{layer}.hook_resid_post", None, "none"
    if kind == "mlp":
        return f"blocks.{layer}.hook_mlp_out", None, "none"
    if kind == "att":
        return f"blocks.{layer}.attn.hook_z", None, "hook_z"
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out", "none"


def gemma1_model(where: str) -> str | None:
    """``google/gemma-2-2b`` from ``gemma-scope-2b-pt-...`` (``-it`` repos: the instruction-tuned model)."""
    m = re.search(r"gemma-scope-(\d+b)-(pt|it)-", where)
    if not m:
        return None
    return f"google/gemma-2-{m.group(1)}" + ("-it" if m.group(2) == "it" else "")


def gemma2_hooks(where: str, layer: int | None, transcoder: bool) -> tuple[str | None, str | None]:
    """TransformerLens hooks of a Gemma Scope 2 folder. Transcoders read the MLP's *normalised* input
    (``pre_feedforward_layernorm.output``, as their config.json says: TransformerLens ``ln2.hook_normalized``) and
    write ``hook_mlp_out``; attention SAEs read the heads' concatenated output (``o_proj`` input, ``attn.hook_z``)."""
    if layer is None:
        return None, None
    if transcoder or re.search(r"(?:^|/)(transcoder|clt)", where):
        return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
    if "resid_post" in where:
        return f"blocks.{layer}.hook_resid_post", None
    if "attn_out" in where:
        return f"blocks.{layer}.attn.hook_z", None
    if "mlp_out" in where:
        return f"blocks.{layer}.hook_mlp_out", None
    return None, None


#: Hugging Face module names of Gemma 3 (``config.json``'s ``hf_hook_point_in/out``) -> TransformerLens hooks.
_HF_TO_TL = (
    (re.compile(r"^model\.layers\.(\d+)\.output$"), "blocks.{}.hook_resid_post"),
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.o_proj\.input$"), "blocks.{}.attn.hook_z"),
    (re.compile(r"^model\.layers\.(\d+)\.pre_feedforward_layernorm\.output$"), "blocks.{}.ln2.hook_normalized"),
    (re.compile(r"^model\.layers\.(\d+)\.post_feedforward_layernorm\.output$"), "blocks.{}.hook_mlp_out"),
    (re.compile(r"^model\.layers\.(\d+)\.post_attention_layernorm\.output$"), "blocks.{}.hook_attn_out"),
)


def hf_point_to_site(point: str | None) -> tuple[str | None, str | None]:
    """(TransformerLens hook, module site) of an ``hf_hook_point`` (``model.layers.5.self_attn.o_proj.input`` ->
    ``("blocks.5.attn.hook_z", "model.layers.5.self_attn.o_proj:input")``); ``(None, None)`` if not recognised."""
    if not point:
        return None, None
    hook = next((t.format(m.group(1)) for rx, t in _HF_TO_TL if (m := rx.match(point))), None)
    if point.endswith(".output"):
        module = point[: -len(".output")]
    elif point.endswith(".input"):
        module = point[: -len(".input")] + ":input"
    else:
        module = point
    return hook, module


def gemma3_model(name: str | None, where: str = "") -> str | None:
    """``google/gemma-3-1b-pt`` from a Gemma Scope 2 ``model_name`` (``gemma-v3-1b-pt``; ``270m`` drops ``-pt``, as
    SAELens normalises it) or, without one, from the repo id (``gemma-scope-2-1b-pt`` -> ``gemma-3-1b-pt``)."""
    if not name:
        m = re.search(r"gemma-scope-2-([\w.]+?-(?:pt|it))(?:/|$)", where)
        if not m:
            return None
        name = f"gemma-3-{m.group(1)}"
    name = name.removeprefix("google/").replace("gemma-v3-", "gemma-3-")
    if re.fullmatch(r"gemma-3-270m-pt", name):
        name = "gemma-3-270m"
    return f"google/{name}"


def _layer(where: str) -> int | None:
    m = re.findall(r"layer_(\d+)", where)
    return int(m[-1]) if m else None


def load_1(folder: str | Path, opts: LoadOptions | None = None) -> SAE:
    opts = opts or LoadOptions()
    folder = Path(folder)
    path = folder / NPZ
    source = str(path)
    state = _canonical(read_npz(path, opts.map_location), source)
    d_in, d_sae, d_out = _shapes(state, source)
    where = _where(opts, folder)
    hook, hook_out, reshape = gemma1_hooks(where, _layer(where))
    hook, hook_out = opts.hook or hook, opts.hook_out or hook_out
    if opts.hook and "hook_z" in opts.hook:
        reshape = "hook_z"
    if hook == "hook_embed" or re.search(r"(?:^|/)embedding(?:/|$)", where):
        s = math.sqrt(d_in)
        # Trained on e, read at hook_embed = e * s: pre = e W_enc + b_enc = x (W_enc / s) + b_enc, and the
        # reconstruction s * (f W_dec + b_dec) = f (s W_dec) + s b_dec. (SAELens scales W_enc and W_dec only,
        # which is the same up to s * b_dec vs b_dec.)
        state["W_enc"] = state["W_enc"] / s
        state["W_dec"] = state["W_dec"] * s
        state["b_dec"] = state["b_dec"] * s
    transcoder = bool(hook_out) or d_out != d_in
    model = opts.model_name or gemma1_model(where)
    cfg = SAEConfig(
        architecture="jumprelu",
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out if transcoder else None,
        dtype=file_dtype(state, "W_enc"),
        reshape=reshape,
        sites=[make_site(hook, hook_out, model)] if hook else [],
        model_name=model,
        metadata={"source_format": NAME_1},
    )
    return build(cfg, state, source, opts)


def read_config_2(raw: dict[str, Any], source: str = CONFIG_2) -> dict[str, Any]:
    """Validated Gemma Scope 2 ``config.json`` fields."""
    expect_object(raw, source)
    arch = get(raw, "architecture", str, source, "jump_relu")
    if arch != "jump_relu":
        raise UnknownArchitectureError(f"{source}: Gemma Scope 2 architecture {arch!r} is not supported (only 'jump_relu')")
    return {
        "model_name": get(raw, "model_name", str, source, None),
        "hf_hook_point_in": get(raw, "hf_hook_point_in", str, source, None),
        "hf_hook_point_out": get(raw, "hf_hook_point_out", str, source, None),
        "affine_connection": get(raw, "affine_connection", bool, source, None),
    }


def load_2(folder: str | Path, opts: LoadOptions | None = None) -> SAE:
    opts = opts or LoadOptions()
    folder = Path(folder)
    path = folder / SAFETENSORS
    source = str(path)
    c = read_config_2(read_json(folder / CONFIG_2), str(folder / CONFIG_2)) if (folder / CONFIG_2).exists() else {}
    raw = read_safetensors(path, opts.map_location)
    state = _canonical(raw, source, extra=("affine_skip_connection",))
    d_in, d_sae, d_out = _shapes(state, source)
    skip = "affine_skip_connection" in raw
    if c.get("affine_connection") and not skip:
        raise SAEFormatError(f"{source}: config says affine_connection but there is no 'affine_skip_connection' tensor")
    if skip:
        W_skip = tensor(raw, "affine_skip_connection", source, 2)
        check_shape(W_skip, (d_in, d_out), "affine_skip_connection", source)
        state["W_skip"] = W_skip
    where = _where(opts, folder)
    hf_in, hf_out = c.get("hf_hook_point_in"), c.get("hf_hook_point_out")
    transcoder = skip or d_out != d_in or bool(hf_out and hf_in and hf_out != hf_in)
    hook, hook_out = gemma2_hooks(where, _layer(where), transcoder)
    # config.json's hf_hook_point_in/out are the authority on the site when they name a known point.
    (cfg_hook, module), (cfg_hook_out, module_out) = hf_point_to_site(hf_in), hf_point_to_site(hf_out)
    hook, hook_out = cfg_hook or hook, (cfg_hook_out if transcoder else None) or hook_out
    hook, hook_out = opts.hook or hook, opts.hook_out or hook_out
    model = opts.model_name or gemma3_model(c.get("model_name"), where)
    site = make_site(hook, hook_out, model) if hook else None
    if site is not None and not opts.hook and cfg_hook and module:
        site.module = module
        if transcoder and cfg_hook_out and module_out and not opts.hook_out:
            site.module_out = module_out
    reshape = "hook_z" if hook and hook.endswith("attn.hook_z") else "none"
    cfg = SAEConfig(
        architecture="jumprelu",
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out if transcoder else None,
        dtype=file_dtype(state, "W_enc"),
        skip=skip,
        reshape=reshape,
        sites=[site] if site else [],
        model_name=model,
        metadata={"source_format": NAME_2, **{k: v for k, v in c.items() if v is not None}},
    )
    return build(cfg, state, source, opts)
