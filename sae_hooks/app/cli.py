"""``sae-hooks`` command line: ``save-activations``, ``eval``, ``demo`` here; ``train``, ``dashboard`` and the
analysis commands in :mod:`sae_hooks.app.commands` (one module each).

Models are Hugging Face causal LMs in a local folder (default: the embedded model); text comes from
``--texts`` files (each file one document) or, by default, Python's pydoc topics. Sites are
TransformerLens hook names (``blocks.1.hook_resid_post``), module paths (``transformer.h.1``) or
``path:input``. ``train`` can also read activations saved to disk (``--activations``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .argtypes import existing_dir, existing_file, model_source, output_dir, positive_int


def _texts(files: list[str] | None) -> tuple[list[str], list[str]]:
    if files:
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
        return texts, texts[:: max(1, len(texts) // 4)] if len(texts) > 1 else texts
    from .demo import pydoc_texts

    return pydoc_texts()


def _load_model(path: str | None) -> tuple[Any, Any]:
    from .models import load_causal_lm

    return load_causal_lm(path)


def _token_batches(tok: Any, texts: list[str], args: argparse.Namespace) -> tuple[list[torch.Tensor], int]:
    from ..train.sources import pack_texts

    bos = tok.bos_token_id if tok.bos_token_id is not None else 0
    return pack_texts(tok, texts, args.seq_len, args.batch_size, bos), bos


def _add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=model_source, help="folder or Hub id of a Hugging Face causal LM (default: the embedded model)")
    p.add_argument("--texts", nargs="*", type=existing_file, help="text files (each one document); default: pydoc topics")
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward pass")


def cmd_save_activations(args: argparse.Namespace) -> int:
    from ..train.sources import save_activations

    model, tok = _load_model(args.model)
    texts, _ = _texts(args.texts)
    batches, bos = _token_batches(tok, texts, args)
    if args.max_batches is not None:
        batches = batches[: args.max_batches]
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="saving activations", unit="tok", unit_scale=True)
    out = save_activations(model, args.site, batches, args.out, shard_tokens=args.shard_tokens, bos_token_id=bos,
                  progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    from ..train.sources import read_manifest

    m = read_manifest(out)
    print(f"wrote {m['tokens']:,} tokens x {len(m['sites'])} site(s) in {len(m['shards'])} shard(s) to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval import hooks_splice_runner, reconstruction_metrics, splice_metrics
    from ..native import load
    from ..train.sources import ActivationReader

    sae = load(args.sae).eval()
    model, tok = _load_model(args.model)
    site = args.site or _trained_site(model, sae)
    if not site:
        sys.exit("sae-hooks eval: the SAE names no site; pass --site")
    _, held = _texts(args.texts)
    batches, bos = _token_batches(tok, held, args)
    batches = batches[: args.batches]
    reader = ActivationReader(model, [site], bos_token_id=bos)
    result = reconstruction_metrics(sae, [reader.read(b)[site] for b in batches])
    result.update(splice_metrics(hooks_splice_runner(model, site, bos_token_id=bos), sae, batches))
    print(json.dumps(result, indent=1))
    return 0


def _trained_site(model: Any, sae: Any) -> str | None:
    """The SAE's own site on ``model``: its hook name, or its module path when the name does not resolve."""
    from ..errors import HookNotFoundError
    from ..sites import site_hooks

    if not sae.cfg.sites:
        return None
    hook, module = sae.cfg.sites[0].hook, sae.cfg.sites[0].module
    if hook and module:
        try:
            site_hooks(model, [hook])
        except HookNotFoundError:
            return module
    return hook or module


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    torch.set_num_threads(args.threads)
    run_demo(DemoConfig(steps=args.steps), progress=not args.no_progress, out_dir=args.out, dashboard=not args.no_dashboard)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sae-hooks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("save-activations", aliases=["capture"],
                       help="save activations at sites as safetensors shards (alias: capture)")
    _add_text_args(c)
    c.add_argument("--site", action="append", required=True,
                   help="a TransformerLens hook name, module path or path:input (repeatable)")
    c.add_argument("--out", required=True, type=output_dir)
    c.add_argument("--shard-tokens", type=positive_int, default=2**16)
    c.add_argument("--max-batches", type=positive_int)
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(fn=cmd_save_activations)

    e = sub.add_parser("eval", help="FVU, L0, dead %%, ce_loss_score, KL of a saved SAE")
    _add_text_args(e)
    e.add_argument("sae", type=existing_dir, help="native SAE folder")
    e.add_argument("--site", help="hook name, module path or path:input (default: the SAE's cfg.sites)")
    e.add_argument("--batches", type=positive_int, default=4)
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", help="train a TopK SAE on the embedded model and report metrics")
    d.add_argument("--steps", type=positive_int, default=200)
    d.add_argument("--threads", type=positive_int, default=2)
    d.add_argument("--out", type=output_dir, default="sae-hooks-demo", help="where the SAE (OUT/sae) and its dashboard (OUT/dashboard) go")
    d.add_argument("--no-dashboard", action="store_true", help="skip building the dashboard")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_demo)

    from .commands import register_all

    register_all(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import SAEHooksError

    try:
        return args.fn(args)
    except SAEHooksError as e:  # a typed error already says what is wrong: no traceback
        print(f"sae-hooks {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
