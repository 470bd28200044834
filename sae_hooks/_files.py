"""Reading our own and foreign files with typed errors that name the file (the writers are in _atomic)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import SAEFormatError


def expect_object(raw: Any, source: str) -> dict[str, Any]:
    """``raw`` if it is a JSON object (a dict); :class:`SAEFormatError` naming ``source`` otherwise."""
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    return raw


#: A config file larger than this is refused before it is read (configs are a few kB).
MAX_JSON_BYTES = 64 * 1024 * 1024


def check_regular_file(path: Path, missing: str) -> os.stat_result:
    """``os.stat`` of ``path`` if it is a regular file (symlinks followed); a typed error otherwise.

    A FIFO, a device or a folder where a file is expected would block or fail deep inside a reader.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SAEFormatError(f"{path}: {missing}") from None
    except OSError as e:  # symlink loop, permission, name too long ...
        raise SAEFormatError(f"{path}: cannot be opened ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        raise SAEFormatError(f"{path}: is {kind}, expected a regular file")
    return st


def read_json(path: str | os.PathLike, missing: str = "missing config file") -> dict[str, Any]:
    """A JSON object from ``path``; :class:`SAEFormatError` naming the file otherwise."""
    path = Path(path)
    st = check_regular_file(path, missing)
    if st.st_size > MAX_JSON_BYTES:
        raise SAEFormatError(f"{path}: {st.st_size:,} bytes is too large for a config file (limit {MAX_JSON_BYTES:,})")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise SAEFormatError(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{path}: invalid JSON ({e})") from None
    except RecursionError:
        raise SAEFormatError(f"{path}: JSON nested too deeply") from None
    except OSError as e:
        raise SAEFormatError(f"{path}: cannot be read ({e.strerror or e})") from None
    return expect_object(data, str(path))


def read_versioned_json(
    path: str | os.PathLike, fmt: str, max_version: int | None = None, missing: str = "missing config file"
) -> dict[str, Any]:
    """A JSON object written by us, tagged ``{"format": fmt, "format_version": n}``; both keys removed.

    A file of another format, or of a newer version than ``max_version``, is refused with a message
    that says so (files from a newer sae-hooks must not be misread).
    """
    data = read_json(path, missing)
    if data.pop("format", None) != fmt:
        raise SAEFormatError(f"{path}: not a {fmt} file (missing \"format\": \"{fmt}\")")
    version = data.pop("format_version", None)
    if max_version is not None and (not isinstance(version, int) or version > max_version):
        raise SAEFormatError(
            f"{path}: format_version {version!r} is not supported (this sae-hooks reads <= {max_version}); "
            "upgrade sae-hooks"
        )
    return data


def read_safetensors(path: str | os.PathLike, device: str | torch.device | None = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, loaded straight onto ``device``."""
    path = Path(path)
    check_regular_file(path, "missing weights file")
    try:
        return load_file(str(path), device=str(device) if device is not None else "cpu")
    except FileNotFoundError:
        raise SAEFormatError(f"{path}: missing weights file") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SAEFormatError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
