"""The small trained causal LM that ships inside sae-hooks.

``sae_hooks/data/default_model/`` holds a GPT-2-architecture language model in Hugging Face
layout (``config.json``, ``model.safetensors`` in fp32, ``tokenizer.json`` + ``tokenizer_config.json``
+ ``special_tokens_map.json``, ``generation_config.json``) and ``training_report.json``. It exists
so that examples, tests and benchmarks have a model with *real* structure (a meaningful
cross-entropy loss, steerable features) without touching the network.

The model
    ``GPT2LMHeadModel``: 4 layers, ``d_model`` 128, 4 heads, context 256, tied embeddings,
    ``gelu_new``; about 1.35M parameters, about 5.7 MB on disk. Vocabulary: a 4096-token
    byte-level BPE trained on the same corpus. Token id 0, ``<|endoftext|>``, is BOS, EOS, PAD
    and UNK at once (as in GPT-2), and the tokenizer *prepends it to every text*, so position 0
    is always BOS -- skip it when you collect SAE activations (it is an attention sink with an
    outlier norm).

The data
    English documentation text of the Python standard library, read offline: ``pydoc``'s
    language-reference topics, the docstrings of the pure-Python stdlib (read with ``ast``) and
    the ``__doc__`` of the built-in / C-extension modules; about 2.5M characters, 0.69M tokens,
    deduplicated, split by document into train and held-out (5 % of the characters).

The report (``training_report.json``, see :func:`default_model_report`)
    corpus size and checksum, the split, tokenizer and model settings, seed, steps, wall time,
    the held-out cross-entropy (nats/token) of the model and of a unigram baseline fitted on the
    train split, a few held-out samples with their token ids and loss (so the numbers can be
    rechecked in seconds), and the train unigram counts. Rebuild with
    ``python scripts/build_default_model.py`` (deterministic given ``--seed`` and the Python
    build whose stdlib is the corpus).

Loading it (the core of sae-hooks never imports these frameworks; you do)::

    from sae_hooks.app.default_model import default_model_path
    path = str(default_model_path())

    # Hugging Face transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)

    # TransformerLens 4: a local folder works as model_name (no Hub access; set
    # HF_HUB_OFFLINE=1 on an offline machine). The bridge forces eager attention; its logits
    # equal those of the HF model loaded with attn_implementation="eager".
    from transformer_lens.model_bridge import TransformerBridge
    bridge = TransformerBridge.boot_transformers(path, device="cpu")
    # or wrap an HF model you already hold: boot_transformers(path, hf_model=model, tokenizer=tokenizer)

    # nnsight 0.8: pass the tokenizer explicitly. With transformers 5.x, nnsight 0.8.1's
    # LanguageModel(path) alone fails with "Impossible to guess which tokenizer to use"
    # (it reads the text-generation pipeline's class flags from transformers' lazily-resolved
    # task table, where the class is still a dotted-path string).
    from nnsight import LanguageModel
    lm = LanguageModel(path, tokenizer=AutoTokenizer.from_pretrained(path))
    with lm.trace("Return the cosine of x."):
        h0 = lm.transformer.h[0].output.save()

TransformerLens hook names are those of GPT-2 (``blocks.{i}.hook_resid_pre`` ...); nnsight /
module paths are ``transformer.h.{i}`` etc.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["default_model_path", "default_model_report"]

_DIRNAME = "default_model"


def default_model_path() -> Path:
    """Folder of the shipped model, usable as ``from_pretrained(str(path))``.

    Resolved next to this module (``sae_hooks/data/default_model``), which is where setuptools
    installs the package data for regular and editable installs alike. (Not through
    :mod:`importlib.resources`: a zip import would need extracting, and Hugging Face loaders
    need a real folder anyway.)

    Raises:
        FileNotFoundError: the folder is missing (e.g. a build that dropped package data).
    """
    path = Path(__file__).resolve().parent.parent / "data" / _DIRNAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the default model is missing from {path}; rebuild it with "
            "`python scripts/build_default_model.py` or reinstall sae-hooks with its package data"
        )
    return path


def default_model_report() -> dict[str, Any]:
    """The parsed ``training_report.json`` (corpus, split, settings, held-out and unigram loss)."""
    return json.loads((default_model_path() / "training_report.json").read_text(encoding="utf-8"))
