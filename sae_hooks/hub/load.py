"""``sae_hooks.load`` / ``load_many``: one entry point for local folders, Hub repos and registered releases.

Resolution of ``repo_or_path``:

1. an existing local file or folder;
2. a release name from :mod:`sae_hooks.hub.releases` (repo, format, model and hooks come from the registry);
3. a Hub repo id ``"namespace/name"`` (through :mod:`sae_hooks.hub.remote`: cache, revisions, offline mode).

Inside it, ``sae_id`` is the path of one SAE (a folder, or a ``.pt`` file for OpenAI's format); ``None`` means the
root. The format is detected from the file names (:mod:`sae_hooks.hub.detect`) unless ``format=`` says it, and only
the files the format reads are downloaded. Tensors are loaded straight onto ``device`` (safetensors
``load_file(device=...)``) and adopted by the module without a second copy (``load_state_dict(assign=True)``).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError, SAEFormatError, SAEHooksError, close_matches
from ..saes import SAE
from . import releases as _releases
from .detect import detect_format, is_sae_folder
from .formats import LoadOptions
from .formats.openai import detect as _openai_detect
from .releases import SAEIdNotFoundError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CONFIG_NAMES = ("cfg.json", "config.json", "hyperparams.json")
_CONVENTION_FORMATS = {"llama_scope", "lm_saes"}
_FILE_FORMATS = {"openai", "circuit_tracer", "connor_rob_hook_z", "qwen_scope", "goodfire"}  # the sae_id names a file, not a folder
_ct_file = re.compile(r"^layer_\d+\.safetensors$")
_goodfire_pth = re.compile(r"^.+-SAE-l\d+\.pth$")  # Goodfire's .pth files are SAEs too


class UnknownSourceError(SAEHooksError, FileNotFoundError):
    """``repo_or_path`` is neither a local path, a registered release, nor a Hub repo id."""


# ---------------------------------------------------------------------------------------------- sources


class _Source:
    """Files of a local folder or a Hub repo: list them, read a small JSON, fetch a set of them."""

    where: str
    repo_id: str | None = None

    def list(self) -> list[str]:
        raise NotImplementedError

    def listing_note(self) -> str:
        """Why the listing may be incomplete (offline: only cached files are listed)."""
        return ""

    def peek(self, rel: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def fetch(self, rels: list[str]) -> Path:
        """Make ``rels`` available locally; return the folder they are relative to."""
        raise NotImplementedError


class _LocalSource(_Source):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)

    def list(self) -> list[str]:
        out = []
        for dirpath, dirnames, files in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(self.root)
            out += [(rel / f).as_posix() for f in files if not f.startswith(".")]
        return sorted(out)

    def peek(self, rel: str) -> dict[str, Any] | None:
        from .._files import check_regular_file

        check_regular_file(self.root / rel, "missing")  # a FIFO would block the read forever
        try:
            data = json.loads((self.root / rel).read_text())
        except (OSError, ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    def fetch(self, rels: list[str]) -> Path:
        return self.root


class _HubSource(_Source):
    def __init__(self, repo_id: str, revision: str | None, token: Any, cache_dir: Any, local_files_only: bool | None):
        self.repo_id = repo_id
        self.revision = revision
        self.token = token
        self.cache_dir = cache_dir
        self.local_files_only = local_files_only
        self.where = f"{repo_id}@{revision or 'main'}"
        self._files: list[str] | None = None

    def _remote(self):  # noqa: ANN202 - the module
        from . import remote

        return remote

    def list(self) -> list[str]:
        if self._files is None:
            self._files = self._remote().list_files(
                self.repo_id, revision=self.revision, token=self.token, cache_dir=self.cache_dir,
                local_files_only=self.local_files_only,
            )
        return self._files

    def listing_note(self) -> str:
        offline = self.local_files_only if self.local_files_only is not None else self._remote().is_offline()
        return (" (offline mode: only files already in the local cache are listed; go online once to download "
                "this SAE)") if offline else ""

    def _download(self, rels: list[str]) -> dict[str, Path]:
        got = self._remote().download_files(
            self.repo_id, rels, revision=self.revision, token=self.token, cache_dir=self.cache_dir,
            local_files_only=self.local_files_only,
        )
        # Pin every later download to the commit this one came from (snapshots/<sha>/...).
        for path in got.values():
            parts = Path(path).parts
            if "snapshots" in parts:
                i = parts.index("snapshots")
                if i + 1 < len(parts) and re.fullmatch(r"[0-9a-f]{40}", parts[i + 1]):
                    self.revision = parts[i + 1]
            break
        return got

    def peek(self, rel: str) -> dict[str, Any] | None:
        try:
            path = self._download([rel])[rel]
            data = json.loads(Path(path).read_text())
        except SAEHooksError:
            raise  # a corrupt download or an offline cache miss must say so, not "no format matches"
        except (OSError, ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    def fetch(self, rels: list[str]) -> Path:
        got = self._download(rels)
        rel, path = next(iter(got.items()))
        root = Path(str(path)[: len(str(path)) - len(rel)])
        return root


# ---------------------------------------------------------------------------------------------- SAE ids


def list_sae_ids(files: list[str]) -> list[str]:
    """Every SAE in a file listing: folders a format's rule matches, plus lone OpenAI ``.pt`` files.

    The root is ``""``. Sorted with numbers in natural order (``layers.2`` before ``layers.10``).
    """
    dirs: set[str] = {""}
    for f in files:
        parts = f.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    ids = []
    for d in dirs:
        rel = _under(files, d)
        if is_sae_folder(rel) and not _openai_detect(rel):
            ids.append(d)
    by_dir: dict[str, list[str]] = {}
    for f in files:
        d, _, name = f.rpartition("/")
        by_dir.setdefault(d, []).append(name)
    for d, names in by_dir.items():
        if any(c in names for c in _CONFIG_NAMES) or d.rsplit("/", 1)[-1] == "checkpoints":
            continue
        ids += [f"{d}/{n}" if d else n for n in names
                if (n.endswith(".pt") and n != "ae.pt") or _ct_file.match(n) or _goodfire_pth.match(n)]
    return sorted(set(ids), key=_natural)


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _under(files: list[str], prefix: str) -> list[str]:
    if not prefix:
        return list(files)
    p = prefix.rstrip("/") + "/"
    return [f[len(p):] for f in files if f.startswith(p)]


# ---------------------------------------------------------------------------------------------- load


def _source_for(repo_or_path: str | os.PathLike, revision, token, cache_dir, local_files_only):  # noqa: ANN001, ANN202
    path = Path(os.fspath(repo_or_path)).expanduser()
    if path.exists():
        return _LocalSource(path if path.is_dir() else path.parent), (None if path.is_dir() else path.name), None
    name = os.fspath(repo_or_path)
    release = _releases.get_release(name)
    if release is not None:
        return None, None, release
    if _REPO_ID.match(name):
        return _HubSource(name, revision, token, cache_dir, local_files_only), None, None
    hints = _releases.suggest(name)
    raise UnknownSourceError(
        f"{name!r} is not a local path, a registered release, or a Hub repo id ('namespace/name')."
        + (f" Did you mean the release(s) {hints}?" if hints else "")
        + " See sae_hooks.list_pretrained()."
    )


def _load_from(source: _Source, sae_id: str | None, fmt_name: str | None, opts: LoadOptions) -> SAE:
    files = source.list()
    sid = (sae_id or "").strip("/")
    if sid and sid in files:  # a file: OpenAI .pt, circuit-tracer layer_N.safetensors (or any file naming its folder)
        folder, _, name = sid.rpartition("/")
        if name.endswith(".pt"):  # + its <name>_cfg.json when there is one
            rel = [name] + [c for c in _under(files, folder) if c == name[: -len(".pt")] + "_cfg.json"]
        elif _ct_file.match(name):  # the file and the folder's config.yaml
            rel = [name] + [c for c in _under(files, folder) if c == "config.yaml"]
        else:
            rel = _under(files, folder)
        prefix = folder
    else:
        prefix = sid
        rel = _under(files, prefix)
    if not files:
        raise SAEIdNotFoundError(f"{source.where} holds no files at all{source.listing_note()}")
    if not rel:
        valid = list_sae_ids(files)
        close = close_matches(sid, valid, 5) or valid[:5]
        raise SAEIdNotFoundError(
            f"{source.where}: no SAE at sae_id {sid!r} (no files there). Closest SAEs: {close}"
            + (f" ({len(valid)} in all)" if len(valid) > 5 else "")
            + source.listing_note()
        )
    peek: Callable[[str], dict[str, Any] | None] = lambda r: source.peek(f"{prefix}/{r}" if prefix else r)  # noqa: E731
    where = f"{source.where}:{prefix or '.'}"
    try:
        fmt = detect_format(rel, peek, where, fmt_name)
    except SAEFormatError as e:
        note = source.listing_note()
        if note:  # offline with a partial cache: the cause is the cache, not the format
            from ..errors import HubUnavailableError

            raise HubUnavailableError(f"{e}{note}") from None
        if not sid:
            valid = [v for v in list_sae_ids(files) if v]
            if valid:
                raise SAEIdNotFoundError(
                    f"{source.where} holds {len(valid)} SAEs, none at its root: pass sae_id= one of "
                    f"{valid[:10]}{' ...' if len(valid) > 10 else ''}, or use load_many()"
                ) from None
        raise
    if opts.convention is not None and fmt.name not in _CONVENTION_FORMATS:
        raise ConfigError(f"{where}: convention= applies to the formats {sorted(_CONVENTION_FORMATS)} only; this SAE "
                          f"is {fmt.name!r}, whose authors' loader and SAELens's agree")
    needed = fmt.needed(rel)
    folder_root = source.fetch([f"{prefix}/{r}" if prefix else r for r in needed])
    folder = folder_root / prefix if prefix else folder_root
    opts.sae_id = opts.sae_id or sid or None
    opts.repo_id = opts.repo_id or source.repo_id
    target = folder / needed[0] if fmt.name in _FILE_FORMATS else folder
    try:
        return fmt.load(target, opts)
    except SAEHooksError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, ArithmeticError, RuntimeError, RecursionError) as e:
        # A converter met something its checks did not foresee (malformed tensors, odd values): the file
        # is at fault, so say which file and format instead of leaking a raw error.
        raise SAEFormatError(
            f"{where}: malformed {fmt.name} SAE ({type(e).__name__}: {e})"
        ) from e


def load(
    repo_or_path: str | os.PathLike,
    sae_id: str | None = None,
    revision: str | None = None,
    *,
    format: str | None = None,  # noqa: A002 - public keyword
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    hook: str | None = None,
    hook_out: str | None = None,
    model_name: str | None = None,
    n_layers: int | None = None,
    norm_scaling_factor: float | None = None,
    convention: str | None = None,
) -> SAE:
    """Load one SAE from a local folder/file, a Hub repo, or a registered release.

    Args:
        repo_or_path: a local path, a release name (see :func:`list_pretrained`) or a Hub repo id.
        sae_id: path of the SAE inside the folder/repo (``"layer_5/width_16k/average_l0_68"``, ``"layers.3"``,
            ``"resid_post_mlp_v5_32k/autoencoders/5.pt"``), or for a release its SAELens id or path (see
            ``list_pretrained(release)``); ``None``: the root.
        revision: Hub branch, tag or commit (default ``main``); all files come from one commit.
        format: skip detection (``"saelens"``, ``"sparsify"``, ``"gemma_scope"``, ... see ``detect``).
        device, dtype: where the weights go and what they become (``None``: cpu / the file's dtype).
        token, cache_dir, local_files_only: passed to the Hub client (``local_files_only=None`` follows
            ``HF_HUB_OFFLINE``).
        hook, hook_out, model_name, n_layers: site information overriding what the format infers.
        norm_scaling_factor: SAELens ``expected_average_only_in`` constant to fold into the weights.
        convention: Llama Scope / lm-saes only: ``"authors"`` (default: what the authors' loader computes) or
            ``"saelens"`` (SAELens's conversion); see ``docs/loading.md``.
    """
    opts = LoadOptions(device=device, dtype=dtype, hook=hook, hook_out=hook_out, model_name=model_name,
                       n_layers=n_layers, norm_scaling_factor=norm_scaling_factor, convention=convention)
    source, file_id, release = _source_for(repo_or_path, revision, token, cache_dir, local_files_only)
    if release is not None:
        return _load_release(release, sae_id, revision, format, opts, token, cache_dir, local_files_only)
    if file_id is not None:
        sae_id = f"{sae_id.strip('/')}/{file_id}" if sae_id else file_id
    return _load_from(source, sae_id, format, opts)


def _load_release(release, sae_id, revision, fmt, opts, token, cache_dir, local_files_only) -> SAE:  # noqa: ANN001
    if not release.on_hub:
        url = release.url(sae_id or release.example)
        raise SAEIdNotFoundError(
            f"release {release.name!r} is not on the Hugging Face Hub ({release.verified}). Download "
            f"{url or release.source} yourself, then load(<that .pt file>)."
        )
    if release.format is None and fmt is None:
        raise _releases.UnsupportedReleaseError(
            f"release {release.name!r} ({release.repo_id}) is listed, but {release.why}. Load its files with "
            "format= once a loader exists, or convert them.")
    source = _HubSource(release.repo_id, revision, token, cache_dir, local_files_only)
    if release.listed:
        listed = release.resolve(sae_id)
        if listed is None:
            raise _releases.unknown_sae_id_error(release, sae_id)
        hook, hook_out = release.site(listed)
        path = listed.path
        if listed.norm_scaling_factor is not None and (fmt or release.format) == "saelens":
            opts.norm_scaling_factor = opts.norm_scaling_factor or listed.norm_scaling_factor
    else:
        fields = release.match(sae_id)
        if fields is None:
            try:
                valid = list_sae_ids(source.list())
            except SAEHooksError:
                valid = None
            raise _releases.unknown_sae_id_error(release, sae_id, valid)
        hook, hook_out = release.hooks_for(fields)
        path = sae_id
    opts.hook = opts.hook or hook
    opts.hook_out = opts.hook_out or hook_out
    opts.model_name = opts.model_name or release.model
    opts.n_layers = opts.n_layers or release.n_layers
    try:
        return _load_from(source, path, fmt or release.format, opts)
    except SAEIdNotFoundError:
        if release.listed:
            raise
        raise _releases.unknown_sae_id_error(release, sae_id, list_sae_ids(source.list())) from None


def load_many(
    repo_or_path: str | os.PathLike,
    pattern: str = "*",
    revision: str | None = None,
    *,
    format: str | None = None,  # noqa: A002 - public keyword
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    model_name: str | None = None,
) -> dict[str, SAE]:
    """Every SAE of a folder / repo / release whose ``sae_id`` matches the glob ``pattern`` (``"layers.*"``).

    Returns ``{sae_id: SAE}`` in natural order (``layers.2`` before ``layers.10``); the root SAE's id is ``""``.
    Raises :class:`SAEIdNotFoundError` when nothing matches (listing what is there).
    """
    source, _file_id, release = _source_for(repo_or_path, revision, token, cache_dir, local_files_only)
    if release is not None:
        if not release.on_hub:
            raise SAEIdNotFoundError(f"release {release.name!r} is not on the Hugging Face Hub: {release.source}")
        source = _HubSource(release.repo_id, revision, token, cache_dir, local_files_only)
    ids = list_sae_ids(source.list())
    if release is not None and release.listed:  # SAELens ids of the listed SAEs present in the repo
        present = set(ids)
        ids = sorted((s.id for s in release.saes if s.path in present), key=_natural)
    elif release is not None:
        ids = [i for i in ids if release.match(i) is not None]
    chosen = [i for i in ids if fnmatch.fnmatchcase(i, pattern)]
    if not chosen:
        raise SAEIdNotFoundError(f"{source.where}: no SAE id matches {pattern!r}; SAEs there: {ids[:20]}")
    out: dict[str, SAE] = {}
    for sid in chosen:
        if release is not None:
            opts = LoadOptions(device=device, dtype=dtype, model_name=model_name)
            out[sid] = _load_release(release, sid, revision, format, opts, token, cache_dir, local_files_only)
        else:
            opts = LoadOptions(device=device, dtype=dtype, model_name=model_name)
            out[sid] = _load_from(source, sid or None, format, opts)
    return out
