"""Pytest fixtures that point the real ``huggingface_hub`` client at the local :class:`hubserver.HubServer`.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` ... into
``huggingface_hub.constants`` when it is *imported*, and a few modules copy them further (the module-level ``HfApi``
behind ``huggingface_hub.list_repo_files`` & co. keeps its own ``endpoint``; ``utils._http`` keeps the set of
trusted Hub origins). Setting environment variables inside a test is therefore not enough once the package is
imported (and something always imports it first). The fixtures below do both: they set the environment variables
(for code that reads them at call time, like ``sae_hooks.hub.remote``, and for subprocesses) *and* patch every
import-time copy, all through ``monkeypatch`` so each test gets a fresh state and nothing leaks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from hubserver import HubServer

__all__ = ["hub_server", "hf_offline", "point_hf_at", "set_hf_offline"]


def point_hf_at(endpoint: str, hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``huggingface_hub`` talk to ``endpoint`` and cache under ``hf_home``, online, with no stored token."""
    import huggingface_hub.hf_api as hf_api
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    endpoint = endpoint.rstrip("/")
    hub_cache = hf_home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_SYMLINKS_WARNING": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)

    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        # Files huggingface_hub writes under HF_HOME: keep them out of the user's real ~/.cache.
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
    }
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    host = urlsplit(endpoint).hostname
    if hasattr(constants, "HF_URL_HOSTS") and host:
        monkeypatch.setattr(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {host.lower()}))
    # Copies made at import time elsewhere in the package.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):
        monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)}))
    try:
        from huggingface_hub.utils import _cache_manager

        if hasattr(_cache_manager, "HF_HUB_CACHE"):
            monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(hub_cache))
    except ImportError:  # pragma: no cover - layout of other huggingface_hub versions
        pass
    # Pooled keep-alive connections from a previous test point at a server that is gone.
    _http.close_session()


def set_hf_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
    """Turn ``huggingface_hub``'s offline mode on/off, both the env var and the import-time constant."""
    from huggingface_hub import constants

    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A fresh :class:`HubServer` on 127.0.0.1 with ``huggingface_hub`` pointed at it and a private cache.

    The cache lives in ``tmp_path / "hf_home" / "hub"`` (also in ``os.environ["HF_HUB_CACHE"]``).
    """
    from huggingface_hub.utils import _http

    server = HubServer().start()
    try:
        point_hf_at(server.url, tmp_path / "hf_home", monkeypatch)
        yield server
    finally:
        _http.close_session()
        server.stop()


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """A function ``(offline=True) -> None`` that toggles ``huggingface_hub`` offline mode for this test."""

    def _set(offline: bool = True) -> None:
        set_hf_offline(monkeypatch, offline)

    return _set
