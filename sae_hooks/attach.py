"""The attach API shared by every adapter: ``add_sae``, edits on an attachment, removal, context managers.

An adapter supplies a :class:`Backend` (how to find a site by name, how to hook it, where to publish
recorded tensors); everything else — the intervention numbers, the bookkeeping, the rule for several
SAEs on one site, position tracking during generation — lives here, so all adapters behave the same.

Rule for several SAEs on one site: they are applied in the order they were attached, each one seeing
the output of the one before (``replace=True`` removes the ones already there first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from .errors import SAEHooksError, ShapeMismatchError
from .interventions import (
    AblationMode,
    ForwardContext,
    LatentEdit,
    PositionSpec,
    Recorder,
    SiteIntervention,
    Steering,
)
from .saes.base import SAE

Remover = Callable[[], None]


class Backend(Protocol):
    """What an adapter provides to :class:`SAEManager`."""

    def resolve(self, name: str) -> str:
        """Canonical name of a site; raise :class:`~sae_hooks.errors.HookNotFoundError` with close matches."""

    def site_width(self, site: str) -> int | None:
        """The feature width at a site when known without running the model (for early shape checks)."""

    def install(self, site: str, fn: Callable[[Tensor], Tensor | None]) -> Remover:
        """Run ``fn`` on the site's activation in every forward; its non-``None`` result replaces it."""

    def recorder(self, prefix: str) -> tuple[Recorder, Remover]:
        """A recorder publishing tensors as ``f"{prefix}.{record_name}"``, and how to unpublish them."""


class Attachment:
    """An SAE attached at one or more sites. Returned by ``model.add_sae``; edit it, then ``remove()`` it.

    Edits (ablation, clamping, steering) apply at every site of the attachment and can be changed
    between forward passes.
    """

    def __init__(self, manager: SAEManager, sae: SAE, sites: list[str], name: str, interventions: list[SiteIntervention]):
        self.manager = manager
        self.sae = sae
        self.sites = sites
        self.name = name
        self.interventions = interventions
        self._removers: list[Remover] = []
        self.active = True

    @property
    def edits(self) -> list[LatentEdit | Steering]:
        return self.interventions[0].edits

    # Edits ---------------------------------------------------------------------------------------

    def _latent_index(self, latents: int | Sequence[int] | Tensor) -> Tensor:
        idx = torch.as_tensor([latents] if isinstance(latents, int) else latents, dtype=torch.long).flatten()
        bad = idx[(idx < 0) | (idx >= self.sae.cfg.d_sae)]
        if len(bad):
            raise IndexError(f"latent indices {bad.tolist()} out of range for d_sae={self.sae.cfg.d_sae}")
        return idx.to(self.sae.device)

    def ablate(
        self,
        latents: int | Sequence[int] | Tensor,
        mode: AblationMode = "zero",
        *,
        means: Tensor | None = None,
        value: float | Tensor | None = None,
        positions: PositionSpec = None,
    ) -> Attachment:
        """Ablate latents: ``mode="zero"``, ``"mean"`` (``means``: a ``(d_sae,)`` tensor of latent means,
        e.g. ``cache[...].mean((0, 1))``), or ``"clamp"`` (to ``value``, a scalar or one per latent)."""
        idx = self._latent_index(latents)
        dtype, device = self.sae.dtype, self.sae.device
        if mode == "zero":
            values = torch.zeros(len(idx), dtype=dtype, device=device)
        elif mode == "mean":
            if means is None:
                raise ValueError("mode='mean' needs means=<(d_sae,) tensor of latent means>")
            if means.shape != (self.sae.cfg.d_sae,):
                raise ShapeMismatchError(f"means must have shape ({self.sae.cfg.d_sae},), got {tuple(means.shape)}")
            values = means.to(device=device, dtype=dtype)[idx]
        elif mode == "clamp":
            if value is None:
                raise ValueError("mode='clamp' needs value=<scalar or one value per latent>")
            values = torch.as_tensor(value, dtype=dtype, device=device).expand(len(idx)).clone()
        else:
            raise ValueError(f"unknown ablation mode {mode!r}; use 'zero', 'mean' or 'clamp'")
        self.edits.append(LatentEdit(idx, values, positions))
        return self

    def clamp(self, latents: int | Sequence[int] | Tensor, value: float | Tensor, *, positions: PositionSpec = None) -> Attachment:
        """Clamp latents to ``value`` (a steering method: set a feature's activation)."""
        return self.ablate(latents, "clamp", value=value, positions=positions)

    def steer(
        self,
        latent: int | None = None,
        alpha: float = 1.0,
        *,
        vector: Tensor | None = None,
        positions: PositionSpec = None,
    ) -> Attachment:
        """Add ``alpha * W_dec[latent] / ||W_dec[latent]||`` (or ``alpha * vector``) at ``positions``."""
        if (latent is None) == (vector is None):
            raise ValueError("steer needs exactly one of latent=<index> or vector=<(d_out,) tensor>")
        if latent is not None:
            direction = self.sae.decoder_directions(self._latent_index(latent))[0].detach()
        else:
            direction = torch.as_tensor(vector)
            if direction.shape != (self.sae.cfg.output_dim,):
                raise ShapeMismatchError(
                    f"steering vector must have shape ({self.sae.cfg.output_dim},), got {tuple(direction.shape)}"
                )
        self.edits.append(Steering(alpha * direction, positions))
        return self

    def clear_edits(self) -> Attachment:
        self.edits.clear()
        return self

    # Lifetime ------------------------------------------------------------------------------------

    def remove(self) -> None:
        """Detach from every site. Safe to call twice."""
        self.manager._detach(self)

    def __repr__(self) -> str:
        mode = self.interventions[0]
        kind = "splice+error" if mode.splice and mode.error_term else "splice" if mode.splice else "capture"
        return f"Attachment(name={self.name!r}, sites={self.sites}, mode={kind}, edits={len(self.edits)})"


class SAEManager:
    """Bookkeeping for the SAEs attached to one model, driven by an adapter's :class:`Backend`."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.attachments: list[Attachment] = []
        self.context = ForwardContext()
        self._generating = False
        self._consumed = 0
        self._history: Tensor | None = None
        self._seq = 0

    # Public API (bound onto the model by adapters) ------------------------------------------------

    def add_sae(
        self,
        sae: SAE,
        hook: str | Sequence[str] | None = None,
        *,
        hook_out: str | None = None,
        error_term: bool = False,
        splice: bool = True,
        detach_error: bool = True,
        skip_positions: PositionSpec = None,
        skip_tokens: Sequence[int] | None = None,
        replace: bool = False,
        name: str | None = None,
    ) -> Attachment:
        """Attach ``sae`` at ``hook`` (default: the site(s) it was trained on).

        Args:
            sae: the SAE.
            hook: a hook name / module path, or several (the same SAE at every one, e.g. a
                multi-layer SAE). Defaults to ``sae.cfg.sites``.
            hook_out: for a transcoder, where its output goes (default: the SAE's own ``hook_out``).
            error_term: splice ``x_hat + (x - x_hat)`` so the model's output is unchanged until
                latents are edited.
            splice: ``False`` only records (capture); edits and steering are then added as deltas.
            detach_error: keep the error term out of the autograd graph.
            skip_positions / skip_tokens: positions or token ids (e.g. BOS) the SAE leaves untouched.
            replace: remove the SAEs already attached at these sites first (default: stack after them).
            name: the name recorded tensors are published under (default: the site name for the
                first SAE at a site, ``"{site}.sae{i}"`` for later ones).
        Returns:
            The :class:`Attachment`, for edits and ``remove()``.
        """
        if not isinstance(sae, SAE):
            raise TypeError(f"add_sae expects an sae_hooks SAE, got {type(sae).__name__}")
        sites_in = self._default_sites(sae, hook)
        sites_in = [self.backend.resolve(s) for s in sites_in]
        out_name = hook_out if hook_out is not None else (sae.cfg.sites[0].hook_out if hook is None and sae.cfg.sites else None)
        site_out = self.backend.resolve(out_name) if out_name else None
        if site_out is not None and len(sites_in) != 1:
            raise SAEHooksError("a transcoder attaches at one input site and one output site")
        if sae.cfg.is_transcoder and site_out is None:
            raise SAEHooksError(
                f"{type(sae).__name__} is a transcoder (d_in={sae.cfg.d_in}, d_out={sae.cfg.output_dim}): "
                "pass hook_out=<where its output goes>"
            )
        for site in sites_in:
            self._check_width(site, sae.cfg.d_in, sae, "reads")
        if site_out is not None:
            self._check_width(site_out, sae.cfg.output_dim, sae, "writes")
        if replace:
            for site in sites_in if site_out is None else [site_out]:
                for att in [a for a in self.attachments if site in a.sites or site in getattr(a, "sites_out", [])]:
                    att.remove()

        edits: list[LatentEdit | Steering] = []
        interventions = [
            SiteIntervention(
                sae, splice=splice, error_term=error_term, detach_error=detach_error,
                skip_positions=skip_positions, skip_tokens=list(skip_tokens) if skip_tokens else None, edits=edits,
            )
            for _ in sites_in
        ]
        key_sites = sites_in if site_out is None else [site_out]
        att = Attachment(self, sae, sites_in, name or self._default_name(key_sites[0]), interventions)
        att.sites_out = [site_out] if site_out else []  # type: ignore[attr-defined]
        try:
            for site, intervention in zip(sites_in, interventions):
                prefix = att.name if len(sites_in) == 1 else f"{site}.{att.name}" if name else self._default_name(site)
                recorder, unpublish = self.backend.recorder(prefix)
                att._removers.append(unpublish)
                if site_out is None:
                    fn = self._site_fn(intervention, recorder)
                    att._removers.append(self.backend.install(site, fn))
                else:
                    fn_in, fn_out = self._transcoder_fns(intervention, recorder)
                    att._removers.append(self.backend.install(site, fn_in))
                    att._removers.append(self.backend.install(site_out, fn_out))
        except BaseException:
            self._run_removers(att)
            raise
        self.attachments.append(att)
        return att

    def remove_sae(self, sae_or_attachment: SAE | Attachment | str) -> None:
        """Detach an attachment, every attachment of an SAE, or every SAE at a site name."""
        targets = self._find(sae_or_attachment)
        if not targets:
            raise SAEHooksError(f"nothing attached matches {sae_or_attachment!r}; attached: {self.attachments}")
        for att in targets:
            att.remove()

    def reset_saes(self) -> None:
        """Detach every SAE."""
        for att in list(self.attachments):
            att.remove()

    @contextlib.contextmanager
    def saes(self, *saes: SAE, **kwargs: Any) -> Iterator[list[Attachment]]:
        """Attach SAEs for the duration of a ``with`` block; they are removed even on an exception.

        ``with model.saes(sae_a, sae_b, error_term=True) as (a, b): ...``
        """
        attached: list[Attachment] = []
        try:
            for sae in saes:
                attached.append(self.add_sae(sae, **kwargs))
            yield attached
        finally:
            for att in attached:
                att.remove()

    # Generation: absolute positions across cached forward steps --------------------------------------

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """Track absolute positions while a ``generate`` call feeds the model step by step."""
        outer = self._generating
        self._generating, self._consumed, self._history = True, 0, None
        try:
            yield
        finally:
            self._generating = outer
            self.context = ForwardContext()

    def begin_forward(self, tokens: Tensor | None, seq: int, attention_mask: Tensor | None = None) -> None:
        """Called by adapters once per forward pass, before the first site runs.

        ``tokens`` may be ``None`` when the forward starts from embeddings; :meth:`observe_tokens`
        can supply them later (e.g. from the embedding module).
        """
        offset = 0
        if self._generating:
            # With a KV cache each step feeds only new tokens; without one each step re-feeds the
            # whole sequence (seq grows past what was consumed), which starts again at position 0.
            if self._consumed and seq > 1 and seq > self._consumed:
                self._consumed = 0
            offset = self._consumed
            self._consumed += seq
        self.context = ForwardContext(tokens=None, attention_mask=attention_mask, position_offset=offset)
        self._seq = seq
        if tokens is not None:
            self.observe_tokens(tokens)

    def observe_tokens(self, tokens: Tensor) -> None:
        """Token ids fed to the model in this forward (all of them, or only the new ones in generation)."""
        if self._generating:
            history = self._history
            full = history is None or history.shape[0] != tokens.shape[0] or tokens.shape[-1] >= self._seq
            self._history = tokens if full else torch.cat([history, tokens], -1)
            tokens = self._history
        if tokens.shape[-1] >= self._seq:
            self.context.tokens = tokens[:, -self._seq:]

    # Internals -----------------------------------------------------------------------------------

    def _default_sites(self, sae: SAE, hook: str | Sequence[str] | None) -> list[str]:
        if hook is None:
            sites = [s.hook or s.module for s in sae.cfg.sites]
            if not sites or any(s is None for s in sites):
                raise SAEHooksError(
                    "this SAE records no site it was trained on; pass hook=<hook name or module path>"
                )
            return sites  # type: ignore[return-value]
        return [hook] if isinstance(hook, str) else list(hook)

    def _check_width(self, site: str, width: int, sae: SAE, verb: str) -> None:
        actual = self.backend.site_width(site)
        if actual is None or actual == width:
            return
        if sae.cfg.reshape == "hook_z" and actual and width % actual == 0:
            return
        raise ShapeMismatchError(
            f"cannot attach at {site!r}: the SAE {verb} {width} features (d_in={sae.cfg.d_in}, "
            f"d_out={sae.cfg.output_dim}) but the activation there is (..., {actual})"
        )

    def _default_name(self, site: str) -> str:
        taken = {a.name for a in self.attachments}
        if site not in taken:
            return site
        i = 1
        while f"{site}.sae{i}" in taken:
            i += 1
        return f"{site}.sae{i}"

    def _site_fn(self, intervention: SiteIntervention, recorder: Recorder) -> Callable[[Tensor], Tensor | None]:
        def fn(x: Tensor) -> Tensor | None:
            return intervention(x, self.context, recorder)

        return fn

    def _transcoder_fns(self, intervention: SiteIntervention, recorder: Recorder):  # noqa: ANN202
        stash: dict[str, Tensor] = {}

        def read_input(x: Tensor) -> None:
            stash["x"] = x
            return None

        def write_output(y: Tensor) -> Tensor | None:
            x = stash.pop("x", None)
            if x is None:
                raise SAEHooksError("transcoder output site ran before its input site in this forward pass")
            return intervention(x, self.context, recorder, x_out=y)

        return read_input, write_output

    def _find(self, key: SAE | Attachment | str) -> list[Attachment]:
        if isinstance(key, Attachment):
            return [key] if key in self.attachments else []
        if isinstance(key, SAE):
            return [a for a in self.attachments if a.sae is key]
        resolved = self.backend.resolve(key) if isinstance(key, str) else key
        return [a for a in self.attachments if resolved in a.sites or resolved in a.sites_out or a.name == key]  # type: ignore[attr-defined]

    def _run_removers(self, att: Attachment) -> None:
        errors = []
        for remove in reversed(att._removers):
            try:
                remove()
            except Exception as e:  # keep removing the rest; report after
                errors.append(e)
        att._removers.clear()
        if errors:
            raise errors[0]

    def _detach(self, att: Attachment) -> None:
        if not att.active:
            return
        att.active = False
        if att in self.attachments:
            self.attachments.remove(att)
        self._run_removers(att)
