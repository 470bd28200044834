"""Helpers shared by the analysis subcommands (``mdl``, ``compare``, ``amortisation``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch


def load_sae(path: str) -> Any:
    """An SAE from a local folder/file in any supported format (or a Hub repo / release name)."""
    from ...hub import load

    return load(path).eval()


def sae_site(model: Any, sae: Any, site: str | None, command: str) -> str:
    """``--site``, else the SAE's own site on ``model`` (its hook name, or its module path)."""
    from ..cli import _trained_site

    site = site or _trained_site(model, sae)
    if not site:
        sys.exit(f"sae-hooks {command}: the SAE names no site; pass --site")
    return site


def model_batches(args: argparse.Namespace) -> tuple[Any, Any, list[torch.Tensor], int]:
    """``(model, tokenizer, held-out token batches[:args.batches], bos id)`` from the text arguments."""
    from ..cli import _load_model, _texts, _token_batches

    model, tok = _load_model(args.model)
    _, held = _texts(args.texts)
    batches, bos = _token_batches(tok, held, args)
    if not batches:
        sys.exit("sae-hooks: not enough text for one batch; lower --seq-len / --batch-size")
    return model, tok, batches[: args.batches], bos


def add_model_args(p: argparse.ArgumentParser, batches: int = 4) -> None:
    from ..cli import _add_text_args

    _add_text_args(p)
    p.add_argument("--site", help="module path or TransformerLens name (default: the SAE's cfg.sites)")
    p.add_argument("--batches", type=int, default=batches, help="held-out token batches to evaluate on")
