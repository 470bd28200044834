"""Activation sources: where training tensors come from. The trainer only ever sees ``(N, d)`` tensors.

Every source yields *chunks*: ``dict[site, Tensor (n, d_site)]`` whose rows are the same ``n`` tokens
at every site (so a shuffling buffer can keep them aligned), and returns ``None`` when exhausted. A
source's ``state_dict()`` is its position (JSON-able ints); ``load_state_dict`` makes the next chunk
the one after that position, so a resumed run continues exactly where the checkpoint was taken.

* :class:`IteratorSource`: any iterable (or zero-argument factory of one) of ``(N, d)`` tensors or
  ``dict[site, (N, d)]`` chunks, e.g. synthetic data with known features;
* :class:`LiveSource`: a model run on token batches with hooks at several sites in ONE forward
  pass, the forward stopped once the last needed site has fired (a private exception raised from
  that hook and caught here), BOS and padding tokens filtered out. The model is a plain ``nn.Module``,
  a TransformerLens model or an nnsight model (duck-typed: nothing here imports a framework);
* :class:`DiskSource`: safetensors shards written by :func:`save_activations`, replayed in order or shuffled.

Sites are given in any spelling :mod:`sae_hooks.sites` accepts: a TransformerLens hook name
(``blocks.1.hook_resid_post``, also on a plain Hugging Face model), a module path (``transformer.h.1``)
or ``path:input``. Chunks are keyed by the sites as given.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor

from .._atomic import atomic_dir, recover
from .._files import check_regular_file, read_json
from ..errors import ConfigError, SAEFormatError, ShapeMismatchError
from ..sites import SiteHooks, site_hooks

Chunk = dict[str, Tensor]
MANIFEST = "manifest.json"


class ActivationSource(Protocol):
    sites: list[str]

    def next_chunk(self) -> Chunk | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _as_factory(data: Iterable | Callable[[], Iterable]) -> Callable[[], Iterable]:
    return data if callable(data) and not hasattr(data, "__iter__") else (lambda: data)


class _Skippable:
    """Counts items taken from a (re-creatable) iterable; after ``load_state_dict`` skips that many."""

    def __init__(self, data: Iterable | Callable[[], Iterable]):
        self._factory = _as_factory(data)
        self._it: Iterator | None = None
        self.position = 0

    def next_item(self) -> Any:
        if self._it is None:
            self._it = iter(self._factory())
            for _ in range(self.position):
                if next(self._it, None) is None:
                    break
        item = next(self._it, None)
        if item is not None:
            self.position += 1
        return item

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self._it = None


class IteratorSource:
    """Chunks from any iterable of ``(N, d)`` tensors (site ``site``) or ``dict[site, (N, d)]``.

    To resume exactly, pass a zero-argument factory (or a re-iterable such as a list): the
    checkpointed position is re-reached by skipping that many items of a fresh iterator.
    """

    def __init__(self, data: Iterable | Callable[[], Iterable], site: str = "x", sites: Sequence[str] | None = None):
        self._items = _Skippable(data)
        self.sites = list(sites) if sites is not None else [site]
        self._site = site

    def next_chunk(self) -> Chunk | None:
        item = self._items.next_item()
        if item is None:
            return None
        chunk = dict(item) if isinstance(item, dict) else {self._site: item}
        return _check_chunk(chunk, "IteratorSource item")

    def state_dict(self) -> dict[str, Any]:
        return self._items.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._items.load_state_dict(state)


def _check_chunk(chunk: Chunk, what: str) -> Chunk:
    n = None
    for site, t in chunk.items():
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ShapeMismatchError(f"{what}: site {site!r} must be a (N, d) tensor, got {getattr(t, 'shape', type(t))}")
        if n is not None and t.shape[0] != n:
            raise ShapeMismatchError(f"{what}: sites have different numbers of rows ({n} vs {t.shape[0]} at {site!r})")
        n = t.shape[0]
    return chunk


class _StopForward(Exception):
    """Raised from the last needed hook to end a forward pass early; never escapes this module."""


def token_mask(input_ids: Tensor, attention_mask: Tensor | None, bos_token_id: int | None) -> Tensor:
    """``(batch, seq)`` bool: real tokens (``attention_mask`` 1) that are not BOS (by token id)."""
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if bos_token_id is not None:
        keep = keep & (input_ids != bos_token_id)
    return keep


def _split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return batch["input_ids"], batch.get("attention_mask")
    raise TypeError(f"token batches must be (batch, seq) tensors or dicts with input_ids, got {type(batch).__name__}")


def default_forward(model: Any, input_ids: Tensor, attention_mask: Tensor | None) -> Any:
    return model(input_ids) if attention_mask is None else model(input_ids, attention_mask=attention_mask)


class ActivationReader:
    """Runs ``model`` once per token batch and returns the activations at ``sites`` (BOS/padding dropped).

    ``sites``: TransformerLens hook names, module paths or ``path:input`` (resolved through
    :func:`sae_hooks.sites.site_hooks`, or through ``hooks=``: anything with ``install(site, fn)``).
    All sites are read in ONE forward pass; with ``stop_early`` the hook that completes the set raises
    a private exception, so layers after the deepest needed site never run.
    """

    def __init__(
        self,
        model: Any,
        sites: Sequence[str],
        *,
        hooks: SiteHooks | None = None,
        bos_token_id: int | None = None,
        stop_early: bool = True,
        device: str | torch.device | None = None,
        autocast_dtype: torch.dtype | None = None,
        out_dtype: torch.dtype = torch.float32,
        out_device: str | torch.device | None = None,
        forward: Callable[[Any, Tensor, Tensor | None], Any] = default_forward,
    ):
        inner = wrapped_module(model)
        self.model = inner
        self.sites = list(sites)
        self.hooks = hooks if hooks is not None else model_site_hooks(model, self.sites)
        self.bos_token_id = bos_token_id
        self.stop_early = stop_early
        self.device = torch.device(device) if device is not None else _model_device(inner)
        self.autocast_dtype = autocast_dtype
        self.out_dtype = out_dtype
        self.out_device = out_device
        self.forward = forward

    @torch.no_grad()
    def read(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Chunk:
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        keep = token_mask(input_ids, attention_mask, self.bos_token_id)
        got: Chunk = {}

        def make(site: str) -> Callable[[Tensor], None]:
            def fn(x: Tensor) -> None:
                if site in got:
                    return None
                x = x.reshape(*x.shape[:2], -1) if x.dim() > 3 else x
                if x.shape[:2] != keep.shape:
                    raise ShapeMismatchError(f"site {site!r}: activation {tuple(x.shape)} is not (batch, seq, d) for tokens {tuple(keep.shape)}")
                out = x[keep].detach().to(dtype=self.out_dtype)
                got[site] = out.to(self.out_device) if self.out_device is not None else out
                if self.stop_early and len(got) == len(self.sites):
                    raise _StopForward
                return None

            return fn

        removers = []
        try:
            for s in self.sites:
                removers.append(self.hooks.install(s, make(s)))
            ctx = (
                torch.autocast(self.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                with contextlib.suppress(_StopForward):
                    self.forward(self.model, input_ids, attention_mask)
        finally:
            for r in removers:
                r()
        missing = [s for s in self.sites if s not in got]
        if missing:
            raise ShapeMismatchError(f"sites {missing} did not fire during the forward pass (wrong hook or module?)")
        return {s: got[s] for s in self.sites}


def wrapped_module(model: Any) -> Any:
    """The ``nn.Module`` an nnsight model (``NNsight``, ``LanguageModel``: an ``Envoy``) wraps, else ``model``.

    Found by duck typing (an object that is not an ``nn.Module`` but holds one as ``_module``), so the core
    never imports nnsight. Hooks on that module fire in every call of the nnsight model, traced or not, and
    running it directly reads the same activations without a trace (see :mod:`sae_hooks.adapters.nnsight`).
    """
    inner = getattr(model, "_module", None) if not isinstance(model, torch.nn.Module) else None
    return inner if isinstance(inner, torch.nn.Module) else model


def model_site_hooks(model: Any, sites: Sequence[str] | None = None) -> SiteHooks:
    """:func:`sae_hooks.sites.site_hooks` for any model a source runs, nnsight models included (the site layer
    of the module they wrap, or the adapter's when the nnsight adapter is attached: its ``hook_names=`` apply)."""
    inner = wrapped_module(model)
    attached = inner is not model and "sae_manager" in getattr(model, "__dict__", {})
    return site_hooks(model if attached else inner, sites)


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


class LiveSource:
    """Activations read from a live model, one forward pass per token batch (see :class:`ActivationReader`).

    Args:
        model: a plain ``nn.Module`` (a Hugging Face model), a TransformerLens model (4.x ``TransformerBridge``,
            2.x/3.x ``HookedTransformer``), an nnsight ``NNsight`` / ``LanguageModel`` (run without a trace:
            hooks on the module it wraps), a model given the SAE API by an adapter, or pass ``hooks``
            (anything with ``install(site, fn)``).
        sites: where to read: TransformerLens hook names, module paths or ``path:input``.
        batches: iterable (or factory) of token batches: ``(batch, seq)`` tensors or dicts with
            ``input_ids`` and optionally ``attention_mask``. For exact resumption pass something
            re-iterable (a list, a factory): the position is re-reached by skipping batches
            without running the model.
        bos_token_id: tokens with this id are dropped (BOS/attention-sink activations are outliers).
    """

    def __init__(self, model: Any, sites: Sequence[str], batches: Iterable | Callable[[], Iterable], **reader_kwargs: Any):
        self.reader = ActivationReader(model, sites, **reader_kwargs)
        self.sites = self.reader.sites
        self._batches = _Skippable(batches)
        self.forward_passes = 0

    def next_chunk(self) -> Chunk | None:
        batch = self._batches.next_item()
        if batch is None:
            return None
        ids, mask = _split_batch(batch)
        self.forward_passes += 1
        return self.reader.read(ids, mask)

    def state_dict(self) -> dict[str, Any]:
        return self._batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batches.load_state_dict(state)


# Disk ---------------------------------------------------------------------------------------------


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def save_activations(
    model: Any,
    sites: Sequence[str],
    batches: Iterable,
    out_dir: str | os.PathLike,
    *,
    shard_tokens: int = 2**16,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
    **reader_kwargs: Any,
) -> Path:
    """Run ``model`` over token ``batches`` and write the activations at ``sites`` as safetensors shards.

    ``out_dir`` gets ``shard_00000.safetensors``, ... (one tensor per site, named by the site, rows
    aligned across sites, ``shard_tokens`` rows each except the last) and ``manifest.json``. The
    folder appears atomically when writing finishes. (The CLI: ``sae-hooks save-activations``.) Returns ``out_dir``.
    """
    if not isinstance(shard_tokens, int) or isinstance(shard_tokens, bool) or shard_tokens <= 0:
        raise ConfigError(f"capture: shard_tokens must be a positive integer, got {shard_tokens!r}")
    reader = ActivationReader(model, sites, out_dtype=dtype, out_device="cpu", **reader_kwargs)
    out_dir = Path(out_dir)
    shards: list[dict[str, Any]] = []
    widths: dict[str, int] = {}
    pending: list[Chunk] = []
    n_pending = 0

    def flush(tmp: Path, final: bool) -> None:
        nonlocal pending, n_pending
        while n_pending >= shard_tokens or (final and n_pending):
            cat = {s: torch.cat([c[s] for c in pending]) for s in reader.sites}
            take = min(shard_tokens, n_pending)
            shard = {s: t[:take].contiguous() for s, t in cat.items()}
            rest = {s: t[take:] for s, t in cat.items()}
            name = _shard_name(len(shards))
            (tmp / name).write_bytes(st_save(shard))
            shards.append({"file": name, "tokens": take})
            pending, n_pending = ([rest] if rest[reader.sites[0]].shape[0] else []), n_pending - take

    with atomic_dir(out_dir) as tmp:
        for batch in batches:
            ids, mask = _split_batch(batch)
            chunk = reader.read(ids, mask)
            for s, t in chunk.items():
                widths[s] = t.shape[-1]
            pending.append(chunk)
            n_pending += chunk[reader.sites[0]].shape[0]
            if progress is not None:
                progress(chunk[reader.sites[0]].shape[0])
            flush(tmp, final=False)
        flush(tmp, final=True)
        if not shards:
            raise ConfigError(f"capture: no activations to write to {out_dir} (no token batches, or every token filtered out)")
        manifest = {
            "format": "sae_hooks.activations",
            "version": 1,
            "sites": reader.sites,
            "widths": widths,
            "dtype": str(dtype).removeprefix("torch."),
            "shards": shards,
            "tokens": sum(s["tokens"] for s in shards),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out_dir


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a folder written by :func:`save_activations`, every field checked (types, counts, sums)."""
    recover(path)
    file = Path(path) / MANIFEST
    manifest = read_json(file, f"no {MANIFEST}; not an activation folder written by save_activations()")
    if manifest.get("format") != "sae_hooks.activations":
        raise SAEFormatError(f"{file}: not a sae_hooks activation manifest")

    def bad(what: str) -> SAEFormatError:
        return SAEFormatError(f"{file}: {what}")

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    sites, widths, shards = manifest.get("sites"), manifest.get("widths"), manifest.get("shards")
    if not isinstance(sites, list) or not sites or not all(isinstance(s, str) for s in sites) or len(set(sites)) != len(sites):
        raise bad(f"'sites' must be a non-empty list of distinct names, got {sites!r}")
    if not isinstance(widths, dict) or sorted(widths) != sorted(sites):
        raise bad(f"'widths' must give a width for every site {sites}, got {widths!r}")
    if not all(count(w) and w > 0 for w in widths.values()):
        raise bad(f"'widths' must be positive integers, got {widths!r}")
    if manifest.get("dtype") not in _DISK_DTYPES:
        raise bad(f"'dtype' must be one of {sorted(_DISK_DTYPES)}, got {manifest.get('dtype')!r}")
    if not isinstance(shards, list):
        raise bad(f"'shards' must be a list, got {type(shards).__name__}")
    names = set()
    for i, sh in enumerate(shards):
        if not isinstance(sh, dict) or not isinstance(sh.get("file"), str) or not count(sh.get("tokens")):
            raise bad(f"shard #{i} must be {{'file': name, 'tokens': count >= 0}}, got {sh!r}")
        name = sh["file"]
        if "/" in name or "\\" in name or name in ("", ".", "..") or name in names:
            raise bad(f"shard #{i} has an invalid or repeated file name {name!r}")
        names.add(name)
    total = sum(sh["tokens"] for sh in shards)
    if manifest.get("tokens") != total:
        raise bad(f"'tokens' is {manifest.get('tokens')!r} but the shards hold {total} tokens")
    return manifest


_DISK_DTYPES = {"float32", "float16", "bfloat16", "float64"}


def _check_shards(path: Path, manifest: dict[str, Any], sites: Sequence[str]) -> None:
    """Every shard exists and holds ``(tokens, width)`` floating tensors for ``sites`` (headers only)."""
    for sh in manifest["shards"]:
        file = path / sh["file"]
        check_regular_file(file, "shard listed in the manifest is missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = set(f.keys())
                for s in sites:
                    if s not in keys:
                        raise SAEFormatError(f"{file}: no tensor for site {s!r} (has {sorted(keys)})")
                    sl = f.get_slice(s)
                    shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                    want = (sh["tokens"], manifest["widths"][s])
                    if shape != want:
                        raise SAEFormatError(
                            f"{file}: tensor {s!r} has shape {shape}, the manifest says {want} (tokens, width)"
                        )
                    if dtype not in ("F32", "F16", "BF16", "F64"):
                        raise SAEFormatError(f"{file}: tensor {s!r} has dtype {dtype}; activations must be floating point")
        except SAEFormatError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers
            raise SAEFormatError(f"{file}: cannot read shard (truncated or corrupt?): {e}") from None


class DiskSource:
    """Replays shards written by :func:`save_activations`, in order, or shuffled (shard order and rows within a
    shard, from ``seed``) when ``shuffle=True``. One chunk per ``chunk_tokens`` rows of a shard
    (default: the whole shard). ``epochs`` passes over the data (each reshuffled)."""

    def __init__(
        self,
        path: str | os.PathLike,
        sites: Sequence[str] | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        chunk_tokens: int | None = None,
        epochs: int = 1,
    ):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        available = self.manifest["sites"]
        self.sites = list(sites) if sites is not None else list(available)
        unknown = [s for s in self.sites if s not in available]
        if unknown:
            raise SAEFormatError(f"{self.path}: no activations for sites {unknown}; the folder has {available}")
        _check_shards(self.path, self.manifest, self.sites)
        for name, value in (("epochs", epochs), ("chunk_tokens", chunk_tokens)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"DiskSource: {name} must be a positive integer, got {value!r}")
        self.shuffle, self.seed, self.epochs = shuffle, seed, epochs
        self.chunk_tokens = chunk_tokens
        self.position = 0
        self._plan = self._make_plan()
        self._cache: tuple[int, int, Chunk] | None = None

    def _make_plan(self) -> list[tuple[int, int, int, int]]:
        """``(epoch, shard, start, stop)`` per chunk."""
        plan = []
        shards = self.manifest["shards"]
        for epoch in range(self.epochs):
            order = list(range(len(shards)))
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(len(shards), generator=g).tolist()
            for i in order:
                n = shards[i]["tokens"]
                step = self.chunk_tokens or n
                plan += [(epoch, i, a, min(a + step, n)) for a in range(0, n, step)]
        return plan

    def _load(self, epoch: int, shard: int) -> Chunk:
        if self._cache is not None and self._cache[:2] == (epoch, shard):
            return self._cache[2]
        file = self.path / self.manifest["shards"][shard]["file"]
        try:
            with safe_open(str(file), framework="pt") as f:
                data = {s: f.get_tensor(s) for s in self.sites}
        except FileNotFoundError:
            raise SAEFormatError(f"{file}: shard listed in the manifest is missing") from None
        except Exception as e:  # noqa: BLE001 - changed or truncated since the header check
            raise SAEFormatError(f"{file}: cannot read shard (truncated or corrupt?): {e}") from None
        want = (self.manifest["shards"][shard]["tokens"],)
        for s, t in data.items():
            if tuple(t.shape) != (*want, self.manifest["widths"][s]):
                raise SAEFormatError(f"{file}: tensor {s!r} has shape {tuple(t.shape)}, the manifest says "
                                     f"{(*want, self.manifest['widths'][s])}")
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 65_537 + shard)
            perm = torch.randperm(data[self.sites[0]].shape[0], generator=g)
            data = {s: t[perm] for s, t in data.items()}
        self._cache = (epoch, shard, data)
        return data

    def next_chunk(self) -> Chunk | None:
        if self.position >= len(self._plan):
            return None
        epoch, shard, a, b = self._plan[self.position]
        self.position += 1
        data = self._load(epoch, shard)
        return {s: t[a:b] for s, t in data.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


# Token batches ------------------------------------------------------------------------------------


def pack_texts(
    tokenizer: Any,
    texts: Iterable[str],
    seq_len: int,
    batch_size: int,
    bos_token_id: int,
    drop_last: bool = True,
) -> list[Tensor]:
    """Tokenise ``texts`` (no special tokens), concatenate them each preceded by BOS, and cut the stream
    into rows of ``seq_len`` tokens that each start with BOS; return ``(batch_size, seq_len)`` batches."""
    stream: list[int] = []
    for text in texts:
        stream.append(bos_token_id)
        # verbose=False: a document longer than the model's context is expected here (it is cut into rows
        # below), so the tokenizer's "longer than the specified maximum sequence length" warning is noise.
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    body = seq_len - 1
    rows = [[bos_token_id, *stream[i : i + body]] for i in range(0, len(stream) - body + 1, body)]
    batches = [torch.tensor(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    if drop_last and batches and batches[-1].shape[0] < batch_size:
        batches.pop()
    return batches
