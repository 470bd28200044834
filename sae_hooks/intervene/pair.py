"""Attaching a Jacobian SAE pair: two SAEs around one MLP, one attachment, an optional live Jacobian.

A *pair* is anything shaped like :class:`sae_hooks.saes.jacobian.JacobianSAEPair` (duck-typed, so this
layer does not depend on where the Jacobian code lives): ``sae_in`` / ``sae_out`` SAEs, ``cfg.hook_in`` /
``cfg.hook_out`` sites, and ``jacobian(x, use_reconstruction) -> SparseJacobian`` at MLP inputs ``x``.

``model.add_sae(pair, ...)`` (any adapter) and :func:`attach_pair` attach it like any multi-site SAE:
``splice`` has the meaning it has in ``add_sae`` (``True``: both sites spliced; ``False``: record only; a
site or list of sites: splice only there), plus the role names ``"in"`` / ``"out"`` for the pair's two sites.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # the manager imports this module
    from .manager import Attachment, SAEManager


def is_pair(obj: Any) -> bool:
    """Whether ``obj`` is a Jacobian SAE pair (see the module docstring)."""
    cfg = getattr(obj, "cfg", None)
    return (
        hasattr(obj, "sae_in") and hasattr(obj, "sae_out") and callable(getattr(obj, "jacobian", None))
        and hasattr(cfg, "hook_in") and hasattr(cfg, "hook_out")
    )


class PairAttachment:
    """A pair attached to a model. ``att_in`` / ``att_out`` are the two SAEs' attachments (their tensors
    are recorded under their site names, e.g. ``cache["blocks.2.ln2.hook_out.hook_sae_acts_post"]``);
    ``jacobian`` holds the ``SparseJacobian`` of the last forward pass run in this thread when attached
    with ``jacobian=True``."""

    def __init__(self, pair: Any) -> None:
        self.pair = pair
        self.att_in: Attachment | None = None
        self.att_out: Attachment | None = None
        self._local = threading.local()  # one Jacobian per thread: concurrent forwards don't swap them

    @property
    def jacobian(self) -> Any:
        return getattr(self._local, "jacobian", None)

    @jacobian.setter
    def jacobian(self, value: Any) -> None:
        self._local.jacobian = value

    @property
    def attachments(self) -> list[Attachment]:
        return [a for a in (self.att_in, self.att_out) if a is not None]

    def remove(self) -> None:
        """Detach both SAEs (and the Jacobian hook). Safe to call twice."""
        for att in reversed(self.attachments):
            att.remove()

    def __enter__(self) -> PairAttachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PairAttachment(in={self.att_in!r}, out={self.att_out!r})"


def _pair_splice(manager: SAEManager, pair: Any, splice: bool | str | Sequence[str]) -> bool | list[str]:
    if isinstance(splice, bool):
        return splice
    roles = {"in": pair.cfg.hook_in, "out": pair.cfg.hook_out}
    wanted = [splice] if isinstance(splice, str) else list(splice)
    if any(w in ("none", "both") for w in wanted):
        raise ValueError("splice='none'/'both' are spelled splice=False/True (as in add_sae)")
    return [manager.backend.resolve(roles.get(w, w)) for w in wanted]


def add_pair(
    manager: SAEManager,
    pair: Any,
    *,
    splice: bool | str | Sequence[str] = True,
    jacobian: bool = True,
    use_reconstruction: bool = False,
    **options: Any,
) -> PairAttachment:
    """Attach ``pair`` through ``manager`` (what ``model.add_sae(pair, ...)`` does).

    Args:
        splice: see the module docstring.
        jacobian: compute the sparse Jacobian at the *true* MLP input each forward pass
            (``use_reconstruction=True``: at the input SAE's reconstruction) into ``.jacobian``.
        options: the other keywords of ``add_sae`` (``error_term``, ``skip_positions``, ...), applied
            to both SAEs.
    """
    chosen = _pair_splice(manager, pair, splice)
    site_in, site_out = manager.backend.resolve(pair.cfg.hook_in), manager.backend.resolve(pair.cfg.hook_out)
    pa = PairAttachment(pair)
    remove_observer = None
    try:
        if jacobian:  # installed before the input SAE, so it sees the true MLP input

            def jac_hook(x: Tensor) -> None:
                with torch.no_grad():
                    pa.jacobian = pair.jacobian(x, use_reconstruction)

            remove_observer = manager.observe(site_in, jac_hook)
        for role, sae, site in (("in", pair.sae_in, site_in), ("out", pair.sae_out, site_out)):
            splice_here = chosen if isinstance(chosen, bool) else site in chosen
            att = manager._add(sae, site, site_out=None, name=None, splice=splice_here, parent=pair, **options)
            setattr(pa, f"att_{role}", att)
            if remove_observer is not None:  # the Jacobian hook lives as long as the input attachment
                att._removers.insert(0, remove_observer)
                remove_observer = None
    except BaseException:
        if remove_observer is not None:
            remove_observer()
        pa.remove()
        raise
    return pa


def attach_pair(model: Any, pair: Any, *, splice: bool | str | Sequence[str] = False, **kwargs: Any) -> PairAttachment:
    """Attach both SAEs of ``pair`` to a model given the SAE API by an adapter; record only by default.

    ``model.add_sae(pair, ...)`` is the same with ``add_sae``'s default ``splice=True``. Keywords: those of
    :func:`add_pair` and ``add_sae`` (unknown ones raise ``TypeError``). Use it as a context manager to
    detach at the end: ``with attach_pair(model, pair, splice="in") as pa: ...``.
    """
    manager = getattr(model, "sae_manager", None)
    if manager is None:
        raise TypeError("attach_pair needs a model with the SAE API: call an adapter's attach(model) first")
    if not is_pair(pair):
        raise TypeError(f"attach_pair expects a Jacobian SAE pair, got {type(pair).__name__}")
    return manager.add_sae(pair, splice=splice, **kwargs)


@contextlib.contextmanager
def pair_attached(model: Any, pair: Any, **kwargs: Any) -> Iterator[PairAttachment]:
    """``with pair_attached(model, pair, splice=True) as pa: ...`` -- removed even on an exception."""
    pa = attach_pair(model, pair, **kwargs)
    try:
        yield pa
    finally:
        pa.remove()


__all__ = ["PairAttachment", "add_pair", "attach_pair", "is_pair", "pair_attached"]
