"""Resumable training checkpoints, written atomically (a crash mid-save leaves the previous one).

A checkpoint folder holds ``trainer.json`` (counters, settings, SAE configs, optimiser hyper-parameters,
the source position) and ``tensors.safetensors`` (SAE weights, Adam moments and step counts,
dead-latent counters, the shuffle buffer's rows and generator, the global RNG states). Nothing is
pickled. Resuming (:func:`load_checkpoint` on a freshly built trainer with the same entry names, and
the same source recreated) continues the run exactly: on CPU, the weights after resuming equal the
uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .._atomic import atomic_dir, recover
from .._files import read_json, read_safetensors
from ..config import SAEConfig
from ..errors import ConfigError, SAEFormatError, SAEHooksError
from .trainer import EntryState, Trainer, TrainSettings

STATE_FILE = "trainer.json"
TENSORS_FILE = "tensors.safetensors"
VERSION = 1


def _optimizer_split(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return {"param_groups": groups, "scalars": scalars, "indices": sorted(sd["state"])}, tensors


def _optimizer_join(meta: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str, device: torch.device) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for idx in meta["indices"]:
        entry: dict[str, Any] = dict(meta["scalars"].get(str(idx), {}))
        pre = f"{prefix}.{idx}."
        for name, t in tensors.items():
            if name.startswith(pre):
                key = name[len(pre):]
                entry[key] = t if key == "step" else t.to(device)
        state[int(idx)] = entry
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(trainer: Trainer, path: str | os.PathLike, buffer: Any = None) -> Path:
    """Write a checkpoint of ``trainer`` (and ``buffer``'s position and rows) to the folder ``path``."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    entries = {}
    for e in trainer.entries:
        for k, v in e.sae.state_dict().items():
            tensors[f"sae.{e.name}.{k}"] = v.detach().contiguous().cpu()
        opt_meta, opt_tensors = _optimizer_split(e.optimizer, f"opt.{e.name}")
        tensors.update(opt_tensors)
        tensors[f"dead.{e.name}"] = e.tokens_since_fired.cpu()
        entries[e.name] = {
            "site": e.site,
            "site_out": e.site_out,
            "settings": e.settings.to_dict(),
            "state": vars(e.state),
            "sae_cfg": e.sae.cfg.to_dict(),
            "optimizer": opt_meta,
        }
    meta: dict[str, Any] = {
        "version": VERSION,
        "step": trainer.step_count,
        "tokens_seen": trainer.tokens_seen,
        "entries": entries,
        "python_random": _jsonable_random_state(),
    }
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    if buffer is not None:
        buf_meta, buf_tensors = buffer.state_dict()
        meta["buffer"] = buf_meta
        tensors.update({f"buffer.{k}": v for k, v in buf_tensors.items()})
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return path


def load_checkpoint(trainer: Trainer, path: str | os.PathLike, buffer: Any = None) -> dict[str, Any]:
    """Restore ``trainer`` (built with the same entry names) and ``buffer`` from ``path``; returns the metadata."""
    path = Path(path)
    recover(path)
    meta = read_json(path / STATE_FILE, f"missing: {path} is not a training checkpoint")
    tensors = read_safetensors(path / TENSORS_FILE)
    if meta.get("version") != VERSION:
        raise SAEFormatError(f"{path}: checkpoint version {meta.get('version')!r} is not {VERSION}")
    _validate(trainer, meta, tensors, path)
    try:
        return _restore(trainer, meta, tensors, path, buffer)
    except SAEHooksError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:  # what _validate cannot foresee
        raise SAEFormatError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from None


def _validate(trainer: Trainer, meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a checkpoint whose structure, tensors or configs disagree, before the trainer is touched."""
    def need(obj: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise SAEFormatError(f"{path / STATE_FILE}: {where} lacks key {key!r}")
        value = obj[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise SAEFormatError(f"{path / STATE_FILE}: {where}[{key!r}] is {type(value).__name__} {value!r}")
        return value

    for key in ("step", "tokens_seen"):
        if need(meta, key, int, "the checkpoint") < 0:
            raise SAEFormatError(f"{path / STATE_FILE}: {key} is negative ({meta[key]})")
    rnd = need(meta, "python_random", list, "the checkpoint")
    if len(rnd) != 3 or not isinstance(rnd[1], list):
        raise SAEFormatError(f"{path / STATE_FILE}: python_random is not a saved random state")
    entries = need(meta, "entries", dict, "the checkpoint")
    names = sorted(e.name for e in trainer.entries)
    if sorted(entries) != names:
        raise ConfigError(f"{path}: checkpoint has entries {sorted(entries)}, the trainer has {names}")
    rng = tensors.get("rng.torch")
    if rng is None or rng.dtype != torch.uint8:
        raise SAEFormatError(f"{path / TENSORS_FILE}: missing or malformed tensor 'rng.torch'")
    for e in trainer.entries:
        em = need(entries, e.name, dict, "entries")
        for key, typ in (("settings", dict), ("state", dict), ("sae_cfg", dict), ("optimizer", dict)):
            need(em, key, typ, f"entry {e.name!r}")
        try:
            cfg = SAEConfig.from_dict(em["sae_cfg"])
        except ConfigError as err:
            raise ConfigError(f"{path / STATE_FILE}: entry {e.name!r}: {err}") from None
        for field in ("architecture", "d_in", "d_sae", "d_out"):
            if getattr(cfg, field) != getattr(e.sae.cfg, field):
                raise ConfigError(
                    f"{path}: entry {e.name!r} was saved with {field}={getattr(cfg, field)!r}, "
                    f"the trainer's SAE has {field}={getattr(e.sae.cfg, field)!r}"
                )
        prefix = f"sae.{e.name}."
        for name, param in e.sae.state_dict().items():
            t = tensors.get(prefix + name)
            if t is None:
                raise SAEFormatError(f"{path / TENSORS_FILE}: missing tensor {prefix + name!r}")
            if tuple(t.shape) != tuple(param.shape) or not t.is_floating_point():
                raise SAEFormatError(
                    f"{path / TENSORS_FILE}: tensor {prefix + name!r} is {t.dtype} {tuple(t.shape)}, "
                    f"the config implies a float tensor of shape {tuple(param.shape)}"
                )
            if not bool(torch.isfinite(t).all()):
                raise SAEFormatError(f"{path / TENSORS_FILE}: tensor {prefix + name!r} holds NaN/inf values")
        extra = [k for k in tensors if k.startswith(prefix) and k[len(prefix):] not in e.sae.state_dict()]
        if extra:
            raise SAEFormatError(f"{path / TENSORS_FILE}: unexpected tensors {extra} for entry {e.name!r}")
        dead = tensors.get(f"dead.{e.name}")
        if dead is None or tuple(dead.shape) != (e.sae.cfg.d_sae,):
            raise SAEFormatError(f"{path / TENSORS_FILE}: missing or misshapen tensor 'dead.{e.name}' (want ({e.sae.cfg.d_sae},))")
        opt = em["optimizer"]
        for key, typ in (("param_groups", list), ("scalars", dict), ("indices", list)):
            need(opt, key, typ, f"entry {e.name!r} optimizer")
        params = [p for g in e.optimizer.param_groups for p in g["params"]]
        pre = f"opt.{e.name}."
        per_index: dict[str, set[str]] = {}
        for k in tensors:
            if k.startswith(pre):
                idx_s, _, key = k[len(pre):].partition(".")
                per_index.setdefault(idx_s, set()).add(key)
        if sorted(per_index) != sorted(str(i) for i in opt["indices"]) or len({frozenset(v) for v in per_index.values()}) > 1:
            raise SAEFormatError(
                f"{path / TENSORS_FILE}: optimizer state of entry {e.name!r} is incomplete "
                f"(tensors for parameters {sorted(per_index)}, expected {sorted(opt['indices'])}, each with the same keys)"
            )
        for idx in opt["indices"]:
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(params):
                raise SAEFormatError(f"{path / STATE_FILE}: entry {e.name!r}: optimizer index {idx!r} is not a parameter")
            for moment in ("exp_avg", "exp_avg_sq"):
                t = tensors.get(f"opt.{e.name}.{idx}.{moment}")
                if t is not None and tuple(t.shape) != tuple(params[idx].shape):
                    raise SAEFormatError(
                        f"{path / TENSORS_FILE}: optimizer tensor 'opt.{e.name}.{idx}.{moment}' has shape "
                        f"{tuple(t.shape)}, its parameter {tuple(params[idx].shape)}"
                    )


def _restore(trainer: Trainer, meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path, buffer: Any) -> dict[str, Any]:
    for e in trainer.entries:
        em = meta["entries"][e.name]
        if em["site"] != e.site:
            raise ConfigError(f"{path}: entry {e.name!r} was trained at {em['site']!r}, not {e.site!r}")
        if em.get("site_out") != e.site_out:
            raise ConfigError(f"{path}: entry {e.name!r} was trained with site_out {em.get('site_out')!r}, not {e.site_out!r}")
        e.settings = TrainSettings.from_dict(em["settings"])
        e.state = EntryState(**em["state"])
        e.sae.cfg = SAEConfig.from_dict(em["sae_cfg"])
        prefix = f"sae.{e.name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        e.sae.load_state_dict(state)
        e.optimizer.load_state_dict(_optimizer_join(em["optimizer"], tensors, f"opt.{e.name}", e.sae.device))
        e.tokens_since_fired = tensors[f"dead.{e.name}"].to(e.sae.device)
    trainer.step_count = int(meta["step"])
    trainer.tokens_seen = int(meta["tokens_seen"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    _restore_random_state(meta["python_random"])
    if buffer is not None:
        if "buffer" not in meta:
            raise ConfigError(f"{path}: the checkpoint has no buffer state")
        buf = {k[len("buffer."):]: v for k, v in tensors.items() if k.startswith("buffer.")}
        buffer.load_state_dict(meta["buffer"], buf)
    return meta


def _jsonable_random_state() -> list[Any]:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _restore_random_state(data: list[Any]) -> None:
    version, state, gauss = data
    random.setstate((version, tuple(state), gauss))
