"""Feature dashboards: a static HTML browser of what every latent of an SAE responds to.

>>> import sae_hooks
>>> sae_hooks.dashboard(sae, model, texts, "dash/", tokenizer=tok)   # then open dash/index.html

One pass over the data (:mod:`.stream`, :mod:`.collect`) gathers, for all latents at once, the
top-activating contexts, a uniform sample of firings cut into activation quantile bands, a histogram,
the firing density and the most co-active latents; :mod:`.render` writes the pages; logit effects
come from the decoder directions through the model's unembedding. See ``docs/dashboards.md``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..._atomic import atomic_dir
from ...errors import ConfigError
from .collect import CollectorSettings, FeatureCollector, FeatureStats, LatentTopK
from .render import DictionaryView, logit_effects, write_dashboard, write_pair_index
from .stream import JacobianAccumulator, StreamResult, default_sites, forward_module, stream

__all__ = [
    "build_dashboard", "CollectorSettings", "FeatureCollector", "FeatureStats", "LatentTopK", "DictionaryView",
    "JacobianAccumulator", "StreamResult", "stream", "logit_effects", "write_dashboard", "find_unembedding",
    "token_strings",
]

# Sites whose activation is not a d_model vector in the residual basis (attention internals, MLP hidden).
_NOT_RESIDUAL = re.compile(r"hook_(z|q|k|v|pattern|attn_scores|pre|post|pre_linear|rot_[qk])$|mlp\.(c_fc|act|up_proj|gate_proj)|:input$")


def find_unembedding(model: Any) -> Tensor | None:
    """``W_U (d_model, d_vocab)`` of a TransformerLens model (``W_U``) or a Hugging Face model
    (``get_output_embeddings()`` / ``lm_head``), found by duck typing; ``None`` if there is none.

    For a Hugging Face model the final norm's weight (``ln_f`` / ``norm``), when there is one, is folded
    in, as TransformerLens folds ``ln_final.w`` into ``W_U``.
    """
    W_U = getattr(model, "W_U", None)
    if isinstance(W_U, Tensor):
        return W_U.detach()
    module = forward_module(model)
    head = None
    if hasattr(module, "get_output_embeddings"):
        head = module.get_output_embeddings()
    head = head if head is not None else getattr(module, "lm_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor):
        return None
    W = weight.detach().T  # (d_model, vocab)
    base = getattr(module, "base_model", module)
    for name in ("ln_f", "norm", "final_layer_norm", "final_layernorm"):
        ln = getattr(base, name, None)
        w = getattr(ln, "weight", None)
        if isinstance(w, Tensor) and w.shape == (W.shape[0],):
            W = W * w.detach().unsqueeze(1)
            break
    return W


def token_strings(tokenizer: Any, vocab_size: int | None = None) -> list[str]:
    """Each token id decoded on its own (what a context shows), ``vocab_size`` entries."""
    n = vocab_size or len(tokenizer)
    return tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)


def _tokenizer_of(model: Any, tokenizer: Any) -> Any:
    return tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)


def _batches(data: Any, tokenizer: Any, seq_len: int, batch_size: int, bos: int | None) -> tuple[Iterable[Any], int | None]:
    """Token batches from texts, a ``(n, seq)`` tensor or an iterable of batches; and the token count if known."""
    if isinstance(data, str):
        raise TypeError("data must be texts (a list of strings), a (n, seq) token tensor or an iterable of batches; "
                        "for a dataset use sae_hooks.train.datasets.token_batches")
    if isinstance(data, Tensor):
        if data.dim() != 2:
            raise ConfigError(f"a token tensor must be (n_sequences, seq_len), got {tuple(data.shape)}")
        return [data[i : i + batch_size] for i in range(0, data.shape[0], batch_size)], data.numel()
    if isinstance(data, Sequence) and data and all(isinstance(t, str) for t in data):
        if tokenizer is None:
            raise ConfigError("texts need a tokenizer: pass tokenizer=... (or a model with .tokenizer)")
        from ...train.sources import pack_texts

        batches = pack_texts(tokenizer, data, seq_len, batch_size, bos if bos is not None else 0, drop_last=False)
        return batches, sum(b.numel() for b in batches)
    return data, None


def _residual(name: str) -> bool:
    return not _NOT_RESIDUAL.search(name)


def _view(stats: FeatureStats, title: str, description: str, sae: Any, W_U: Tensor | None, write_site: str | None,
          n_logits: int) -> DictionaryView:
    logits = None
    if W_U is not None and write_site is not None and _residual(write_site) and sae.cfg.output_dim == W_U.shape[0]:
        logits = logit_effects(sae.W_dec, W_U, n_logits)
    return DictionaryView(stats, title, description, logits=logits)


def build_dashboard(
    sae: Any,
    model: Any,
    data: Any,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    site: str | list[str] | None = None,
    seq_len: int = 128,
    batch_size: int = 16,
    max_tokens: int | None = None,
    bos_token_id: int | None = None,
    settings: CollectorSettings | None = None,
    n_logits: int = 10,
    title: str | None = None,
    neuronpedia: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Run ``model`` over ``data`` once and write a static feature browser for every latent of ``sae``.

    Args:
        sae: an SAE (any architecture; a multi-layer SAE reads all its sites and shows activation by
            layer; a transcoder is read at its input site), or a ``JacobianSAEPair`` (one dashboard per
            SAE under ``input/`` and ``output/``, each latent with its top Jacobian entries).
        model: a Hugging Face / plain ``nn.Module``, a TransformerLens model, an nnsight model, or any
            of them given the SAE API by an adapter (then sites may be spelled as that adapter accepts).
        data: texts (``list[str]``, packed into ``seq_len`` rows each starting with BOS), a ``(n, seq)``
            token tensor, or an iterable of ``(batch, seq)`` tensors / dicts with ``input_ids`` and
            ``attention_mask``.
        out_dir: the folder to write (replaced atomically); open ``out_dir/index.html``.
        tokenizer: for texts and token strings (default: ``model.tokenizer`` when there is one).
        site: where to read (default: the SAE's ``cfg.sites``).
        max_tokens: stop after this many tokens.
        bos_token_id: tokens with this id are left out (default: the tokenizer's BOS).
        settings: how many contexts, samples, window size, histogram bins (:class:`CollectorSettings`).
        n_logits: promoted / suppressed tokens shown per latent.
        neuronpedia: also write ``out_dir/neuronpedia/batch-*.json`` in the layout Neuronpedia uploads
            accept: ``{"model_id": ..., "layer": ..., "sae_set": ...}`` (see :mod:`.neuronpedia`).
    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    from ...saes.jacobian import JacobianSAEPair

    tok = _tokenizer_of(model, tokenizer)
    bos = bos_token_id if bos_token_id is not None else getattr(tok, "bos_token_id", None)
    batches, total = _batches(data, tok, seq_len, batch_size, bos)
    result = stream(sae, model, batches, site=site, bos_token_id=bos, settings=settings, max_tokens=max_tokens,
                    total_tokens=total, progress=progress)
    W_U = find_unembedding(model)
    vocab = token_strings(tok, W_U.shape[1] if W_U is not None else None) if tok is not None else None
    pair = isinstance(sae, JacobianSAEPair)
    if neuronpedia is not None:
        missing = {"model_id", "layer", "sae_set"} - set(neuronpedia)
        if pair or missing:
            raise ConfigError(f"neuronpedia export needs one SAE and model_id, layer, sae_set (missing {sorted(missing)})"
                              if not pair else "neuronpedia export covers single SAEs, not Jacobian pairs")
    name = title or _default_title(sae)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        if pair:
            by_in, by_out = result.jacobian.top(10)
            parts = {"input": (sae.sae_in, sae.cfg.hook_in, by_in, "output latents this latent drives (d out / d in)", "output"),
                     "output": (sae.sae_out, sae.cfg.hook_out, by_out, "input latents that drive this latent (d out / d in)", "input")}
            for key, (s, hook, jac, label, other) in parts.items():
                view = _view(result.stats[key], f"{name}: {key} SAE", f"{key} SAE at {hook}", s, W_U, hook, n_logits)
                view.jacobian, view.jacobian_label = jac, label
                view.jacobian_href, view.jacobian_other = f"../{other}/latent.html#", f"{other} latent"
                (tmp / key).mkdir()
                write_dashboard(view, vocab, tmp / key, progress=progress)
            write_pair_index(tmp, name, {"input": f"input SAE ({sae.cfg.hook_in})", "output": f"output SAE ({sae.cfg.hook_out})"})
        else:
            sites = default_sites(sae, site, model)
            first = sae.cfg.sites[0] if sae.cfg.sites else None
            write_site = (first.hook_out or first.module_out) if sae.cfg.is_transcoder and first else sites[0]
            view = _view(result.stats["sae"], name, f"{sae.cfg.architecture} SAE at {', '.join(sites)}", sae, W_U,
                         write_site, n_logits)
            if len(sites) > 1:
                view.layer_names = sites
            write_dashboard(view, vocab, tmp, progress=progress)
            if neuronpedia is not None:
                from .neuronpedia import export_neuronpedia

                export_neuronpedia(view, vocab or [], tmp / "neuronpedia", W_dec=sae.W_dec, W_U=W_U,
                                   n_tokens_in_prompt=seq_len, **neuronpedia)
    return out


def _default_title(sae: Any) -> str:
    cfg = getattr(sae, "cfg", None)
    model_name = getattr(cfg, "model_name", None)
    if hasattr(sae, "sae_in"):
        return f"Jacobian SAE pair, layer {sae.cfg.layer}" + (f" of {model_name}" if model_name else "")
    return f"{cfg.architecture} SAE, d_sae={cfg.d_sae}" + (f" on {model_name}" if model_name else "")
