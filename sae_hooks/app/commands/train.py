"""``sae-hooks train``: train SAEs in place on a live model (or on saved activations), every objective.

One run trains every model it is given in ONE forward pass per batch: SAEs of any registered ``--arch``
(several ``--site``, ``*`` for every layer), transcoders (``--site-out``), a multi-layer SAE
(``--arch mlsae``), a Jacobian SAE pair (``--objective jsae --layer L``), or a mix of them given as
repeated ``--sae 'key=value,...'`` groups or a ``--config`` file (:mod:`sae_hooks.app.train_plan`).
The model is a Hugging Face causal LM (folder or Hub id, default the embedded model), run as itself or
through TransformerLens or nnsight (``--framework``); text comes from ``--texts`` files, a Hugging Face
``--dataset`` or, by default, Python's pydoc topics. ``--checkpoint-dir``/``--checkpoint-every`` and
``--resume`` continue a run exactly.

  sae-hooks train --site blocks.1.hook_resid_post --arch topk --k 32 --out out/
  sae-hooks train --arch mlsae --site 'blocks.*.hook_resid_post' --out out/
  sae-hooks train --objective jsae --layer 1 --k 16 --out out/
  sae-hooks train --sae 'site=blocks.1.hook_resid_post,arch=topk,k=32' \\
                  --sae 'site=blocks.0.ln2.hook_out,site_out=blocks.0.hook_mlp_out,arch=topk' \\
                  --sae 'arch=mlsae,site=blocks.*.hook_resid_post' --out out/
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from datetime import timedelta
from typing import Any

import torch

from ..argtypes import (
    device,
    existing_dir,
    existing_file,
    nonnegative_float,
    nonnegative_int,
    output_dir,
    positive_float,
    positive_int,
)

DIST_TIMEOUT = 1800.0


def register(subparsers: Any) -> None:
    from ..cli import _add_text_args
    from ...train.datasets import add_dataset_args

    t = subparsers.add_parser("train", help="train SAEs, transcoders, multi-layer SAEs and Jacobian pairs in place",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_text_args(t)
    t.add_argument("--framework", default="torch", choices=["torch", "transformer-lens", "nnsight"],
                   help="run the model as a plain torch module (default), a TransformerLens TransformerBridge or an "
                        "nnsight LanguageModel; sites in any spelling either way")
    t.add_argument("--activations", type=existing_dir, help="folder written by `sae-hooks save-activations` (instead of a live model)")
    add_dataset_args(t)
    g = t.add_argument_group("what to train (also the keys of a --sae group / --config entry)")
    g.add_argument("--site", "--sites", dest="site", action="extend", nargs="+",
                   help="where to train: TransformerLens hook names, module paths or path:input; '*' = every layer "
                        "(blocks.*.hook_resid_post); one SAE per site, or the sites of one --arch mlsae")
    g.add_argument("--site-out", action="extend", nargs="+",
                   help="train a transcoder from the matching --site to this site (one per --site); with "
                        "--objective jsae the MLP's output site")
    g.add_argument("--objective", choices=["sae", "transcoder", "mlsae", "jsae"],
                   help="default: mlsae for --arch mlsae, transcoder with --site-out, else sae")
    g.add_argument("--layer", type=nonnegative_int, help="jsae: the block whose MLP the pair sits around")
    g.add_argument("--skip", action="store_true", help="skip transcoders (a trained linear x @ W_skip path)")
    g.add_argument("--arch", default="topk", choices=_cli_architectures(),
                   help="architecture (every registered one with a training spec)")
    g.add_argument("--d-sae", type=positive_int)
    g.add_argument("--expansion", type=positive_int, default=8)
    g.add_argument("--k", type=positive_int, default=32)
    g.add_argument("--lr", type=positive_float)
    g.add_argument("--l1", type=nonnegative_float, default=5.0)
    g.add_argument("--l0", type=nonnegative_float, default=0.5)
    g.add_argument("--warmup", type=nonnegative_int, default=100)
    g.add_argument("--dead-tokens", type=positive_int, default=10_000_000)
    g.add_argument("--optimizer", default="adam", choices=["adam", "pam-sgd"],
                   help="pam-sgd: closed-form decoder steps + Adam on the encoder (signed_topk, topk, relu)")
    g.add_argument("--pam-round-steps", type=positive_int, default=50, help="pam-sgd: encoder steps between decoder solves")
    g.add_argument("--matryoshka-widths", type=positive_int, nargs="+", help="matryoshka: nested prefix widths (d_sae is added)")
    g.add_argument("--capacities", choices=["uniform", "zipf"], help="feature_choice: per-feature token capacities")
    g.add_argument("--choice-aux", choices=["zipf", "k"], help="feature/mutual_choice: aux_zipf_loss or AuxK")
    g.add_argument("--jacobian-coefficient", type=nonnegative_float, default=1.0,
                   help="jsae: weight of the Jacobian sparsity term (the paper's schedule: λ warm-up 5%%, lr 5e-4)")
    g.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0], help="init seeds: one model per seed")
    g.add_argument("--name", help="entry (output folder) name; default from site, arch and seed")
    t.add_argument("--sae", action="append", metavar="KEY=VALUE,...",
                   help="one objective group (repeatable; all train in one forward pass), e.g. "
                        "'site=blocks.1.hook_resid_post,arch=topk,k=32'; keys are the flags above, lists space-separated")
    t.add_argument("--config", type=existing_file, help="TOML/JSON file with [[sae]] objective groups (same keys)")
    t.add_argument("--steps", type=positive_int, default=1000)
    t.add_argument("--epochs", type=positive_int, default=1)
    t.add_argument("--batch-tokens", type=positive_int, default=4096,
                   help="tokens per step (a resumed run must use the checkpoint's value)")
    t.add_argument("--buffer-tokens", type=positive_int, default=2**16)
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
    t.add_argument("--dist-timeout", type=positive_float, default=DIST_TIMEOUT, metavar="SECONDS",
                   help="with --distributed: how long a rank waits for the others before failing (default 1800)")
    t.set_defaults(fn=lambda args: cmd_train(args, t))


def _cli_architectures() -> list[str]:
    """Trainable architectures (``mlsae`` trains one multi-layer SAE over the sites)."""
    from ...saes.registry import trainable_architectures

    return trainable_architectures()


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    groups = _check_train_args(args, parser)
    if getattr(args, "distributed", None):
        from ...train.distributed import distributed_context

        with distributed_context(timeout=timedelta(seconds=args.dist_timeout)) as info:
            return _train(args, groups, info)
    return _train(args, groups, None)


def _check_train_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Any]:
    """Checks that involve several arguments (each one alone was checked by its ``type=``): before any work."""
    from ...errors import ConfigError
    from ..train_plan import check_group, groups_from_args

    if args.buffer_tokens < args.batch_tokens:
        sys.exit(f"sae-hooks train: --buffer-tokens ({args.buffer_tokens}) must be >= --batch-tokens ({args.batch_tokens})")
    if args.checkpoint_every is not None and not args.checkpoint_dir:
        sys.exit("sae-hooks train: --checkpoint-every needs --checkpoint-dir")
    if args.dist_timeout != DIST_TIMEOUT and not args.distributed:
        sys.exit("sae-hooks train: --dist-timeout applies only with --distributed")
    if args.activations and args.framework != "torch":
        sys.exit("sae-hooks train: --framework runs a live model; --activations replays saved ones")
    try:
        groups = groups_from_args(args, parser)
        for g in groups:
            check_group(g, replay=bool(args.activations))
    except ConfigError as e:
        sys.exit(f"sae-hooks train: {e}")
    return groups


def _train(args: argparse.Namespace, groups: list[Any], dist_info: Any) -> int:
    """``sae-hooks train``; ``dist_info`` (a :class:`~.train.distributed.DistInfo`) under ``--distributed``."""
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    with contextlib.ExitStack() as locks:
        if rank == 0:  # one run per output folder: a second run is refused now, naming this one
            from ..._atomic import folder_lock

            for folder in dict.fromkeys(f for f in (args.checkpoint_dir, args.out) if f):
                locks.enter_context(folder_lock(folder, timeout=0))
        return _train_locked(args, groups, dist_info, rank, world)


def _pair_mlps(hf_model: Any, planned: list[Any]) -> dict[str, Any]:
    """The frozen MLP copy of every Jacobian pair, from the Hugging Face module tree (before a framework wraps it)."""
    from ...saes.jacobian import FrozenMLP
    from ...sites import ModuleSites

    sites = ModuleSites(hf_model)
    out = {}
    for p in planned:
        if p.objective == "jsae":
            module, path, side = sites.module_site(p.site_out)
            if side != "output":
                sys.exit(f"sae-hooks train: {p.group.where}: the pair's output site {p.site_out!r} must be a module's "
                         f"output (the MLP's), not its {side}")
            out[p.name] = _frozen_mlp(hf_model, module, path)
    return out


def _frozen_mlp(hf_model: Any, module: Any, path: str) -> Any:
    """The frozen MLP whose output is the module at ``path``: the MLP itself, or, where ``path`` is a block's
    post-MLP norm (Gemma's ``post_feedforward_layernorm``, which Gemma's ``hook_mlp_out`` reads), that block's
    MLP followed by the norm."""
    from ...saes.jacobian import FrozenMLP

    parent_path, _, _ = path.rpartition(".")
    block = hf_model.get_submodule(parent_path) if parent_path else None
    if block is not None and getattr(block, "post_feedforward_layernorm", None) is module and hasattr(block, "mlp"):
        return FrozenMLP.from_module(block.mlp, post_norm=module)
    return FrozenMLP.from_module(module)


def _site_exists(resolver: Any) -> Any:
    from ...errors import HookNotFoundError

    def exists(site: str) -> bool:
        try:
            resolver(site)
        except HookNotFoundError:
            return False
        return True

    return exists


def _train_locked(args: argparse.Namespace, groups: list[Any], dist_info: Any, rank: int, world: int) -> int:
    from ...errors import ConfigError
    from ...train import DiskSource, LiveSource, ShuffleBuffer, Trainer, load_checkpoint
    from ...train.sources import model_site_hooks
    from ...train.trainer import pick_device
    from ..train_plan import plan

    ddp = dist_info is not None and args.distributed == "ddp"
    dev = pick_device(args.device) if dist_info is None or args.device else dist_info.device
    batch_tokens, buffer_tokens = args.batch_tokens, args.buffer_tokens
    if ddp:  # --batch-tokens / --buffer-tokens are global: each rank takes its share
        if batch_tokens % world or buffer_tokens % world:
            sys.exit(f"sae-hooks train: --batch-tokens and --buffer-tokens must be divisible by the {world} ranks")
        batch_tokens, buffer_tokens = batch_tokens // world, buffer_tokens // world
    needs_model = not args.activations or any(g.objective == "jsae" for g in groups)
    hf_model = tok = model = None
    if needs_model:
        from ..models import load_causal_lm, resolve_model

        hf_model, tok = load_causal_lm(args.model)
        hf_model.to(dev)
    if args.activations:
        manifest_sites = DiskSource(args.activations, None).sites
        exists: Any = manifest_sites.__contains__
    else:
        exists = None  # set once the model is wrapped
    try:
        if exists is None:
            # Pairs' MLPs come from the Hugging Face tree, which a TransformerBridge then wraps in place.
            pre = plan([g for g in groups if g.objective == "jsae"], lambda s: False)
            mlps = _pair_mlps(hf_model, pre)
            if args.framework != "torch":
                from ...adapters.frameworks import as_framework

                model = as_framework(args.framework, hf_model, tok, resolve_model(args.model), dev)
            else:
                model = hf_model
            planned = plan(groups, _site_exists(model_site_hooks(model).resolve))
        else:
            planned = plan(groups, exists, all_sites=manifest_sites)
            mlps = _pair_mlps(hf_model, planned) if hf_model is not None else {}
    except ConfigError as e:
        sys.exit(f"sae-hooks train: {e}")
    read_sites = list(dict.fromkeys(s for p in planned for s in p.sites))
    if args.activations:
        source: Any = DiskSource(args.activations, read_sites, shuffle=True, seed=args.seed, epochs=args.epochs)
        widths = source.manifest["widths"]
        if ddp:
            from ...train.distributed import shard_disk_source

            shard_disk_source(source, rank, world)
    else:
        if args.dataset:
            from ...train.datasets import dataset_source

            source, first = dataset_source(model, tok, read_sites, args, rank=rank, world=world if ddp else 1)
        else:
            from ..cli import _texts, _token_batches

            texts, _ = _texts(args.texts)
            batches, bos = _token_batches(tok, texts, args)
            repeated = [b for _ in range(args.epochs) for b in batches]
            if ddp:
                repeated = repeated[rank::world]
            source = LiveSource(model, read_sites, repeated, bos_token_id=bos,
                                autocast_dtype=torch.bfloat16 if args.bf16 else None)
            first = batches[0]
        widths = {s: t.shape[-1] for s, t in source.reader.read(first[:1], torch.ones_like(first[:1])).items()}  # one tiny forward
        _check_pairs(model, planned, mlps, first[:2])
    entries = [_entry(p, widths, mlps, args, None if dist_info else dev) for p in planned]
    buffer = ShuffleBuffer(source, batch_tokens=batch_tokens, size_tokens=buffer_tokens, seed=args.seed, device=dev)
    autocast = torch.bfloat16 if args.bf16 else None
    if dist_info is not None:
        from ...train.distributed import DistributedTrainer

        trainer: Any = DistributedTrainer(entries, args.distributed, device=dev, autocast_dtype=autocast)
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
        metrics = {k: round(v, 5) for k, v in e.state.metrics.items()}
        print(f"{e.name}: {e.state.tokens_seen:,} tokens, {json.dumps(metrics)} -> {paths[e.name]}")
    return 0


def _check_pairs(model: Any, planned: list[Any], mlps: dict[str, Any], tokens: torch.Tensor) -> None:
    """Each pair's frozen MLP must map the activation at its input site to the one at its output site."""
    from ...errors import ConfigError
    from ...saes.jacobian import make_jsae_pair
    from ...train.jsae import check_mlp_input

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the probe batch holds BOS = pad id: transformers' attention-mask advice is noise
    try:
        for p in planned:
            if p.objective == "jsae":
                probe = make_jsae_pair(mlps[p.name], p.layer, 2, 1, hook_in=p.sites[0], hook_out=p.site_out)
                try:
                    check_mlp_input(model, probe, tokens)
                except ConfigError as e:
                    sys.exit(f"sae-hooks train: {p.group.where}: {e}")
    finally:
        hf_logging.set_verbosity(level)


def _entry(p: Any, widths: dict[str, int], mlps: dict[str, Any], args: argparse.Namespace, dev: Any) -> Any:
    """The :class:`~sae_hooks.train.TrainEntry` of one planned model."""
    from ...config import Site
    from ...saes.jacobian import make_jsae_pair
    from ...saes.multilayer import make_mlsae
    from ...saes.registry import make_sae, sae_class
    from ...train import TrainEntry, TrainSettings
    from ...train.jsae import jsae_settings

    v = p.group.values
    if p.objective == "jsae":
        mlp = mlps[p.name]
        d_sae = v["d_sae"] or mlp.d_model * v["expansion"]
        pair = make_jsae_pair(mlp, p.layer, d_sae, v["k"], hook_in=p.sites[0], hook_out=p.site_out, seed=p.seed)
        settings = jsae_settings(args.steps, v["jacobian_coefficient"], lr=v["lr"] or 5e-4)
        settings.seed, settings.dead_tokens = p.seed, v["dead_tokens"]
        return TrainEntry(p.name, None, pair, settings, device=dev)
    d_in = int(widths[p.sites[0]])
    d_sae = v["d_sae"] or d_in * v["expansion"]
    common = dict(lr=v["lr"], seed=p.seed, dead_tokens=v["dead_tokens"], warmup_steps=v["warmup"])
    if p.objective == "mlsae":
        bad = {s: widths[s] for s in p.sites if widths[s] != d_in}
        if bad:
            sys.exit(f"sae-hooks train: {p.group.where}: a multi-layer SAE needs one width at every site; "
                     f"{p.sites[0]!r} has {d_in}, {bad}")
        sae = make_mlsae(d_in, len(p.sites), d_sae=d_sae, k=v["k"], seed=p.seed)
        sae.cfg = sae.cfg.replace(sites=[Site(**_site_fields(s)) for s in p.sites])
        return TrainEntry(p.name, list(p.sites), sae, TrainSettings(**common), init_weights=False, device=dev)
    extra: dict[str, Any] = {"k": v["k"]} if sae_class(v["arch"]).uses_k else {}
    if v["matryoshka_widths"]:
        extra["matryoshka_widths"] = v["matryoshka_widths"]
    site_out = p.sites[1] if p.objective == "transcoder" else None
    if site_out is not None:
        extra.update(d_out=int(widths[site_out]), skip=v["skip"])
    sae = make_sae(v["arch"], d_in, d_sae, **extra)
    pam = {"round_steps": v["pam_round_steps"]} if v["optimizer"] == "pam-sgd" else {}
    settings = TrainSettings(**common, arch=_arch_settings(v), optimizer=v["optimizer"], optimizer_settings=pam)
    return TrainEntry(p.name, p.sites[0], sae, settings, device=dev, site_out=site_out)


def _site_fields(name: str) -> dict[str, str]:
    return {"hook" if name.rsplit(".", 1)[-1].startswith("hook_") else "module": name}


def _arch_settings(v: dict[str, Any]) -> dict[str, Any]:
    """The ``l1`` / ``l0`` / ``capacities`` / ``choice_aux`` keys, for the architectures whose settings have them."""
    import dataclasses

    from ...saes.registry import training_spec

    known = {f.name for f in dataclasses.fields(training_spec(v["arch"]).settings)}
    flags = {"l1_coefficient": v["l1"], "l0_coefficient": v["l0"], "capacities": v["capacities"], "aux": v["choice_aux"]}
    return {k: x for k, x in flags.items() if k in known and x is not None}


def _loggers(args: argparse.Namespace):  # noqa: ANN202
    sinks = []
    if getattr(args, "wandb", None):
        try:
            import wandb
        except ImportError:
            print("sae-hooks: --wandb given but wandb is not installed; not logging to wandb", file=sys.stderr)
        else:
            run = wandb.init(project=args.wandb, config={k: v for k, v in vars(args).items() if k != "fn"})
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
