"""The trainer: several ``(site, SAE, settings, seed)`` entries fed from one batch per site.

One source batch (e.g. one forward pass of a live model with hooks at several sites) feeds every
entry; each entry has its own optimiser (Adam), learning-rate schedule, dead-latent counters and
random generator, so training N SAEs together gives exactly what training each alone on the same
activations gives.

>>> trainer = Trainer([TrainEntry("l1", "transformer.h.1", make_sae("topk", 64, 512, k=16))])
>>> trainer.fit(ShuffleBuffer(LiveSource(model, ["transformer.h.1"], batches)), max_steps=1000)
>>> trainer.save("out/")            # native format, training metadata in cfg.metadata
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import Site
from ..errors import ConfigError, ShapeMismatchError
from ..saes.base import SAE
from . import losses

B_DEC_INITS = ("geometric_median", "mean", "zeros")
NORMALIZE_MODES = ("scale", "none")


@dataclass
class TrainSettings:
    """Hyper-parameters of one SAE's training (every field is JSON-serialisable).

    Attributes:
        lr: Adam learning rate; ``None`` = ``2e-4 / sqrt(d_sae / 2**14)`` (sparsify's Adam default).
        warmup_steps: linear warm-up from 0.
        decay_fraction: linear decay to 0 over this final fraction of ``total_steps`` (needs it).
        total_steps: length of the run, for the decay (``Trainer.fit(max_steps=...)`` fills it in).
        l1_coefficient: ``relu``/``gated`` sparsity weight. ``l0_coefficient``: ``jumprelu``.
        sparsity_warmup_steps: the sparsity coefficient rises linearly from 0 over these steps.
        bandwidth, init_threshold: JumpReLU's ε and initial θ.
        aux_k, aux_coefficient: AuxK for ``topk``/``batchtopk`` (0 disables it).
        dead_tokens: a latent is dead after this many tokens without firing.
        threshold_lr: BatchTopK threshold EMA rate.
        unit_norm_decoder: keep decoder rows at unit norm and remove the gradient parallel to them;
            ``None`` = on for ``topk``, ``batchtopk``, ``jumprelu``, ``gated`` (as in their papers),
            off for ``relu`` (whose L1 is weighted by decoder norms instead).
        decoder_init_norm: decoder row norm at init (encoder = decoder transposed); ``None`` = 1 with
            unit-norm decoders, 0.1 otherwise (Anthropic's April 2024 init); for ``gated`` ``None``
            keeps unit decoder rows but starts the encoder at norm 0.1 (see ``_init_weights``).
        b_dec_init: ``geometric_median`` | ``mean`` | ``zeros`` of the first batch.
        normalize: ``scale``: multiply inputs by a constant (from the first batch) so that
            ``E||x||² = d_in``; stored as ``cfg.normalize="scale"`` during training and folded into the
            weights at :meth:`Trainer.save` when ``fold_normalization``.
        seed: initialises the weights.
    """

    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    total_steps: int | None = None
    grad_clip: float | None = None
    l1_coefficient: float = 5.0
    l0_coefficient: float = 0.5
    sparsity_warmup_steps: int = 0
    bandwidth: float = 0.05
    init_threshold: float = 1.0
    aux_k: int = 256
    aux_coefficient: float = 1 / 32
    dead_tokens: int = 10_000_000
    threshold_lr: float = 0.01
    unit_norm_decoder: bool | None = None
    decoder_init_norm: float | None = None
    b_dec_init: str = "geometric_median"
    normalize: str = "scale"
    fold_normalization: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.b_dec_init not in B_DEC_INITS:
            raise ConfigError(f"b_dec_init must be one of {B_DEC_INITS}, got {self.b_dec_init!r}")
        if self.normalize not in NORMALIZE_MODES:
            raise ConfigError(f"normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def geometric_median(x: Tensor, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm on the rows of ``x (N, d)``, started at the mean; returns ``(d,)``."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - y).norm() <= tol * y.norm().clamp_min(1e-12):
            y = new
            break
        y = new
    return y


@dataclass
class EntryState:
    step: int = 0
    tokens_seen: int = 0
    skipped: int = 0
    initialised: bool = False
    mse_scale: float = 1.0
    # Transcoders: the constant input / output scales (``normalize="scale"``), folded in at save.
    in_scale: float = 1.0
    out_scale: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)


class TrainEntry:
    """One SAE being trained at ``site`` with ``settings``.

    ``init_weights=True`` re-initialises the SAE's weights from ``settings.seed`` (same seed, same
    architecture and shape ⇒ the same initial weights at every site).

    Transcoders (``sae.cfg.is_transcoder`` or ``site_out`` given) read their input ``x (N, d_in)`` at
    ``site`` and their target ``y (N, d_out)`` at ``site_out`` (rows of the same tokens, from the same
    batch); the loss is ``MSE(y, transcoder(x))`` plus the architecture's sparsity term, ``b_dec``
    starts at the target's median/mean, and ``normalize="scale"`` uses one constant for the input
    (``E||c_in·x||² = d_in``) and another for the target (``E||c_out·y||² = d_out``); both are always
    folded into the weights by :meth:`final_sae` (a config has room for only one scale). The
    transcoder's config must have ``normalize="none"``.
    """

    def __init__(
        self,
        name: str,
        site: str,
        sae: SAE,
        settings: TrainSettings | None = None,
        init_weights: bool = True,
        device: str | torch.device | None = None,
        site_out: str | None = None,
    ):
        self.name, self.site, self.site_out = name, site, site_out
        self.settings = settings or TrainSettings()
        if device is not None:
            sae = sae.to(device)
        self.sae = sae
        self.state = EntryState()
        # Data-parallel hook (:class:`sae_hooks.train.distributed.GradSync`); ``None`` = one process.
        self.sync: Any = None
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.device)
        arch = sae.cfg.architecture
        if arch not in ("relu", "topk", "batchtopk", "jumprelu", "gated"):
            raise ConfigError(f"training is implemented for relu, topk, batchtopk, jumprelu, gated; not {arch!r}")
        self.transcoder = sae.cfg.is_transcoder or site_out is not None
        if self.transcoder:
            if site_out is None:
                raise ConfigError(f"entry {name!r}: a transcoder (d_in={sae.cfg.d_in}, d_out={sae.cfg.output_dim}) needs site_out, the site of its target")
            if site_out == site:
                raise ConfigError(f"entry {name!r}: a transcoder's site_out must differ from its site {site!r}")
            if sae.cfg.normalize != "none":
                raise ConfigError(f"entry {name!r}: train transcoders with cfg.normalize='none' (TrainSettings.normalize scales input and target separately), got {sae.cfg.normalize!r}")
            if sae.cfg.apply_b_dec_to_input:
                raise ConfigError(f"entry {name!r}: apply_b_dec_to_input makes no sense for a transcoder")
        s = self.settings
        self.unit_norm = s.unit_norm_decoder if s.unit_norm_decoder is not None else arch in ("topk", "batchtopk", "jumprelu", "gated")
        if init_weights:
            self._init_weights()
        lr = s.lr if s.lr is not None else 2e-4 / math.sqrt(sae.cfg.d_sae / 2**14)
        self.base_lr = lr
        params = [p for p in sae.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=s.betas, eps=s.eps)
        if not sae.cfg.sites:
            kind = "hook" if site.rsplit(".", 1)[-1].startswith("hook_") else "module"
            fields = {kind: site}
            if site_out is not None:
                kind_out = "hook_out" if site_out.rsplit(".", 1)[-1].startswith("hook_") else "module_out"
                fields[kind_out] = site_out
            sae.cfg = sae.cfg.replace(sites=[Site(**fields)])

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites this entry reads from each batch: ``(site,)``, or ``(site, site_out)``."""
        return (self.site, self.site_out) if self.site_out is not None else (self.site,)

    def batch_args(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """``(x, target)`` for :meth:`train_step` from a ``{site: (N, d)}`` batch (target ``None`` for SAEs)."""
        return batch[self.site], (batch[self.site_out] if self.site_out is not None else None)

    @torch.no_grad()
    def _init_weights(self) -> None:
        sae, s = self.sae, self.settings
        g = torch.Generator().manual_seed(s.seed)
        sae.reset_parameters(generator=g)
        norm = s.decoder_init_norm if s.decoder_init_norm is not None else (1.0 if self.unit_norm else 0.1)
        sae.W_dec.mul_(norm)
        # Gated: the gate's L1 and the auxiliary loss act on ReLU(π_gate) directly, so a unit-norm
        # tied encoder starts with ~half of the latents gated on at O(1) magnitudes and the gate never
        # becomes sparse (planted MMCS ≈ 0.65 at L0 ≈ 13 for 3 true features). Start the encoder at
        # Anthropic's 0.1 scale instead (decoder rows stay unit norm): MMCS ≈ 0.97, L0 ≈ 5.
        enc_norm = 0.1 if s.decoder_init_norm is None and sae.cfg.architecture == "gated" else norm
        if self.transcoder:
            # Input and output live in different spaces: no tied init, unit-norm random encoder columns.
            w = torch.randn(sae.cfg.d_in, sae.cfg.d_sae, generator=g)
            sae.W_enc.copy_(w / w.norm(dim=0, keepdim=True) * enc_norm)
        elif sae.cfg.output_dim == sae.cfg.d_in:
            sae.W_enc.copy_(sae.W_dec.T * (enc_norm / norm))
        if sae.cfg.architecture == "jumprelu":
            sae.threshold.fill_(s.init_threshold)

    # Schedules -----------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        s = self.settings
        factor = min(1.0, (step + 1) / s.warmup_steps) if s.warmup_steps > 0 else 1.0
        if s.total_steps and s.decay_fraction > 0:
            decay_start = s.total_steps * (1 - s.decay_fraction)
            if step >= decay_start:
                factor *= max(0.0, (s.total_steps - step) / (s.total_steps - decay_start))
        return self.base_lr * factor

    def sparsity_factor(self, step: int) -> float:
        n = self.settings.sparsity_warmup_steps
        return min(1.0, (step + 1) / n) if n > 0 else 1.0

    @property
    def dead(self) -> Tensor:
        return self.tokens_since_fired > self.settings.dead_tokens

    # Data-dependent initialisation ---------------------------------------------------------------

    @torch.no_grad()
    def _first_batch(self, x: Tensor, y: Tensor | None = None) -> None:
        sae, s = self.sae, self.settings
        if self.transcoder:
            assert y is not None
            if s.normalize == "scale":
                self.state.in_scale = _scale_for(x, sae.cfg.d_in)
                self.state.out_scale = _scale_for(y, sae.cfg.output_dim)
            self._init_from_target(self._normalise(x, y)[2])
            return
        if s.normalize == "scale" and sae.cfg.normalize == "none":
            c = math.sqrt(sae.cfg.d_in / x.double().pow(2).sum(-1).mean().clamp_min(1e-30).item())
            sae.cfg = sae.cfg.replace(normalize="scale", norm_scale=c)
        xn, _ = sae.normalize_input(x.to(sae.dtype))
        self._init_from_target(xn)

    @torch.no_grad()
    def _init_from_target(self, yn: Tensor) -> None:
        """``b_dec`` from the (normalised) reconstruction target, and the TopK MSE scale (≈ FVU)."""
        sae, s = self.sae, self.settings
        if s.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(yn).to(sae.dtype))
        elif s.b_dec_init == "mean":
            sae.b_dec.copy_(yn.mean(0))
        var = (yn - yn.mean(0)).double().pow(2).sum(-1).mean().item()
        self.state.mse_scale = 1.0 / max(var, 1e-30)
        self.state.initialised = True

    def _normalise(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(xn, yn, target)`` in training coordinates: the SAE's own normalisation for an SAE (target
        ``xn``), the two constant scales for a transcoder."""
        if not self.transcoder:
            xn, _ = self.sae.normalize_input(x.to(self.sae.dtype))
            return xn, None, xn
        assert y is not None
        xn, yn = x * self.state.in_scale, y * self.state.out_scale
        return xn, yn, yn

    # One step ------------------------------------------------------------------------------------

    def loss(self, xn: Tensor, yn: Tensor | None = None) -> losses.LossOutput:
        """The architecture's loss on normalised inputs ``xn`` (and, for a transcoder, targets ``yn``)."""
        sae, s, step = self.sae, self.settings, self.state.step
        arch = sae.cfg.architecture
        sp = self.sparsity_factor(step)
        if arch == "relu":
            return losses.relu_loss(sae, xn, s.l1_coefficient * sp, target=yn)
        if arch == "gated":
            return losses.gated_loss(sae, xn, s.l1_coefficient * sp, target=yn)
        if arch == "jumprelu":
            return losses.jumprelu_loss(sae, xn, s.l0_coefficient * sp, s.bandwidth, target=yn)
        denom = self.sync.aux_denom if self.sync is not None else None
        if arch == "topk":
            return losses.topk_loss(sae, xn, self.state.mse_scale, self.dead, s.aux_k, s.aux_coefficient, aux_denom=denom, target=yn)
        return losses.batchtopk_loss(
            sae, xn, self.state.mse_scale, self.dead, s.aux_k, s.aux_coefficient, s.threshold_lr, step == 0,
            aux_denom=denom, target=yn,
        )

    def train_step(
        self, x: Tensor, autocast_dtype: torch.dtype | None = None, target: Tensor | None = None,
    ) -> dict[str, float] | None:
        """One optimiser step on ``x (N, d_in)`` (a transcoder also needs ``target (N, d_out)``, the same
        tokens at ``site_out``); ``None`` (and no change at all) for a non-finite batch."""
        sae = self.sae
        if x.dim() != 2 or x.shape[-1] != sae.cfg.d_in:
            raise ShapeMismatchError(f"entry {self.name!r} (site {self.site!r}) expects (N, {sae.cfg.d_in}) batches, got {tuple(x.shape)}")
        x = x.to(device=sae.device, dtype=sae.dtype)
        if self.transcoder:
            d_out = sae.cfg.output_dim
            if target is None:
                raise ConfigError(f"entry {self.name!r} is a transcoder: train_step needs the target at {self.site_out!r}")
            if target.dim() != 2 or target.shape != (x.shape[0], d_out):
                raise ShapeMismatchError(f"entry {self.name!r} (site_out {self.site_out!r}) expects targets ({x.shape[0]}, {d_out}), got {tuple(target.shape)}")
            target = target.to(device=sae.device, dtype=sae.dtype)
        elif target is not None:
            raise ConfigError(f"entry {self.name!r} is not a transcoder: it takes no target")
        finite = bool(torch.isfinite(x).all()) and (target is None or bool(torch.isfinite(target).all()))
        if self.sync is not None:
            finite = self.sync.all_true(finite)
        if not finite:
            return self._skip("the batch contains NaN/inf")
        if not self.state.initialised:
            gather = (lambda t: t) if self.sync is None else self.sync.gather_rows
            self._first_batch(gather(x), None if target is None else gather(target))
        xn, yn, goal = self._normalise(x, target)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.state.step)
        ctx = torch.autocast(sae.device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        with ctx:
            out = self.loss(xn, yn)
        finite = bool(torch.isfinite(out.loss))
        if self.sync is not None:
            finite = self.sync.all_true(finite)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip("the loss is NaN/inf")
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.sync is not None:
            self.sync.after_backward(sae)
        if self.unit_norm:
            _remove_parallel_grad(sae)
        if self.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            if self.unit_norm:
                sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            if sae.cfg.architecture == "jumprelu":
                sae.threshold.clamp_(min=0.0)
            n, fired = x.shape[0], out.fired
            if self.sync is not None:
                fired, n = self.sync.fired(fired, n)
            self.tokens_since_fired.add_(n).masked_fill_(fired, 0)
            var = (goal - goal.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-30)
            metrics = {
                "loss": out.loss.item(),
                "mse": out.mse.item(),
                "aux": out.aux.item(),
                "fvu": (out.mse / var).item(),
                "l0": out.l0.item(),
                "dead_fraction": self.dead.float().mean().item(),
                "lr": self.optimizer.param_groups[0]["lr"],
            }
            if self.sync is not None:
                metrics = self.sync.metrics(metrics)
        self.state.step += 1
        self.state.tokens_seen += n
        self.state.metrics = metrics
        return metrics

    def _skip(self, why: str) -> None:
        self.state.skipped += 1
        warnings.warn(f"entry {self.name!r} (site {self.site!r}): skipped a batch because {why}", RuntimeWarning, stacklevel=3)
        return None

    # Output --------------------------------------------------------------------------------------

    def final_sae(self) -> SAE:
        """A copy of the SAE for inference: normalisation folded (if asked), training metadata set."""
        sae = copy.deepcopy(self.sae)
        if self.transcoder:
            fold_transcoder_scales(sae, self.state.in_scale, self.state.out_scale)
        elif self.settings.fold_normalization and sae.cfg.normalize == "scale" and self.state.initialised:
            fold_scale(sae)
        meta = dict(sae.cfg.metadata)
        meta["training"] = {
            "site": self.site,
            **({"site_out": self.site_out} if self.site_out is not None else {}),
            "steps": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "skipped_batches": self.state.skipped,
            "dead_fraction": self.dead.float().mean().item(),
            "final_metrics": self.state.metrics,
            "settings": self.settings.to_dict(),
            "library": "sae_hooks",
        }
        sae.cfg = sae.cfg.replace(metadata=meta)
        return sae


@torch.no_grad()
def fold_scale(sae: SAE) -> None:
    """Fold ``normalize="scale"`` (inputs multiplied by ``c``) into the weights; same function after.

    ``pre = (c·x − b_dec) W_enc = (x − b_dec/c)(c·W_enc)`` and ``x_hat = (f W_dec + b_dec)/c``; thresholds,
    gates and the skip path are unchanged.
    """
    c = float(sae.cfg.norm_scale)  # type: ignore[arg-type]
    sae.W_enc.mul_(c)
    sae.W_dec.div_(c)
    sae.b_dec.div_(c)
    sae.cfg = sae.cfg.replace(normalize="none", norm_scale=None)


@torch.no_grad()
def fold_transcoder_scales(sae: SAE, in_scale: float, out_scale: float) -> None:
    """Fold a transcoder's training scales (input ``c_in·x``, target ``c_out·y``) into its weights.

    Trained: ``c_out·y ≈ f(c_in·x W_enc + b_enc) W_dec + b_dec + c_in·x W_skip``. So ``W_enc ← c_in·W_enc``
    (pre-activations, thresholds and gates unchanged) and ``W_dec, b_dec ← /c_out``,
    ``W_skip ← c_in/c_out·W_skip``: the saved transcoder maps model-space ``x`` to model-space ``y``.
    """
    sae.W_enc.mul_(in_scale)
    sae.W_dec.div_(out_scale)
    sae.b_dec.div_(out_scale)
    if sae.cfg.skip:
        sae.W_skip.mul_(in_scale / out_scale)


def _scale_for(x: Tensor, d: int) -> float:
    """The constant ``c`` with ``E||c·x||² = d`` on the rows of ``x (N, d)``."""
    return math.sqrt(d / x.double().pow(2).sum(-1).mean().clamp_min(1e-30).item())


def _remove_parallel_grad(sae: SAE) -> None:
    W, g = sae.W_dec, sae.W_dec.grad
    if g is None:
        return
    unit = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    g.sub_((g * unit).sum(-1, keepdim=True) * unit)


# The multi-SAE trainer ----------------------------------------------------------------------------


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA, then MPS, then CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Trainer:
    """Feeds one batch per site to every entry at that site.

    Args:
        entries: the SAEs to train (unique names).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the SAE forward under autocast (GPU).
    """

    def __init__(self, entries: Sequence[TrainEntry], autocast_dtype: torch.dtype | None = None):
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ConfigError(f"entry names must be unique, got {names}")
        if any("/" in n or n.startswith(".") for n in names):
            raise ConfigError(f"entry names are folder names: no '/' or leading '.', got {names}")
        self.entries = list(entries)
        self.autocast_dtype = autocast_dtype
        self.step_count = 0
        self.tokens_seen = 0
        self.sites = sorted({s for e in self.entries for s in e.sites})

    def entry(self, name: str) -> TrainEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def step(self, batch: dict[str, Tensor] | Tensor) -> dict[str, dict[str, float] | None]:
        """One step of every entry; ``batch`` maps each site to ``(N, d)`` (a bare tensor: one site)."""
        if isinstance(batch, Tensor):
            if len(self.sites) != 1:
                raise ConfigError(f"a bare tensor batch is ambiguous with sites {self.sites}; pass a dict")
            batch = {self.sites[0]: batch}
        missing = [s for s in self.sites if s not in batch]
        if missing:
            raise ConfigError(f"batch lacks sites {missing} (has {sorted(batch)})")
        out = {}
        for e in self.entries:
            x, target = e.batch_args(batch)
            out[e.name] = e.train_step(x, self.autocast_dtype, target=target)
        self.step_count += 1
        self.tokens_seen += int(next(iter(batch.values())).shape[0])
        return out

    def fit(
        self,
        data: Any,
        max_steps: int | None = None,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        progress: bool = False,
        log: Callable[[int, dict[str, Any]], None] | None = None,
        log_every: int = 10,
    ) -> Trainer:
        """Train until ``max_steps`` (counted from the start of the run, so a resumed run stops at the
        same place) or until ``data`` runs out. ``data`` is a :class:`~.buffer.ShuffleBuffer` (or any
        object with ``next_batch()``) or an iterable of batches; only a buffer can be checkpointed."""
        if max_steps is not None:
            for e in self.entries:
                if e.settings.total_steps is None:
                    e.settings.total_steps = max_steps
        next_batch = data.next_batch if hasattr(data, "next_batch") else iter(data).__next__
        bar = _progress_bar(progress, max_steps, self.step_count)
        t0, tok0 = time.perf_counter(), self.tokens_seen
        try:
            while max_steps is None or self.step_count < max_steps:
                try:
                    batch = next_batch()
                except StopIteration:
                    batch = None
                if batch is None:
                    break
                results = self.step(batch)
                if bar is not None:
                    bar.update(1)
                    if self.step_count % log_every == 0:
                        rate = (self.tokens_seen - tok0) / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(_summary(results, rate), refresh=False)
                if log is not None and self.step_count % log_every == 0:
                    log(self.step_count, _flat_metrics(results))
                if checkpoint_dir is not None and checkpoint_every and self.step_count % checkpoint_every == 0:
                    from .checkpoint import save_checkpoint

                    save_checkpoint(self, checkpoint_dir, data if hasattr(data, "state_dict") else None)
        finally:
            if bar is not None:
                bar.close()
        return self

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Save every entry's SAE (native format) to ``out_dir/<name>``, all or none (one atomic unit:
        a kill mid-save leaves either every old folder or every new one); returns the paths."""
        from .._atomic import atomic_dirs
        from ..native import write_folder

        out = Path(out_dir)
        paths = {e.name: out / e.name for e in self.entries}
        saes = [e.final_sae() for e in self.entries]
        with atomic_dirs(list(paths.values())) as tmps:
            for sae, tmp in zip(saes, tmps):
                write_folder(sae, tmp)
        return paths


def _summary(results: dict[str, dict[str, float] | None], rate: float) -> dict[str, str]:
    ok = [m for m in results.values() if m]
    post = {"tok/s": f"{rate:,.0f}"}
    if ok:
        for key in ("loss", "l0", "fvu"):
            post[key] = f"{sum(m[key] for m in ok) / len(ok):.3g}"
    return post


def _flat_metrics(results: dict[str, dict[str, float] | None]) -> dict[str, float]:
    return {f"{name}/{k}": v for name, m in results.items() if m for k, v in m.items()}


def _progress_bar(enabled: bool, total: int | None, initial: int):  # noqa: ANN202
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=initial, desc="training SAEs", unit="step", dynamic_ncols=True)


def train_on_tensors(entries: Sequence[TrainEntry], batches: Iterable[Tensor | dict[str, Tensor]], **fit_kwargs: Any) -> Trainer:
    """Convenience: ``Trainer(entries).fit(batches)``."""
    return Trainer(entries).fit(batches, **fit_kwargs)
