"""Atomic file and folder writes, one writer per folder, and recovery from killed writes.

Guarantees (see ``docs/reliability.md``):

* **Files** (:func:`atomic_write_bytes`): written to a temporary sibling, fsynced, renamed into place.
* **Folders** (:func:`atomic_dir`, and :func:`atomic_dirs` for several folders as one unit): the new
  contents are written to temporary siblings, fsynced, then a *journal* naming each new folder by its
  inode is written (the commit point) and every target is swapped in with one
  ``renameat2(RENAME_EXCHANGE)`` on Linux, so a target is never missing. Where the exchange is not
  available (another OS, a filesystem without it) the swap is two renames; a kill between them is
  repaired by rolling the journal forward on the next read or write of that folder (:func:`recover`).
  A kill before the journal leaves the old folders untouched; a kill after it leaves all the new ones.
* **One writer per folder** (:func:`folder_lock`): an advisory ``flock`` on a hidden sibling
  ``.NAME.lock`` serialises writers across processes and threads (re-entrant within a thread). Where
  ``fcntl`` does not exist (Windows) the lock is that file itself, created with ``O_CREAT|O_EXCL``; a
  lock file left by a dead process of this host is taken over. A writer that cannot get the lock in
  time raises :class:`~sae_hooks.errors.FolderLockedError` naming the holder (PID, host, command).
* **Leftovers of killed writers** (temporary folders, swapped-out old folders, journals) carry the
  writer's host and PID in their names and are removed by the next writer of that folder once that
  PID is dead.
* **Permissions** follow the umask (``0755``/``0644`` under the usual ``022``), so collaborators can
  read saved folders; ``tempfile`` alone would make them ``0700``/``0600``.

``SAE_HOOKS_FAULT_AT=<point>`` makes the writing process exit at that point (``os._exit``); the
fault-injection tests use it to kill a writer between two steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
try:
    import fcntl
except ImportError:  # Windows: no flock; the lock is then an exclusively created file (see folder_lock)
    fcntl = None  # type: ignore[assignment]
import json
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import FolderLockedError

#: Seconds a writer waits for another writer of the same folder before giving up.
DEFAULT_LOCK_TIMEOUT = 60.0

_TAG = "sae-hooks"  # marks our hidden siblings: .NAME.sae-hooks-KIND.HOST.PID.RAND
_HOST = socket.gethostname().replace(".", "_") or "host"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _fault(point: str) -> None:
    """Exit the process here when the fault-injection tests ask for it (``SAE_HOOKS_FAULT_AT``)."""
    if os.environ.get("SAE_HOOKS_FAULT_AT") == point:
        os._exit(86)


# Permissions ------------------------------------------------------------------------------------


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide and not thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fix_modes(root: Path) -> None:
    """Give a folder written through ``tempfile`` the modes a plain ``mkdir``/``open`` would have."""
    mask = _umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    if root.is_dir():
        os.chmod(root, dir_mode)
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), dir_mode)
            for f in filenames:
                p = os.path.join(dirpath, f)
                if not os.path.islink(p):
                    os.chmod(p, file_mode)
    else:
        os.chmod(root, file_mode)


# Low-level helpers ------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets us open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _libc_renameat2():  # noqa: ANN202 - a ctypes function or None
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step; ``False`` where the system cannot (then nothing happened)."""
    if _renameat2 is None or os.environ.get("SAE_HOOKS_NO_RENAME_EXCHANGE"):
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{_TAG}-{kind}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would *terminate* the process there
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _windows_pid_alive(pid: int) -> bool:  # pragma: no cover - Windows only
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: exists, not ours
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _dead_writer(name: str) -> bool:
    """Whether a sibling named ``...sae-hooks-KIND.HOST.PID.RAND`` was left by a dead process of this host."""
    parts = name.rsplit(".", 3)
    if len(parts) != 4 or parts[1] != _HOST or not parts[2].isdigit():
        return False
    return not _pid_alive(int(parts[2]))


# Locking ----------------------------------------------------------------------------------------

_held: dict[str, list] = {}  # lock file -> [owner thread id, depth]
_held_guard = threading.Lock()


#: A lock file without readable holder information (its writer died between creating and filling it)
#: is stale after this many seconds (only where ``fcntl`` is missing).
UNREADABLE_LOCK_STALE_S = 30.0


def _lock_file(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    return path.with_name(f".{path.name}.lock")


def _holder_info() -> bytes:
    return json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(getattr(sys, "orig_argv", sys.argv))[:300],
    }).encode()


def _read_holder(lock: Path) -> tuple[dict | None, float] | None:
    """``(holder info or None if unreadable, age in s)`` of a lock file; ``None`` if there is none."""
    try:
        with open(lock, "rb") as f:
            raw = f.read(4096)
        age = time.time() - os.stat(lock).st_mtime
    except FileNotFoundError:
        return None
    except OSError:
        return {}, 0.0
    try:
        info = json.loads(raw.decode() or "null")
    except ValueError:
        info = None
    return (info if isinstance(info, dict) else None), age


def _describe(info: dict | None) -> str:
    if not info:
        return "another writer (holder unknown)"
    return f"PID {info.get('pid')} on host {info.get('host')!r} (command: {info.get('command')!r}, since {info.get('since')})"


def _stale(info: dict | None, age: float) -> bool:
    """Whether a lock file's holder is known to be gone: a dead PID of this host, or no holder written long ago."""
    if not info:
        return age > UNREADABLE_LOCK_STALE_S
    pid = info.get("pid")
    return info.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def _take_over_stale(lock: Path) -> bool:
    """Remove ``lock`` if its holder is gone (no ``fcntl``); ``True`` if the caller should try again now.

    Takeovers are serialised by a ``.takeover`` guard file (created exclusively; itself taken over when
    its holder died), so a stale lock is removed only after being re-read under the guard: a fresh lock
    that another writer created meanwhile is never removed."""
    seen = _read_holder(lock)
    if seen is None:
        return True  # released meanwhile
    if not _stale(*seen):
        return False
    guard = lock.with_name(lock.name + ".takeover")
    try:
        gfd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        held = _read_holder(guard)
        if held is not None and _stale(*held):
            with contextlib.suppress(OSError):
                os.unlink(guard)
        return False
    try:
        os.write(gfd, _holder_info())
        now = _read_holder(lock)
        if now is None:
            return True
        if now[0] == seen[0] and _stale(*now):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            return True
        return False
    finally:
        os.close(gfd)
        with contextlib.suppress(OSError):
            os.unlink(guard)


def _acquire(lock: Path) -> int | None:
    """The open descriptor of ``lock``, now held by this thread, or ``None`` if another writer holds it."""
    if fcntl is None:
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                if _take_over_stale(lock):
                    continue
                return None
            try:
                os.write(fd, _holder_info())
            except BaseException:
                os.close(fd)
                os.unlink(lock)
                raise
            return fd
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # The holder before us unlinks the lock file on release: make sure we locked the file that is
        # still at that path, else try again (two writers must never both "hold" the lock).
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, _holder_info())
        except BaseException:
            os.close(fd)
            raise
        return fd


def _release(lock: Path, fd: int) -> None:
    if fcntl is None:
        os.close(fd)  # first: an open file cannot be removed on Windows
        with contextlib.suppress(OSError):
            os.unlink(lock)
        return
    try:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it; see the inode check in _acquire
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the writer lock of folder ``path`` (re-entrant within a thread).

    Waits up to ``timeout`` seconds (``0``: do not wait) for another writer, then raises
    :class:`~sae_hooks.errors.FolderLockedError` naming the holder.
    """
    lock = _lock_file(Path(path))
    key = str(lock)
    me = threading.get_ident()
    with _held_guard:
        entry = _held.get(key)
        if entry is not None and entry[0] == me:
            entry[1] += 1
            reentrant = True
        else:
            reentrant = False
    if reentrant:
        try:
            yield
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + max(timeout, 0.0)
    while (fd := _acquire(lock)) is None:
        if time.monotonic() >= deadline:
            seen = _read_holder(lock)
            hint = "" if fcntl is not None else f" If that process is gone (on another host?), remove {lock}."
            raise FolderLockedError(
                f"{Path(path)} is being written by {_describe(seen[0] if seen else None)}; waited {timeout:g} s for "
                f"its lock {lock}. Use another folder, or wait for that writer to finish.{hint}"
            )
        time.sleep(0.02)
    try:
        with _held_guard:
            _held[key] = [me, 1]
        yield
    finally:
        with _held_guard:
            _held.pop(key, None)
        _release(lock, fd)


# Journal and recovery ---------------------------------------------------------------------------


def _journals(parent: Path) -> list[Path]:
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return [parent / n for n in names if n.startswith(f".{_TAG}-txn.") and n.endswith(".json")]


def _read_journal(journal: Path) -> list[tuple[str, str, int]] | None:
    try:
        data = json.loads(journal.read_text())
        return [(str(t), str(n), int(ino)) for t, n, ino in data["pairs"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _roll_forward(journal: Path) -> None:
    """Finish the swaps a journal lists (idempotent: each new folder is recognised by its inode)."""
    pairs = _read_journal(journal)
    if pairs is None:
        _remove(journal)  # torn or foreign: journals are written atomically, so it never committed
        return
    parent = journal.parent
    for tmp_name, target_name, ino in pairs:
        tmp, target = parent / tmp_name, parent / target_name
        if os.path.lexists(target) and os.lstat(target).st_ino == ino:
            continue  # already swapped in
        if os.path.lexists(tmp) and os.lstat(tmp).st_ino == ino:
            _swap_in(tmp, target)
    _fsync_dir(parent)
    _remove(journal)


def _clean_dead(path: Path) -> None:
    """Remove temporary/old siblings of ``path`` left by dead writers (call with the lock held)."""
    prefix = f".{path.name}.{_TAG}-"
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    lock_prefix = "." + prefix  # lock files of those siblings (a writer killed inside a nested save)
    for n in names:
        if n.startswith(prefix) and _dead_writer(n):
            _remove(path.parent / n)
        elif n.startswith(lock_prefix) and n.endswith(".lock") and _dead_writer(n[1:-len(".lock")]):
            _remove(path.parent / n)


def _dead_journals(parent: Path) -> list[Path]:
    return [j for j in _journals(parent) if _dead_writer(j.name[: -len(".json")])]


def _repair(parent: Path, timeout: float) -> None:
    """Roll forward the journals of dead writers in ``parent``, holding the locks of their targets."""
    try:
        names = os.listdir(parent)
    except OSError:
        names = []
    for n in names:  # a journal's own temporary file, left by a writer killed while writing the journal
        if n.startswith(f"..{_TAG}-txn.") and _dead_writer(n):
            _remove(parent / n)
    for journal in _dead_journals(parent):
        names = sorted({n for _t, n, _i in _read_journal(journal) or []})
        with contextlib.ExitStack() as locks:
            for n in names:
                locks.enter_context(folder_lock(parent / n, timeout))
            if os.path.lexists(journal):
                _roll_forward(journal)


def recover(path: str | os.PathLike, timeout: float = DEFAULT_LOCK_TIMEOUT) -> None:
    """Repair ``path`` after a writer was killed mid-swap (roll its journal forward); cheap when intact.

    Readers of our folders call this first, so a folder is never seen missing or half-swapped.
    """
    _repair(Path(os.path.abspath(path)).parent, timeout)


def _swap_in(tmp: Path, target: Path) -> None:
    """Put ``tmp`` at ``target``; the old ``target`` ends up at a dead-writer sibling (or ``tmp``)."""
    if os.path.lexists(target):
        if _exchange(tmp, target):
            _fault("atomic:exchanged")
            return  # ``tmp`` now holds the old folder; removed by the caller
        old = _sibling(target, "old")
        os.replace(target, old)
        _fault("atomic:moved-old")  # target missing: the journal repairs it
        os.replace(tmp, target)
        return
    os.replace(tmp, target)


# Public writers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dirs(paths: Sequence[str | os.PathLike], timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[list[Path]]:
    """Yield one temporary folder per path; on success they replace ``paths`` as one unit.

    All paths must share one parent folder (the journal lives there). An exception inside the block
    leaves every target as it was; a kill before the commit point leaves the old folders, after it
    the new ones (completed by :func:`recover` or the next writer).
    """
    targets = [Path(os.path.abspath(p)) for p in paths]
    if not targets:
        yield []
        return
    parent = targets[0].parent
    if any(t.parent != parent for t in targets) or len(set(targets)) != len(targets):
        raise ValueError(f"atomic_dirs: paths must be distinct folders in one parent, got {[str(t) for t in targets]}")
    parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as locks:
        for t in sorted(targets):  # one global order: no deadlock between two multi-folder writers
            locks.enter_context(folder_lock(t, timeout))
        _repair(parent, timeout)
        for t in targets:
            _clean_dead(t)
        tmps: list[Path] = []
        journal = parent / f".{_TAG}-txn.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.json"
        committed = False
        try:
            for t in targets:
                tmp = _sibling(t, "tmp")
                tmp.mkdir()
                tmps.append(tmp)
            yield list(tmps)
            for tmp in tmps:
                _fix_modes(tmp)
                _fsync_tree(tmp)
            _fault("atomic:written")
            pairs = [[tmp.name, t.name, os.lstat(tmp).st_ino] for tmp, t in zip(tmps, targets)]
            atomic_write_bytes(journal, json.dumps({"pairs": pairs}).encode())
            committed = True  # from here on the new folders win, whatever happens
            _fault("atomic:journal")
            for i, (tmp, t) in enumerate(zip(tmps, targets)):
                _swap_in(tmp, t)
                if i == 0:
                    _fault("atomic:first-swapped")
            _fsync_dir(parent)
            _remove(journal)
        except BaseException:
            if committed:
                with contextlib.suppress(Exception):  # else the journal stays for recover()
                    _roll_forward(journal)
            else:
                for tmp in tmps:
                    _remove(tmp)
            raise
        for tmp in tmps:  # after a swap by exchange, these hold the old folders
            _remove(tmp)
        for t in targets:  # old folders moved aside by the two-rename fallback
            prefix = f".{t.name}.{_TAG}-old.{_HOST}.{os.getpid()}."
            for n in os.listdir(parent):
                if n.startswith(prefix):
                    _remove(parent / n)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` as a whole (see :func:`atomic_dirs`).

    An exception leaves ``path`` as it was (old contents intact, no partial folder); the target is
    never missing, even if the process is killed mid-swap.
    """
    with atomic_dirs([path], timeout) as tmps:
        yield tmps[0]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
