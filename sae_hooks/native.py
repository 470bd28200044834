"""The native format: one folder per SAE with ``cfg.json`` and ``sae.safetensors``. Nothing is pickled."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ._atomic import atomic_dir, recover
from ._files import read_safetensors, read_versioned_json
from .config import FORMAT_VERSION, SAEConfig, parse_dtype
from .errors import ConfigError, SAEFormatError, ShapeMismatchError
from .saes import SAE, build_sae
from .saes import base as _saes_base

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
FORMAT_NAME = "sae_hooks"


def write_folder(sae: SAE, folder: str | os.PathLike) -> None:
    """Write ``cfg.json`` and ``sae.safetensors`` into an existing (temporary) folder, not atomically:
    callers wrap it in :func:`~sae_hooks._atomic.atomic_dir` / ``atomic_dirs``."""
    folder = Path(folder)
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **sae.cfg.to_dict()}
    tensors = {name: t.detach().contiguous().cpu() for name, t in sae.state_dict().items()}
    (folder / CONFIG_FILE).write_text(json.dumps(header, indent=2, sort_keys=False) + "\n")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})


def save(sae: SAE, path: str | os.PathLike) -> Path:
    """Write ``sae`` to the folder ``path`` atomically (the old folder survives a failed or killed save)."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_folder(sae, tmp)
    return path


def read_config(path: str | os.PathLike) -> SAEConfig:
    """The config of a native folder. The format is ours, so every key is required (a lost key must not
    silently become a default) and typed."""
    recover(path)
    cfg_path = Path(path) / CONFIG_FILE
    data = read_versioned_json(cfg_path, FORMAT_NAME, FORMAT_VERSION, f"no {CONFIG_FILE}; not a native sae-hooks folder")
    missing = [f.name for f in dataclasses.fields(SAEConfig) if f.name not in data]
    if missing:
        raise ConfigError(f"{cfg_path}: missing key(s) {missing} (every key of a native cfg.json is required)")
    try:
        return SAEConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{cfg_path}: {e}") from None


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> SAE:
    """Load a native SAE folder onto ``device`` (tensors go there directly), optionally cast to ``dtype``."""
    path = Path(path)
    cfg = read_config(path)
    weights = path / WEIGHTS_FILE
    return from_state_dict(cfg, read_safetensors(weights, device), source=str(weights), dtype=dtype)


def from_state_dict(
    cfg: SAEConfig,
    state: dict[str, torch.Tensor],
    source: str = "<state dict>",
    dtype: str | torch.dtype | None = None,
) -> SAE:
    """Build an SAE from a canonical state dict, checking every key and shape against ``cfg``.

    The tensors are adopted without a second full copy (``load_state_dict(assign=True)``).
    """
    if dtype is not None:
        cfg = cfg.replace(dtype=str(parse_dtype(dtype)).removeprefix("torch."))
    with torch.device("meta"):
        sae = build_sae(cfg)
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SAEFormatError(
            f"{source}: tensors do not match architecture {cfg.architecture!r}: "
            f"missing {missing}, unexpected {unexpected}"
        )
    for name, shape in expected.items():
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise SAEFormatError(f"{source}: {name!r} is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise SAEFormatError(f"{source}: tensor {name!r} has dtype {t.dtype}; SAE weights must be floating point")
        if tuple(t.shape) != shape:
            raise ShapeMismatchError(
                f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                f"but the config (d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.output_dim}) implies {shape}"
            )
    for name in expected:
        t = state[name]
        if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise SAEFormatError(f"{source}: tensor {name!r} holds {n_bad} NaN/inf value(s); refusing corrupt weights")
    target = cfg.torch_dtype
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    sae.load_state_dict(state, assign=True)
    return sae


# SAE.save / SAE.load use this module without the SAE layer importing it (no saes <-> native cycle).
_saes_base.NATIVE_IO.update(save=save, load=load)
