"""One converter per on-disk SAE format, each into the canonical layout (see :mod:`sae_hooks.saes.base`).

Every format module offers ``detect(files) -> bool`` (on paths relative to the SAE's folder), ``needed(files)``
(the files it reads, so a Hub download fetches only those) and ``load(folder, opts) -> SAE``. :data:`FORMATS`
lists them in the order :func:`sae_hooks.hub.detect.detect_format` tries them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ...saes import SAE
from . import circuit_tracer, connor_rob_hook_z, dictionary_learning, gemma_scope, llama_scope, lm_saes, mlsae, native, openai, saelens, sparsify
from ._common import LoadOptions


@dataclass(frozen=True)
class Format:
    """A named converter. ``detect`` may take a second argument, ``peek(relpath) -> dict | None``."""

    name: str
    detect: Callable[..., bool]
    needed: Callable[[list[str]], list[str]]
    load: Callable[[Path, LoadOptions], SAE]
    rule: str

    def matches(self, files: list[str], peek: Callable[[str], dict[str, Any] | None] | None) -> bool:
        if len(inspect.signature(self.detect).parameters) > 1:
            return bool(self.detect(files, peek))
        return bool(self.detect(files))


#: Detection order; the rules are disjoint except native/sparsify, which cfg.json's "format" key separates.
FORMATS: list[Format] = [
    Format(native.NAME, native.detect, native.needed, native.load,
           'cfg.json + sae.safetensors, cfg.json has "format": "sae_hooks"'),
    Format(sparsify.NAME, sparsify.detect, sparsify.needed, sparsify.load,
           "cfg.json + sae.safetensors (cfg.json not ours)"),
    Format(saelens.NAME, saelens.detect, saelens.needed, saelens.load, "cfg.json + sae_weights.safetensors"),
    Format(gemma_scope.NAME_2, gemma_scope.detect_2, gemma_scope.needed_2, gemma_scope.load_2,
           "params.safetensors (+ optional config.json)"),
    Format(gemma_scope.NAME_1, gemma_scope.detect_1, gemma_scope.needed_1, gemma_scope.load_1, "params.npz"),
    Format(llama_scope.NAME, llama_scope.detect, llama_scope.needed, llama_scope.load,
           "hyperparams.json + sae_weights.* or checkpoints/{pruned,final}.{safetensors,pt}"),
    Format(lm_saes.NAME, lm_saes.detect, lm_saes.needed, lm_saes.load, "config.json + sae_weights.{safetensors,pt}"),
    Format(dictionary_learning.NAME, dictionary_learning.detect, dictionary_learning.needed, dictionary_learning.load,
           "config.json + ae.pt"),
    Format(mlsae.NAME, mlsae.detect, mlsae.needed, mlsae.load, "config.json + model.safetensors"),
    Format(openai.NAME, openai.detect, openai.needed, openai.load, "exactly one *.pt file and no JSON config"),
    Format(connor_rob_hook_z.NAME, connor_rob_hook_z.detect, connor_rob_hook_z.needed, connor_rob_hook_z.load,
           "one <name>.pt + <name>_cfg.json (attention-output SAEs)"),
    Format(circuit_tracer.NAME, circuit_tracer.detect, circuit_tracer.needed, circuit_tracer.load,
           "one layer_N.safetensors file (+ optional config.yaml)"),
]

BY_NAME: dict[str, Format] = {f.name: f for f in FORMATS}
ALIASES = {"native": "sae_hooks", "sae_lens": "saelens", "gemma_scope_1": "gemma_scope", "gemma-scope": "gemma_scope",
           "eleuther": "sparsify", "dictionary-learning": "dictionary_learning", "llama-scope": "llama_scope",
           "llamascopium": "lm_saes", "lm-saes": "lm_saes",
           "circuit-tracer": "circuit_tracer", "mwhanna_transcoder": "circuit_tracer"}

__all__ = ["FORMATS", "BY_NAME", "ALIASES", "Format", "LoadOptions"]
