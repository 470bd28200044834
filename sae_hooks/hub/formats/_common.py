"""Helpers shared by the format converters: safe file readers, typed config access, the final build step.

Every reader raises :class:`~sae_hooks.errors.SAEFormatError` (or a subclass) whose message names the file and
the problem, never a bare ``KeyError``/``SafetensorError``/``UnpicklingError``.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from ..._files import MAX_JSON_BYTES, check_regular_file, read_json, read_safetensors
from ...config import SAEConfig, Site
from ...errors import ConfigError, SAEFormatError, ShapeMismatchError, UnsafeCheckpointError
from ...native import from_state_dict
from ...saes import SAE



@dataclass
class LoadOptions:
    """What the caller (or the release registry) knows that the files may not say.

    Attributes:
        device, dtype: where the weights go and what they become (``None``: the file's dtype).
        hook, hook_out: TransformerLens hook names overriding what the format infers.
        model_name: the model the SAE was trained on, overriding the format's guess.
        repo_id: the Hub repo the files came from (some formats infer the hook from its name).
        sae_id: the path of the SAE inside the repo / folder (some formats infer the layer from it).
        n_layers: number of layers, for multi-layer SAEs whose files do not say it.
        norm_scaling_factor: SAELens ``expected_average_only_in`` constant to fold into the weights.
        convention: for formats whose authors' loader and SAELens's differ (Llama Scope / lm-saes): ``"authors"``
            (default) or ``"saelens"``; any other format refuses it.
    """

    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    hook: str | None = None
    hook_out: str | None = None
    model_name: str | None = None
    repo_id: str | None = None
    sae_id: str | None = None
    n_layers: int | None = None
    norm_scaling_factor: float | None = None
    convention: str | None = None

    @property
    def map_location(self) -> str:
        return str(self.device) if self.device is not None else "cpu"


# ------------------------------------------------------------------------------------------- readers


def read_config_and_safetensors(
    folder: str | os.PathLike,
    config_name: str,
    weights_name: str,
    read_config: Callable[[dict[str, Any], str], dict[str, Any]],
    opts: LoadOptions,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """The validated config, the raw tensors (on ``opts.map_location``) and the weights file's name,
    for the formats that are one JSON config beside one safetensors file."""
    folder = Path(folder)
    config = read_config(read_json(folder / config_name), str(folder / config_name))
    weights = folder / weights_name
    return config, read_safetensors(weights, opts.map_location), str(weights)


def read_npz(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Arrays of a ``.npz`` file as tensors. Pickled object arrays are refused (``allow_pickle=False``)."""
    import numpy as np

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise SAEFormatError(f"{path}: missing weights file") from None
    except ValueError as e:  # object arrays need pickle
        if "pickle" in str(e).lower():
            raise UnsafeCheckpointError(f"{path}: the archive holds pickled objects; refusing to load ({e})") from None
        raise SAEFormatError(f"{path}: cannot read .npz archive ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise SAEFormatError(f"{path}: cannot read .npz archive (truncated or corrupt?): {e}") from None
    out = {}
    for k, a in arrays.items():
        if a.dtype.kind not in "fiub":
            raise SAEFormatError(f"{path}: array {k!r} has unsupported dtype {a.dtype}")
        out[k] = torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return out


def torch_load_weights(path: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """A pickled state dict, opened ONLY with ``torch.load(weights_only=True)``.

    Raises:
        UnsafeCheckpointError: the file needs more than tensors and plain containers to unpickle (arbitrary
            classes would run code): the message names the file and what it asked for.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise SAEFormatError(f"{path}: missing checkpoint file") from None
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            first = msg.strip().splitlines()
            detail = next((line for line in first if "Unsupported" in line or "GLOBAL" in line), first[0] if first else "")
            raise UnsafeCheckpointError(
                f"{path}: needs more than torch.load(weights_only=True) to open ({detail.strip()}); refusing to "
                "unpickle arbitrary objects. Re-save it as a plain state dict of tensors."
            ) from None
        raise SAEFormatError(f"{path}: cannot unpickle checkpoint ({msg.splitlines()[0] if msg else e})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise SAEFormatError(f"{path}: cannot read checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(obj, dict):
        raise SAEFormatError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


# ------------------------------------------------------------------------------------------- typed config access

_MISSING = object()


def get(cfg: dict[str, Any], key: str, types: type | tuple[type, ...], source: str, default: Any = _MISSING) -> Any:
    """``cfg[key]`` checked against ``types`` (bools are not ints); typed errors naming ``source`` and ``key``."""
    if key not in cfg or cfg[key] is None:
        if default is _MISSING:
            raise SAEFormatError(f"{source}: config is missing key {key!r}")
        return default
    value = cfg[key]
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        ok = False
    elif float in types and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    else:
        ok = isinstance(value, types)
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise SAEFormatError(f"{source}: config key {key!r} must be {names}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SAEFormatError(f"{source}: config key {key!r} must be finite, got {value!r}")
    return value


#: Largest size (a width, a count) read from a file: bounds allocations before they happen.
MAX_SIZE = 2**31 - 1


def positive_int(cfg: dict[str, Any], key: str, source: str, default: Any = _MISSING) -> Any:
    value = get(cfg, key, int, source, default)
    if value is not None and value is not default and not 0 < value <= MAX_SIZE:
        raise SAEFormatError(f"{source}: config key {key!r} must be a positive integer <= {MAX_SIZE}, got {value!r}")
    return value


def tensor(state: dict[str, torch.Tensor], key: str, source: str, ndim: int | None = None) -> torch.Tensor:
    if key not in state:
        raise SAEFormatError(f"{source}: missing tensor {key!r} (tensors present: {sorted(state)})")
    t = state[key]
    if not isinstance(t, torch.Tensor):
        raise SAEFormatError(f"{source}: entry {key!r} is a {type(t).__name__}, not a tensor")
    if ndim is not None and t.dim() != ndim:
        raise ShapeMismatchError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return t


def check_shape(t: torch.Tensor, shape: tuple[int, ...], key: str, source: str, why: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        raise ShapeMismatchError(
            f"{source}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}" + (f" ({why})" if why else "")
        )


def t_(x: torch.Tensor) -> torch.Tensor:
    """Transpose a 2-D tensor into a contiguous copy (the original is dropped by the caller)."""
    return x.T.contiguous()


def read_linear_pair(
    path: str | os.PathLike, keys: tuple[str, str, str, str], opts: LoadOptions, holder: str, dec_why: str,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A ``torch.save``d file that holds exactly an encoder/decoder pair in ``nn.Linear`` layout
    (``W_enc (d_sae, d_in)``, ``W_dec (d_in, d_sae)``, ``b_enc (d_sae,)``, ``b_dec (d_in,)``), under ``keys``
    (in that order); returns ``(raw tensors, {W_enc, b_enc, W_dec, b_dec} in our layout)``. Any other tensor,
    a missing one or a shape off is refused naming ``holder`` ("a Goodfire SAE") and the file."""
    src = str(path)
    raw = float_state(torch_load_weights(path, opts.map_location), src)
    extra = sorted(set(raw) - set(keys))
    if extra:
        raise SAEFormatError(f"{src}: unexpected tensors {extra} ({holder} holds {', '.join(keys)})")
    k_we, k_be, k_wd, k_bd = keys
    W_enc = tensor(raw, k_we, src, 2)
    d_sae, d_in = W_enc.shape
    W_dec = tensor(raw, k_wd, src, 2)
    check_shape(W_dec, (d_in, d_sae), k_wd, src, dec_why)
    b_enc, b_dec = tensor(raw, k_be, src, 1), tensor(raw, k_bd, src, 1)
    check_shape(b_enc, (d_sae,), k_be, src)
    check_shape(b_dec, (d_in,), k_bd, src)
    return raw, {"W_enc": t_(W_enc), "b_enc": b_enc, "W_dec": t_(W_dec), "b_dec": b_dec}


def read_feature_hooks(path: Path, default_in: str, default_out: str) -> tuple[str, str]:
    """circuit-tracer's ``config.yaml``: its block-relative ``feature_input_hook`` / ``feature_output_hook``
    (the defaults where the file or a key is absent); a typed error naming the file otherwise."""
    if not path.exists():
        return default_in, default_out
    import yaml

    st = check_regular_file(path, "missing config file")
    if st.st_size > MAX_JSON_BYTES:
        raise SAEFormatError(f"{path}: {st.st_size:,} bytes is too large for a config file (limit {MAX_JSON_BYTES:,})")
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SAEFormatError(f"{path}: cannot read ({e})") from None
    except RecursionError:
        raise SAEFormatError(f"{path}: YAML nested too deeply") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{path}: expected a mapping, got {type(cfg).__name__}")
    hin, hout = cfg.get("feature_input_hook", default_in), cfg.get("feature_output_hook", default_out)
    if not isinstance(hin, str) or not isinstance(hout, str):
        raise SAEFormatError(f"{path}: feature_input_hook / feature_output_hook must be strings")
    return hin, hout


# ------------------------------------------------------------------------------------------- sites

def make_site(hook: str | None, hook_out: str | None = None, model_name: str | None = None) -> Site:
    """A :class:`Site` with module paths filled in when :mod:`sae_hooks.sites.names` knows the model family."""
    module = module_out = None
    if model_name and hook:
        module = _module_path(hook, model_name)
        if hook_out:
            module_out = _module_path(hook_out, model_name)
    return Site(hook=hook, module=module, hook_out=hook_out if hook_out and hook_out != hook else None,
                module_out=module_out if hook_out and hook_out != hook else None)


_FAMILY_BY_NAME = (
    (re.compile(r"gpt-?2"), "gpt2"),
    (re.compile(r"pythia|neox"), "gpt_neox"),
    (re.compile(r"gemma-?[23]"), "gemma"),
    (re.compile(r"llama|mistral|qwen"), "llama"),
)


def model_family(model_name: str) -> str | None:
    """The :mod:`sae_hooks.sites.names` family of a model name (``"google/gemma-2-2b"`` -> ``"gemma"``), if known."""
    low = model_name.lower()
    return next((fam for rx, fam in _FAMILY_BY_NAME if rx.search(low)), None)


def _module_path(hook: str, model_name: str) -> str | None:
    """Module site (``"path"`` or ``"path:input"``) of ``hook`` via :mod:`sae_hooks.sites.names`; ``None`` if unknown."""
    fam = model_family(model_name)
    if fam is None:
        return None
    from ...sites import names as hooknames

    # ``lnN.hook_normalized`` keeps its TransformerLens meaning (the norm's pre-affine value): that is the tensor
    # the formats naming it trained on (SAELens and lm-saes run TransformerLens, where the hook sits before the
    # scale; circuit-tracer maps it to ``<norm>.source.self__norm_0`` in nnsight). Formats that read the norm's
    # output name ``lnN.hook_out`` / ``mlp.hook_in`` (Gemma Scope 2, sparsify, circuit-tracer's default).
    try:
        path, side = hooknames.to_module_path(hook, fam)
    except Exception:  # noqa: BLE001 - no translation for this hook: leave the module unknown
        return None
    return hooknames.join_site(path, side)


# ------------------------------------------------------------------------------------------- build


def build(
    cfg: SAEConfig,
    state: dict[str, torch.Tensor],
    source: str,
    opts: LoadOptions,
) -> SAE:
    """Check ``state`` against ``cfg`` and adopt the tensors (no second copy): :func:`native.from_state_dict`."""
    try:
        return from_state_dict(cfg, state, source=source, dtype=opts.dtype)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def file_dtype(state: dict[str, torch.Tensor], key: str) -> str:
    """Name of the dtype of ``state[key]`` (what the SAE is built in when no ``dtype`` is asked for)."""
    return str(state[key].dtype).removeprefix("torch.")


def float_state(state: dict[str, Any], source: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Only the tensor entries; floating ones cast to ``dtype`` when given (integers kept)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out
