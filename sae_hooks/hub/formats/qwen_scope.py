"""Qwen Scope residual-stream TopK SAEs: one ``layer{N}.sae.pt`` per layer in ``Qwen/SAE-Res-<model>-W<n>K-L0_<k>``.

Layout (the release's model cards; SAELens 6.54's ``qwen_scope_sae_huggingface_loader``): a pickled dict of four
tensors, ``W_enc (d_sae, d_in)`` and ``W_dec (d_in, d_sae)`` (both the transpose of ours), ``b_enc (d_sae,)``,
``b_dec (d_in,)``; TopK (top ``k`` pre-activations, then ReLU), no ``b_dec`` subtracted from the input. ``k`` is the
repo id's ``L0_<k>``. Site: ``blocks.N.hook_resid_post`` (module ``model.layers.N``). Opened only with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...config import SAEConfig
from ...errors import SAEFormatError
from ...saes import SAE
from ._common import LoadOptions, build, file_dtype, make_site, read_linear_pair

NAME = "qwen_scope"
FILE = re.compile(r"^layer(\d+)\.sae\.pt$")
REPO = re.compile(r"SAE-Res-(.+?)-W(\d+)K-L0_(\d+)")


def detect(files: list[str]) -> bool:
    """Exactly one ``layer{N}.sae.pt`` (the sae_id names the file)."""
    return len([f for f in files if FILE.match(f)]) == 1


def needed(files: list[str]) -> list[str]:
    return [next(f for f in files if FILE.match(f))]


def _repo_info(opts: LoadOptions, path: Path) -> tuple[str | None, int | None]:
    """(model, k) from the repo id (or a Hub cache path ``models--Qwen--SAE-Res-...``)."""
    for where in (opts.repo_id or "", str(path)):
        m = REPO.search(where)
        if m:
            return f"Qwen/{m.group(1)}", int(m.group(3))
    return None, None


def load(path: str | Path, opts: LoadOptions | None = None) -> SAE:
    """``path`` is the ``layer{N}.sae.pt`` file."""
    opts = opts or LoadOptions()
    path = Path(path)
    m = FILE.match(path.name)
    if m is None:
        raise SAEFormatError(f"{path}: expected a file named layer<N>.sae.pt")
    layer, src = int(m.group(1)), str(path)
    raw, state = read_linear_pair(path, ("W_enc", "b_enc", "W_dec", "b_dec"), opts, "a Qwen Scope file",
                                  "Qwen Scope stores (d_in, d_sae)")
    d_in, d_sae = state["W_enc"].shape
    model, k = _repo_info(opts, path)
    if k is None:
        raise SAEFormatError(f"{src}: the TopK k of a Qwen Scope SAE is in its repo id (Qwen/SAE-Res-...-L0_<k>); "
                             "load it by repo id or release name")
    if k > d_sae:
        raise SAEFormatError(f"{src}: k={k} from the repo id exceeds d_sae={d_sae}")
    model = opts.model_name or model
    hook = opts.hook or f"blocks.{layer}.hook_resid_post"
    cfg = SAEConfig(
        architecture="topk",
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        dtype=file_dtype(raw, "W_enc"),
        sites=[make_site(hook, None, model)],
        model_name=model,
        metadata={"source_format": NAME, "layer": layer},
    )
    return build(cfg, state, src, opts)
