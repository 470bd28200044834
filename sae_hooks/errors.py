"""Typed errors. Every message names what is wrong: the hook, the file, the key, the shapes."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SAEHooksError(Exception):
    """Base class of every error raised by sae-hooks."""


class ConfigError(SAEHooksError, ValueError):
    """An SAE config is malformed: unknown key, missing key, wrong type or inconsistent values."""


class UnknownArchitectureError(ConfigError):
    """The architecture name is not registered."""


class ShapeMismatchError(SAEHooksError, ValueError):
    """A tensor's shape disagrees with what the SAE or the site expects."""


class HookNotFoundError(SAEHooksError, KeyError):
    """A hook name or module path does not exist on the model."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SAEFormatError(SAEHooksError, ValueError):
    """A file on disk is not a valid SAE in the expected format."""


class HubFileNotFoundError(SAEHooksError, FileNotFoundError):
    """A file is missing from a Hub repository (the message lists what is there)."""


class CorruptDownloadError(SAEHooksError, OSError):
    """A downloaded file does not match its advertised size or hash."""


class HubRepoNotFoundError(SAEHooksError, FileNotFoundError):
    """A Hub repository does not exist, or is private/gated and the token cannot see it."""


class HubRevisionNotFoundError(SAEHooksError, FileNotFoundError):
    """A branch, tag or commit does not exist in a Hub repository (the message lists the branches and tags)."""


class HubUnavailableError(SAEHooksError, ConnectionError):
    """The Hub cannot be used (offline mode, or unreachable) and the local cache lacks what was asked for."""


class FolderLockedError(SAEHooksError, BlockingIOError):
    """Another writer (named in the message: PID, host, command) holds the lock of the folder being written."""


class DegenerateDataError(SAEHooksError, ValueError):
    """Training data that cannot give a statistic the trainer needs (all zero, constant rows, a scale the
    training dtype cannot represent); the message names the statistic and the batch."""


class UnsafeCheckpointError(SAEFormatError):
    """A pickled checkpoint needs more than ``torch.load(weights_only=True)`` to open."""


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates closest to ``name`` (best first), for 'did you mean' messages."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if len(matches) < n:
        # Also suggest names sharing the last dotted component (e.g. other layers' hook_resid_post).
        tail = name.rsplit(".", 1)[-1]
        matches += [c for c in candidates if c.endswith(tail) and c not in matches][: n - len(matches)]
    return matches


def did_you_mean(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """' Did you mean: a, b?' or '' when nothing is close."""
    matches = close_matches(name, candidates, n)
    return f" Did you mean: {', '.join(repr(m) for m in matches)}?" if matches else ""
