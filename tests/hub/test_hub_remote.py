"""``sae_hooks.hub.remote`` with the real ``huggingface_hub`` client against the local test Hub (``hubserver``).

Nothing here reaches the network: the ``hub_server`` fixture (``tests/conftest_hub.py``) serves on 127.0.0.1 and
points ``huggingface_hub`` at it, with a private cache per test.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from hubserver import HubServer
from sae_hooks.errors import (
    CorruptDownloadError,
    HubFileNotFoundError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubUnavailableError,
    SAEHooksError,
)
from sae_hooks.hub import remote

REPO = "sae-hooks-test/tiny-sae"
CFG_V1 = b'{"architecture": "topk", "d_in": 8, "d_sae": 32, "k": 4}'
CFG_V2 = b'{"architecture": "topk", "d_in": 8, "d_sae": 64, "k": 4}'
WEIGHTS_V1 = bytes(range(256)) * 8  # 2 KiB, stored as LFS (".safetensors")
WEIGHTS_V2 = bytes(reversed(range(256))) * 8


def _files_v1() -> dict[str, bytes]:
    return {
        "layer_0/cfg.json": CFG_V1,
        "layer_0/sae.safetensors": WEIGHTS_V1,
        "layer_1/cfg.json": CFG_V1.replace(b"topk", b"relu"),
        "layer_1/sae.safetensors": WEIGHTS_V1[::-1],
        "README.md": b"# tiny sae\n",
    }


@pytest.fixture
def repo(hub_server: HubServer) -> str:
    """A repo on the test Hub; returns the sha of its first commit."""
    return hub_server.create_repo(REPO, _files_v1())


def _blobs(cache: Path) -> list[str]:
    folder = cache / ("models--" + REPO.replace("/", "--")) / "blobs"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def _cache() -> Path:
    return Path(os.environ["HF_HUB_CACHE"])


# ------------------------------------------------------------------------------------------- download


def test_download_files_returns_cached_paths_with_the_right_bytes(hub_server: HubServer, repo: str) -> None:
    paths = remote.download_files(REPO, ["layer_0/cfg.json", "layer_0/sae.safetensors"])
    assert set(paths) == {"layer_0/cfg.json", "layer_0/sae.safetensors"}
    assert paths["layer_0/cfg.json"].read_bytes() == CFG_V1
    assert paths["layer_0/sae.safetensors"].read_bytes() == WEIGHTS_V1
    for p in paths.values():
        assert _cache() in p.parents
        assert f"snapshots/{repo}/" in p.as_posix()
    # LFS file cached under its sha256, regular file under its git blob sha1: what the server advertised.
    assert set(_blobs(_cache())) == {
        hub_server.etag(REPO, "layer_0/cfg.json"),
        hub_server.etag(REPO, "layer_0/sae.safetensors"),
    }
    assert hub_server.etag(REPO, "layer_0/sae.safetensors") == hashlib.sha256(WEIGHTS_V1).hexdigest()


def test_one_call_reads_every_file_from_one_commit(hub_server: HubServer, repo: str) -> None:
    remote.download_files(REPO, ["layer_0/cfg.json", "layer_1/cfg.json", "layer_1/sae.safetensors"])
    heads = [r.path for r in hub_server.requests if r.method == "HEAD"]
    assert heads[0].endswith("/resolve/main/layer_0/cfg.json")
    # The branch is resolved once; the other files are fetched at the commit it pointed to.
    assert all(f"/resolve/{repo}/" in h for h in heads[1:]), heads


def test_second_call_is_served_from_the_cache(hub_server: HubServer, repo: str) -> None:
    names = ["layer_0/cfg.json", "layer_0/sae.safetensors"]
    first = remote.download_files(REPO, names)
    assert len(hub_server.content_gets()) == 2

    hub_server.clear_requests()
    again = remote.download_files(REPO, names)
    assert again == first
    assert hub_server.content_gets() == []  # at most a HEAD to check that `main` did not move
    assert all(r.method == "HEAD" for r in hub_server.requests)

    hub_server.clear_requests()
    pinned = remote.download_files(REPO, names, revision=repo)
    assert pinned == first
    assert hub_server.requests == []  # a commit sha is immutable: no request at all


def test_revision_pinning_branch_and_tag(hub_server: HubServer, repo: str) -> None:
    hub_server.tag(REPO, "v1", repo)
    v2 = hub_server.commit(REPO, {"layer_0/cfg.json": CFG_V2, "layer_0/sae.safetensors": WEIGHTS_V2})
    assert v2 != repo
    dev = hub_server.commit(REPO, {"layer_0/cfg.json": b"{}"}, branch="dev")

    def get(revision: str | None) -> tuple[bytes, bytes]:
        p = remote.download_files(REPO, ["layer_0/cfg.json", "layer_0/sae.safetensors"], revision=revision)
        return p["layer_0/cfg.json"].read_bytes(), p["layer_0/sae.safetensors"].read_bytes()

    assert get(None) == (CFG_V2, WEIGHTS_V2)  # main moved
    assert get(repo) == (CFG_V1, WEIGHTS_V1)  # old commit, full sha
    assert get(repo[:10]) == (CFG_V1, WEIGHTS_V1)  # short sha
    assert get("v1") == (CFG_V1, WEIGHTS_V1)  # tag
    assert get("dev")[0] == b"{}"  # branch (created from main = v2 here)
    assert get("dev")[1] == WEIGHTS_V2
    assert remote.download_files(REPO, ["layer_0/cfg.json"], revision=dev)["layer_0/cfg.json"].read_bytes() == b"{}"
    assert "layer_0/cfg.json" in remote.list_files(REPO, revision="v1")


# ------------------------------------------------------------------------------------------- offline


def test_offline_mode_serves_the_cache_and_names_missing_files(
    hub_server: HubServer, repo: str, hf_offline: Callable[[bool], None]
) -> None:
    online = remote.download_files(REPO, ["layer_0/cfg.json", "layer_0/sae.safetensors"])
    hub_server.clear_requests()
    hf_offline(True)

    assert remote.download_files(REPO, ["layer_0/cfg.json", "layer_0/sae.safetensors"]) == online
    assert remote.list_files(REPO) == ["layer_0/cfg.json", "layer_0/sae.safetensors"]  # what is cached
    with pytest.raises(HubUnavailableError) as info:
        remote.download_files(REPO, ["layer_1/sae.safetensors"])
    msg = str(info.value)
    assert "'layer_1/sae.safetensors'" in msg and REPO in msg and "offline" in msg
    assert "'layer_0/cfg.json'" in msg  # lists what *is* available offline
    assert isinstance(info.value, SAEHooksError) and isinstance(info.value, ConnectionError)
    assert hub_server.requests == []


def test_offline_env_var_is_read_at_call_time(hub_server: HubServer, repo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    online = remote.download_files(REPO, ["layer_0/cfg.json"])
    hub_server.clear_requests()
    # Only the environment variable: huggingface_hub.constants still says "online".
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert constants.HF_HUB_OFFLINE is False
    assert remote.is_offline()
    assert remote.download_files(REPO, ["layer_0/cfg.json"]) == online
    with pytest.raises(HubUnavailableError):
        remote.download_files(REPO, ["layer_1/cfg.json"])
    assert hub_server.requests == []


def test_local_files_only_and_offline_snapshot(hub_server: HubServer, repo: str, hf_offline: Callable[[bool], None]) -> None:
    folder = remote.snapshot(REPO, "layer_1/*")
    hub_server.clear_requests()
    assert remote.download_files(REPO, ["layer_1/cfg.json"], local_files_only=True)["layer_1/cfg.json"].exists()
    hf_offline(True)
    assert remote.snapshot(REPO, "layer_1/*") == folder
    with pytest.raises(HubUnavailableError, match="layer_0"):
        remote.snapshot(REPO, "layer_0/*")
    assert hub_server.requests == []


# ------------------------------------------------------------------------------------------- resume


def test_download_cut_mid_file_is_resumed_with_a_range_request(
    hub_server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dropped connection is retried with ``Range: bytes=<received>-`` where <received> is every byte that
    arrived (sae_hooks keeps them in ``blobs/<etag>.sae-hooks.partial``; huggingface_hub 2.x alone resumed only
    from whole ``DOWNLOAD_CHUNK_SIZE`` chunks, here 65536, and not at all for files under 10 MiB)."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    data = hashlib.sha256(b"seed").digest() * (256 * 1024 // 32)  # 256 KiB
    hub_server.create_repo(REPO, {"big/sae.safetensors": data})
    hub_server.truncate_next("big/sae.safetensors", 100_000)  # connection dropped after 100 kB

    path = remote.download_files(REPO, ["big/sae.safetensors"])["big/sae.safetensors"]
    assert path.read_bytes() == data
    gets = hub_server.content_gets("big/sae.safetensors")
    assert [(g.status, g.range) for g in gets] == [(200, None), (206, "bytes=100000-")]
    assert gets[0].body_bytes_sent == 100_000
    assert sum(g.body_bytes_sent for g in gets) == len(data)  # no byte downloaded twice
    _assert_blob_is_whole(path, hub_server.etag(REPO, "big/sae.safetensors"), hashlib.sha256(data).hexdigest())


def test_interrupted_download_resumes_in_the_same_call_and_leaves_nothing(hub_server: HubServer, repo: str) -> None:
    """A response that ends early without a network error (``mode="short"``) is completed with a ``Range``
    request for the missing bytes (huggingface_hub 2.x alone raised and restarted from byte 0 on the next call);
    no ``.incomplete``/partial file stays behind."""
    hub_server.truncate_next("layer_0/sae.safetensors", 1000, mode="short")
    path = remote.download_files(REPO, ["layer_0/sae.safetensors"])["layer_0/sae.safetensors"]
    assert path.read_bytes() == WEIGHTS_V1
    assert [(g.range, g.body_bytes_sent) for g in hub_server.content_gets()] == [(None, 1000), ("bytes=1000-", 1048)]
    _assert_blob_is_whole(path, hub_server.etag(REPO, "layer_0/sae.safetensors"), hashlib.sha256(WEIGHTS_V1).hexdigest())


def _assert_blob_is_whole(path: Path, etag: str, sha256: str) -> None:
    """The resumed bytes were joined at the right offset: the cached blob is named after the advertised etag and
    hashes to it (a wrong offset or a doubled range would change the hash), and nothing is left beside it."""
    blob = Path(os.path.realpath(path))
    assert blob.name == etag == sha256
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == sha256
    assert not any(b.endswith((".incomplete", ".partial", ".lock")) for b in _blobs(_cache()))


# ------------------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize(
    ("filename", "algo"), [("layer_0/sae.safetensors", "sha256"), ("layer_0/cfg.json", "git-sha1")]
)
def test_corrupted_download_is_rejected_and_not_cached(
    hub_server: HubServer, repo: str, filename: str, algo: str
) -> None:
    hub_server.corrupt(filename)
    with pytest.raises(CorruptDownloadError) as info:
        remote.download_files(REPO, [filename])
    msg = str(info.value)
    expected = hub_server.etag(REPO, filename)
    assert repr(filename) in msg and f"expected {algo} {expected}" in msg
    assert isinstance(info.value, SAEHooksError) and isinstance(info.value, OSError)
    assert expected not in _blobs(_cache())  # the bad blob is gone

    hub_server.clear_faults()
    path = remote.download_files(REPO, [filename])[filename]
    assert path.read_bytes() == _files_v1()[filename]


def test_corrupted_file_in_a_snapshot_is_rejected(hub_server: HubServer, repo: str) -> None:
    hub_server.corrupt("layer_1/sae.safetensors")
    with pytest.raises(CorruptDownloadError, match="layer_1/sae.safetensors"):
        remote.snapshot(REPO, "layer_1/*")
    hub_server.clear_faults()
    folder = remote.snapshot(REPO, "layer_1/*")
    assert (folder / "layer_1/sae.safetensors").read_bytes() == WEIGHTS_V1[::-1]


# ------------------------------------------------------------------------------------------- missing things


def test_missing_file_error_lists_the_files_closest_first(hub_server: HubServer, repo: str) -> None:
    with pytest.raises(HubFileNotFoundError) as info:
        remote.download_files(REPO, ["layer_0/sae.safetensor"])
    msg = str(info.value)
    assert "'layer_0/sae.safetensor'" in msg and REPO in msg and "'main'" in msg
    assert "Did you mean 'layer_0/sae.safetensors'" in msg
    listing = msg.split("Files there", 1)[1]
    assert listing.index("'layer_0/sae.safetensors'") < listing.index("'README.md'")
    for name in _files_v1():
        assert repr(name) in listing
    assert isinstance(info.value, FileNotFoundError)


def test_missing_repo_and_revision(hub_server: HubServer, repo: str) -> None:
    hub_server.tag(REPO, "v1")
    with pytest.raises(HubRepoNotFoundError, match="no-such/repo"):
        remote.download_files("no-such/repo", ["cfg.json"])
    with pytest.raises(HubRepoNotFoundError):
        remote.list_files("no-such/repo")
    with pytest.raises(HubRevisionNotFoundError) as info:
        remote.download_files(REPO, ["layer_0/cfg.json"], revision="v9")
    assert "'v9'" in str(info.value) and "'main'" in str(info.value) and "'v1'" in str(info.value)


def test_snapshot_with_patterns_matching_nothing(hub_server: HubServer, repo: str) -> None:
    with pytest.raises(HubFileNotFoundError, match="layer_7"):
        remote.snapshot(REPO, "layer_7/*")
    folder = remote.snapshot(REPO, ["layer_0/*", "README.md"])
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "README.md",
        "layer_0/cfg.json",
        "layer_0/sae.safetensors",
    ]


# ------------------------------------------------------------------------------------------- listing


def test_list_files_follows_tree_pagination(hub_server: HubServer, repo: str) -> None:
    hub_server.tree_page_size = 2
    assert remote.list_files(REPO) == sorted([".gitattributes", *_files_v1()])
    assert any("cursor=" in r.query for r in hub_server.requests if "/tree/" in r.path)


def test_dataset_repos_and_filenames_that_need_quoting(hub_server: HubServer) -> None:
    odd = "acts/layer 3#b.safetensors"
    hub_server.create_repo("me/acts", {odd: WEIGHTS_V1, "meta.json": b"{}"}, repo_type="dataset")
    assert remote.list_files("me/acts", repo_type="dataset") == [".gitattributes", odd, "meta.json"]
    got = remote.download_files("me/acts", [odd], repo_type="dataset")
    assert got[odd].read_bytes() == WEIGHTS_V1
    assert "datasets--me--acts" in got[odd].as_posix()
    with pytest.raises(HubRepoNotFoundError):
        remote.list_files("me/acts")  # it is not a model repo


def test_plain_huggingface_hub_calls_reach_the_test_server(hub_server: HubServer, repo: str) -> None:
    # The module-level HfApi behind these functions was built at import time: the fixture re-points it.
    assert huggingface_hub.model_info(REPO).sha == repo
    assert "README.md" in huggingface_hub.list_repo_files(REPO)
    path = huggingface_hub.hf_hub_download(REPO, "README.md")
    assert Path(path).read_bytes() == b"# tiny sae\n" and _cache() in Path(path).parents


# ------------------------------------------------------------------------------------------- upload


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_upload_folder_round_trip(hub_server: HubServer, tmp_path: Path) -> None:
    files = {"cfg.json": CFG_V1, "sae.safetensors": WEIGHTS_V1, "extra/notes.txt": b"hello"}
    _write_tree(tmp_path / "out", files)

    sha = remote.upload_folder(tmp_path / "out", "me/new-sae", commit_message="first upload")
    assert sha == hub_server.head("me/new-sae")
    assert remote.list_files("me/new-sae") == sorted([".gitattributes", *files])
    back = remote.download_files("me/new-sae", list(files))
    assert {name: p.read_bytes() for name, p in back.items()} == files

    # Again into a sub-folder on a new branch; main is untouched.
    sha2 = remote.upload_folder(tmp_path / "out", "me/new-sae", path_in_repo="layer_3", revision="exp")
    assert sha2 == hub_server.head("me/new-sae", "exp") != sha
    assert hub_server.head("me/new-sae") == sha
    assert "layer_3/sae.safetensors" in remote.list_files("me/new-sae", revision="exp")
    got = remote.download_files("me/new-sae", ["layer_3/sae.safetensors"], revision="exp")
    assert got["layer_3/sae.safetensors"].read_bytes() == WEIGHTS_V1


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # raised inside huggingface_hub
def test_upload_through_the_lfs_batch_api(
    hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Xet disabled and the server asking for LFS, the client uses the LFS batch API + a PUT per object."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub_server.lfs_uploads = True
    _write_tree(tmp_path / "out", {"cfg.json": CFG_V1, "sae.safetensors": WEIGHTS_V2})
    remote.upload_folder(tmp_path / "out", "me/lfs-sae")
    assert any(r.path.endswith(".git/info/lfs/objects/batch") for r in hub_server.requests)
    assert [r.method for r in hub_server.requests if r.path.startswith("/_lfs/objects/")] == ["PUT"]
    got = remote.download_files("me/lfs-sae", ["sae.safetensors"])
    assert got["sae.safetensors"].read_bytes() == WEIGHTS_V2


def test_upload_refuses_offline(hub_server: HubServer, tmp_path: Path, hf_offline: Callable[[bool], None]) -> None:
    _write_tree(tmp_path / "out", {"cfg.json": CFG_V1})
    hf_offline(True)
    with pytest.raises(HubUnavailableError, match="offline"):
        remote.upload_folder(tmp_path / "out", "me/x")
    with pytest.raises(NotADirectoryError):
        remote.upload_folder(tmp_path / "missing", "me/x")
