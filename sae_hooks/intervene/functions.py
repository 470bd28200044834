"""Framework-free interventions: what happens to the activation at a site when an SAE is attached.

With ``x`` the activation at the site, ``f = encode(x)`` and ``x_hat = reconstruct(x, f)``:

* capture (``splice=False``): record ``f``, ``x_hat`` and the error; the forward pass is unchanged, except
  that latent edits and steering are added as deltas: ``x + (decode(f') - decode(f)) + steer``;
* splice: the forward pass continues with ``decode(f') + steer``;
* splice with the error term: ``decode(f') + steer + (x - x_hat)``, the error computed from the
  unedited ``f`` and detached from the autograd graph unless ``detach_error=False``. With no edits
  this reproduces the clean forward pass to float precision;
* ablation of latents ``S``: ``f'_i = 0``, the latent's mean, or a clamp value, for ``i`` in ``S``;
* steering: ``alpha * W_dec[i] / ||W_dec[i]||`` added at chosen positions.

Edits and steering apply at chosen token positions; ``skip_positions`` / ``skip_tokens`` leave positions
untouched by the SAE altogether (their latents are recorded as zero). Adapters only decide *where* an
:class:`SiteIntervention` runs; the numbers come from here, so every adapter agrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, Union

import torch
from torch import Tensor

from ..errors import ShapeMismatchError
from ..saes.base import SAE, SparseLatents, to_dense

PositionSpec = Union[None, int, Sequence[int], slice, Tensor]
AblationMode = Literal["zero", "mean", "clamp"]

#: Names under which an attached SAE's tensors are recorded (SAELens's names, so users recognise them).
RECORD_NAMES = ("hook_sae_input", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error", "hook_sae_output")


@dataclass
class ForwardContext:
    """What an adapter knows about the current forward pass, for position and token filters.

    Attributes:
        tokens: ``(batch, seq)`` token ids of this forward, when the adapter could see them.
        attention_mask: ``(batch, seq_total)`` 1 for real tokens, 0 for padding. During generation
            with a KV cache it may cover past positions too; its last ``seq`` columns are this forward's.
        position_offset: absolute position of this forward's first column (generation with a cache).
    """

    tokens: Tensor | None = None
    attention_mask: Tensor | None = None
    position_offset: int = 0

    def absolute_positions(self, batch: int, seq: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(positions, is_real)``, both ``(batch, seq)``: absolute token positions (padding not counted)."""
        mask = self.attention_mask
        if mask is not None and mask.shape[-1] >= seq and mask.shape[0] in (1, batch):
            mask = mask.to(device).bool()
            pos = (mask.long().cumsum(-1) - 1)[:, -seq:].expand(batch, seq)
            return pos, mask[:, -seq:].expand(batch, seq)
        pos = torch.arange(self.position_offset, self.position_offset + seq, device=device)
        return pos.expand(batch, seq), torch.ones(batch, seq, dtype=torch.bool, device=device)


def position_mask(spec: PositionSpec, ctx: ForwardContext, batch: int, seq: int, device: torch.device) -> Tensor:
    """A ``(batch, seq)`` bool mask of the positions ``spec`` selects; padding is never selected.

    ``spec`` is ``None`` (all), an int or ints (absolute positions; negative ones count from the end of
    each row's sequence so far, so ``-1`` is the newest token), a ``slice`` of positions, or a bool
    tensor ``(seq_total,)`` / ``(batch, seq_total)`` indexed by absolute position.
    """
    pos, real = ctx.absolute_positions(batch, seq, device)
    if spec is None:
        return real
    length = pos[:, -1:] + 1  # tokens so far in each row, this forward included
    if isinstance(spec, Tensor) and spec.dtype == torch.bool:
        table = spec.to(device)
        if table.dim() == 1:
            table = table.expand(batch, -1)
        if table.shape[0] != batch:
            raise ShapeMismatchError(f"position mask has batch size {table.shape[0]}, the input has {batch}")
        inside = pos < table.shape[-1]
        picked = table.gather(-1, pos.clamp_max(table.shape[-1] - 1))
        return picked & inside & real
    if isinstance(spec, slice):
        start, stop, step = spec.start, spec.stop, spec.step or 1
        if step <= 0:
            raise ValueError(f"position slices need a positive step, got {step}")
        lo = torch.zeros_like(length) if start is None else (length + start if start < 0 else torch.full_like(length, start))
        hi = length if stop is None else (length + stop if stop < 0 else torch.full_like(length, stop))
        return (pos >= lo) & (pos < hi) & ((pos - lo) % step == 0) & real
    if isinstance(spec, Tensor):
        spec = spec.tolist()
    wanted = [spec] if isinstance(spec, int) else list(spec)
    mask = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    for p in wanted:
        target = length + p if p < 0 else torch.full_like(length, p)
        mask |= pos == target
    return mask & real


@dataclass
class LatentEdit:
    """Set latents ``S`` to zero, to given means, or to clamp values at chosen positions."""

    latents: Tensor  # (n,) long
    values: Tensor  # (n,) new values (zeros for 'zero')
    positions: PositionSpec = None


@dataclass
class Steering:
    """Add a fixed vector (``alpha`` times a unit decoder direction) to the site's output."""

    vector: Tensor  # (d_out,)
    positions: PositionSpec = None


class Recorder(Protocol):
    """Where an intervention publishes its tensors (a TransformerLens HookPoint, a cache dict, ...).

    ``__call__`` may return a replacement tensor (a user hook that edits the latents), or the same one.
    """

    def wants(self, name: str) -> bool: ...

    def __call__(self, name: str, value: Tensor) -> Tensor: ...


class NullRecorder:
    def wants(self, name: str) -> bool:
        return False

    def __call__(self, name: str, value: Tensor) -> Tensor:
        return value


@dataclass
class SiteIntervention:
    """One SAE at one site, with its mode, filters and edits. Call it with the site's activation."""

    sae: SAE
    splice: bool = True
    error_term: bool = False
    detach_error: bool = True
    skip_positions: PositionSpec = None
    skip_tokens: Sequence[int] | None = None
    edits: list[LatentEdit | Steering] = field(default_factory=list)
    #: Extra recorder run after the adapter's (e.g. attribution); its result is what the forward uses.
    probe: Recorder | None = None
    #: The site's name, for errors (a width the site layer could not know before the forward pass).
    site: str | None = None

    def __call__(
        self,
        x: Tensor,
        ctx: ForwardContext | None = None,
        record: Recorder | None = None,
        x_out: Tensor | None = None,
    ) -> Tensor | None:
        """Apply the SAE to the activation ``x`` ``(batch, seq, ..., d_in)``.

        ``x_out`` is the activation being replaced when it differs from the input (transcoders);
        it defaults to ``x``. Returns the tensor the forward pass continues with, or ``None`` when it
        continues unchanged (capture without edits).
        """
        ctx = ctx or ForwardContext()
        record = record or NullRecorder()
        if self.probe is not None:
            record = _Chain(record, self.probe)
        sae = self.sae
        target = x if x_out is None else x_out
        hook_z = target.shape[-1] != sae.cfg.output_dim  # (..., n_heads, d_head) sites keep their shape
        target_flat = target.flatten(-2) if hook_z else target
        where = f"at {self.site!r}: " if self.site else ""
        if target_flat.shape[-1] != sae.cfg.output_dim:
            verb = "reads" if x_out is None else "writes"
            raise ShapeMismatchError(
                f"{where}the SAE {verb} {sae.cfg.output_dim} features but the activation there has shape "
                f"{tuple(target.shape)}"
            )
        try:
            x_flat = sae.flatten_input(x)
        except ShapeMismatchError as e:
            raise ShapeMismatchError(f"{where}{e}") from None
        if record.wants("hook_sae_input"):
            x_flat = record("hook_sae_input", x_flat)
        latents, state = sae.encode_with_state(x_flat)
        recon = sae.reconstruct(x_flat, latents, state)  # (..., d_out) in the SAE's dtype

        skip = self._skip_mask(x_flat, ctx)
        delta = self._edit_delta(latents, state, ctx, x_flat)
        dense_edited = None
        if record.wants("hook_sae_acts_post"):
            dense = to_dense(latents)
            edited = self._apply_latent_edits_dense(dense, ctx) if delta is not None else dense
            if skip is not None:
                edited = edited * ~skip
            # Publish a copy: a user hook may edit it in place and return nothing (TransformerLens habit);
            # ``edited`` itself stays intact, so the change is ``published - edited`` either way.
            published = edited.clone()
            dense_edited = record("hook_sae_acts_post", published)
            in_graph = torch.is_grad_enabled() and dense_edited.requires_grad
            if in_graph or dense_edited is not published or not torch.equal(dense_edited, edited):
                # Decode the user's change. With autograd on, also when it is zero: the recorded latents
                # then feed the output (exactly ``+ 0``), so their gradient, backward hooks on them and
                # attribution work for every architecture, sparse TopK latents included.
                change = sae.decode(dense_edited - edited, None) - sae.b_dec
                change = _scale_only(sae, change, state)
                delta = change if delta is None else delta + change
        steer = self._steering(x_flat, ctx, target_flat.dtype)

        edited_recon = recon if delta is None else recon + delta
        if record.wants("hook_sae_recons"):
            edited_recon = record("hook_sae_recons", edited_recon)
        error = None
        wants_error = record.wants("hook_sae_error")
        if wants_error or (self.splice and self.error_term):  # not computed when nobody needs it
            # In the model's dtype: with no edits decode(f') == x_hat exactly, so x_hat + error == x to
            # the model's own precision even for a bf16 SAE on an fp32 model.
            error = target_flat - recon.to(target_flat.dtype)
            if self.detach_error:
                error = error.detach()
            if wants_error:
                error = record("hook_sae_error", error)

        if not self.splice:
            if delta is None and steer is None and edited_recon is recon:
                return None
            out = target_flat + (edited_recon - recon).to(target_flat.dtype)
        elif self.error_term:
            out = edited_recon.to(target_flat.dtype) + error
        else:
            out = edited_recon.to(target_flat.dtype)
        if steer is not None:
            out = out + steer
        if skip is not None:
            out = torch.where(skip, target_flat, out)
        if record.wants("hook_sae_output"):
            out = record("hook_sae_output", out)
        return out.unflatten(-1, target.shape[-2:]) if hook_z else out

    # Helpers -------------------------------------------------------------------------------------

    def _batch_seq(self, x: Tensor) -> tuple[int, int]:
        if x.dim() < 3:
            raise ShapeMismatchError(
                f"position filters need activations shaped (batch, seq, d), got {tuple(x.shape)}"
            )
        return x.shape[0], x.shape[1]

    def _skip_mask(self, x: Tensor, ctx: ForwardContext) -> Tensor | None:
        if self.skip_positions is None and not self.skip_tokens:
            return None
        batch, seq = self._batch_seq(x)
        skip = torch.zeros(batch, seq, dtype=torch.bool, device=x.device)
        if self.skip_positions is not None:
            skip |= position_mask(self.skip_positions, ctx, batch, seq, x.device)
        if self.skip_tokens:
            if ctx.tokens is None:
                raise RuntimeError(
                    "skip_tokens needs the input token ids, which this adapter could not see for this "
                    "forward pass; pass token ids (not embeddings) or use skip_positions"
                )
            tokens = ctx.tokens[:, -seq:].to(x.device)
            skip |= torch.isin(tokens, torch.as_tensor(list(self.skip_tokens), device=x.device))
        return skip.view(batch, seq, *([1] * (x.dim() - 2)))  # broadcasts over the feature dims

    def _edit_mask(self, spec: PositionSpec, ctx: ForwardContext, x: Tensor) -> Tensor | None:
        if spec is None and ctx.attention_mask is None:
            return None
        batch, seq = self._batch_seq(x)
        return position_mask(spec, ctx, batch, seq, x.device).view(batch, seq, *([1] * (x.dim() - 2)))

    def _latent_edits(self) -> list[LatentEdit]:
        return [e for e in self.edits if isinstance(e, LatentEdit)]

    def _edit_delta(self, latents: Tensor | SparseLatents, state, ctx: ForwardContext, x: Tensor) -> Tensor | None:
        """``decode(f') - decode(f)`` for the latent edits, touching only the edited decoder rows."""
        edits = self._latent_edits()
        if not edits:
            return None
        sae = self.sae
        current_cols: dict[int, Tensor] = {}
        delta = None
        for edit in edits:
            idx = edit.latents.to(x.device)
            old = _gather_latents(latents, idx)  # (..., n)
            # Latents edited earlier hold their edited value.
            for j, i in enumerate(idx.tolist()):
                if i in current_cols:
                    old = old.clone()
                    old[..., j] = current_cols[i]
            new = edit.values.to(old.dtype).to(x.device).expand_as(old)
            mask = self._edit_mask(edit.positions, ctx, x)
            if mask is not None:
                new = torch.where(mask, new, old)
            for j, i in enumerate(idx.tolist()):
                current_cols[i] = new[..., j]
            change = (new - old) @ sae.W_dec[idx]
            delta = change if delta is None else delta + change
        return _scale_only(sae, delta, state)

    def _apply_latent_edits_dense(self, dense: Tensor, ctx: ForwardContext) -> Tensor:
        out = dense.clone()
        for edit in self._latent_edits():
            idx = edit.latents.to(dense.device)
            new = edit.values.to(dense.dtype).to(dense.device).expand(*dense.shape[:-1], len(idx))
            mask = self._edit_mask(edit.positions, ctx, dense)
            if mask is not None:
                new = torch.where(mask, new, out[..., idx])
            out[..., idx] = new
        return out

    def _steering(self, x: Tensor, ctx: ForwardContext, dtype: torch.dtype) -> Tensor | None:
        steer = None
        for edit in self.edits:
            if not isinstance(edit, Steering):
                continue
            vec = edit.vector.to(device=x.device, dtype=dtype)
            mask = self._edit_mask(edit.positions, ctx, x)
            add = vec if mask is None else mask * vec
            steer = add if steer is None else steer + add
        return steer


class _Chain:
    """Two recorders in a row: the adapter's, then a probe."""

    def __init__(self, first: Recorder, second: Recorder):
        self.first, self.second = first, second

    def wants(self, name: str) -> bool:
        return self.first.wants(name) or self.second.wants(name)

    def __call__(self, name: str, value: Tensor) -> Tensor:
        if self.first.wants(name):
            value = self.first(name, value)
        return self.second(name, value) if self.second.wants(name) else value


def _gather_latents(latents: Tensor | SparseLatents, idx: Tensor) -> Tensor:
    """Dense values of latents ``idx`` ``(n,)``: ``(..., n)``, without densifying sparse latents."""
    if isinstance(latents, SparseLatents):
        hit = latents.indices[..., :, None] == idx  # (..., k, n)
        return (latents.values[..., :, None] * hit).sum(-2)
    return latents[..., idx]


def _scale_only(sae: SAE, delta: Tensor, state) -> Tensor:  # noqa: ANN001 - NormState | None
    """Map a *difference* of decoder outputs to model space: per-token scale applies, shift cancels."""
    if state is None or (sae.cfg.is_transcoder and sae.cfg.normalize != "scale"):
        return delta
    return delta * state.scale
