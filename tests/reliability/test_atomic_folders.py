"""Atomic folder writes under fault injection: a writer killed between any two steps of a swap leaves
every target readable and whole (old or new, never a mix, never missing), its leftovers are cleaned by
the next writer, one folder has one writer at a time, and saved folders follow the umask.

A child process saves with ``SAE_HOOKS_FAULT_AT=<step>`` and exits (``os._exit``) at that step; the
parent then checks what a reader sees. Both swap strategies are covered: ``renameat2(RENAME_EXCHANGE)``
and the two-rename fallback (forced with ``SAE_HOOKS_NO_RENAME_EXCHANGE=1``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import activation_folder
from sae_hooks import _atomic
from sae_hooks._atomic import atomic_dir, atomic_dirs, folder_lock, recover
from sae_hooks.errors import FolderLockedError, SAEHooksError
from sae_hooks.native import load
from sae_hooks.saes.registry import make_sae

ROOT = Path(__file__).resolve().parents[2]
FAULT_EXIT = 86

CHILD = r"""
import sys, torch
from pathlib import Path
from sae_hooks.saes.registry import make_sae
from sae_hooks.train.trainer import Trainer, TrainEntry

def sae(seed):
    torch.manual_seed(seed)
    s = make_sae("topk", 6, 12, k=3)
    with torch.no_grad():
        for p in s.parameters():
            p.normal_()
    return s

kind, target, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if kind == "native":
    sae(seed).save(target)
elif kind == "set":
    entries = [TrainEntry(n, "site", sae(seed + i), init_weights=False) for i, n in enumerate(["a", "b"])]
    Trainer(entries).save(target)
elif kind == "loop":
    i = 0
    while True:
        sae(seed + i % 2).save(target)
        i += 1
"""


def saved_sae(seed: int):
    torch.manual_seed(seed)
    s = make_sae("topk", 6, 12, k=3)
    with torch.no_grad():
        for p in s.parameters():
            p.normal_()
    return s


def save_set(out: Path, seed: int) -> None:
    from sae_hooks.train.trainer import Trainer, TrainEntry

    entries = [TrainEntry(n, "site", saved_sae(seed + i), init_weights=False) for i, n in enumerate(["a", "b"])]
    Trainer(entries).save(out)


def run_child(kind: str, target: Path, seed: int, fault: str | None = None, exchange: bool = True) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("SAE_HOOKS_FAULT_AT", "SAE_HOOKS_NO_RENAME_EXCHANGE")}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["SAE_HOOKS_FAULT_AT"] = fault
    if not exchange:
        env["SAE_HOOKS_NO_RENAME_EXCHANGE"] = "1"
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(target), str(seed)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, FAULT_EXIT), proc.stderr
    return proc.returncode


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# Which version a reader must see after a kill at each step (the journal is the commit point).
STEPS = {
    True: {"atomic:written": "old", "atomic:journal": "new", "atomic:exchanged": "new", "atomic:first-swapped": "new"},
    False: {"atomic:written": "old", "atomic:journal": "new", "atomic:moved-old": "new", "atomic:first-swapped": "new"},
}
CASES = [(ex, step, want) for ex, steps in STEPS.items() for step, want in steps.items()]


NATIVE_CASES = [(True, "atomic:exchanged", "new"), (False, "atomic:moved-old", "new"), (True, "atomic:written", "old")]


@pytest.mark.slow
@pytest.mark.parametrize("exchange,step,want", NATIVE_CASES)
def test_killed_native_save_leaves_old_or_new_folder(tmp_path: Path, exchange: bool, step: str, want: str) -> None:
    target = tmp_path / "sae"
    saved_sae(0).save(target)
    rc = run_child("native", target, 1, step, exchange)
    assert rc == FAULT_EXIT  # the child really died at that step
    if exchange:  # RENAME_EXCHANGE: the folder exists at every instant, before any recovery
        assert (target / "cfg.json").is_file() and (target / "sae.safetensors").is_file()
    got = load(target)  # readers recover (roll the journal forward) first
    assert same_weights(got, saved_sae(0 if want == "old" else 1))
    assert hidden(tmp_path) != [] or step == "atomic:written"  # the dead writer left something behind ...
    saved_sae(2).save(target)  # ... which the next writer removes
    assert hidden(tmp_path) == []
    assert same_weights(load(target), saved_sae(2))


@pytest.mark.slow
@pytest.mark.parametrize("exchange,step,want", CASES)
def test_killed_trainer_save_is_all_or_nothing(tmp_path: Path, exchange: bool, step: str, want: str) -> None:
    out = tmp_path / "out"
    save_set(out, 0)
    assert run_child("set", out, 10, step, exchange) == FAULT_EXIT
    if exchange:
        assert (out / "a" / "cfg.json").is_file() and (out / "b" / "cfg.json").is_file()
    base = 0 if want == "old" else 10
    for i, name in enumerate(["a", "b"]):  # both SAEs from the same save: never one old and one new
        got = load(out / name)
        ref = saved_sae(base + i)
        assert torch.equal(got.W_dec, ref.W_dec) and torch.equal(got.b_enc, ref.b_enc)
    save_set(out, 20)
    assert hidden(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_the_folder(tmp_path: Path) -> None:
    """A child saves in a loop; SIGKILL at random moments; every time the folder loads and is whole."""
    target = tmp_path / "sae"
    saved_sae(0).save(target)
    versions = [saved_sae(0), saved_sae(1)]
    rng = torch.Generator().manual_seed(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, "loop", str(target), "0"], env=env, cwd=ROOT)
        time.sleep(2.5 + float(torch.rand(1, generator=rng)) * 1.5)  # past the import, inside the save loop
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert (target / "cfg.json").is_file()  # never missing, even before recovery
        got = load(target)
        assert any(same_weights(got, v) for v in versions)
    saved_sae(3).save(target)
    assert hidden(tmp_path) == []


def test_exception_inside_the_block_keeps_old_folder_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "x"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("old")
    with pytest.raises(KeyError), atomic_dirs([target, tmp_path / "y"]) as (a, b):
        (a / "f").write_text("new")
        raise KeyError("boom")
    assert (target / "f").read_text() == "old" and not (tmp_path / "y").exists()
    assert hidden(tmp_path) == []


def test_atomic_dirs_refuses_paths_in_different_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one parent"), atomic_dirs([tmp_path / "a", tmp_path / "sub" / "b"]):
        pass


def test_torn_journal_is_ignored_and_foreign_one_of_live_writer_is_left(tmp_path: Path) -> None:
    target = tmp_path / "x"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("v1")
    dead = tmp_path / ".sae-hooks-txn.h.999999999.abcd.json"  # no such PID: a dead writer's torn journal
    dead.write_text('{"pairs": [[')
    recover(target)
    assert (target / "f").read_text() == "v1"


# Locking -----------------------------------------------------------------------------------------

HOLDER = r"""
import sys, time
from sae_hooks._atomic import folder_lock
with folder_lock(sys.argv[1]):
    open(sys.argv[2], "w").write("ready")
    time.sleep(60)
"""
NO_FCNTL = "import sys; sys.modules['fcntl'] = None  # as on Windows: `import fcntl` raises ImportError\n"


@pytest.fixture(params=["flock", "no fcntl"])
def lock_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both lock implementations: ``flock``, and the exclusively created lock file used where ``fcntl`` is
    missing (Windows), simulated here by hiding the module (children: ``sys.modules['fcntl'] = None``)."""
    if request.param == "no fcntl":
        monkeypatch.setattr(_atomic, "fcntl", None)
    return request.param


def _child(code: str, kind: str) -> str:
    return (NO_FCNTL if kind == "no fcntl" else "") + code


def test_second_process_is_refused_with_the_holder_named(tmp_path: Path, lock_kind: str) -> None:
    target, ready = tmp_path / "ckpt", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _child(HOLDER, lock_kind), str(target), str(ready)], cwd=ROOT)
    try:
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(FolderLockedError) as err, folder_lock(target, timeout=0.3):
            pass
        assert time.monotonic() - t0 < 5
        msg = str(err.value)
        assert f"PID {proc.pid}" in msg and "host" in msg and "folder_lock" in msg  # the holder's command line
        with pytest.raises(FolderLockedError), atomic_dir(target, timeout=0.2):  # saves take the same lock
            pass
    finally:
        proc.kill()
        proc.wait()
    if lock_kind == "no fcntl":  # SIGKILL leaves the lock file: its holder's PID is dead, so it is taken over
        assert json.loads((tmp_path / ".ckpt.lock").read_text())["pid"] == proc.pid
    with folder_lock(target, timeout=5):  # released when its holder died
        pass
    assert hidden(tmp_path) == []


COUNTER = r"""
import sys, time
from pathlib import Path
from sae_hooks._atomic import folder_lock
target, counter = sys.argv[1], Path(sys.argv[2])
for _ in range(25):
    with folder_lock(target):
        n = int(counter.read_text())
        time.sleep(0.002)  # a read-modify-write that loses updates unless the lock excludes the other process
        counter.write_text(str(n + 1))
"""


def test_two_processes_contend_for_one_lock_without_lost_updates(tmp_path: Path, lock_kind: str) -> None:
    counter = tmp_path / "n"
    counter.write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", _child(COUNTER, lock_kind), str(tmp_path / "x"), str(counter)],
                              cwd=ROOT) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert counter.read_text() == "50"
    assert hidden(tmp_path) == []


def test_portable_lock_takes_over_only_what_is_known_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fcntl: a lock file of a live PID, or of another host, is respected (the error says who holds it
    and, for a host we cannot check, to remove it by hand); one of a dead PID, a takeover guard of a dead PID,
    and an unreadable lock file older than UNREADABLE_LOCK_STALE_S are taken over."""
    monkeypatch.setattr(_atomic, "fcntl", None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock, guard = tmp_path / ".x.lock", tmp_path / ".x.lock.takeover"
    host = socket.gethostname()

    def holder(pid: int, on: str = host) -> str:
        return json.dumps({"pid": pid, "host": on, "command": "sae-hooks train", "since": "2026-12-02T06:00:00"})

    lock.write_text(holder(os.getppid()))  # alive
    with pytest.raises(FolderLockedError, match=f"PID {os.getppid()} on host"):
        with folder_lock(tmp_path / "x", timeout=0.1):
            pass
    lock.write_text(holder(dead.pid, "gpu3"))  # another host: cannot be checked from here
    with pytest.raises(FolderLockedError, match=r"host 'gpu3' .* remove .*\.x\.lock"):
        with folder_lock(tmp_path / "x", timeout=0.1):
            pass
    lock.write_text(holder(dead.pid))
    guard.write_text(holder(dead.pid))  # a takeover interrupted by a kill
    with folder_lock(tmp_path / "x", timeout=5):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text("")  # a writer killed between creating and filling its lock file
    with pytest.raises(FolderLockedError, match="holder unknown"):
        with folder_lock(tmp_path / "x", timeout=0.1):
            pass
    old = time.time() - _atomic.UNREADABLE_LOCK_STALE_S - 5
    os.utime(lock, (old, old))
    with folder_lock(tmp_path / "x", timeout=5):
        pass
    assert hidden(tmp_path) == []


def test_cli_refuses_a_second_run_on_one_checkpoint_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sae_hooks.app.cli import main

    ckpt, ready = tmp_path / "ckpt", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ckpt), str(ready)], cwd=ROOT)
    try:
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        acts = tmp_path / "acts"
        rc = main(["train", "--activations", str(activation_folder(acts)), "--out", str(tmp_path / "o"),
                   "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--steps", "2", "--no-progress"])
    finally:
        proc.kill()
        proc.wait()
    assert rc == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"PID {proc.pid}" in err
    assert not (tmp_path / "o").exists()


def test_threads_saving_one_sae_serialise_without_errors(tmp_path: Path, lock_kind: str) -> None:
    target = tmp_path / "sae"
    saes = [saved_sae(i) for i in range(4)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(10):
                saes[i].save(target)
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    got = load(target)
    assert any(same_weights(got, s) for s in saes)  # one whole save won
    assert hidden(tmp_path) == []


def test_lock_is_reentrant_in_one_thread(tmp_path: Path, lock_kind: str) -> None:
    with folder_lock(tmp_path / "a", timeout=0), folder_lock(tmp_path / "a", timeout=0):
        with atomic_dir(tmp_path / "a", timeout=0) as tmp:  # a save inside a held lock (the CLI holds it per run)
            (tmp / "f").write_text("x")
    assert (tmp_path / "a" / "f").read_text() == "x"


# Permissions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_folders_follow_the_umask(tmp_path: Path, umask: int, dir_mode: int, file_mode: int) -> None:
    old = os.umask(umask)
    try:
        saved_sae(0).save(tmp_path / "sae")
        from sae_hooks._atomic import atomic_write_bytes

        atomic_write_bytes(tmp_path / "f.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "sae").stat().st_mode & 0o777 == dir_mode
    for f in ("cfg.json", "sae.safetensors"):
        assert (tmp_path / "sae" / f).stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == file_mode


def test_typed_errors_are_sae_hooks_errors() -> None:
    assert issubclass(FolderLockedError, SAEHooksError)
