"""``sae-hooks dashboard SAE --model ... --data ... --out DIR``: a static feature browser for an SAE.

``SAE`` is anything :func:`sae_hooks.load` reads (a native folder, another library's folder, a Hub repo
or release, ``--sae-id`` inside it) or a Jacobian SAE pair folder (``pair.json``). ``--data`` is text
files (each one document) or a Hugging Face dataset (Hub id, ``save_to_disk`` folder, parquet / json /
csv files; ``--split --column --streaming --dataset-config``); by default Python's pydoc topics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".html", ".tex"}


def register(subparsers: Any) -> None:
    d = subparsers.add_parser("dashboard", help="build a static HTML feature browser for an SAE",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("sae", help="SAE folder, Hub repo or release name, or a Jacobian SAE pair folder")
    d.add_argument("--sae-id", help="path of the SAE inside the folder / repo")
    d.add_argument("--model", help="folder or Hub id of a Hugging Face causal LM (default: the embedded model)")
    d.add_argument("--data", nargs="*", help="text files, or one dataset (Hub id, save_to_disk folder, data files); "
                                              "default: Python's pydoc topics")
    d.add_argument("--split", default="train")
    d.add_argument("--column", help="text or input_ids column (default: input_ids, else text)")
    d.add_argument("--streaming", action="store_true")
    d.add_argument("--dataset-config")
    d.add_argument("--out", required=True, help="folder to write (replaced); open OUT/index.html")
    d.add_argument("--site", action="append", help="where to read (default: the SAE's own sites)")
    d.add_argument("--max-tokens", type=int, default=2**18, help="tokens to run (default 262144)")
    d.add_argument("--seq-len", type=int, default=128)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--top", type=int, default=10, help="top-activating contexts per latent")
    d.add_argument("--samples", type=int, default=20, help="sampled firings per latent (shown in 4 quantile bands)")
    d.add_argument("--title")
    d.add_argument("--neuronpedia", nargs=3, metavar=("MODEL_ID", "LAYER", "SAE_SET"),
                   help="also write OUT/neuronpedia/batch-*.json for a Neuronpedia upload")
    d.add_argument("--device")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=run)


def load_any_sae(path: str, sae_id: str | None = None, device: str | None = None) -> Any:
    """An SAE, or a ``JacobianSAEPair`` when ``path`` is a pair folder."""
    from ...saes.jacobian import PAIR_FILE, JacobianSAEPair

    if (Path(path) / PAIR_FILE).is_file():
        return JacobianSAEPair.load(path, device=device)
    from ...hub import load

    return load(path, sae_id, device=device)


def data_for(args: argparse.Namespace, tokenizer: Any) -> Any:
    """Texts or a token-batch iterable for ``--data``."""
    files = args.data or []
    if not files:
        from ..demo import pydoc_texts

        train, held = pydoc_texts()
        return train + held
    if all(Path(f).is_file() and Path(f).suffix in _TEXT_SUFFIXES for f in files):
        return [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    if len(files) != 1:
        sys.exit("sae-hooks dashboard: --data takes text files or ONE dataset")
    from ...train.datasets import TokenBatches, load_dataset_any

    ds = load_dataset_any(files[0], split=args.split, config=args.dataset_config, streaming=args.streaming)
    return TokenBatches(ds, tokenizer, args.seq_len, args.batch_size, column=args.column)


def _neuronpedia(values: list[str] | None) -> dict[str, Any] | None:
    if not values:
        return None
    model_id, layer, sae_set = values
    if not layer.isdigit():
        sys.exit(f"sae-hooks dashboard: --neuronpedia LAYER must be a layer number, got {layer!r}")
    return {"model_id": model_id, "layer": int(layer), "sae_set": sae_set}


def run(args: argparse.Namespace) -> int:
    import torch

    from ...eval.dashboard import CollectorSettings, build_dashboard
    from ..models import load_causal_lm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sae = load_any_sae(args.sae, args.sae_id, device=device)
    model, tok = load_causal_lm(args.model)
    model.to(device)
    settings = CollectorSettings(n_top=args.top, n_samples=args.samples)
    out = build_dashboard(
        sae, model, data_for(args, tok), args.out, tokenizer=tok, site=args.site, seq_len=args.seq_len,
        batch_size=args.batch_size, max_tokens=args.max_tokens, settings=settings, title=args.title,
        neuronpedia=_neuronpedia(args.neuronpedia), progress=not args.no_progress,
    )
    print(f"dashboard written to {out}/ -- open {out / 'index.html'} in a browser")
    return 0
