"""The Hub client against a local server that stalls, drops, cuts, corrupts and answers 5xx/429:
typed errors naming the cause, timeouts instead of hangs, and cut downloads that resume (within a call,
across calls, across processes) without leaving stale files."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

import sae_hooks
from hubserver import HubServer
from sae_hooks.errors import CorruptDownloadError, HubUnavailableError, SAEHooksError
from sae_hooks.hub import remote

REPO = "sae-hooks-test/faults"
ROOT = Path(__file__).resolve().parents[2]
BIG = hashlib.sha256(b"big").digest() * (2 * 1024 * 1024 // 32)  # 2 MiB, LFS (".safetensors")
NOTES = hashlib.sha256(b"notes").digest() * (1024 * 1024 // 32)  # 1 MiB, not LFS: the "< 10 MB" case


def _blobs() -> list[str]:
    folder = Path(os.environ["HF_HUB_CACHE"]) / ("models--" + REPO.replace("/", "--")) / "blobs"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


@pytest.fixture
def repo(hub_server: HubServer) -> HubServer:
    hub_server.create_repo(REPO, {"big/sae.safetensors": BIG, "notes.json": NOTES, "README.md": b"hi"})
    return hub_server


def test_listing_that_never_answers_times_out(repo: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_HOOKS_HUB_TIMEOUT", "1.5")
    repo.stall_requests("/api/models/", 120, times=None)
    t0 = time.monotonic()
    with pytest.raises(HubUnavailableError, match="no answer .* within 1.5 s"):
        remote.list_files(REPO)
    assert time.monotonic() - t0 < 10  # was: still waiting at 450 s
    repo.clear_faults()
    assert "notes.json" in remote.list_files(REPO)


@pytest.mark.parametrize("status,words", [(503, "server error (HTTP 503)"), (500, "HTTP 500"),
                                          (429, "rate-limiting requests (HTTP 429)")])
def test_listing_server_errors_are_typed_and_say_so(repo: HubServer, status: int, words: str) -> None:
    repo.fail_requests("/api/models/", status, times=None)
    with pytest.raises(HubUnavailableError, match=words.replace("(", r"\(").replace(")", r"\)")):
        remote.list_files(REPO)


def test_download_server_error_is_not_called_unreachable(repo: HubServer) -> None:
    repo.fail_requests("/resolve/", 503, times=None)
    with pytest.raises(HubUnavailableError) as info:
        remote.download_files(REPO, ["notes.json"])
    assert "HTTP 503" in str(info.value) and "could not be reached" not in str(info.value)


def test_repeated_cuts_resume_from_every_received_byte(repo: HubServer) -> None:
    repo.truncate_next("notes.json", 300_000, times=3)  # three dropped connections
    path = remote.download_files(REPO, ["notes.json"])["notes.json"]
    assert path.read_bytes() == NOTES
    gets = repo.content_gets("notes.json")
    assert [g.range for g in gets] == [None, "bytes=300000-", "bytes=600000-", "bytes=900000-"]
    assert sum(g.body_bytes_sent for g in gets) == len(NOTES)  # nothing downloaded twice
    assert not [b for b in _blobs() if b.endswith((".incomplete", ".partial", ".lock"))]


def test_cut_download_resumes_in_the_next_call(repo: HubServer) -> None:
    repo.truncate_next("big/sae.safetensors", 100, times=None, mode="short")  # every attempt cut after 100 bytes
    with pytest.raises(HubUnavailableError, match="stopped at 600 of 2,097,152 bytes.*resumes"):
        remote.download_files(REPO, ["big/sae.safetensors"])
    repo.clear_faults()
    repo.clear_requests()
    path = remote.download_files(REPO, ["big/sae.safetensors"])["big/sae.safetensors"]
    assert path.read_bytes() == BIG
    assert [g.range for g in repo.content_gets()] == ["bytes=600-"]
    assert not [b for b in _blobs() if b.endswith((".incomplete", ".partial", ".lock"))]


CHILD = """
import sys
from sae_hooks.hub import remote
remote.download_files(sys.argv[1], [sys.argv[2]])
"""


def test_download_killed_in_another_process_resumes_here(repo: HubServer) -> None:
    repo.stall_next("big/sae.safetensors", 700_000, 120)  # the child gets 700 kB, then the server hangs
    proc = subprocess.Popen([sys.executable, "-c", CHILD, REPO, "big/sae.safetensors"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        partial = None
        for _ in range(1200):
            found = [b for b in _blobs() if b.endswith(".sae-hooks.partial")]
            if found:
                partial = Path(os.environ["HF_HUB_CACHE"]) / ("models--" + REPO.replace("/", "--")) / "blobs" / found[0]
                if partial.stat().st_size >= 700_000:
                    break
            time.sleep(0.05)
        assert partial is not None and partial.stat().st_size == 700_000
    finally:
        proc.kill()
        proc.wait()
    repo.clear_faults()
    repo.clear_requests()
    path = remote.download_files(REPO, ["big/sae.safetensors"])["big/sae.safetensors"]
    assert path.read_bytes() == BIG
    gets = repo.content_gets()
    assert [(g.range, g.body_bytes_sent) for g in gets] == [("bytes=700000-", len(BIG) - 700_000)]
    assert not [b for b in _blobs() if b.endswith((".incomplete", ".partial", ".lock"))]
    old = os.umask(0o022)
    os.umask(old)
    if old == 0o022:
        assert os.stat(os.path.realpath(path)).st_mode & 0o777 == 0o644  # readable by collaborators


def _native_repo(server: HubServer) -> None:
    sae = sae_hooks.make_sae("relu", 4, 8)
    import json

    cfg = {"format": "sae_hooks", "format_version": 1, **sae.cfg.to_dict()}
    server.create_repo("sae-hooks-test/native", {
        "cfg.json": json.dumps(cfg).encode(),
        "sae.safetensors": st_save({k: v.contiguous() for k, v in sae.state_dict().items()}),
    })


def test_corrupt_config_download_is_reported_as_corrupt(hub_server: HubServer) -> None:
    _native_repo(hub_server)
    hub_server.corrupt("cfg.json")
    with pytest.raises(CorruptDownloadError, match="cfg.json"):  # was: "no known SAE format matches"
        sae_hooks.load("sae-hooks-test/native")
    hub_server.clear_faults()
    assert sae_hooks.load("sae-hooks-test/native").cfg.d_sae == 8


def test_offline_with_a_partial_cache_says_offline(hub_server: HubServer, hf_offline: Callable[[bool], None]) -> None:
    _native_repo(hub_server)
    remote.download_files("sae-hooks-test/native", ["sae.safetensors"])  # the weights, not the config
    hf_offline(True)
    with pytest.raises(HubUnavailableError, match="offline"):
        sae_hooks.load("sae-hooks-test/native")
