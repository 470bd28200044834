"""The attach API shared by every adapter: ``add_sae``, edits on an attachment, removal, context managers.

An adapter supplies a :class:`Backend` (how to find a site by name, how to hook it, where to publish
recorded tensors); everything else — the intervention numbers, the bookkeeping, the rule for several
SAEs on one site, position tracking during generation — lives here, so all adapters behave the same.

Rule for several SAEs on one site: they are applied in the order they were attached, each one seeing
the output of the one before (``replace=True`` removes the ones already there first).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, Union

import torch
from torch import Tensor

from ..errors import HookNotFoundError, SAEHooksError, ShapeMismatchError
from ..saes.base import SAE
from ..sites import ModuleSites
from .functions import (
    AblationMode,
    ForwardContext,
    LatentEdit,
    PositionSpec,
    Recorder,
    SiteIntervention,
    Steering,
)
from ..saes.clt import is_clt
from .clt import add_clt
from .pair import PairAttachment, add_pair, is_pair

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

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model (what ``run_with_saes`` calls)."""

    def run_with_cache(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Run the model and return ``(output, cache)`` with the attached SAEs' tensors in the cache."""


class Attachment:
    """An SAE attached at one or more sites. Returned by ``model.add_sae``; edit it, then ``remove()`` it.

    Edits (ablation, clamping, steering) apply at every site of the attachment and can be changed
    between forward passes.
    """

    def __init__(
        self,
        manager: SAEManager,
        sae: SAE,
        sites: list[str],
        name: str,
        interventions: list[SiteIntervention],
        sites_out: list[str] | None = None,
        parent: Any = None,
    ):
        self.manager = manager
        self.sae = sae
        self.sites = sites
        self.sites_out = sites_out or []
        self.name = name
        self.interventions = interventions
        self.parent = parent  # the multi-SAE object (e.g. a Jacobian pair) this attachment belongs to
        self._removers: list[Remover] = []
        self.active = True

    @property
    def edits(self) -> list[LatentEdit | Steering]:
        return self.interventions[0].edits

    # Edits ---------------------------------------------------------------------------------------

    def _check_active(self) -> None:
        if not self.active:
            raise SAEHooksError(f"{self!r} was removed; edits on it would do nothing. Attach the SAE again")

    def _latent_index(self, latents: int | Sequence[int] | Tensor) -> Tensor:
        self._check_active()
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
        self._check_active()
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

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        kinds = []
        for mode in self.interventions:
            kind = "splice+error" if mode.splice and mode.error_term else "splice" if mode.splice else "record"
            if kind not in kinds:
                kinds.append(kind)
        return f"Attachment(name={self.name!r}, sites={self.sites}, mode={'/'.join(kinds)}, edits={len(self.edits)})"


class CLTAttachment(Attachment):
    """A cross-layer transcoder attached at one input and one output site per layer (``sites`` / ``sites_out``).
    Latent edits are not supported (yet): they raise rather than doing nothing."""

    @property
    def edits(self) -> list[LatentEdit | Steering]:
        raise SAEHooksError("latent edits (ablate/clamp/steer) on a cross-layer transcoder are not supported yet")

    def _latent_index(self, latents: int | Sequence[int] | Tensor) -> Tensor:
        return self.edits  # raises (ablate, clamp and steer all start here or at edits)

    def steer(self, *args: Any, **kwargs: Any) -> Attachment:
        return self.edits  # raises

    def __repr__(self) -> str:
        return f"CLTAttachment(name={self.name!r}, layers={len(self.sites)}, sites_out={self.sites_out})"


class SAEManager:
    """Bookkeeping for the SAEs attached to one model, driven by an adapter's :class:`Backend`."""

    def __init__(self, backend: Backend, convert: Callable[[Any], SAE | None] | None = None):
        self.backend = backend
        self.convert = convert  # another library's in-memory SAE -> ours (given by the adapter), or None
        self.attachments: list[Attachment] = []
        # Per-forward state (tokens, positions, generation counters) is per thread: one attached model run
        # from several threads must not read another call's tokens or positions (silently wrong outputs).
        self._local = threading.local()

    def _state(self) -> Any:
        st = self._local
        if not hasattr(st, "context"):
            st.context, st.generating, st.consumed, st.history, st.seq = ForwardContext(), False, 0, None, 0
        return st

    @property
    def _generating(self) -> bool:
        """Whether a ``generate`` call is running in this thread."""
        return self._state().generating

    @property
    def context(self) -> ForwardContext:
        """What the adapter knows about the forward pass running in this thread."""
        return self._state().context

    @context.setter
    def context(self, value: ForwardContext) -> None:
        self._state().context = value

    # Public API (bound onto the model by adapters) ------------------------------------------------

    def add_sae(
        self,
        sae: SAE | Any,
        site: str | Sequence[str] | None = None,
        *,
        site_out: str | None = None,
        error_term: bool = False,
        splice: SpliceSpec = True,
        detach_error: bool = True,
        skip_positions: PositionSpec = None,
        skip_tokens: Sequence[int] | None = None,
        replace: bool = False,
        name: str | None = None,
        hook: str | Sequence[str] | None = None,
        hook_out: str | None = None,
        use_error_term: bool | None = None,
        **pair_options: Any,
    ) -> Attachment | PairAttachment:
        """Attach ``sae`` at ``site`` (default: the site(s) it was trained on).

        Args:
            sae: the SAE, a Jacobian SAE pair (see :func:`sae_hooks.intervene.attach_pair`), or a cross-layer
                transcoder (:mod:`sae_hooks.intervene.clt`: ``site``/``site_out`` then take one site per layer).
            site: a TransformerLens hook name, module path or ``path:input``, or several (the same
                SAE at every one, e.g. a multi-layer SAE). Defaults to ``sae.cfg.sites``.
                ``hook=`` is accepted as an alias.
            site_out: for a transcoder, where its output goes (default: the SAE's own ``hook_out``;
                ``hook_out=`` is accepted as an alias).
            error_term: splice ``x_hat + (x - x_hat)`` so the model's output is unchanged until
                latents are edited (``use_error_term=``, SAELens's spelling, is accepted as an alias).
            splice: ``True``: the forward pass continues with the reconstruction at every site;
                ``False``: record only (the forward pass is unchanged; edits and steering are added as
                deltas); a site or list of sites: splice there and record at the others.
            detach_error: keep the error term out of the autograd graph.
            skip_positions / skip_tokens: positions or token ids (e.g. BOS) the SAE leaves untouched.
            replace: remove the SAEs already attached at these sites first (default: stack after them).
            name: the name recorded tensors are published under (default: the site name for the
                first SAE at a site, ``"{site}.sae{i}"`` for later ones).
            pair_options: for a Jacobian pair only: ``jacobian=``, ``use_reconstruction=``.
        Returns:
            The :class:`Attachment` (a :class:`PairAttachment` for a pair), for edits and ``remove()``.
        """
        site = _alias("site", site, "hook", hook)
        site_out = _alias("site_out", site_out, "hook_out", hook_out)
        error_term = bool(_alias("error_term", error_term or None, "use_error_term", use_error_term))
        common = dict(error_term=error_term, splice=splice, detach_error=detach_error,
                      skip_positions=skip_positions, skip_tokens=skip_tokens, replace=replace)
        if is_pair(sae):
            if site is not None or site_out is not None or name is not None:
                raise TypeError("a Jacobian pair attaches at its own sites (pair.cfg.hook_in / hook_out); "
                                "site=, site_out= and name= are not accepted")
            return add_pair(self, sae, **common, **pair_options)
        if is_clt(sae):
            if pair_options:
                raise TypeError(f"add_sae() got unexpected keyword argument(s) {sorted(pair_options)}")
            return add_clt(self, sae, site, site_out, name=name, attachment_cls=CLTAttachment, **common)
        if pair_options:
            raise TypeError(f"add_sae() got unexpected keyword argument(s) {sorted(pair_options)}")
        parent = None
        if not isinstance(sae, SAE) and self.convert is not None:
            converted = self.convert(sae)
            if converted is not None:  # e.g. a SAELens SAE object: attach our copy, keyed by the original
                sae, parent = converted, sae
        if not isinstance(sae, SAE):
            raise TypeError(f"add_sae expects an sae_hooks SAE (or a SAELens SAE object), got {type(sae).__name__}")
        return self._add(sae, site, site_out=site_out, name=name, parent=parent, **common)

    def _check_device(self, sae: SAE) -> None:
        device = getattr(self.backend, "device", lambda: None)()
        if device is not None and sae.device != device:
            raise SAEHooksError(
                f"the SAE is on {sae.device} but the model is on {device}; move it first: sae.to({str(device)!r})"
            )

    def _add(
        self,
        sae: SAE,
        site: str | Sequence[str] | None,
        *,
        site_out: str | None,
        error_term: bool,
        splice: SpliceSpec,
        detach_error: bool,
        skip_positions: PositionSpec,
        skip_tokens: Sequence[int] | None,
        replace: bool,
        name: str | None,
        parent: Any = None,
    ) -> Attachment:
        self._check_device(sae)
        sites_in = self._default_sites(sae, site)
        out_name = site_out if site_out is not None else (sae.cfg.sites[0].hook_out if site is None and sae.cfg.sites else None)
        resolved_out = self.backend.resolve(out_name) if out_name else None
        if resolved_out is not None and len(sites_in) != 1:
            raise SAEHooksError("a transcoder attaches at one input site and one output site")
        if sae.cfg.is_transcoder and resolved_out is None:
            raise SAEHooksError(
                f"{type(sae).__name__} is a transcoder (d_in={sae.cfg.d_in}, d_out={sae.cfg.output_dim}): "
                "pass site_out=<where its output goes>"
            )
        spliced = self._splice_sites(splice, sites_in)
        for s in sites_in:
            self._check_width(s, sae.cfg.d_in, sae, "reads")
        if resolved_out is not None:
            self._check_width(resolved_out, sae.cfg.output_dim, sae, "writes")
        if replace:
            for s in sites_in if resolved_out is None else [resolved_out]:
                for att in [a for a in self.attachments if s in a.sites or s in a.sites_out]:
                    att.remove()

        edits: list[LatentEdit | Steering] = []
        interventions = [
            SiteIntervention(
                sae, splice=s in spliced, error_term=error_term, detach_error=detach_error,
                skip_positions=skip_positions, skip_tokens=list(skip_tokens) if skip_tokens else None, edits=edits,
                site=s if resolved_out is None else f"{s} -> {resolved_out}",
            )
            for s in sites_in
        ]
        key_sites = sites_in if resolved_out is None else [resolved_out]
        att = Attachment(self, sae, sites_in, name or self._default_name(key_sites[0]), interventions,
                         sites_out=[resolved_out] if resolved_out else [], parent=parent)
        try:
            for s, intervention in zip(sites_in, interventions):
                prefix = att.name if len(sites_in) == 1 else f"{s}.{att.name}" if name else self._default_name(s)
                recorder, unpublish = self.backend.recorder(prefix)
                att._removers.append(unpublish)
                if resolved_out is None:
                    fn = self._site_fn(intervention, recorder)
                    att._removers.append(self.backend.install(s, fn))
                else:
                    fn_in, fn_out = self._transcoder_fns(intervention, recorder)
                    att._removers.append(self.backend.install(s, fn_in))
                    att._removers.append(self.backend.install(resolved_out, fn_out))
        except BaseException:
            self._run_removers(att)
            raise
        self.attachments.append(att)
        return att

    def observe(self, site: str, fn: Callable[[Tensor], None]) -> Remover:
        """Run ``fn`` on the activation at ``site`` in every forward pass (read only); returns its remover.

        Hooks run in the order they were installed, so an observer installed before an SAE at the same
        site sees the model's own activation.
        """

        def read_only(x: Tensor) -> None:
            fn(x)
            return None

        return self.backend.install(self.backend.resolve(site), read_only)

    def remove_sae(self, sae_or_attachment: SAE | Attachment | str | Any) -> None:
        """Detach an attachment, every attachment of an SAE (or of a pair), or every SAE at a site."""
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
    def saes(self, *positional: SAE | Any, reset_saes_end: bool = True, **kwargs: Any) -> Iterator[list[Attachment]]:
        """Attach SAEs for the duration of a ``with`` block; they are removed even on an exception.

        ``with model.saes(sae_a, sae_b, error_term=True) as (a, b): ...``; SAELens's spelling
        ``model.saes(saes=[sae_a, sae_b], use_error_term=True)`` works too. Other keywords are those of
        :meth:`add_sae` (unknown ones raise ``TypeError``). ``reset_saes_end=False`` leaves them attached.
        """
        todo = self._sae_list(positional, kwargs.pop("saes", None))
        self._check_keywords(kwargs)
        if not todo:
            raise TypeError("saes() needs at least one SAE (positional or saes=[...])")
        with self._temporarily(todo, reset_saes_end, kwargs) as attached:
            yield attached

    def run_with_saes(
        self, *model_args: Any, saes: Any = (), reset_saes_end: bool = True, use_error_term: bool | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """SAELens's ``run_with_saes``: run the model with ``saes`` attached (spliced; with the error term
        when ``use_error_term=True``), then detach them (unless ``reset_saes_end=False``). SAEs already
        attached stay and apply too."""
        todo = self._sae_list((), saes)
        with self._temporarily(todo, reset_saes_end, {"use_error_term": use_error_term}):
            return self.backend.forward(*model_args, **model_kwargs)

    def run_with_cache_with_saes(
        self, *model_args: Any, saes: Any = (), reset_saes_end: bool = True, use_error_term: bool | None = None,
        **model_kwargs: Any,
    ) -> tuple[Any, Any]:
        """SAELens's ``run_with_cache_with_saes``: ``(output, cache)`` with ``saes`` attached for the call;
        the cache holds the SAEs' tensors (``"{site}.hook_sae_acts_post"``, ...)."""
        todo = self._sae_list((), saes)
        with self._temporarily(todo, reset_saes_end, {"use_error_term": use_error_term}):
            return self.backend.run_with_cache(*model_args, **model_kwargs)

    @staticmethod
    def _sae_list(positional: Sequence[Any], listed: Any) -> list[Any]:
        todo = list(positional)
        if listed is not None:
            todo += list(listed) if isinstance(listed, (list, tuple)) else [listed]
        return todo

    @staticmethod
    def _check_keywords(kwargs: dict[str, Any]) -> None:
        unknown = sorted(set(kwargs) - _ADD_SAE_KEYWORDS)
        if unknown:
            raise TypeError(
                f"got unexpected keyword argument(s) {unknown}; saes() takes saes= and reset_saes_end= "
                f"plus add_sae's keywords {sorted(_ADD_SAE_KEYWORDS)}"
            )

    @contextlib.contextmanager
    def _temporarily(self, todo: list[Any], reset_saes_end: bool, kwargs: dict[str, Any]) -> Iterator[list[Attachment]]:
        self._check_keywords(kwargs)
        kwargs = {k: v for k, v in kwargs.items() if not (k == "use_error_term" and v is None)}
        attached: list[Attachment] = []
        try:
            for sae in todo:
                attached.append(self.add_sae(sae, **kwargs))
            yield attached
        finally:
            if reset_saes_end:
                for att in attached:
                    att.remove()

    # Generation: absolute positions across cached forward steps --------------------------------------

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """Track absolute positions while a ``generate`` call feeds the model step by step."""
        st = self._state()
        outer = st.generating
        st.generating, st.consumed, st.history = True, 0, None
        try:
            yield
        finally:
            st.generating = outer
            st.context = ForwardContext()

    def begin_forward(self, tokens: Tensor | None, seq: int, attention_mask: Tensor | None = None) -> None:
        """Called by adapters once per forward pass, before the first site runs.

        ``tokens`` may be ``None`` when the forward starts from embeddings; :meth:`observe_tokens`
        can supply them later (e.g. from the embedding module).
        """
        st = self._state()
        offset = 0
        if st.generating:
            # With a KV cache each step feeds only new tokens; without one each step re-feeds the
            # whole sequence (seq grows past what was consumed), which starts again at position 0.
            if st.consumed and seq > 1 and seq > st.consumed:
                st.consumed = 0
            offset = st.consumed
            st.consumed += seq
        st.context = ForwardContext(tokens=None, attention_mask=attention_mask, position_offset=offset)
        st.seq = seq
        if tokens is not None:
            self.observe_tokens(tokens)

    def observe_tokens(self, tokens: Tensor) -> None:
        """Token ids fed to the model in this forward (all of them, or only the new ones in generation)."""
        st = self._state()
        if st.generating:
            history = st.history
            full = history is None or history.shape[0] != tokens.shape[0] or tokens.shape[-1] >= st.seq
            st.history = tokens if full else torch.cat([history, tokens], -1)
            tokens = st.history
        if tokens.shape[-1] >= st.seq:
            st.context.tokens = tokens[:, -st.seq:]

    # Internals -----------------------------------------------------------------------------------

    def _default_sites(self, sae: SAE, site: str | Sequence[str] | None) -> list[str]:
        """Resolved sites: ``site`` as given, else each of ``sae.cfg.sites`` by its hook name, or by its
        module path when the hook name does not resolve on this model."""
        if site is not None:
            return [self.backend.resolve(s) for s in ([site] if isinstance(site, str) else site)]
        if not sae.cfg.sites or any(s.hook is None and s.module is None for s in sae.cfg.sites):
            raise SAEHooksError("this SAE records no site it was trained on; pass site=<hook name or module path>")
        # On a module-based backend the recorded module path is the tensor the SAE was trained on (the format
        # knows it: e.g. Gemma Scope 2's config names the module); on a TransformerLens model, the hook name.
        module_first = isinstance(self.backend, ModuleSites)
        out = []
        for s in sae.cfg.sites:
            first, second = (s.module, s.hook) if module_first else (s.hook, s.module)
            try:
                out.append(self.backend.resolve(first or second))
            except HookNotFoundError:
                if not (first and second):
                    raise
                out.append(self.backend.resolve(second))
        return out

    def _splice_sites(self, splice: SpliceSpec, sites: list[str]) -> set[str]:
        if isinstance(splice, bool):
            return set(sites) if splice else set()
        wanted = [splice] if isinstance(splice, str) else list(splice)
        chosen = {self.backend.resolve(s) for s in wanted}
        stray = sorted(chosen - set(sites))
        if stray:
            raise ValueError(f"splice= names sites {stray} that this SAE is not attached at ({sites}); "
                             "pass True, False, or some of its sites")
        return chosen

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
        stash = threading.local()  # the input of the forward pass running in this thread

        def read_input(x: Tensor) -> None:
            stash.x = x
            return None

        def write_output(y: Tensor) -> Tensor | None:
            x = getattr(stash, "x", None)
            stash.x = None
            if x is None:
                raise SAEHooksError("transcoder output site ran before its input site in this forward pass")
            return intervention(x, self.context, recorder, x_out=y)

        return read_input, write_output

    def _find(self, key: SAE | Attachment | PairAttachment | str | Any) -> list[Attachment]:
        if isinstance(key, Attachment):
            return [key] if key in self.attachments else []
        if isinstance(key, PairAttachment):
            return [a for a in (key.att_in, key.att_out) if a in self.attachments]
        if not isinstance(key, str):
            found = [a for a in self.attachments if a.sae is key or a.parent is key]
            if found or isinstance(key, SAE) or is_pair(key) or is_clt(key):
                return found
            raise TypeError(f"remove_sae takes an SAE, an attachment or a site name, got {type(key).__name__}")
        named = [a for a in self.attachments if a.name == key]
        if named:
            return named
        resolved = self.backend.resolve(key)  # a misspelled site raises with close matches
        return [a for a in self.attachments if resolved in a.sites or resolved in a.sites_out]

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


SpliceSpec = Union[bool, str, Sequence[str]]


def _alias(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    """``value``, or ``alias_value`` when only the alias was given; both given and different is an error."""
    if alias_value is None:
        return value
    if value is not None and value != alias_value:
        raise TypeError(f"{name}= and its alias {alias}= were both given ({value!r} vs {alias_value!r}); pass one")
    return alias_value


_ADD_SAE_KEYWORDS = frozenset(
    p for p in inspect.signature(SAEManager.add_sae).parameters if p not in ("self", "sae", "pair_options")
) | {"jacobian", "use_reconstruction"}
