"""Causal LMs for the CLI by local folder or Hub id, through ``huggingface_hub``'s cache and offline mode.

A Hub id is fetched with :func:`sae_hooks.hub.remote.snapshot` (the configuration, tokenizer and
safetensors weights only; ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` apply, and with
``HF_HUB_OFFLINE=1`` the cached snapshot is used without any request). Weights are loaded from
safetensors only: a repo that ships only pickled ``.bin`` weights is refused, never unpickled.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..errors import SAEHooksError

#: The files a causal LM needs (no pickled weights, no remote code).
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.tiktoken"]


def resolve_model(name_or_path: str | None, revision: str | None = None) -> Path:
    """A local folder for ``name_or_path``: itself if it exists, the embedded model for ``None``, else the
    Hub snapshot of that repo id."""
    if name_or_path is None:
        from .default_model import default_model_path

        return default_model_path()
    path = Path(name_or_path)
    if path.exists():
        return path
    if name_or_path.count("/") > 1 or name_or_path.startswith((".", "/")):
        raise SAEHooksError(f"no model folder {name_or_path!r} (and it is not a Hub id like 'org/name')")
    from ..hub.remote import snapshot

    folder = snapshot(name_or_path, allow_patterns=MODEL_FILES, revision=revision)
    if not any(folder.glob("*.safetensors")):
        raise SAEHooksError(
            f"{name_or_path}: the repo has no safetensors weights; sae-hooks never loads pickled .bin checkpoints"
        )
    return folder


def load_causal_lm(name_or_path: str | None, revision: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a Hugging Face causal LM in eval mode with gradients off."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:  # pragma: no cover
        sys.exit("sae-hooks: this command needs transformers (pip install 'sae-hooks[hf]')")
    from transformers.utils import logging as hf_logging

    folder = str(resolve_model(name_or_path, revision))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our commands show their own progress; a weight-loading bar is noise
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(folder)
