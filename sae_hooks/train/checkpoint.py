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

from .._atomic import atomic_dir
from .._files import read_json, read_safetensors
from ..errors import SAEFormatError

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
    meta = read_json(path / STATE_FILE, f"missing: {path} is not a training checkpoint")
    if not isinstance(meta, dict) or meta.get("version") != VERSION:
        got = meta.get("version") if isinstance(meta, dict) else None
        raise SAEFormatError(f"{path}: checkpoint version {got!r} is not {VERSION}")
    return meta, read_safetensors(path / TENSORS_FILE)


def load_checkpoint(trainer: Any, path: str | os.PathLike, buffer: Any = None) -> dict[str, Any]:
    """Restore ``trainer`` (built with the same entry names) and ``buffer`` from ``path``; returns the metadata."""
    meta, tensors = read_checkpoint(path)
    trainer.load_state_dict(meta, tensors, buffer, where=str(path))
    return meta
