"""The one trainer: entries of ``(sites, model, objective)`` fed from one batch per site.

One source batch (e.g. one forward pass of a live model with hooks at several sites) feeds every
entry; each entry has its own optimiser, learning-rate schedule, dead-latent counter (in tokens) and
random generator, so training N SAEs together gives exactly what training each alone on the same
activations gives. What an entry trains is its *objective* (:mod:`.objectives`): an SAE or transcoder,
a multi-layer SAE, a Jacobian SAE pair, or anything implementing :class:`~.objectives.Objective`. The
loop is the same for all: Adam (or a registered optimiser, :func:`register_optimizer`), warm-up/decay
schedule, the decoder-norm constraint with parallel-gradient removal, NaN/inf skipping, checkpoints with
exact resume, ``torch.distributed`` (:mod:`.distributed`), progress bars and logging callbacks.

>>> trainer = Trainer([TrainEntry("l1", "transformer.h.1", make_sae("topk", 64, 512, k=16))])
>>> trainer.fit(ShuffleBuffer(LiveSource(model, ["transformer.h.1"], batches)), max_steps=1000)
>>> trainer.save("out/")            # native format, training metadata in cfg.metadata
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ..saes.base import SAE
from ..saes.kernels import latent_major_, match_state_layout
from ..saes.training import ArchSettings, LossOutput, StepContext, remove_parallel_grad, unit_norm_rows_
from . import checkpoint as _ckpt
from .objectives import Objective, make_objective

B_DEC_INITS = ("geometric_median", "mean", "zeros")
INPUT_SCALINGS = ("scale", "none")


# Optimisers ---------------------------------------------------------------------------------------

#: name -> ``factory(params, settings) -> torch.optim.Optimizer``; :func:`register_optimizer` adds one.
OPTIMIZERS: dict[str, Callable[[list[Tensor], TrainSettings], torch.optim.Optimizer]] = {}
#: name -> ``objective(sae, site, site_out, optimizer_settings) -> Objective`` for optimisers with per-batch
#: work of their own (PAM-SGD's closed-form decoder steps, :mod:`.pam`).
OPTIMIZER_OBJECTIVES: dict[str, Callable[..., Objective]] = {}


def register_optimizer(
    name: str, factory: Callable[..., torch.optim.Optimizer], *, replace: bool = False,
    objective: Callable[..., Objective] | None = None,
) -> None:
    """Make ``TrainSettings(optimizer=name)`` build ``factory(params, settings)``. The trainer sets each
    param group's ``"lr"`` from the schedule before every step and calls ``optimizer.step()``. An optimiser
    that needs more than gradients (a closed-form step, its own state) also gives ``objective``, which
    builds the entry's objective for an SAE from ``(sae, site, site_out, settings.optimizer_settings)``."""
    if name in OPTIMIZERS and not replace:
        raise ConfigError(f"optimizer {name!r} is already registered; pass replace=True to replace it")
    OPTIMIZERS[name] = factory
    if objective is not None:
        OPTIMIZER_OBJECTIVES[name] = objective
    else:
        OPTIMIZER_OBJECTIVES.pop(name, None)


def adam_impl(params: list[Tensor]) -> dict[str, bool]:
    """``{"fused": True}`` when torch's fused Adam applies (floating CPU/CUDA parameters stored densely):
    one pass over each tensor, no full-size temporaries (12x faster than the default per-tensor loop
    on CPU at d_sae 32k). The fused kernel pairs elements by memory order, so the optimiser state must
    have the parameter's strides: :func:`~sae_hooks.saes.kernels.match_state_layout` (a
    ``load_state_dict`` post-hook) restores them after a checkpoint, which stores state contiguous."""
    ok = bool(params) and all(
        p.is_floating_point() and (p.is_contiguous() or p.T.is_contiguous()) and p.device.type in ("cpu", "cuda")
        for p in params
    )
    return {"fused": True} if ok else {}


register_optimizer("adam", lambda params, s: torch.optim.Adam(params, lr=1.0, betas=s.betas, eps=s.eps, **adam_impl(params)))


# Settings -----------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """Hyper-parameters of one entry's training (every field is JSON-serialisable).

    Attributes:
        lr: learning rate; ``None`` = ``2e-4 / sqrt(d_sae / 2**14)`` (sparsify's Adam default).
        betas, eps: Adam's.
        warmup_steps: linear warm-up from 0.
        decay_fraction: linear decay to 0 over this final fraction of ``total_steps`` (needs it).
        total_steps: length of the run, for the decay (``Trainer.fit(max_steps=...)`` fills it in).
        grad_clip: clip the gradient norm (``None``: no clipping).
        sparsity_warmup_steps: the sparsity coefficient rises linearly from 0 over these steps.
        dead_tokens: a latent is dead after this many tokens without firing.
        unit_norm_decoder: keep decoder rows at unit norm and remove the gradient parallel to them;
            ``None`` = what the architecture's training spec says (on for all but ``relu``).
        decoder_init_norm: decoder row norm at init (encoder = decoder transposed); ``None`` = 1 with
            unit-norm decoders, 0.1 otherwise (Anthropic's April 2024 init); an architecture may start its
            encoder elsewhere (Gated: 0.1).
        b_dec_init: ``geometric_median`` | ``mean`` | ``zeros`` of the first batches' targets.
        input_scaling: ``scale``: multiply inputs by a constant (from the first batches, robustly) so that
            ``E||x||² = d_in``; held as ``cfg.normalize="scale"`` during training and folded into the weights
            when saving if ``fold_input_scaling``. (Not :attr:`SAEConfig.normalize`, which is the SAE's own
            inference-time normalisation.)
        init_batches: how many first batches the data statistics (input scale, ``b_dec``, MSE scale)
            come from; training on them starts once they are all in (:mod:`.statistics`).
        seed: initialises the weights.
        optimizer: a name registered with :func:`register_optimizer` (``adam``, ``pam-sgd``).
        optimizer_settings: the optimiser's own settings (``pam-sgd``: :class:`~.pam.PAMSettings` keys).
        arch: the architecture's own settings (a dict or its :class:`~sae_hooks.saes.training.ArchSettings`),
            checked against its keys, e.g. ``{"l1_coefficient": 2.0}`` for ``relu``, ``{"aux_k": 128}`` for ``topk``.
    """

    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    total_steps: int | None = None
    grad_clip: float | None = None
    sparsity_warmup_steps: int = 0
    dead_tokens: int = 10_000_000
    unit_norm_decoder: bool | None = None
    decoder_init_norm: float | None = None
    b_dec_init: str = "geometric_median"
    input_scaling: str = "scale"
    fold_input_scaling: bool = True
    init_batches: int = 3
    seed: int = 0
    optimizer: str = "adam"
    arch: dict[str, Any] = field(default_factory=dict)
    optimizer_settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if isinstance(self.arch, ArchSettings):
            self.arch = self.arch.to_dict()
        if not isinstance(self.arch, dict):
            raise ConfigError(f"TrainSettings.arch must be a dict of the architecture's settings, got {type(self.arch).__name__}")
        if self.b_dec_init not in B_DEC_INITS:
            raise ConfigError(f"b_dec_init must be one of {B_DEC_INITS}, got {self.b_dec_init!r}")
        if self.input_scaling not in INPUT_SCALINGS:
            raise ConfigError(f"input_scaling must be one of {INPUT_SCALINGS}, got {self.input_scaling!r}")
        if not isinstance(self.init_batches, int) or self.init_batches < 1:
            raise ConfigError(f"init_batches must be a positive integer, got {self.init_batches!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; registered: {sorted(OPTIMIZERS)}")
        if not isinstance(self.optimizer_settings, dict):
            raise ConfigError(f"TrainSettings.optimizer_settings must be a dict, got {type(self.optimizer_settings).__name__}")
        if self.optimizer_settings and self.optimizer not in OPTIMIZER_OBJECTIVES:
            raise ConfigError(f"optimizer {self.optimizer!r} takes no optimizer_settings, got {sorted(self.optimizer_settings)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown training setting(s) {unknown}; known: {known}")
        return cls(**data)


@dataclass
class EntryState:
    step: int = 0
    tokens_seen: int = 0
    skipped: int = 0
    initialised: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


# Data-parallel hooks: the single-process version ----------------------------------------------------


class LocalSync:
    """What an entry calls to make a step global across data-parallel ranks; here, one process: nothing
    to do. :class:`~.distributed.GradSync` is the ``torch.distributed`` version."""

    world = 1
    aux_denom = None  # the AuxK normaliser of this batch alone

    def all_true(self, flag: bool) -> bool:
        return flag

    def gather_rows(self, x: Tensor) -> Tensor:
        return x

    def after_backward(self, params: Sequence[Tensor], n_local: int) -> None:
        pass

    def average_(self, tensors: Sequence[Tensor]) -> None:
        pass

    def fired(self, fired: Tensor, n: int) -> tuple[Tensor, int]:
        return fired, n

    def metrics(self, metrics: dict[str, float], n_local: int) -> dict[str, float]:
        return metrics


# One entry -----------------------------------------------------------------------------------------


class TrainEntry:
    """One model being trained at ``site`` with ``settings``.

    ``model`` is an SAE (a transcoder when ``site_out`` is given: input at ``site``, target at
    ``site_out``), a :class:`~sae_hooks.saes.multilayer.MultiLayerSAE` (``site``: its list of sites,
    default its config's), a :class:`~sae_hooks.saes.jacobian.JacobianSAEPair` (``site`` default the
    pair's ``hook_in``), or pass ``objective=`` for anything else (:class:`~.objectives.Objective`).

    ``init_weights=True`` re-initialises the weights from ``settings.seed`` (same seed, same architecture
    and shape ⇒ the same initial weights at every site). See :class:`~.objectives.SAEObjective` for
    transcoders' separate input/target scales.
    """

    def __init__(
        self,
        name: str,
        site: str | Sequence[str] | None = None,
        sae: Any = None,
        settings: TrainSettings | None = None,
        init_weights: bool = True,
        device: str | torch.device | None = None,
        site_out: str | None = None,
        *,
        objective: Objective | None = None,
    ):
        settings = settings or TrainSettings()
        if objective is None:
            if sae is None:
                raise ConfigError(f"entry {name!r}: give the model to train (an SAE, MLSAE or Jacobian pair) or objective=")
            special = OPTIMIZER_OBJECTIVES.get(settings.optimizer)
            objective = special(sae, site, site_out, settings.optimizer_settings) if special else make_objective(sae, site, site_out)
        elif sae is not None or site is not None or site_out is not None:
            raise ConfigError(f"entry {name!r}: with objective= the sites and model come from the objective")
        self.name = name
        self.objective = objective
        self.settings = settings
        if device is not None:
            objective.module.to(device)
        self.arch_settings = objective.spec.settings.from_dict(self.settings.arch)
        self.state = EntryState()
        self.sync: Any = LocalSync()
        self.pending: list[dict[str, Tensor]] = []
        self.tokens_since_fired = torch.zeros(objective.n_latents, dtype=torch.long, device=self.device)
        s = self.settings
        self.unit_norm = s.unit_norm_decoder if s.unit_norm_decoder is not None else objective.spec.unit_norm_decoder
        if init_weights:
            objective.init_weights(s, self.unit_norm, self.arch_settings)
        self.base_lr = s.lr if s.lr is not None else 2e-4 / math.sqrt(objective.n_latents / 2**14)
        module = objective.module
        if isinstance(module, SAE) and module.cfg.architecture == "topk":
            latent_major_(module.W_enc)  # its sparse gradient is latent-major: no transposing copy (saes/kernels.py)
        self.params = [p for p in objective.module.parameters() if p.requires_grad]
        self.optimizer = OPTIMIZERS[s.optimizer](self.params, s)
        self.optimizer.register_load_state_dict_post_hook(match_state_layout)

    # Views ---------------------------------------------------------------------------------------

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites this entry reads from each batch."""
        return self.objective.sites

    @property
    def site(self) -> str:
        return self.objective.sites[0]

    @property
    def site_out(self) -> str | None:
        return getattr(self.objective, "site_out", None)

    @property
    def sae(self) -> Any:
        """The model being trained (an SAE, an MLSAE, a Jacobian pair)."""
        return self.objective.module

    @property
    def device(self) -> torch.device:
        return next(self.objective.module.parameters()).device

    @property
    def dead(self) -> Tensor:
        return self.tokens_since_fired > self.settings.dead_tokens

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

    # One step ------------------------------------------------------------------------------------

    def train_step(
        self, batch: dict[str, Tensor] | Tensor, autocast_dtype: torch.dtype | None = None, target: Tensor | None = None,
    ) -> dict[str, float] | None:
        """One optimiser step on ``batch`` (``{site: (N, d)}``; a bare tensor for a one-site entry, with
        ``target`` for a transcoder). Returns the metrics, or ``None`` with no change at all for a
        non-finite or empty batch (and while the first ``init_batches`` batches are collected for the statistics)."""
        if isinstance(batch, Tensor):
            if target is not None and self.site_out is None:
                raise ConfigError(f"entry {self.name!r} is not a transcoder: it takes no target")
            batch = {self.site: batch} if target is None else {self.site: batch, self.site_out: target}
        elif target is not None:
            raise ConfigError(f"entry {self.name!r}: pass the target inside the batch dict")
        missing = [site for site in self.sites if site not in batch]
        if missing:
            role = " (the transcoder's target: pass target= or a dict)" if missing == [self.site_out] else ""
            raise ConfigError(f"entry {self.name!r}: the batch lacks {missing}{role}; it has {sorted(batch)}")
        inputs = self.objective.inputs(batch, self.name)
        if not self.sync.all_true(self.objective.tokens(inputs) > 0):  # no data: nothing to learn or measure
            return self._skip("it has 0 rows (an empty batch)")
        finite = self.sync.all_true(all(bool(torch.isfinite(t).all()) for t in inputs.values()))
        if not finite:
            return self._skip("the batch contains NaN/inf")
        if self.state.initialised or not self.objective.needs_statistics:
            return self._step(inputs, autocast_dtype)
        self.pending.append(inputs)
        if len(self.pending) < self.settings.init_batches:
            return None
        return self.flush(autocast_dtype)

    def flush(self, autocast_dtype: torch.dtype | None = None) -> dict[str, float] | None:
        """Compute the data statistics from the collected first batches and train on them (a run shorter
        than ``init_batches`` calls this at its end)."""
        if not self.pending:
            return None
        gathered = [{k: self.sync.gather_rows(v) for k, v in b.items()} for b in self.pending]
        keep = self.objective.prepare(gathered, self.settings) or [True] * len(gathered)
        self.state.initialised = True
        pending, self.pending, out = self.pending, [], None
        for inputs, k in zip(pending, keep):
            if k:
                out = self._step(inputs, autocast_dtype) or out
            else:
                self.state.skipped += 1
        return out

    def _step(self, inputs: dict[str, Tensor], autocast_dtype: torch.dtype | None) -> dict[str, float] | None:
        obj, s = self.objective, self.settings
        if not obj.needs_statistics:
            self.state.initialised = True
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.state.step)
        ctx = StepContext(
            step=self.state.step, total_steps=s.total_steps, dead=self.dead, sparsity=self.sparsity_factor(self.state.step),
            mse_scale=getattr(obj, "mse_scale", 1.0), aux_denom=self.sync.aux_denom,
        )
        amp = torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        with amp:
            out: LossOutput = obj.loss(inputs, ctx, self.arch_settings)
        if not self.sync.all_true(bool(torch.isfinite(out.loss))):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip("the loss is NaN/inf")
        n_local = obj.tokens(inputs)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.sync.after_backward(self.params, n_local)
        decoders = obj.decoders()
        if self.unit_norm:
            for W in decoders:
                remove_parallel_grad(W)
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            if self.unit_norm:
                for W in decoders:
                    unit_norm_rows_(W)
            obj.after_step(inputs, out, self.arch_settings, first=self.state.step == 0)
            self.sync.average_(obj.synced_buffers())
            fired, n = self.sync.fired(out.fired, n_local)
            self.tokens_since_fired.add_(n).masked_fill_(fired, 0)
            metrics = {"loss": out.loss.item(), **{k: float(v) for k, v in out.metrics.items()},
                       "dead_fraction": self.dead.float().mean().item(), "lr": self.optimizer.param_groups[0]["lr"]}
            metrics = self.sync.metrics(metrics, n_local)
        self.state.step += 1
        self.state.tokens_seen += n
        self.state.metrics = metrics
        return metrics

    def _skip(self, why: str) -> None:
        self.state.skipped += 1
        warnings.warn(f"entry {self.name!r} (site {self.site!r}): skipped a batch because {why}", RuntimeWarning, stacklevel=3)
        return None

    # State, output -------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``(JSON metadata, tensors)`` of everything needed to continue exactly (checkpoints, gathering)."""
        tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in self.objective.module.state_dict().items()}
        opt = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in opt["state"].items():
            for key, value in st.items():
                if isinstance(value, Tensor):
                    tensors[f"opt.{idx}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
        tensors["dead"] = self.tokens_since_fired.cpu()
        tensors.update({f"objective.{k}": v.detach().contiguous().cpu() for k, v in self.objective.tensor_state().items()})
        for i, b in enumerate(self.pending):
            tensors.update({f"pending.{i}.{site}": t.detach().contiguous().cpu() for site, t in b.items()})
        meta = {
            "sites": list(self.sites), "kind": self.objective.kind, "settings": self.settings.to_dict(),
            "state": dataclasses.asdict(self.state), "objective": self.objective.state_dict(),
            "optimizer": {"param_groups": groups, "scalars": scalars, "indices": sorted(opt["state"])},
            "pending": len(self.pending),
        }
        return meta, tensors

    def load_state_dict(self, meta: dict[str, Any], tensors: dict[str, Tensor], where: str = "checkpoint") -> None:
        if list(meta["sites"]) != list(self.sites) or meta["kind"] != self.objective.kind:
            roles = "site, site_out" if self.site_out is not None or len(meta["sites"]) == 2 and meta["kind"] == "sae" else "sites"
            raise ConfigError(
                f"{where}: entry {self.name!r} was a {meta['kind']} trained at ({roles}) {meta['sites']}, not a "
                f"{self.objective.kind} at {list(self.sites)}"
            )
        self.settings = TrainSettings.from_dict(meta["settings"])
        self.arch_settings = self.objective.spec.settings.from_dict(self.settings.arch)
        self.state = EntryState(**meta["state"])
        self.objective.load_state_dict(meta["objective"])
        self.objective.load_tensor_state({k[len("objective."):]: v for k, v in tensors.items() if k.startswith("objective.")})
        dev = self.device
        self.objective.module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        om = meta["optimizer"]
        state: dict[int, dict[str, Any]] = {}
        for idx in om["indices"]:
            st: dict[str, Any] = dict(om["scalars"].get(str(idx), {}))
            pre = f"opt.{idx}."
            for name, t in tensors.items():
                if name.startswith(pre):
                    key = name[len(pre):]
                    st[key] = t if key == "step" else t.to(dev)
            state[int(idx)] = st
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in om["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.tokens_since_fired = tensors["dead"].to(dev)
        self.pending = [
            {site: tensors[f"pending.{i}.{site}"].to(dev) for site in self.sites if f"pending.{i}.{site}" in tensors}
            for i in range(int(meta.get("pending", 0)))
        ]

    def training_metadata(self) -> dict[str, Any]:
        return {
            "site": self.site,
            **({"site_out": self.site_out} if self.site_out is not None else {}),
            **({"sites": list(self.sites)} if len(self.sites) > 1 and self.site_out is None else {}),
            "steps": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "skipped_batches": self.state.skipped,
            "dead_fraction": self.dead.float().mean().item(),
            "final_metrics": self.state.metrics,
            "settings": self.settings.to_dict(),
            "library": "sae_hooks",
        }

    def final(self) -> Any:
        """A copy of the model for inference: input scaling folded (if asked), training metadata set."""
        return self.objective.final(self.settings, self.state, self.training_metadata())

    final_sae = final

    def save(self, path: str | os.PathLike) -> Path:
        """Save :meth:`final` to the folder ``path`` (atomically)."""
        self.final().save(path)
        return Path(path)


# The trainer ---------------------------------------------------------------------------------------


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
        entries: what to train (unique names).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward passes under autocast (GPU).
    """

    is_main = True

    def __init__(self, entries: Sequence[TrainEntry], autocast_dtype: torch.dtype | None = None):
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ConfigError(f"entry names must be unique, got {names}")
        if any("/" in n or n.startswith(".") for n in names):
            raise ConfigError(f"entry names are folder names: no '/' or leading '.', got {names}")
        self.entries = list(entries)
        self.local = self.entries  # the entries this process steps (a subset under sharding)
        self.autocast_dtype = autocast_dtype
        self.step_count = 0
        self.tokens_seen = 0

    @property
    def sites(self) -> list[str]:
        return sorted({s for e in self.local for s in e.sites})

    def entry(self, name: str) -> TrainEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    def _as_dict(self, batch: dict[str, Tensor] | Tensor) -> dict[str, Tensor]:
        if isinstance(batch, Tensor):
            sites = sorted({s for e in self.entries for s in e.sites})
            if len(sites) != 1:
                raise ConfigError(f"a bare tensor batch is ambiguous with sites {sites}; pass a dict")
            return {sites[0]: batch}
        missing = [s for s in self.sites if s not in batch]
        if missing:
            raise ConfigError(f"batch lacks sites {missing} (has {sorted(batch)})")
        return batch

    def _agree(self, has_batch: bool, n: int) -> tuple[bool, int]:
        """Every process has a batch?, and the rows of this step over all processes."""
        return has_batch, n

    def step(self, batch: dict[str, Tensor] | Tensor, _n_total: int | None = None) -> dict[str, dict[str, float] | None]:
        """One step of every (local) entry; ``batch`` maps each site to ``(N, d)`` (a bare tensor: one site)."""
        batch = self._as_dict(batch)
        n_local = int(next(iter(batch.values())).shape[0])
        n_total = _n_total if _n_total is not None else self._agree(True, n_local)[1]
        out = {e.name: e.train_step(batch, self.autocast_dtype) for e in self.local}
        self.step_count += 1
        self.tokens_seen += n_total
        return out

    def flush(self) -> None:
        """Train every entry on first batches it still holds for its statistics (end of a short run)."""
        for e in self.local:
            e.flush(self.autocast_dtype)

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
        same place) or until ``data`` runs out (any process's, when distributed). ``data`` is a
        :class:`~.buffer.ShuffleBuffer` (or any object with ``next_batch()``) or an iterable of batches;
        only a buffer can be checkpointed. ``progress`` (tqdm) and ``log(step, metrics)`` (e.g. W&B,
        TensorBoard) act on the main process only."""
        if max_steps is not None:
            for e in self.entries:
                if e.settings.total_steps is None:
                    e.settings.total_steps = max_steps
        next_batch = data.next_batch if hasattr(data, "next_batch") else iter(data).__next__
        bar = _progress_bar(progress and self.is_main, max_steps, self.step_count)
        t0, tok0 = time.perf_counter(), self.tokens_seen
        try:
            while max_steps is None or self.step_count < max_steps:
                try:
                    batch = next_batch()
                except StopIteration:
                    batch = None
                n = 0 if batch is None else int((batch if isinstance(batch, Tensor) else next(iter(batch.values()))).shape[0])
                every, n_total = self._agree(batch is not None, n)
                if not every:
                    break
                results = self.step(batch, _n_total=n_total)  # type: ignore[arg-type]
                at_log = self.step_count % log_every == 0
                if at_log:
                    results = self._gather_results(results)
                if bar is not None:
                    bar.update(1)
                    if at_log:
                        rate = (self.tokens_seen - tok0) / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(_summary(results, rate), refresh=False)
                if log is not None and at_log and self.is_main:
                    log(self.step_count, _flat_metrics(results))
                if checkpoint_dir is not None and checkpoint_every and self.step_count % checkpoint_every == 0:
                    self.save_checkpoint(checkpoint_dir, data if hasattr(data, "state_dict") else None)
            self.flush()
        finally:
            if bar is not None:
                bar.close()
        return self

    def _gather_results(self, results: dict[str, Any]) -> dict[str, Any]:
        return results

    # Checkpoints, saving ------------------------------------------------------------------------

    def state_dict(self, buffer: Any = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Everything a checkpoint holds: counters, every entry, the RNG states, the buffer's."""
        tensors: dict[str, Tensor] = {}
        entries = {}
        for e in self.entries:
            meta, t = e.state_dict()
            entries[e.name] = meta
            tensors.update({f"entry.{e.name}.{k}": v for k, v in t.items()})
        version, state, gauss = random.getstate()
        meta_all: dict[str, Any] = {
            "step": self.step_count, "tokens_seen": self.tokens_seen, "entries": entries,
            "python_random": [version, list(state), gauss],
        }
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        if buffer is not None:
            buf_meta, buf_tensors = buffer.state_dict()
            meta_all["buffer"] = buf_meta
            tensors.update({f"buffer.{k}": v.detach().cpu() for k, v in buf_tensors.items()})
        return meta_all, tensors

    def load_state_dict(self, meta: dict[str, Any], tensors: dict[str, Tensor], buffer: Any = None, where: str = "checkpoint") -> None:
        names = sorted(e.name for e in self.entries)
        if sorted(meta["entries"]) != names:
            raise ConfigError(f"{where}: checkpoint has entries {sorted(meta['entries'])}, the trainer has {names}")
        for e in self.entries:
            pre = f"entry.{e.name}."
            e.load_state_dict(meta["entries"][e.name], {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, where)
        self.step_count = int(meta["step"])
        self.tokens_seen = int(meta["tokens_seen"])
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        version, state, gauss = meta["python_random"]
        random.setstate((version, tuple(state), gauss))
        if buffer is not None:
            if "buffer" not in meta:
                raise ConfigError(f"{where}: the checkpoint has no buffer state")
            buffer.load_state_dict(meta["buffer"], {k[7:]: v for k, v in tensors.items() if k.startswith("buffer.")})

    def save_checkpoint(self, path: str | os.PathLike, buffer: Any = None) -> Path:
        """Write a checkpoint (folder ``path``, atomically) of every entry and ``buffer``'s position."""
        return _ckpt.save_checkpoint(self, path, buffer)

    def load_checkpoint(self, path: str | os.PathLike, buffer: Any = None) -> dict[str, Any]:
        """Restore from :meth:`save_checkpoint`'s folder (same entry names; ``buffer`` recreated the same way)."""
        return _ckpt.load_checkpoint(self, path, buffer)

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Save every entry's final model (native format; a Jacobian pair its pair folder) to ``out_dir/<name>``,
        all or none: the folders are swapped in as one unit (a kill mid-save leaves every old folder or every new
        one, see :func:`sae_hooks._atomic.atomic_dirs`)."""
        from .._atomic import atomic_dirs
        from ..native import write_folder

        out = Path(out_dir)
        paths = {e.name: out / e.name for e in self.entries}
        finals = [e.final() for e in self.entries]
        with atomic_dirs(list(paths.values())) as tmps:
            for model, tmp in zip(finals, tmps):
                if type(model).save is SAE.save:
                    write_folder(model, tmp)  # plainly: the set is what is swapped in atomically
                else:
                    model.save(tmp)  # e.g. a Jacobian pair's folder
        return paths


def _summary(results: dict[str, dict[str, float] | None], rate: float) -> dict[str, str]:
    ok = [m for m in results.values() if m]
    post = {"tok/s": f"{rate:,.0f}"}
    for key in ("loss", "l0", "fvu"):
        vals = [m[key] for m in ok if key in m]
        if vals:
            post[key] = f"{sum(vals) / len(vals):.3g}"
    return post


def _flat_metrics(results: dict[str, dict[str, float] | None]) -> dict[str, float]:
    return {f"{name}/{k}": v for name, m in results.items() if m for k, v in m.items()}


def _progress_bar(enabled: bool, total: int | None, initial: int):  # noqa: ANN202
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)
