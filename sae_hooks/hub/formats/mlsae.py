"""Multi-layer SAEs (Lawson et al. 2024, ``tim-lawson/mlsae``): ``config.json`` + ``model.safetensors``.

``PyTorchModelHubMixin`` files of the bare ``TopKSAE``: ``encoder.weight (n_latents, d)`` (no bias),
``decoder.weight (d, n_latents)``, ``pre_encoder_bias (d)``; ``config.json`` holds the constructor kwargs
(``n_inputs``, ``n_latents``, ``k``, ``standardize``, ...). Dimensions come from the tensors; the config is
checked against them.

Forward (one set of weights for every layer's residual stream, each token and layer independent):

    x' = (x - mean(x)) / (std(x) + 1e-5)      if standardize (default True)   -> normalize="standardize"
    f  = ReLU(TopK(W_enc (x' - b_pre)))        no latent bias                   -> b_enc = 0
    x_hat = (W_dec f + b_pre) * std + mean

Sites: ``blocks.{i}.hook_resid_post`` for every layer ``i`` (``n_layers`` from ``config.json``, else the caller /
the registry, else the Pythia size in the repo name).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ...config import SAEConfig
from ...errors import SAEFormatError, UnknownArchitectureError
from ...saes import SAE
from ..._files import expect_object, read_json
from ._common import LoadOptions, build, check_shape, file_dtype, get, make_site, positive_int, t_, tensor, read_config_and_safetensors

NAME = "mlsae"
MAX_LAYERS = 10_000
CONFIG = "config.json"
WEIGHTS = "model.safetensors"

PYTHIA_LAYERS = {"14m": 6, "31m": 6, "70m": 6, "160m": 12, "410m": 24, "1b": 16, "1.4b": 24, "2.8b": 32,
                 "6.9b": 32, "12b": 36}


def detect(files: list[str], peek: Any = None) -> bool:
    """``config.json`` + ``model.safetensors`` whose config is an MLSAE's (``k`` and ``n_latents``/``n_inputs``, no
    ``model_type``/``architectures``: a transformers model folder has the same file names)."""
    if not (CONFIG in files and WEIGHTS in files):
        return False
    cfg = peek(CONFIG) if peek is not None else None
    if cfg is None:
        return peek is None  # name-only check (listing SAE folders): the file names match
    return "k" in cfg and ("n_latents" in cfg or "n_inputs" in cfg) and not (
        "model_type" in cfg or "architectures" in cfg)


def needed(files: list[str]) -> list[str]:
    return [CONFIG, WEIGHTS]


def read_config(raw: dict[str, Any], source: str = CONFIG) -> dict[str, Any]:
    expect_object(raw, source)
    return {
        "n_inputs": positive_int(raw, "n_inputs", source, None),
        "n_latents": positive_int(raw, "n_latents", source, None),
        "k": positive_int(raw, "k", source),
        "standardize": get(raw, "standardize", bool, source, True),
        "n_layers": positive_int(raw, "n_layers", source, None),
        "model_name": get(raw, "model_name", str, source, None),
    }


def n_layers_from_name(name: str) -> int | None:
    m = re.search(r"pythia-(\d+(?:\.\d+)?[mb])", name)
    return PYTHIA_LAYERS.get(m.group(1)) if m else None


def load(folder: str | Path, opts: LoadOptions | None = None) -> SAE:
    opts = opts or LoadOptions()
    where0 = "/".join(p for p in (opts.repo_id or "", opts.sae_id or "", str(folder)) if p)
    lens_cfg = read_json(Path(folder) / CONFIG) if (Path(folder) / CONFIG).exists() else {}
    if re.search(r"mlsae-[\w.-]+-lens(?:-tfm)?(?:/|$)", where0) or (isinstance(lens_cfg, dict) and lens_cfg.get("tuned_lens")):
        raise UnknownArchitectureError(
            f"{where0}: a tuned-lens MLSAE (repo suffix '-lens'): each layer's tuned-lens translator is applied before "
            "the SAE and inverted after it, and those translators are not in this repo; not supported")
    c, raw, wsrc = read_config_and_safetensors(folder, CONFIG, WEIGHTS, read_config, opts)
    source = str(Path(folder) / CONFIG)
    enc = tensor(raw, "encoder.weight", wsrc, 2)
    n, d = enc.shape
    dec = tensor(raw, "decoder.weight", wsrc, 2)
    check_shape(dec, (d, n), "decoder.weight", wsrc)
    b_pre = tensor(raw, "pre_encoder_bias", wsrc, 1)
    check_shape(b_pre, (d,), "pre_encoder_bias", wsrc)
    if c["n_inputs"] is not None and c["n_inputs"] != d:
        raise SAEFormatError(f"{wsrc}: encoder.weight has d={d} but {CONFIG} says n_inputs={c['n_inputs']}")
    if c["n_latents"] is not None and c["n_latents"] != n:
        raise SAEFormatError(f"{wsrc}: encoder.weight has {n} latents but {CONFIG} says n_latents={c['n_latents']}")
    if c["k"] > n:
        raise SAEFormatError(f"{source}: k={c['k']} exceeds n_latents={n}")
    state = {"W_enc": t_(enc), "b_enc": torch.zeros(n, dtype=enc.dtype, device=enc.device), "W_dec": t_(dec),
             "b_dec": b_pre}
    where = "/".join(p for p in (opts.repo_id or "", opts.sae_id or "", str(folder)) if p)
    n_layers = c["n_layers"] or opts.n_layers or n_layers_from_name(where)
    if n_layers is not None and not 0 < n_layers <= MAX_LAYERS:  # one Site object per layer: bound it first
        raise SAEFormatError(f"{source}: n_layers={n_layers} is not in [1, {MAX_LAYERS}]")
    model = opts.model_name or c["model_name"]
    if model is None:
        m = re.search(r"(pythia-\d+(?:\.\d+)?[mb](?:-deduped)?)", where)
        model = f"EleutherAI/{m.group(1)}" if m else None
    sites = [make_site(f"blocks.{i}.hook_resid_post", None, model) for i in range(n_layers)] if n_layers else []
    if opts.hook:
        sites = [make_site(opts.hook, None, model)]
    cfg = SAEConfig(
        architecture="topk",
        d_in=d,
        d_sae=n,
        k=c["k"],
        dtype=file_dtype(raw, "encoder.weight"),
        apply_b_dec_to_input=True,
        normalize="standardize" if c["standardize"] else "none",
        norm_eps=1e-5,
        sites=sites,
        model_name=model,
        metadata={"source_format": NAME},
    )
    return build(cfg, state, wsrc, opts)
