"""Translate between TransformerLens hook names and module paths of Hugging Face models (framework-free).

A *module site* is a module path plus which side of the module the tensor is on::

    to_module_path("blocks.3.hook_resid_post", "gpt2")  ->  ("transformer.h.3", "output")
    to_module_path("blocks.3.hook_resid_pre", "llama")  ->  ("model.layers.3", "input")
    to_hook_name("transformer.h.3", "gpt2")             ->  "blocks.3.hook_resid_post"
    to_hook_name("model.layers.3.post_attention_layernorm:input", "llama") -> "blocks.3.hook_resid_mid"

``"output"`` is what the module returns (the hidden-state element when it returns a tuple);
``"input"`` is its first positional argument (or ``hidden_states=``); ``"normalized"`` (norm modules
only) is the norm's pre-affine value ``(x - mean) / sqrt(var + eps)`` (RMSNorm: ``x / rms``), which is
what TransformerLens (3 and 4) calls ``lnN.hook_normalized``. In the string form used by the torch and
nnsight adapters a module site is written ``"path"`` (output), ``"path:input"`` or ``"path:normalized"``.

Every family translates, per block: ``hook_resid_pre/mid/post``, ``hook_attn_out``, ``hook_mlp_out``,
``attn.hook_z``, ``mlp.hook_pre`` / ``mlp.hook_post`` (gated MLPs: ``hook_pre`` = gate projection output,
``hook_pre_linear`` = up projection output), and TransformerLens 4's names: ``hook_in`` / ``hook_out``
(the block), ``attn.hook_in/out``, ``mlp.hook_in/out``, and for each norm ``lnN.hook_in`` (input),
``lnN.hook_out`` (output, after scale and shift) and ``lnN.hook_normalized`` (pre-affine); Gemma's extra
norms are ``ln1_post`` / ``ln2_post``; ``ln_final.*`` for the final norm. When several names denote one
tensor (``hook_resid_pre`` / ``hook_in``) the first is canonical.

Families and what is exact (every name, read *and* written, is checked against a TransformerLens 4
``TransformerBridge`` built on the same module with random norm weights and biases in
``tests/sites/test_hooknames.py`` and ``tests/adapters/test_hookname_conformance.py``, except where marked):

========================= ============================ ===============================================
family (``model_type``)   layer path                   notes
========================= ============================ ===============================================
``gpt2``                  ``transformer.h.N``          all rows exact; ``hook_resid_mid`` = input of
                                                       ``ln_2``; ``hook_pos_embed`` = ``wpe`` output.
``gpt_neox`` (Pythia)     ``gpt_neox.layers.N``        parallel residual (Pythia's default) has no
                                                       ``hook_resid_mid``: it is not translated; with
                                                       ``use_parallel_residual=False`` it is the input of
                                                       ``post_attention_layernorm`` (:func:`for_config`).
``llama`` (Llama, Mistral, ``model.layers.N``           ``hook_resid_mid`` = input of
Qwen2, Qwen3)                                          ``post_attention_layernorm``. Writing there changes
                                                       the norm's (so the MLP's) input only, not the
                                                       residual stream: Hugging Face keeps its own
                                                       reference to the residual (the bridge behaves the
                                                       same).
``gemma`` (Gemma 2, 3)    ``model.layers.N``           ``hook_attn_out`` is *after* the post-attention
                                                       norm (``post_attention_layernorm`` output) and
                                                       ``hook_mlp_out`` after ``post_feedforward_layernorm``
                                                       (what is added to the residual stream);
                                                       ``ln2`` = ``pre_feedforward_layernorm``;
                                                       ``hook_resid_mid`` = its input.
                                                       ``hook_embed`` = the scaled embedding.
``bert``                  ``bert.encoder.layer.N``     as TransformerLens 4's bridge defines them (post-LN):
                                                       ``hook_embed`` = the normalised embedding sum
                                                       (``embeddings.LayerNorm`` output);
                                                       ``hook_attn_out`` = the ``attention`` module's
                                                       output (after its add & norm);
                                                       ``hook_mlp_out`` = ``output.dense`` output;
                                                       ``hook_resid_mid`` = input of ``output.LayerNorm``.
                                                       Legacy ``HookedTransformer`` BERT places
                                                       ``hook_attn_out``/``hook_resid_mid``/
                                                       ``hook_resid_post`` before the norms instead.
========================= ============================ ===============================================

``attn.hook_z`` maps to the input of the attention output projection, which holds the same numbers
flattened to ``(batch, seq, n_heads * d_head)`` (TransformerLens keeps ``(..., n_heads, d_head)``).
Base models without the task head (``GPT2Model``: ``h.N``) are handled by :func:`detect_family`,
which strips the prefix (``transformer.``) when the module tree lacks it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from ..config import Site
from ..errors import HookNotFoundError, did_you_mean

Side = str  # "output" | "input" | "normalized"


def _norm(tl: str, path: str) -> dict[str, tuple[str, Side]]:
    """TransformerLens 4 names of one norm module: its input, output, and the pre-affine normalised value
    (``(x - mean) / sqrt(var + eps)``, or ``x / rms`` for RMSNorm: what TransformerLens calls
    ``hook_normalized``; read inside the norm, written back through its scale and shift)."""
    return {f"{tl}.hook_in": (path, "input"), f"{tl}.hook_out": (path, "output"),
            f"{tl}.hook_normalized": (path, "normalized")}


def _tl4(attn: str, mlp: str) -> dict[str, tuple[str, Side]]:
    """TransformerLens 4 ``hook_in`` / ``hook_out`` names of a block and its attention and MLP modules."""
    return {"hook_in": ("", "input"), "hook_out": ("", "output"),
            "attn.hook_in": (attn, "input"), "attn.hook_out": (attn, "output"),
            "mlp.hook_in": (mlp, "input"), "mlp.hook_out": (mlp, "output")}


# TL suffix (after "blocks.N.") -> (module path relative to the layer, side). "" is the layer itself.
# When several names share one module site, the first listed is its canonical name.
_GPT2_LAYER = {
    "hook_resid_pre": ("", "input"),
    "hook_resid_mid": ("ln_2", "input"),
    "hook_resid_post": ("", "output"),
    "hook_attn_out": ("attn", "output"),
    "hook_mlp_out": ("mlp", "output"),
    **_norm("ln1", "ln_1"),
    **_norm("ln2", "ln_2"),
    "mlp.hook_pre": ("mlp.c_fc", "output"),
    "mlp.hook_post": ("mlp.c_proj", "input"),
    "attn.hook_z": ("attn.c_proj", "input"),
    **_tl4("attn", "mlp"),
}
_NEOX_LAYER = {
    "hook_resid_pre": ("", "input"),
    "hook_resid_post": ("", "output"),
    "hook_attn_out": ("attention", "output"),
    "hook_mlp_out": ("mlp", "output"),
    **_norm("ln1", "input_layernorm"),
    **_norm("ln2", "post_attention_layernorm"),
    "mlp.hook_pre": ("mlp.dense_h_to_4h", "output"),
    "mlp.hook_post": ("mlp.dense_4h_to_h", "input"),
    "attn.hook_z": ("attention.dense", "input"),
    **_tl4("attention", "mlp"),
}
_LLAMA_LAYER = {
    "hook_resid_pre": ("", "input"),
    "hook_resid_mid": ("post_attention_layernorm", "input"),
    "hook_resid_post": ("", "output"),
    "hook_attn_out": ("self_attn", "output"),
    "hook_mlp_out": ("mlp", "output"),
    **_norm("ln1", "input_layernorm"),
    **_norm("ln2", "post_attention_layernorm"),
    "mlp.hook_pre": ("mlp.gate_proj", "output"),
    "mlp.hook_pre_linear": ("mlp.up_proj", "output"),
    "mlp.hook_post": ("mlp.down_proj", "input"),
    "attn.hook_z": ("self_attn.o_proj", "input"),
    **_tl4("self_attn", "mlp"),
}
_GEMMA_LAYER = {
    "hook_resid_pre": ("", "input"),
    "hook_resid_mid": ("pre_feedforward_layernorm", "input"),
    "hook_resid_post": ("", "output"),
    "hook_attn_out": ("post_attention_layernorm", "output"),
    "hook_mlp_out": ("post_feedforward_layernorm", "output"),
    **_norm("ln1", "input_layernorm"),
    **_norm("ln1_post", "post_attention_layernorm"),
    **_norm("ln2", "pre_feedforward_layernorm"),
    **_norm("ln2_post", "post_feedforward_layernorm"),
    "mlp.hook_pre": ("mlp.gate_proj", "output"),
    "mlp.hook_pre_linear": ("mlp.up_proj", "output"),
    "mlp.hook_post": ("mlp.down_proj", "input"),
    "attn.hook_z": ("self_attn.o_proj", "input"),
    **_tl4("self_attn", "mlp"),
}
_BERT_LAYER = {
    "hook_resid_pre": ("", "input"),
    "hook_resid_mid": ("output.LayerNorm", "input"),
    "hook_resid_post": ("", "output"),
    "hook_attn_out": ("attention", "output"),
    "hook_mlp_out": ("output.dense", "output"),
    **_norm("ln1", "attention.output.LayerNorm"),
    **_norm("ln2", "output.LayerNorm"),
    "mlp.hook_pre": ("intermediate.dense", "output"),
    "mlp.hook_post": ("output.dense", "input"),
    "attn.hook_z": ("attention.output.dense", "input"),
}


@dataclass(frozen=True)
class Family:
    """How one model family names its modules.

    Attributes:
        name: ``gpt2``, ``gpt_neox``, ``llama``, ``gemma`` or ``bert``.
        layers: path of the layer list (``transformer.h``).
        layer: TL suffix -> (path relative to a layer, side).
        globals: TL names outside the layers -> (path, side).
        marker: a submodule of layer 0 (relative) that tells this family apart in a module tree.
    """

    name: str
    layers: str
    layer: dict[str, tuple[str, Side]]
    globals: dict[str, tuple[str, Side]] = field(default_factory=dict)
    marker: str = ""

    def with_prefix(self, old: str, new: str) -> Family:
        """The same family with the path prefix ``old`` (e.g. ``"transformer."``) replaced by ``new``."""

        def swap(path: str) -> str:
            return new + path[len(old):] if path.startswith(old) else path

        return replace(
            self,
            layers=swap(self.layers),
            globals={k: (swap(p), s) for k, (p, s) in self.globals.items()},
        )


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        "gpt2", "transformer.h", _GPT2_LAYER,
        {
            "hook_embed": ("transformer.wte", "output"),
            "hook_pos_embed": ("transformer.wpe", "output"),
            **_norm("ln_final", "transformer.ln_f"),
        },
        marker="ln_2",
    ),
    "gpt_neox": Family(
        "gpt_neox", "gpt_neox.layers", _NEOX_LAYER,
        {
            "hook_embed": ("gpt_neox.embed_in", "output"),
            **_norm("ln_final", "gpt_neox.final_layer_norm"),
        },
        marker="attention",
    ),
    "llama": Family(
        "llama", "model.layers", _LLAMA_LAYER,
        {
            "hook_embed": ("model.embed_tokens", "output"),
            **_norm("ln_final", "model.norm"),
        },
        marker="self_attn",
    ),
    "gemma": Family(
        "gemma", "model.layers", _GEMMA_LAYER,
        {
            "hook_embed": ("model.embed_tokens", "output"),
            **_norm("ln_final", "model.norm"),
        },
        marker="pre_feedforward_layernorm",
    ),
    "bert": Family(
        "bert", "bert.encoder.layer", _BERT_LAYER,
        {"hook_embed": ("bert.embeddings.LayerNorm", "output")},
        marker="intermediate",
    ),
}

#: HF ``config.model_type`` -> family name.
MODEL_TYPES = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
    "bert": "bert",
}

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def family(name: str | Family) -> Family:
    """The :class:`Family` named ``name`` (a family or an HF ``model_type``)."""
    if isinstance(name, Family):
        return name
    key = MODEL_TYPES.get(name, name)
    if key not in FAMILIES:
        known = sorted(set(FAMILIES) | set(MODEL_TYPES))
        raise HookNotFoundError(
            f"no hook-name translation for model family {name!r}.{did_you_mean(name, known)} "
            f"Known: {known}; pass module paths instead"
        )
    return FAMILIES[key]


SIDES = ("output", "input", "normalized")


def split_site(site: str) -> tuple[str, Side]:
    """``"a.b:input"`` -> ``("a.b", "input")``; ``"a.b"`` or ``"a.b:output"`` -> ``("a.b", "output")``;
    ``"ln:normalized"`` -> ``("ln", "normalized")`` (a norm's pre-affine value, TransformerLens's
    ``hook_normalized``)."""
    path, sep, side = site.partition(":")
    if not sep:
        return site, "output"
    if side not in SIDES:
        raise HookNotFoundError(
            f"bad module site {site!r}: the suffix must be ':input', ':output' or ':normalized' (norm modules)"
        )
    return path, side


def join_site(path: str, side: Side) -> str:
    """Inverse of :func:`split_site` (``output`` is written without a suffix)."""
    return path if side == "output" else f"{path}:{side}"


def to_module_path(hook_name: str, fam: str | Family) -> tuple[str, Side]:
    """``(module path, "output" | "input")`` of a TransformerLens hook name in a model family.

    Raises :class:`~sae_hooks.errors.HookNotFoundError` (with close matches) when the name has no
    translation in that family.
    """
    fam = family(fam)
    if hook_name in fam.globals:
        return fam.globals[hook_name]
    m = _BLOCK.match(hook_name)
    if m and m.group(2) in fam.layer:
        rel, side = fam.layer[m.group(2)]
        path = f"{fam.layers}.{m.group(1)}" + (f".{rel}" if rel else "")
        return path, side
    known = list(fam.globals) + [f"blocks.{m.group(1) if m else 0}.{s}" for s in fam.layer]
    raise HookNotFoundError(
        f"no module path for hook {hook_name!r} in the {fam.name!r} family.{did_you_mean(hook_name, known)}"
    )


def to_hook_name(site: str, fam: str | Family, side: Side | None = None) -> str | None:
    """The TransformerLens hook name of a module site (``"path"`` or ``"path:input"``), or ``None``.

    When several hook names share a module site, the first in the family's table wins.
    """
    fam = family(fam)
    path, parsed_side = split_site(site)
    side = side or parsed_side
    for name, (p, s) in fam.globals.items():
        if p == path and s == side:
            return name
    prefix = fam.layers + "."
    if not path.startswith(prefix):
        return None
    index, _, rel = path[len(prefix):].partition(".")
    if not index.isdigit():
        return None
    for suffix, (r, s) in fam.layer.items():
        if r == rel and s == side:
            return f"blocks.{index}.{suffix}"
    return None


def hook_names(fam: str | Family, n_layers: int) -> list[str]:
    """Every TransformerLens name that translates in ``fam`` for a model with ``n_layers`` layers."""
    fam = family(fam)
    return list(fam.globals) + [f"blocks.{i}.{s}" for i in range(n_layers) for s in fam.layer]


def for_config(fam: Family, config: object) -> Family:
    """``fam`` adjusted to a model's config: a GPT-NeoX with ``use_parallel_residual=False`` (sequential
    residual) has ``hook_resid_mid`` at the input of ``post_attention_layernorm``."""
    if fam.name == "gpt_neox" and getattr(config, "use_parallel_residual", True) is False:
        layer = {"hook_resid_mid": ("post_attention_layernorm", "input"), **fam.layer}  # canonical over ln2.hook_in
        return replace(fam, name="gpt_neox_sequential", layer=layer)
    return fam


def detect_family(module_names: Iterable[str], model_type: str | None = None) -> Family | None:
    """The family of a model from its HF ``config.model_type`` and/or its module names, or ``None``.

    ``module_names`` is e.g. ``[n for n, _ in model.named_modules()]``. When the family's standard
    prefix is missing (a base model such as ``GPT2Model``), the returned family has it stripped.
    """
    names = set(module_names)
    # Gemma before Llama: both have ``model.layers.N.self_attn``; only Gemma has the extra norms.
    order = ("gpt2", "gpt_neox", "gemma", "llama", "bert")
    candidates = [family(model_type)] if model_type in MODEL_TYPES else [FAMILIES[n] for n in order]
    for fam in candidates:
        # Try the standard path, then without its first component(s): "transformer.h" -> "h".
        parts = fam.layers.split(".")
        for cut in range(len(parts)):
            layers = ".".join(parts[cut:])
            if f"{layers}.0.{fam.marker}" in names or (model_type in MODEL_TYPES and f"{layers}.0" in names):
                if cut == 0:
                    return fam
                old = ".".join(parts[:cut]) + "."
                return fam.with_prefix(old, "")
    return None


def complete_site(site: Site, fam: str | Family) -> Site:
    """A copy of ``site`` with the missing spelling filled in (``hook`` from ``module`` or back), so an
    SAE records both names and attaches by either adapter with no arguments."""
    fam = family(fam)
    changes = {}
    for hook_key, module_key in (("hook", "module"), ("hook_out", "module_out")):
        hook, module = getattr(site, hook_key), getattr(site, module_key)
        if hook and not module:
            try:
                changes[module_key] = join_site(*to_module_path(hook, fam))
            except HookNotFoundError:
                pass
        elif module and not hook:
            name = to_hook_name(module, fam)
            if name:
                changes[hook_key] = name
    return replace(site, **changes)
