"""Download from and upload to the Hugging Face Hub: a thin layer over ``huggingface_hub``.

What this layer adds to ``huggingface_hub``:

* **Settings read at call time.** ``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HUB_CACHE``/``HF_HOME`` and
  ``HF_HUB_OFFLINE`` once, when it is imported. Here the environment is consulted on every call (falling back to
  ``huggingface_hub.constants``), so setting ``os.environ["HF_HUB_OFFLINE"] = "1"`` in a running notebook works.
* **One commit per call.** :func:`download_files` resolves a branch or tag once (with the first file) and fetches
  every other file from that same commit, so a push landing mid-download cannot mix two versions.
* **Integrity.** ``huggingface_hub`` checks the size of a plain HTTP download but not its hash. Every blob that a
  call newly adds to the cache is hashed and compared with the etag it is cached under (sha256 for LFS files, git
  blob sha1 otherwise); a mismatch deletes the blob and raises :class:`~sae_hooks.errors.CorruptDownloadError`, so a
  retry downloads it again. Files already in the cache were checked when they arrived and are not re-hashed.
* **Typed errors** from :mod:`sae_hooks.errors`, whose messages name the repo, revision and file, and list what *is*
  there (closest names first) when a file is missing.

A local path is the caller's business: every function here talks to the Hub (or its cache).

Progress bars use ``huggingface_hub``'s bar class (silence them with ``HF_HUB_DISABLE_PROGRESS_BARS=1``).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.utils import (  # re-exported there by every huggingface_hub >= 0.24
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    filter_repo_objects,
)
from huggingface_hub.file_download import repo_folder_name

from sae_hooks.errors import (
    CorruptDownloadError,
    HubFileNotFoundError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubUnavailableError,
    SAEHooksError,
)

__all__ = [
    "download_files",
    "hub_cache_dir",
    "hub_endpoint",
    "is_offline",
    "list_files",
    "snapshot",
    "upload_folder",
]

T = TypeVar("T")
DEFAULT_REVISION = "main"
_TRUE = {"1", "ON", "YES", "TRUE"}
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 8 * 1024 * 1024
_MAX_LISTED = 40  # files named in a "not found" message before "... and N more"
_NETWORK_ERROR_MODULES = {"httpx", "httpx2", "httpcore", "requests", "urllib3"}


# ---------------------------------------------------------------------------------------------- settings


def hub_endpoint() -> str:
    """The Hub URL: ``HF_ENDPOINT`` as set now, else what ``huggingface_hub`` read at import."""
    env = os.environ.get("HF_ENDPOINT", "").strip()
    return (env or constants.ENDPOINT).rstrip("/")


def is_offline() -> bool:
    """Whether offline mode is on: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, else at import."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(key)
        if value is not None and value.strip():
            return value.strip().upper() in _TRUE
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Hub cache folder: ``cache_dir``, else ``HF_HUB_CACHE`` / ``HF_HOME/hub`` as set now, else at import."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.path.expandvars(os.environ[key])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _as_list(patterns: str | Sequence[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _api(token: str | bool | None) -> HfApi:
    return HfApi(endpoint=hub_endpoint(), token=token)


def _offline(local_files_only: bool | None) -> bool:
    return is_offline() if local_files_only is None else bool(local_files_only)


def hub_timeout() -> float:
    """Seconds an API call (listing, refs) may take: ``SAE_HOOKS_HUB_TIMEOUT``, default 60.

    ``huggingface_hub`` gives its API calls no timeout (a stalled server blocks them forever).
    """
    raw = os.environ.get("SAE_HOOKS_HUB_TIMEOUT", "").strip()
    try:
        value = float(raw) if raw else 60.0
    except ValueError:
        raise HubUnavailableError(f"SAE_HOOKS_HUB_TIMEOUT must be a number of seconds, got {raw!r}") from None
    return value if value > 0 else 60.0


def _bounded(fn: Callable[[], T], what: str) -> T:
    """``fn()`` run in a daemon thread; :class:`HubUnavailableError` if it takes longer than :func:`hub_timeout`.

    The thread is left to finish (or fail) on its own: Python cannot interrupt a blocked socket read, but
    the caller gets control back with a clear error.
    """
    limit = hub_timeout()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    worker = threading.Thread(target=run, name="sae-hooks-hub-call", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        raise HubUnavailableError(
            f"{what}: no answer from {hub_endpoint()} within {limit:g} s (set SAE_HOOKS_HUB_TIMEOUT to wait longer)"
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---------------------------------------------------------------------------------------------- listing


def list_files(
    repo_id: str,
    revision: str | None = None,
    token: str | bool | None = None,
    *,
    repo_type: str = "model",
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
) -> list[str]:
    """Paths of all files in ``repo_id`` at ``revision`` (default ``main``), sorted.

    Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) this lists the files of that revision that are in the
    local cache, i.e. the ones that can be loaded offline; :class:`~sae_hooks.errors.HubUnavailableError` if none are.
    """
    rev = revision or DEFAULT_REVISION
    if _offline(local_files_only):
        cached = _cached_files(hub_cache_dir(cache_dir), repo_id, repo_type, rev)
        if cached is None:
            raise HubUnavailableError(
                f"Offline mode is on and nothing from {_repo_str(repo_id, repo_type)} at revision {rev!r} is in the "
                f"local cache ({hub_cache_dir(cache_dir)}). Go online once to download it."
            )
        return cached[1]
    return sorted(_listing(lambda api: api.list_repo_files(repo_id, revision=rev, repo_type=repo_type, token=token),
                           repo_id, repo_type, rev, token, cache_dir))


def _listing(call: Callable[[HfApi], T], repo_id: str, repo_type: str, rev: str, token: str | bool | None,
             cache_dir: str | os.PathLike[str] | None) -> T:
    """A Hub listing call, bounded by :func:`hub_timeout`, its errors mapped to typed ones."""
    try:
        return _bounded(lambda: call(_api(token)), f"Listing {_repo_str(repo_id, repo_type)} at revision {rev!r}")
    except HubUnavailableError:
        raise
    except Exception as err:  # noqa: BLE001 - mapped to typed errors, or re-raised
        _raise_typed(err, repo_id=repo_id, repo_type=repo_type, revision=rev, token=token, cache_dir=cache_dir)
        raise


# ---------------------------------------------------------------------------------------------- downloads


def download_files(
    repo_id: str,
    filenames: Iterable[str],
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    *,
    repo_type: str = "model",
    verify: bool = True,
) -> dict[str, Path]:
    """Download ``filenames`` from ``repo_id`` into the Hub cache; return ``{filename: local path}``.

    Args:
        repo_id: ``"namespace/name"``.
        filenames: paths inside the repo (``"layer_3/sae.safetensors"``). Duplicates are fetched once.
        revision: branch, tag or commit sha (default ``main``). A branch or tag is resolved once, with the first
            file; the other files come from that same commit.
        token: Hub token (``None``: the stored one, ``False``: none).
        cache_dir: the Hub cache folder (default: :func:`hub_cache_dir`).
        local_files_only: serve from the cache only, never touch the network. ``None`` follows ``HF_HUB_OFFLINE``.
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``.
        verify: hash blobs newly added to the cache and compare them with their etag (see module docstring).

    Raises:
        HubFileNotFoundError: a file is not in the repo at that revision (the message lists what is).
        HubRepoNotFoundError, HubRevisionNotFoundError: the repo or revision does not exist (or is not visible).
        HubUnavailableError: offline or unreachable, and a file is not in the cache.
        CorruptDownloadError: a download was cut short or does not match its advertised hash (nothing is cached).
    """
    if isinstance(filenames, str):
        filenames = [filenames]
    names = list(dict.fromkeys(filenames))
    offline = _offline(local_files_only)
    cache = hub_cache_dir(cache_dir).resolve()  # huggingface_hub returns resolved paths
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    endpoint = hub_endpoint()
    asked = revision or DEFAULT_REVISION
    pinned = asked
    out: dict[str, Path] = {}
    for name in names:
        before = _blob_names(storage)
        try:
            if not offline and not _cached_pointer(storage, pinned, name):
                commit = _fetch_blob_resumably(repo_id, name, repo_type=repo_type, revision=pinned, token=token,
                                               storage=storage, endpoint=endpoint)
                if commit and commit != pinned:  # one HEAD resolved the branch: the rest is fetched at that commit
                    if not _COMMIT_RE.match(pinned):
                        from .._atomic import atomic_write_bytes

                        atomic_write_bytes(storage / "refs" / pinned, commit.encode())  # as hf_hub_download does
                    pinned = commit
            local = Path(
                hf_hub_download(
                    repo_id,
                    name,
                    repo_type=repo_type,
                    revision=pinned,
                    cache_dir=cache,
                    token=token,
                    local_files_only=offline,
                    endpoint=endpoint,
                )
            )
        except Exception as err:  # noqa: BLE001 - mapped to typed errors, or re-raised
            _raise_typed(
                err,
                repo_id=repo_id,
                repo_type=repo_type,
                revision=asked,
                commit=pinned if pinned != asked else None,
                filename=name,
                token=token,
                cache_dir=cache,
                offline=offline,
            )
            raise
        commit = _commit_of(local, storage)
        if commit is not None:
            pinned = commit
        if verify:
            _verify_new_blob(local, name, before, storage, repo_id=repo_id, revision=asked)
        out[name] = local
    return out


def snapshot(
    repo_id: str,
    allow_patterns: str | Sequence[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    *,
    ignore_patterns: str | Sequence[str] | None = None,
    repo_type: str = "model",
    verify: bool = True,
    max_workers: int = 8,
) -> Path:
    """Download every file of ``repo_id`` matching ``allow_patterns`` (fnmatch, e.g. ``"layer_3/*"``); return the
    snapshot folder (files keep their repo paths below it).

    The file list is read once, pinned to the commit ``revision`` points at, and every matching file is fetched
    at that commit by :func:`download_files` (``max_workers`` at a time): cut files resume from their last byte
    (in this call, the next one, or another process after a kill), files already in the cache are not fetched
    again, and every new blob is hash-checked. Offline, the cached snapshot is served.

    Raises what :func:`download_files` raises; :class:`~sae_hooks.errors.HubFileNotFoundError` when
    ``allow_patterns`` matches no file of the repo (the message lists the files).
    """
    offline = _offline(local_files_only)
    cache = hub_cache_dir(cache_dir).resolve()  # huggingface_hub returns resolved paths
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    rev = revision or DEFAULT_REVISION
    patterns = _as_list(allow_patterns) or []
    if offline:
        return _cached_snapshot(repo_id, patterns, ignore_patterns, rev, token, cache, repo_type)
    info = _listing(lambda api: api.repo_info(repo_id, revision=rev, repo_type=repo_type, token=token),
                    repo_id, repo_type, rev, token, cache)
    commit = info.sha
    files = sorted(s.rfilename for s in info.siblings or [])
    wanted = list(filter_repo_objects(files, allow_patterns=patterns or None, ignore_patterns=_as_list(ignore_patterns)))
    if patterns and not wanted:
        raise HubFileNotFoundError(
            f"{_repo_str(repo_id, repo_type)} at revision {rev!r} has no file matching {patterns!r}. "
            f"Files in the repo: {_format_list(files)}."
        )
    if not _COMMIT_RE.match(rev) and commit:
        from .._atomic import atomic_write_bytes

        atomic_write_bytes(storage / "refs" / rev, commit.encode())  # as snapshot_download does

    def fetch(name: str) -> Path:
        return download_files(repo_id, [name], commit, token, cache, False, repo_type=repo_type, verify=verify)[name]

    if max_workers <= 1 or len(wanted) <= 1:
        for name in wanted:
            fetch(name)
    else:
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sae-hooks-snapshot") as pool:
            futures = [pool.submit(fetch, name) for name in wanted]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and f.exception() is not None]
            if failed:
                for f in futures:
                    f.cancel()  # the ones not started; running ones finish (their bytes are kept)
                raise failed[0].exception()  # type: ignore[misc]
    return storage / "snapshots" / commit


def _cached_snapshot(
    repo_id: str, patterns: list[str], ignore_patterns: str | Sequence[str] | None, rev: str,
    token: str | bool | None, cache: Path, repo_type: str,
) -> Path:
    """The cached snapshot folder of ``rev`` (offline), checked to hold a file matching ``patterns``."""
    try:
        folder = Path(snapshot_download(
            repo_id, repo_type=repo_type, revision=rev, cache_dir=cache, token=token, local_files_only=True,
            allow_patterns=patterns or None, ignore_patterns=_as_list(ignore_patterns), endpoint=hub_endpoint(),
        ))
    except Exception as err:  # noqa: BLE001 - mapped to typed errors, or re-raised
        _raise_typed(err, repo_id=repo_id, repo_type=repo_type, revision=rev,
                     filename=", ".join(patterns) if patterns else None, token=token, cache_dir=cache, offline=True)
        raise
    present = _files_under(folder)
    if patterns and not any(fnmatch.fnmatch(p, pat) for p in present for pat in patterns):
        raise HubUnavailableError(
            f"Offline mode is on and no file matching {patterns!r} from {_repo_str(repo_id, repo_type)} at revision "
            f"{rev!r} is in the local cache ({cache}). Cached files: {_format_list(present)}."
        )
    return folder


# ---------------------------------------------------------------------------------------------- upload


def upload_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    path_in_repo: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload with sae-hooks",
    create_repo: bool = True,
    private: bool | None = None,
    *,
    repo_type: str = "model",
    allow_patterns: str | Sequence[str] | None = None,
    ignore_patterns: str | Sequence[str] | None = None,
) -> str:
    """Upload the files under ``folder`` to ``repo_id`` (below ``path_in_repo``) in one commit; return its sha.

    Args:
        folder: local folder; its layout is kept.
        repo_id: ``"namespace/name"``.
        path_in_repo: folder inside the repo (default: the root).
        revision: branch to commit to (default ``main``); created from ``main`` if it does not exist.
        token: Hub token with write access (``None``: the stored one).
        commit_message: the commit's title.
        create_repo: create the repo first if it does not exist (with ``private``).
        private: visibility of a repo created here (``None``: the Hub's default).
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``.
        allow_patterns, ignore_patterns: fnmatch filters on paths relative to ``folder``.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise NotADirectoryError(f"upload_folder: {str(root)!r} is not a directory")
    if is_offline():
        raise HubUnavailableError(
            f"Cannot upload {str(root)!r} to {_repo_str(repo_id, repo_type)}: offline mode is on (HF_HUB_OFFLINE)."
        )
    api = _api(token)
    branch = revision or DEFAULT_REVISION
    try:
        if create_repo:
            api.create_repo(repo_id, token=token, private=private, repo_type=repo_type, exist_ok=True)
        if branch != DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, token=token, repo_type=repo_type, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=root,
            path_in_repo=path_in_repo,
            commit_message=commit_message,
            token=token,
            repo_type=repo_type,
            revision=branch,
            allow_patterns=_as_list(allow_patterns),
            ignore_patterns=_as_list(ignore_patterns),
        )
    except Exception as err:  # noqa: BLE001 - mapped to typed errors, or re-raised
        _raise_typed(err, repo_id=repo_id, repo_type=repo_type, revision=branch, token=token)
        raise
    oid = getattr(info, "oid", None)
    if not isinstance(oid, str):  # pragma: no cover - run_as_future is never used here
        raise SAEHooksError(f"upload to {_repo_str(repo_id, repo_type)} returned no commit id ({info!r})")
    return oid


# ---------------------------------------------------------------------------------------------- resumable downloads

_PARTIAL = ".sae-hooks.partial"
_DOWNLOAD_ATTEMPTS = 6
_STALE_INCOMPLETE_S = 600


def _cached_pointer(storage: Path, revision: str, filename: str) -> bool:
    """Whether ``filename`` at ``revision`` (a commit, or a ref as last seen) is already in the cache."""
    commit = revision if _COMMIT_RE.match(revision) else None
    if commit is None:
        try:
            commit = (storage / "refs" / revision).read_text().strip()
        except OSError:
            return False
    return bool(commit) and (storage / "snapshots" / commit / filename).exists()


def _fetch_blob_resumably(
    repo_id: str, filename: str, *, repo_type: str, revision: str, token: str | bool | None, storage: Path,
    endpoint: str,
) -> str | None:
    """Put the blob of ``filename`` in the cache, resuming cut downloads, before ``hf_hub_download`` links it.

    ``huggingface_hub`` 2.x writes each download to a per-process temporary file that it deletes on failure, so a
    download cut after its in-call retries, or by a killed process, restarts from byte 0. Here the bytes go to
    ``blobs/<etag>.sae-hooks.partial``, kept across calls and processes (one writer at a time: a lock), extended with
    ``Range`` requests until complete, then checked (size, then sha256 or git blob sha1 against the etag) and renamed
    to ``blobs/<etag>``. ``hf_hub_download`` then finds the blob and only creates the snapshot link. Files served
    through Xet, or without an etag/size, are left to ``huggingface_hub``. Returns the commit the Hub resolved.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
    from huggingface_hub.utils import tqdm as hf_tqdm

    url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision, endpoint=endpoint)
    meta = _bounded(lambda: get_hf_file_metadata(url, token=token, timeout=hub_timeout(), endpoint=endpoint),
                    f"Looking up {filename!r} in {_repo_str(repo_id, repo_type)}")
    etag, size, commit = meta.etag, meta.size, meta.commit_hash
    if not etag or size is None or getattr(meta, "xet_file_data", None) is not None or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", etag):
        return commit
    blobs = storage / "blobs"
    blob = blobs / etag
    if blob.exists():
        return commit
    blobs.mkdir(parents=True, exist_ok=True)
    partial = blobs / (etag + _PARTIAL)
    from .._atomic import folder_lock

    with folder_lock(partial, timeout=max(hub_timeout(), 600.0)):
        if blob.exists():  # another process finished it while we waited
            return commit
        _remove_stale_incomplete(blobs, etag)
        last_error: BaseException | None = None
        # huggingface_hub's own bar class and group: HF_HUB_DISABLE_PROGRESS_BARS silences it too.
        with hf_tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=filename,
                     name="huggingface_hub.http_get") as bar:
            for attempt in range(_DOWNLOAD_ATTEMPTS):
                have = partial.stat().st_size if partial.exists() else 0
                if have > size:
                    have = 0
                    partial.unlink()
                bar.n = have  # resumed bytes count as done
                bar.refresh()
                if have == size:
                    break
                headers = build_hf_headers(token=token)
                if have:
                    headers["Range"] = f"bytes={have}-"
                try:
                    with get_session().stream("GET", meta.location or url, headers=headers, follow_redirects=True,
                                              timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                        if response.status_code == 416:  # our partial is not a prefix of this file: start over
                            partial.unlink(missing_ok=True)
                            continue
                        hf_raise_for_status(response)
                        append = bool(have) and response.status_code == 206
                        if not append:  # a server that ignores Range sends the whole file again
                            bar.n = 0
                        with open(partial, "ab" if append else "wb") as f:
                            for chunk in response.iter_bytes():  # as received: a cut keeps every byte
                                f.write(chunk)
                                bar.update(len(chunk))
                            f.flush()
                            os.fsync(f.fileno())
                    last_error = None
                except HfHubHTTPError as err:
                    status = _http_status(err)
                    if status is None or (status < 500 and status != 429):
                        raise
                    last_error = err
                except Exception as err:  # noqa: BLE001 - network errors of httpx/httpx2: retried, bytes kept
                    if type(err).__module__.split(".")[0] not in _NETWORK_ERROR_MODULES:
                        raise
                    last_error = err
                if attempt:
                    time.sleep(min(0.2 * 2**attempt, 5.0))
        have = partial.stat().st_size if partial.exists() else 0
        if have != size:
            why = f" ({type(last_error).__name__}: {last_error})" if last_error else ""
            raise HubUnavailableError(
                f"Download of {filename!r} from {_repo_str(repo_id, repo_type)} stopped at {have:,} of {size:,} bytes "
                f"after {_DOWNLOAD_ATTEMPTS} attempts{why}. The bytes received are kept in the cache; calling again "
                "resumes from there."
            )
        algo, actual = ("sha256", _sha256(partial)) if len(etag) == 64 else ("git-sha1", _git_blob_sha1(partial))
        if actual != etag:
            partial.unlink(missing_ok=True)
            raise CorruptDownloadError(
                f"Downloaded {filename!r} from {repo_id!r} (revision {revision!r}) does not match the hash the Hub "
                f"advertised: expected {algo} {etag}, got {actual}. The bad copy was deleted from the cache; "
                "downloading again fetches it afresh."
            )
        from .._atomic import _fix_modes

        _fix_modes(partial)  # readable by the group/others as the umask allows, like the rest of the cache
        os.replace(partial, blob)
    return commit


def _remove_stale_incomplete(blobs: Path, etag: str) -> None:
    """``huggingface_hub``'s own ``<etag>.<id>.incomplete`` files left by killed processes (never resumed)."""
    now = time.time()
    for name in os.listdir(blobs):
        if name.startswith(etag + ".") and name.endswith(".incomplete"):
            with contextlib.suppress(OSError):
                if now - os.stat(blobs / name).st_mtime > _STALE_INCOMPLETE_S:
                    os.unlink(blobs / name)


# ---------------------------------------------------------------------------------------------- integrity


def _blob_names(storage: Path) -> set[str]:
    try:
        return set(os.listdir(storage / "blobs"))
    except OSError:
        return set()


def _commit_of(local: Path, storage: Path) -> str | None:
    """The commit sha in ``<storage>/snapshots/<sha>/<file>``, or ``None`` for another layout."""
    try:
        rel = local.relative_to(storage / "snapshots")
    except ValueError:
        return None
    sha = rel.parts[0] if rel.parts else ""
    return sha if _COMMIT_RE.match(sha) else None


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_new_blob(
    local: Path, filename: str, before: set[str], storage: Path, *, repo_id: str, revision: str
) -> None:
    """Hash the blob behind ``local`` if this call added it to the cache; on mismatch delete it and raise.

    The cache names each blob after the etag the Hub advertised: a sha256 (LFS files) or a git blob sha1. Without
    symlinks (some Windows setups) the snapshot holds a copy, the etag is unknown here, and nothing is checked.
    """
    blob = Path(os.path.realpath(local))
    if blob.parent != Path(os.path.realpath(storage / "blobs")) or blob.name in before:
        return
    expected = blob.name
    if _SHA256_RE.match(expected):
        algo, actual = "sha256", _sha256(blob)
    elif re.fullmatch(r"[0-9a-f]{40}", expected):
        algo, actual = "git-sha1", _git_blob_sha1(blob)
    else:
        return
    if actual == expected:
        return
    for p in (blob, local):
        try:
            os.unlink(p)
        except OSError:
            pass
    raise CorruptDownloadError(
        f"Downloaded {filename!r} from {repo_id!r} (revision {revision!r}) does not match the hash the Hub "
        f"advertised: expected {algo} {expected}, got {actual}. The bad copy was deleted from the cache; "
        "downloading again fetches it afresh."
    )


# ---------------------------------------------------------------------------------------------- errors


def _http_status(err: BaseException) -> int | None:
    """The HTTP status behind ``err`` or the errors it was raised from (``huggingface_hub`` wraps a failed HEAD
    into ``LocalEntryNotFoundError``), if any."""
    seen = 0
    e: BaseException | None = err
    while e is not None and seen < 10:
        response = getattr(e, "response", None)
        code = getattr(response, "status_code", None)
        if isinstance(code, int):
            return code
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _repo_str(repo_id: str, repo_type: str) -> str:
    return repr(repo_id) if repo_type == "model" else f"{repo_type} {repo_id!r}"


def _format_list(items: Sequence[str], limit: int = _MAX_LISTED) -> str:
    if not items:
        return "(none)"
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _closest_first(name: str, candidates: Sequence[str]) -> list[str]:
    """``candidates`` with the names closest to ``name`` first (difflib, then same basename), then the rest sorted."""
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.4)
    base = name.rsplit("/", 1)[-1]
    same_base = [c for c in candidates if c.rsplit("/", 1)[-1] == base]
    head = list(dict.fromkeys(close + same_base))
    return head + sorted(c for c in candidates if c not in head)


def _safe_list(repo_id: str, repo_type: str, revision: str, token: str | bool | None) -> list[str]:
    try:
        return sorted(_bounded(
            lambda: _api(token).list_repo_files(repo_id, revision=revision, repo_type=repo_type, token=token), "listing"
        ))
    except Exception:  # noqa: BLE001 - best effort, for an error message
        return []


def _cached_files(cache: Path, repo_id: str, repo_type: str, revision: str) -> tuple[str, list[str]] | None:
    """``(commit, files)`` of ``revision`` in the local cache, or ``None`` if that revision was never cached."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    commit: str | None = revision if _COMMIT_RE.match(revision) else None
    if commit is None:
        ref = storage / "refs" / revision
        if ref.is_file():
            commit = ref.read_text().strip()
    if not commit:
        return None
    folder = storage / "snapshots" / commit
    if not folder.is_dir():
        return None
    return commit, _files_under(folder)


def _files_under(folder: Path) -> list[str]:
    out = []
    for dirpath, _dirnames, files in os.walk(folder):
        for f in files:
            full = Path(dirpath) / f
            if full.exists():  # skip dangling links
                out.append(full.relative_to(folder).as_posix())
    return sorted(out)


def _refs_hint(repo_id: str, repo_type: str, token: str | bool | None) -> str:
    try:
        refs = _bounded(lambda: _api(token).list_repo_refs(repo_id, repo_type=repo_type, token=token), "refs")
    except Exception:  # noqa: BLE001 - best effort, for an error message
        return ""
    branches = [b.name for b in refs.branches]
    tags = [t.name for t in refs.tags]
    return f" Branches: {_format_list(branches)}. Tags: {_format_list(tags)}."


def _raise_typed(
    err: Exception,
    *,
    repo_id: str,
    repo_type: str,
    revision: str,
    commit: str | None = None,
    filename: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool = False,
) -> None:
    """Raise the :mod:`sae_hooks.errors` error that says what ``err`` (from ``huggingface_hub``) means.

    Returns (so the caller re-raises ``err``) for errors it does not know.
    """
    where = f"{_repo_str(repo_id, repo_type)} at revision {revision!r}" + (
        f" (commit {commit[:12]})" if commit else ""
    )
    if isinstance(err, GatedRepoError):
        raise HubRepoNotFoundError(
            f"{_repo_str(repo_id, repo_type)} on {hub_endpoint()} is gated: accept its terms on the Hub and pass a "
            f"token that has access. ({err})"
        ) from err
    if isinstance(err, RepositoryNotFoundError):
        raise HubRepoNotFoundError(
            f"Repository {_repo_str(repo_id, repo_type)} was not found on {hub_endpoint()}. Check the name and "
            "repo_type; a private repo needs a token that can see it."
        ) from err
    if isinstance(err, RevisionNotFoundError):
        raise HubRevisionNotFoundError(
            f"Revision {revision!r} does not exist in {_repo_str(repo_id, repo_type)}."
            + _refs_hint(repo_id, repo_type, token)
        ) from err
    status = _http_status(err)
    if status is not None and (status >= 500 or status == 429):
        what = repr(filename) if filename else "the file list"
        kind = "is rate-limiting requests" if status == 429 else "had a server error"
        raise HubUnavailableError(
            f"Cannot get {what} from {where}: the Hub at {hub_endpoint()} {kind} (HTTP {status}). "
            "Try again later; files already downloaded stay in the cache."
        ) from err
    if isinstance(err, LocalEntryNotFoundError) or isinstance(err, OfflineModeIsEnabled):
        cache = hub_cache_dir(cache_dir).resolve()  # huggingface_hub returns resolved paths
        cached = _cached_files(cache, repo_id, repo_type, commit or revision)
        listing = _format_list(cached[1]) if cached else "(nothing cached for this revision)"
        what = repr(filename) if filename else "the snapshot"
        reason = (
            "offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True)"
            if offline or isinstance(err, OfflineModeIsEnabled)
            else f"the Hub at {hub_endpoint()} could not be reached"
        )
        raise HubUnavailableError(
            f"Cannot get {what} from {where}: {reason} and it is not in the local cache ({cache}). "
            f"Cached files of this revision: {listing}."
        ) from err
    if isinstance(err, EntryNotFoundError) and filename is not None:
        files = _safe_list(repo_id, repo_type, commit or revision, token)
        ordered = _closest_first(filename, files)
        close = difflib.get_close_matches(filename, files, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise HubFileNotFoundError(
            f"{filename!r} is not in {where}.{hint} Files there ({len(files)}): {_format_list(ordered)}."
        ) from err
    if type(err) is OSError and "Consistency check failed" in str(err):
        m = re.search(r"size (\d+) but has size (\d+)", str(err))
        sizes = f": expected {m.group(1)} bytes, received {m.group(2)}" if m else ""
        raise CorruptDownloadError(
            f"Download of {filename!r} from {where} was cut short{sizes}. Nothing was cached; downloading again "
            "fetches it afresh."
        ) from err
    if type(err).__module__.split(".")[0] in _NETWORK_ERROR_MODULES and not isinstance(err, HfHubHTTPError):
        what = repr(filename) if filename else "files"
        raise HubUnavailableError(
            f"Network error while getting {what} from {where} on {hub_endpoint()}: {type(err).__name__}: {err}"
        ) from err
