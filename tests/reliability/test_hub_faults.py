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


# ------------------------------------------------------------------------------------------- snapshots
# ``snapshot()`` fetches through the same resumable path as ``download_files`` (it used to hand the whole
# folder to huggingface_hub's ``snapshot_download``, whose retries restart small files from byte 0 and
# whose per-process temporary files die with the process).

SNAP_FILES = [".gitattributes", "README.md", "big/sae.safetensors", "notes.json"]  # the order of a 1-worker snapshot


def _blob_path(server: HubServer, name: str) -> Path:
    return Path(os.environ["HF_HUB_CACHE"]) / ("models--" + REPO.replace("/", "--")) / "blobs" / server.etag(REPO, name)


def _assert_whole_snapshot(server: HubServer, folder: Path) -> None:
    assert _files_under(folder) == SNAP_FILES
    for name in SNAP_FILES:
        assert (folder / name).read_bytes() == server.files(REPO)[name]
    for name in ("big/sae.safetensors",):  # an LFS blob is stored under its sha256: check the bytes hash to it
        assert hashlib.sha256(_blob_path(server, name).read_bytes()).hexdigest() == server.etag(REPO, name)
    assert not [b for b in _blobs() if b.endswith((".incomplete", ".partial", ".lock"))]


def _files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("workers", [1, 4])
def test_snapshot_resumes_files_dropped_mid_transfer_in_the_same_call(repo: HubServer, workers: int) -> None:
    repo.truncate_next("big/sae.safetensors", 500_000, times=2)  # connection dropped twice
    repo.truncate_next("notes.json", 300_000)
    folder = remote.snapshot(REPO, max_workers=workers)
    _assert_whole_snapshot(repo, folder)
    big, notes = repo.content_gets("big/sae.safetensors"), repo.content_gets("notes.json")
    assert [(g.range, g.body_bytes_sent) for g in big] == [
        (None, 500_000), ("bytes=500000-", 500_000), ("bytes=1000000-", len(BIG) - 1_000_000)]
    assert [(g.range, g.body_bytes_sent) for g in notes] == [(None, 300_000), ("bytes=300000-", len(NOTES) - 300_000)]
    assert len(repo.content_gets()) == 2 + 3 + 2  # .gitattributes and README once each


def test_snapshot_cut_in_every_attempt_resumes_in_the_next_call_without_refetching(repo: HubServer) -> None:
    repo.truncate_next("big/sae.safetensors", 100, times=None, mode="short")
    with pytest.raises(HubUnavailableError, match="'big/sae.safetensors'.*stopped at 600 of 2,097,152 bytes"):
        remote.snapshot(REPO, max_workers=1)
    repo.clear_faults()
    repo.clear_requests()
    folder = remote.snapshot(REPO, max_workers=1)
    _assert_whole_snapshot(repo, folder)
    # Finished files are not fetched again; the cut one continues at its 600th byte.
    assert [(g.path.rsplit("/", 1)[-1], g.range) for g in repo.content_gets()] == [
        ("sae.safetensors", "bytes=600-"), ("notes.json", None)]
    repo.clear_requests()
    assert remote.snapshot(REPO) == folder
    assert repo.content_gets() == []  # a complete snapshot: at most the listing and HEADs, no content


SNAP_CHILD = """
import sys
from sae_hooks.hub import remote
remote.snapshot(sys.argv[1], max_workers=1)
"""


@pytest.mark.parametrize("point", ["between files", "mid-file"])
def test_snapshot_killed_in_another_process_completes_here(repo: HubServer, point: str) -> None:
    """A child process downloading a 4-file snapshot is SIGKILLed after the 3rd file (its request for the 4th
    held by the server) or 300 kB into the 4th; the next call fetches only what is missing."""
    if point == "between files":
        repo.stall_requests("/notes.json", 120)  # the child's first request for the 4th file gets no answer
    else:
        repo.stall_next("notes.json", 300_000, 120)
    proc = subprocess.Popen([sys.executable, "-c", SNAP_CHILD, REPO], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    partial = Path(str(_blob_path(repo, "notes.json")) + ".sae-hooks.partial")
    try:
        for _ in range(1200):
            if proc.poll() is not None:
                break
            if point == "between files" and _blob_path(repo, "big/sae.safetensors").exists():
                time.sleep(0.5)  # on to the 4th file, whose requests are all held: no byte of it can arrive
                break
            if point == "mid-file" and partial.exists() and partial.stat().st_size >= 300_000:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the child finished or died before the kill point"
    finally:
        proc.kill()
        proc.wait()
    assert _blob_path(repo, "big/sae.safetensors").exists() and not _blob_path(repo, "notes.json").exists()
    assert partial.exists() == (point == "mid-file")
    repo.clear_faults()
    repo.clear_requests()
    folder = remote.snapshot(REPO, max_workers=1)
    _assert_whole_snapshot(repo, folder)
    want = [(None, len(NOTES))] if point == "between files" else [("bytes=300000-", len(NOTES) - 300_000)]
    assert [(g.range, g.body_bytes_sent) for g in repo.content_gets()] == [(r, n) for r, n in want]
    assert all(g.path.endswith("/notes.json") for g in repo.content_gets())



def test_server_that_ignores_range_gets_a_whole_fresh_copy(repo: HubServer) -> None:
    """A retry answered 200 (the whole file) instead of 206 overwrites the partial instead of appending to it."""
    repo.ranges_supported = False
    repo.truncate_next("notes.json", 300_000)
    path = remote.download_files(REPO, ["notes.json"])["notes.json"]
    assert path.read_bytes() == NOTES
    gets = repo.content_gets("notes.json")
    assert [(g.status, g.range, g.body_bytes_sent) for g in gets] == [(200, None, 300_000), (200, "bytes=300000-", len(NOTES))]
    assert not [b for b in _blobs() if b.endswith((".incomplete", ".partial", ".lock"))]
