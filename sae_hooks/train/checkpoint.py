"""Resumable training checkpoints, written atomically (a crash mid-save leaves the previous one).

A checkpoint folder holds ``trainer.json`` (counters, every entry's settings, objective state and
optimiser hyper-parameters, the source position) and ``tensors.safetensors`` (weights, optimiser moments
and step counts, dead-latent counters, first batches held for the statistics, the shuffle buffer's rows
and generator, the global RNG states). Nothing is pickled. What goes in is the trainer's
``state_dict(buffer)`` (:meth:`~.trainer.Trainer.state_dict`), so every objective (SAE, transcoder,
MLSAE, Jacobian pair) checkpoints the same way. Resuming (:func:`load_checkpoint` on a freshly built
trainer with the same entry names, and the same source recreated) continues the run exactly: on CPU,
the weights after resuming equal the uninterrupted run's bit for bit.

This module only reads and writes files: it does not import the trainer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

import torch

from .._atomic import atomic_dir, recover
from .._files import read_json, read_safetensors
from ..errors import ConfigError, SAEFormatError, SAEHooksError

STATE_FILE = "trainer.json"
TENSORS_FILE = "tensors.safetensors"
VERSION = 2


def save_checkpoint(trainer: Any, path: str | os.PathLike, buffer: Any = None) -> Path:
    """Write a checkpoint of ``trainer`` (and ``buffer``'s position and rows) to the folder ``path``."""
    path = Path(path)
    meta, tensors = trainer.state_dict(buffer)
    meta = {"version": VERSION, **meta}
    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, tensors)`` of a checkpoint folder (typed errors for a missing or foreign folder)."""
    path = Path(path)
    recover(path)  # a writer killed mid-swap: finish its swap first
    meta = read_json(path / STATE_FILE, f"missing: {path} is not a training checkpoint")
    if not isinstance(meta, dict) or meta.get("version") != VERSION:
        got = meta.get("version") if isinstance(meta, dict) else None
        raise SAEFormatError(f"{path}: checkpoint version {got!r} is not {VERSION}")
    return meta, read_safetensors(path / TENSORS_FILE)


def load_checkpoint(trainer: Any, path: str | os.PathLike, buffer: Any = None) -> dict[str, Any]:
    """Restore ``trainer`` (built with the same entry names) and ``buffer`` from ``path``; returns the metadata."""
    meta, tensors = read_checkpoint(path)
    validate_checkpoint(trainer, meta, tensors, Path(path))
    try:
        trainer.load_state_dict(meta, tensors, buffer, where=str(path))
    except SAEHooksError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:  # what validation cannot foresee
        raise SAEFormatError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from None
    return meta


def validate_checkpoint(trainer: Any, meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a checkpoint whose structure, tensors or shapes disagree with ``trainer``, before it is touched.

    Checked: the counters and RNG state; per entry, every key of its metadata, every weight of its model
    (present, floating point, the trainer's shape, finite), its dead-latent counter and its optimiser
    state (indices of real parameters, the parameters' shapes, the same keys for every parameter).
    """
    state_file, tensor_file = path / STATE_FILE, path / TENSORS_FILE

    def need(obj: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise SAEFormatError(f"{state_file}: {where} lacks key {key!r}")
        value = obj[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise SAEFormatError(f"{state_file}: {where}[{key!r}] is {type(value).__name__} {value!r}")
        return value

    for key in ("step", "tokens_seen"):
        if need(meta, key, int, "the checkpoint") < 0:
            raise SAEFormatError(f"{state_file}: {key} is negative ({meta[key]})")
    rnd = need(meta, "python_random", list, "the checkpoint")
    if len(rnd) != 3 or not isinstance(rnd[1], list):
        raise SAEFormatError(f"{state_file}: python_random is not a saved random state")
    entries = need(meta, "entries", dict, "the checkpoint")
    names = sorted(e.name for e in trainer.entries)
    if sorted(entries) != names:
        raise ConfigError(f"{path}: checkpoint has entries {sorted(entries)}, the trainer has {names}")
    rng = tensors.get("rng.torch")
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise SAEFormatError(f"{tensor_file}: missing or malformed tensor 'rng.torch'")
    for e in trainer.entries:
        em = need(entries, e.name, dict, "entries")
        where = f"entry {e.name!r}"
        for key, typ in (("sites", list), ("kind", str), ("settings", dict), ("state", dict), ("objective", dict),
                         ("optimizer", dict)):
            need(em, key, typ, where)
        if list(em["sites"]) != list(e.sites) or em["kind"] != e.objective.kind:  # as the trainer words it
            two = getattr(e, "site_out", None) is not None or len(em["sites"]) == 2 and em["kind"] == "sae"
            roles = "site, site_out" if two else "sites"
            raise ConfigError(
                f"{path}: {where} was a {em['kind']} trained at ({roles}) {em['sites']}, not a "
                f"{e.objective.kind} at {list(e.sites)}"
            )
        pre = f"entry.{e.name}."
        module = e.objective.module
        for name, param in module.state_dict().items():
            key = f"{pre}model.{name}"
            t = tensors.get(key)
            if t is None:
                raise SAEFormatError(f"{tensor_file}: missing tensor {key!r}")
            if tuple(t.shape) != tuple(param.shape) or t.is_floating_point() != param.is_floating_point():
                raise SAEFormatError(
                    f"{tensor_file}: tensor {key!r} is {t.dtype} {tuple(t.shape)}; {where} needs "
                    f"{param.dtype} {tuple(param.shape)} (the checkpoint disagrees with the trainer's configuration)"
                )
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise SAEFormatError(f"{tensor_file}: tensor {key!r} holds NaN/inf values")
        extra = [k for k in tensors if k.startswith(pre + "model.") and k[len(pre) + 6:] not in module.state_dict()]
        if extra:
            raise SAEFormatError(f"{tensor_file}: unexpected tensors {extra} for {where}")
        dead = tensors.get(pre + "dead")
        if dead is None or tuple(dead.shape) != tuple(e.tokens_since_fired.shape):
            raise SAEFormatError(
                f"{tensor_file}: missing or misshapen tensor '{pre}dead' (want {tuple(e.tokens_since_fired.shape)})"
            )
        opt = em["optimizer"]
        for key, typ in (("param_groups", list), ("scalars", dict), ("indices", list)):
            need(opt, key, typ, f"{where} optimizer")
        params = [p for g in e.optimizer.param_groups for p in g["params"]]
        per_index: dict[str, set[str]] = {}
        for k in tensors:
            if k.startswith(pre + "opt."):
                idx_s, _, sub = k[len(pre) + 4:].partition(".")
                per_index.setdefault(idx_s, set()).add(sub)
        indices = opt["indices"]
        if (not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(params) for i in indices)
                or sorted(per_index) != sorted(str(i) for i in indices)
                or len({frozenset(v) for v in per_index.values()}) > 1):
            raise SAEFormatError(
                f"{tensor_file}: optimizer state of {where} is inconsistent (indices {indices!r} for "
                f"{len(params)} parameters; tensors for {sorted(per_index)}, each with the same keys)"
            )
        for i in indices:
            for moment in ("exp_avg", "exp_avg_sq"):
                t = tensors.get(f"{pre}opt.{i}.{moment}")
                if t is not None and tuple(t.shape) != tuple(params[i].shape):
                    raise SAEFormatError(
                        f"{tensor_file}: optimizer tensor '{pre}opt.{i}.{moment}' has shape {tuple(t.shape)}, its "
                        f"parameter {tuple(params[i].shape)}"
                    )
