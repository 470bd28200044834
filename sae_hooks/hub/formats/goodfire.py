"""Goodfire's Llama SAEs: one ``<model>-SAE-l<N>.pt`` / ``.pth`` (``Goodfire/Llama-3.1-8B-Instruct-SAE-l19``,
``Goodfire/Llama-3.3-70B-Instruct-SAE-l50``).

Layout (SAELens 6.54's ``get_goodfire_huggingface_loader`` and Goodfire's reference class quoted in SAELens's tests):
the state dict of an ``nn.Linear`` pair, ``encoder_linear.weight (d_sae, d_in)`` / ``.bias`` and
``decoder_linear.weight (d_in, d_sae)`` / ``.bias``; ``relu(encoder_linear(x))`` then ``decoder_linear`` (a plain
ReLU SAE, no ``b_dec`` subtracted from the input). Site: ``blocks.N.hook_resid_post`` (module ``model.layers.N``);
the model is the file name's prefix (``meta-llama/Llama-3.1-8B-Instruct``). Opened only with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...config import SAEConfig
from ...errors import SAEFormatError
from ...saes import SAE
from ._common import LoadOptions, build, file_dtype, make_site, read_linear_pair

NAME = "goodfire"
FILE = re.compile(r"^(.+)-SAE-l(\d+)\.pth?$")
KEYS = ("encoder_linear.weight", "encoder_linear.bias", "decoder_linear.weight", "decoder_linear.bias")


def detect(files: list[str]) -> bool:
    """Exactly one ``<model>-SAE-l<N>.pt(h)`` file (the sae_id names it)."""
    return len([f for f in files if "/" not in f and FILE.match(f)]) == 1


def needed(files: list[str]) -> list[str]:
    return [next(f for f in files if "/" not in f and FILE.match(f))]


def load(path: str | Path, opts: LoadOptions | None = None) -> SAE:
    """``path`` is the ``.pt`` / ``.pth`` file."""
    opts = opts or LoadOptions()
    path = Path(path)
    m = FILE.match(path.name)
    if m is None:
        raise SAEFormatError(f"{path}: expected a file named <model>-SAE-l<N>.pt or .pth")
    stem, layer, src = m.group(1), int(m.group(2)), str(path)
    raw, state = read_linear_pair(path, KEYS, opts, "a Goodfire SAE", "an nn.Linear(d_sae, d_in) weight")
    d_in, d_sae = state["W_enc"].shape
    model = opts.model_name or (f"meta-llama/{stem}" if stem.lower().startswith("llama") else None)
    hook = opts.hook or f"blocks.{layer}.hook_resid_post"
    cfg = SAEConfig(
        architecture="relu",
        d_in=d_in,
        d_sae=d_sae,
        dtype=file_dtype(raw, "encoder_linear.weight"),
        sites=[make_site(hook, None, model)],
        model_name=model,
        metadata={"source_format": NAME, "layer": layer},
    )
    return build(cfg, state, src, opts)
