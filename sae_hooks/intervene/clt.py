"""Attaching a cross-layer transcoder (:class:`~sae_hooks.saes.clt.CrossLayerTranscoder`) as a multi-site replacement.

``model.add_sae(clt)`` installs, for each layer ``i``, a read-only hook at its input site (computing and recording
the latents ``a_i``) and a hook at its output site that replaces the MLP output ``y_j`` by the CLT's
``sum_{i <= j} a_i @ W_dec[i][:, j - i] + b_dec[j]`` (``error_term=True``: plus ``y_j - that``, so the model is
unchanged until latents are edited; ``detach_error`` as in ``add_sae``). ``splice=False`` records only. Recorded
tensors: ``{input site}.hook_sae_acts_post`` (the latents) and ``{output site}.hook_sae_recons``.

The input hook of layer ``j`` runs before its output hook in every forward pass, and layers run in order, so when
layer ``j``'s output hook runs the latents of layers ``0..j`` of the same forward pass are stashed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..errors import HookNotFoundError, SAEHooksError

if TYPE_CHECKING:  # the manager imports this module
    from .manager import SAEManager


def _resolve(manager: SAEManager, names: Sequence[str | None], modules: Sequence[str | None] | None) -> list[str]:
    out = []
    for i, name in enumerate(names):
        module = modules[i] if modules else None
        try:
            if name is None:
                raise HookNotFoundError("no hook name")
            out.append(manager.backend.resolve(name))
        except HookNotFoundError:
            if module is None:
                raise
            out.append(manager.backend.resolve(module))
    return out


def add_clt(
    manager: SAEManager,
    clt: Any,
    site: str | Sequence[str] | None = None,
    site_out: str | Sequence[str] | None = None,
    *,
    error_term: bool = False,
    splice: bool = True,
    detach_error: bool = True,
    name: str | None = None,
    attachment_cls: type | None = None,
    **options: Any,
) -> Any:
    """Attach ``clt`` through ``manager`` (what ``model.add_sae(clt, ...)`` does); returns its attachment.

    Args:
        site / site_out: one input / output site per layer (default: the CLT's ``hooks_in`` / ``hooks_out``, or
            its module paths where the hook names do not resolve on this model).
        error_term, splice, detach_error, name: as in ``add_sae`` (``splice`` is all or nothing here).
        attachment_cls: the manager's ``CLTAttachment`` (passed in: this module may not import the manager).
    """
    unsupported = sorted(k for k, v in options.items() if v not in (None, False))
    if unsupported:
        raise TypeError(f"a cross-layer transcoder does not support {unsupported} (yet)")
    if not isinstance(splice, bool):
        raise TypeError("splice= for a cross-layer transcoder is True or False")
    n = clt.n_layers
    ins = [site] if isinstance(site, str) else site
    outs = [site_out] if isinstance(site_out, str) else site_out
    for given, what in ((ins, "site"), (outs, "site_out")):
        if given is not None and len(given) != n:
            raise SAEHooksError(f"{what}= needs one site per layer of the CLT ({n}), got {len(given)}")
    if (ins is None and clt.hooks_in is None) or (outs is None and clt.hooks_out is None):
        raise SAEHooksError("this CLT records no sites; pass site=[one per layer] and site_out=[one per layer]")
    sites_in = _resolve(manager, ins if ins is not None else clt.hooks_in,
                        None if ins is not None else getattr(clt, "modules_in", None))
    sites_out = _resolve(manager, outs if outs is not None else clt.hooks_out,
                         None if outs is not None else getattr(clt, "modules_out", None))
    for s in sites_in:
        _check(manager, s, clt.d_in, "reads")
    for s in sites_out:
        _check(manager, s, clt.d_out, "writes")

    if attachment_cls is None:
        raise TypeError("add_clt needs attachment_cls= (the manager passes its CLTAttachment); use model.add_sae(clt)")
    att = attachment_cls(manager, clt, sites_in, name or manager._default_name(sites_out[0]), [], sites_out=sites_out)
    state = threading.local()  # the latents of the forward pass running in this thread

    def stash() -> Any:
        if not hasattr(state, "acts"):
            state.acts, state.x = [None] * n, [None] * n
        return state

    def make_in(i: int, record: Any):  # noqa: ANN202
        def read_input(x: Tensor) -> None:
            st = stash()
            if i == 0:  # a new forward pass: forget the last one's latents
                st.acts, st.x = [None] * n, [None] * n
            acts = clt.encode_layer(x, i)
            if record.wants("hook_sae_acts_post"):
                acts = record("hook_sae_acts_post", acts)
            st.acts[i], st.x[i] = acts, x
            return None

        return read_input

    def make_out(j: int, record: Any):  # noqa: ANN202
        def write_output(y: Tensor) -> Tensor | None:
            st = stash()
            if st.acts[j] is None:
                raise SAEHooksError(f"CLT output site {sites_out[j]!r} ran before its input site {sites_in[j]!r}")
            recon = clt.decode_layer(st.acts, j, st.x[j]).to(y.dtype)
            if record.wants("hook_sae_recons"):
                recon = record("hook_sae_recons", recon)
            if not splice:
                return None
            if error_term:
                err = y - recon
                recon = recon + (err.detach() if detach_error else err)
            return recon

        return write_output

    try:
        for i in range(n):
            for s, make in ((sites_in[i], make_in), (sites_out[i], make_out)):
                recorder, unpublish = manager.backend.recorder(f"{s}.{att.name}" if name else s)
                att._removers.append(unpublish)
                att._removers.append(manager.backend.install(s, make(i, recorder)))
    except BaseException:
        manager._run_removers(att)
        raise
    manager.attachments.append(att)
    return att


def _check(manager: SAEManager, site: str, width: int, verb: str) -> None:
    from ..errors import ShapeMismatchError

    actual = manager.backend.site_width(site)
    if actual is not None and actual != width:
        raise ShapeMismatchError(f"cannot attach the CLT at {site!r}: it {verb} {width} features but the activation "
                                 f"there is (..., {actual})")


__all__ = ["add_clt"]
