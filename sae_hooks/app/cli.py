"""``sae-hooks`` command line: ``train``, ``save-activations``, ``eval``, ``demo``.

Models are Hugging Face causal LMs in a local folder (default: the embedded model); text comes from
``--texts`` files (each file one document) or, by default, Python's pydoc topics. Sites are
TransformerLens hook names (``blocks.1.hook_resid_post``), module paths (``transformer.h.1``) or
``path:input``. ``train`` can also read activations saved to disk (``--activations``).
Logging to wandb / tensorboard happens only when asked for and installed (imported lazily).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from .argtypes import (
    device,
    existing_dir,
    existing_file,
    model_source,
    nonnegative_float,
    nonnegative_int,
    output_dir,
    positive_float,
    positive_int,
)


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


def _loggers(args: argparse.Namespace):  # noqa: ANN202
    sinks = []
    if getattr(args, "wandb", None):
        try:
            import wandb
        except ImportError:
            print("sae-hooks: --wandb given but wandb is not installed; not logging to wandb", file=sys.stderr)
        else:
            run = wandb.init(project=args.wandb, config=vars(args))
            sinks.append(lambda step, m: run.log(m, step=step))
    if getattr(args, "tensorboard", None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("sae-hooks: --tensorboard given but tensorboard is not installed", file=sys.stderr)
        else:
            writer = SummaryWriter(args.tensorboard)
            sinks.append(lambda step, m: [writer.add_scalar(k, v, step) for k, v in m.items()])
    if not sinks:
        return None
    return lambda step, m: [s(step, m) for s in sinks]


def cmd_train(args: argparse.Namespace) -> int:
    if getattr(args, "distributed", None):
        from ..train.distributed import distributed_context

        with distributed_context(timeout=timedelta(seconds=args.dist_timeout)) as info:
            return _train(args, info)
    return _train(args, None)


def _check_train_args(args: argparse.Namespace) -> None:
    """Checks that involve several arguments (each one alone was checked by its ``type=``)."""
    if args.buffer_tokens < args.batch_tokens:
        sys.exit(f"sae-hooks train: --buffer-tokens ({args.buffer_tokens}) must be >= --batch-tokens ({args.batch_tokens})")
    if args.checkpoint_every is not None and not args.checkpoint_dir:
        sys.exit("sae-hooks train: --checkpoint-every needs --checkpoint-dir")
    if args.d_sae is not None and args.arch in ("topk", "batchtopk") and args.k > args.d_sae:
        sys.exit(f"sae-hooks train: --k ({args.k}) must be <= --d-sae ({args.d_sae})")
    if len(set(args.seeds)) != len(args.seeds):
        sys.exit(f"sae-hooks train: --seeds has repeats: {args.seeds}")
    if args.dist_timeout != _DIST_TIMEOUT and not args.distributed:
        sys.exit("sae-hooks train: --dist-timeout applies only with --distributed")


_DIST_TIMEOUT = 1800.0


def _train(args: argparse.Namespace, dist_info: Any) -> int:
    """``sae-hooks train``; ``dist_info`` (a :class:`~.train.distributed.DistInfo`) under ``--distributed``."""
    _check_train_args(args)
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    with contextlib.ExitStack() as locks:
        if rank == 0:  # one run per output folder: a second run is refused now, naming this one
            from .._atomic import folder_lock

            for folder in dict.fromkeys(f for f in (args.checkpoint_dir, args.out) if f):
                locks.enter_context(folder_lock(folder, timeout=0))
        return _train_locked(args, dist_info, rank, world)


def _train_locked(args: argparse.Namespace, dist_info: Any, rank: int, world: int) -> int:
    from ..saes.registry import make_sae, sae_class
    from ..train import DiskSource, LiveSource, ShuffleBuffer, Trainer, TrainEntry, TrainSettings, load_checkpoint
    from ..train.trainer import pick_device

    ddp = dist_info is not None and args.distributed == "ddp"
    device = pick_device(args.device) if dist_info is None or args.device else dist_info.device
    batch_tokens, buffer_tokens = args.batch_tokens, args.buffer_tokens
    if ddp:  # --batch-tokens / --buffer-tokens are global: each rank takes its share
        if batch_tokens % world or buffer_tokens % world:
            sys.exit(f"sae-hooks train: --batch-tokens and --buffer-tokens must be divisible by the {world} ranks")
        batch_tokens, buffer_tokens = batch_tokens // world, buffer_tokens // world
    site_out = args.site_out or []
    if site_out and len(site_out) != len(args.site or []):
        sys.exit(f"sae-hooks train: give one --site-out per --site (transcoders), got {len(site_out)} for {len(args.site or [])}")
    pairs = list(zip(args.site, site_out)) if site_out else None  # (input site, target site) per transcoder
    read_sites = list(dict.fromkeys([s for p in pairs for s in p])) if pairs else args.site
    if args.activations:
        source = DiskSource(args.activations, read_sites or None, shuffle=True, seed=args.seed, epochs=args.epochs)
        widths = source.manifest["widths"]
        if ddp:
            from ..train.distributed import shard_disk_source

            shard_disk_source(source, rank, world)
    else:
        model, tok = _load_model(args.model)
        model.to(device)
        if not args.site:
            sys.exit("sae-hooks train: give at least one --site")
        if args.dataset:
            from ..train.datasets import dataset_source

            source, first = dataset_source(model, tok, read_sites, args, rank=rank, world=world if ddp else 1)
        else:
            texts, _ = _texts(args.texts)
            batches, bos = _token_batches(tok, texts, args)
            repeated = [b for _ in range(args.epochs) for b in batches]
            if ddp:
                repeated = repeated[rank::world]
            source = LiveSource(
                model, read_sites, repeated, bos_token_id=bos,
                autocast_dtype=torch.bfloat16 if args.bf16 else None,
            )
            first = batches[0]
        widths = {s: t.shape[-1] for s, t in source.reader.read(first[:1], torch.ones_like(first[:1])).items()}  # one tiny forward
    buffer = ShuffleBuffer(source, batch_tokens=batch_tokens, size_tokens=buffer_tokens, seed=args.seed, device=device)
    entries = []
    for site, out in pairs or [(s, None) for s in source.sites]:
        d_in = int(widths[site])
        d_sae = args.d_sae or d_in * args.expansion
        for seed in args.seeds:
            extra: dict[str, Any] = {"k": args.k} if sae_class(args.arch).uses_k else {}
            if args.matryoshka_widths:
                if args.arch != "matryoshka":
                    sys.exit("sae-hooks train: --matryoshka-widths is for --arch matryoshka")
                extra["matryoshka_widths"] = args.matryoshka_widths
            if out is not None:
                extra.update(d_out=int(widths[out]), skip=args.skip)
            sae = make_sae(args.arch, d_in, d_sae, **extra)
            settings = TrainSettings(lr=args.lr, seed=seed, dead_tokens=args.dead_tokens, warmup_steps=args.warmup,
                                     arch=_arch_settings(args), optimizer=args.optimizer,
                                     optimizer_settings={"round_steps": args.pam_round_steps} if args.optimizer == "pam-sgd" else {})
            kind = f"{args.arch}-tc" if out is not None else args.arch
            name = f"{site}-{kind}-s{seed}".replace("/", "_")
            entries.append(TrainEntry(name, site, sae, settings, device=None if dist_info else device, site_out=out))
    autocast = torch.bfloat16 if args.bf16 else None
    if dist_info is not None:
        from ..train.distributed import DistributedTrainer

        trainer: Any = DistributedTrainer(entries, args.distributed, device=device, autocast_dtype=autocast)
        if args.resume:
            trainer.load_checkpoint(args.resume, buffer)
    else:
        trainer = Trainer(entries, autocast_dtype=autocast)
        if args.resume:
            load_checkpoint(trainer, args.resume, buffer)
    trainer.fit(
        buffer, max_steps=args.steps, checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress and rank == 0, log=_loggers(args) if rank == 0 else None,
    )
    paths = trainer.save(args.out)
    if rank != 0:
        return 0
    for e in trainer.entries:
        print(f"{e.name}: {e.state.tokens_seen:,} tokens, {json.dumps({k: round(v, 5) for k, v in e.state.metrics.items()})} -> {paths[e.name]}")
    return 0


def _arch_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--l1`` / ``--l0`` flags, for the architectures whose settings have those keys."""
    import dataclasses

    from ..saes.registry import training_spec

    known = {f.name for f in dataclasses.fields(training_spec(args.arch).settings)}
    flags = {"l1_coefficient": args.l1, "l0_coefficient": args.l0, "capacities": args.capacities, "aux": args.choice_aux}
    return {k: v for k, v in flags.items() if k in known and v is not None}


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


def _cli_architectures() -> list[str]:
    """Trainable architectures that train on one site (the multi-layer SAE has its own entry point)."""
    from ..saes.registry import trainable_architectures

    return [a for a in trainable_architectures() if a != "mlsae"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sae-hooks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train SAEs in place (live model) or on captured activations")
    _add_text_args(t)
    t.add_argument("--activations", type=existing_dir, help="folder written by `sae-hooks save-activations` (instead of a live model)")
    from ..train.datasets import add_dataset_args

    add_dataset_args(t)
    t.add_argument("--site", action="append",
                   help="where to train: a TransformerLens hook name, module path or path:input (repeatable)")
    t.add_argument("--site-out", action="append",
                   help="train a transcoder from the matching --site to this site (repeatable, one per --site)")
    t.add_argument("--skip", action="store_true", help="skip transcoders (a trained linear x @ W_skip path)")
    t.add_argument("--arch", default="topk", choices=_cli_architectures(),
                   help="architecture (every registered one with a training spec)")
    t.add_argument("--d-sae", type=positive_int)
    t.add_argument("--expansion", type=positive_int, default=8)
    t.add_argument("--k", type=positive_int, default=32)
    t.add_argument("--steps", type=positive_int, default=1000)
    t.add_argument("--epochs", type=positive_int, default=1)
    t.add_argument("--batch-tokens", type=positive_int, default=4096,
                   help="tokens per step (a resumed run must use the checkpoint's value)")
    t.add_argument("--buffer-tokens", type=positive_int, default=2**16)
    t.add_argument("--lr", type=positive_float)
    t.add_argument("--l1", type=nonnegative_float, default=5.0)
    t.add_argument("--l0", type=nonnegative_float, default=0.5)
    t.add_argument("--warmup", type=nonnegative_int, default=100)
    t.add_argument("--dead-tokens", type=positive_int, default=10_000_000)
    t.add_argument("--optimizer", default="adam", choices=["adam", "pam-sgd"],
                   help="pam-sgd: closed-form decoder steps + Adam on the encoder (signed_topk, topk, relu)")
    t.add_argument("--pam-round-steps", type=positive_int, default=50, help="pam-sgd: encoder steps between decoder solves")
    t.add_argument("--matryoshka-widths", type=positive_int, nargs="+", help="matryoshka: nested prefix widths (d_sae is added)")
    t.add_argument("--capacities", choices=["uniform", "zipf"], help="feature_choice: per-feature token capacities")
    t.add_argument("--choice-aux", choices=["zipf", "k"], help="feature/mutual_choice: aux_zipf_loss or AuxK")
    t.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0])
    t.add_argument("--seed", type=nonnegative_int, default=0, help="buffer / data shuffling seed")
    t.add_argument("--out", required=True, type=output_dir)
    t.add_argument("--checkpoint-dir", type=output_dir)
    t.add_argument("--checkpoint-every", type=positive_int)
    t.add_argument("--resume", type=existing_dir, help="checkpoint folder to resume from")
    t.add_argument("--device", type=device)
    t.add_argument("--bf16", action="store_true", help="bf16 autocast for the model and the SAEs")
    t.add_argument("--wandb", metavar="PROJECT")
    t.add_argument("--tensorboard", metavar="LOGDIR")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--distributed", choices=["ddp", "shard"],
                   help="under torchrun: ddp = each rank its share of the data (--batch-tokens is global), "
                        "shard = each rank its subset of the SAEs (same data)")
    t.add_argument("--dist-timeout", type=positive_float, default=_DIST_TIMEOUT, metavar="SECONDS",
                   help="with --distributed: how long a rank waits for the others before failing (default 1800)")
    t.set_defaults(fn=cmd_train)

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
