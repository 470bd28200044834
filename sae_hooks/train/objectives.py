"""What a training entry optimises: an :class:`Objective` turns a batch ``{site: (N, d)}`` into a loss.

The trainer (:mod:`.trainer`) owns the loop: optimiser, schedules, decoder-norm constraint, dead-latent
counter, NaN skipping, synchronisation, checkpoints. An objective owns what is specific to a model:
which sites it reads, its weight initialisation and data statistics, its loss (through the
architecture's :class:`~sae_hooks.saes.training.TrainingSpec`), which parameters are unit-norm decoders,
its post-step hook, and how the final model is saved. Built in:

* :class:`SAEObjective`: an SAE (target = its input) or a transcoder (input at ``site``, target at ``site_out``);
* :class:`MultiLayerObjective`: one MLSAE over every layer's residual (one example per layer and token);
* :class:`JacobianObjective`: a Jacobian SAE pair around one MLP (:mod:`sae_hooks.saes.jacobian`).

A new objective (or a new optimiser's per-batch work, e.g. a closed-form decoder solve in
:meth:`Objective.after_step`) plugs in with ``TrainEntry(name, objective=...)``; the loop is not edited.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import SAEConfig, Site
from ..errors import ConfigError, DegenerateDataError, ShapeMismatchError
from ..saes.base import SAE
from ..saes.jacobian import JacobianSAEPair, JacobianTraining
from ..saes.multilayer import MultiLayerSAE
from ..saes.registry import training_spec
from ..saes.training import ArchSettings, LossOutput, StepContext, TrainingSpec, unit_norm_rows_
from .statistics import geometric_median, inlier_mask, robust_centre_and_mse_scale, robust_scale


class Objective:
    """The interface :class:`~.trainer.TrainEntry` drives. ``module`` holds every trained parameter (and
    is what checkpoints store); ``n_latents`` sizes the dead-latent counter (the ``fired`` of the loss)."""

    kind: ClassVar[str] = ""
    #: whether :meth:`prepare` needs the first ``init_batches`` batches before training starts.
    needs_statistics: ClassVar[bool] = True
    spec: TrainingSpec
    module: nn.Module
    sites: tuple[str, ...]
    n_latents: int

    def inputs(self, batch: dict[str, Tensor], name: str) -> dict[str, Tensor]:
        """This objective's tensors from a batch, shape-checked and on its device and dtype."""
        raise NotImplementedError

    def tokens(self, inputs: dict[str, Tensor]) -> int:
        return int(next(iter(inputs.values())).shape[0])

    def init_weights(self, settings: Any, unit_norm: bool, arch: ArchSettings) -> None:
        """Initialise the weights from ``settings.seed``."""

    def prepare(self, batches: list[dict[str, Tensor]], settings: Any) -> list[bool] | None:
        """Data-dependent initialisation from the first batches (every rank's rows, when distributed);
        returns which of them to train on (``None``: all)."""
        return None

    def loss(self, inputs: dict[str, Tensor], ctx: StepContext, arch: ArchSettings) -> LossOutput:
        raise NotImplementedError

    def decoders(self) -> list[Tensor]:
        """Parameters whose rows the trainer keeps at unit norm (when the spec asks for it)."""
        return []

    def after_step(self, inputs: dict[str, Tensor], out: LossOutput, arch: ArchSettings, first: bool) -> None:
        """After the optimiser step (never for a skipped batch)."""

    def synced_buffers(self) -> list[Tensor]:
        """Buffers averaged across data-parallel ranks after each step."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state besides the module's tensors."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def tensor_state(self) -> dict[str, Tensor]:
        """Tensors of the objective's own state besides the module's (checkpointed; e.g. PAM-SGD's statistics)."""
        return {}

    def load_tensor_state(self, tensors: dict[str, Tensor]) -> None:
        pass

    def final(self, settings: Any, state: Any, metadata: dict[str, Any]) -> Any:
        """The trained model to save (has ``.save(path)``), with ``metadata`` under ``"training"``."""
        raise NotImplementedError


def make_objective(model: Any, site: str | Sequence[str] | None, site_out: str | None = None) -> Objective:
    """The built-in objective for ``model``: a Jacobian pair, an MLSAE, or an SAE / transcoder."""
    if isinstance(model, JacobianSAEPair):
        return JacobianObjective(model, site)  # type: ignore[arg-type]
    if isinstance(model, MultiLayerSAE):
        return MultiLayerObjective(model, site)
    if isinstance(model, SAE):
        if not isinstance(site, str):
            raise ConfigError(f"an SAE entry reads one site (a string), got {site!r}")
        return SAEObjective(model, site, site_out)
    raise ConfigError(f"cannot train a {type(model).__name__}: pass an SAE, a MultiLayerSAE, a JacobianSAEPair or objective=")


def _site(name: str, out: bool = False) -> dict[str, str]:
    kind = "hook" if name.rsplit(".", 1)[-1].startswith("hook_") else "module"
    return {f"{kind}_out" if out else kind: name}


def _check(t: Tensor, width: int, what: str, rows: int | None = None) -> None:
    if t.dim() != 2 or t.shape[-1] != width or (rows is not None and t.shape[0] != rows):
        want = f"({rows if rows is not None else 'N'}, {width})"
        raise ShapeMismatchError(f"{what} expects {want} batches, got {tuple(t.shape)}")


# SAEs and transcoders ---------------------------------------------------------------------------------


class SAEObjective(Objective):
    """An SAE reconstructing its input at ``site``, or a transcoder predicting ``site_out`` from ``site``.

    Inputs are scaled (``TrainSettings.input_scaling="scale"``) by a constant so that ``E||c·x||² = d_in``,
    held as ``cfg.normalize="scale"`` while training. A transcoder has one constant for its input and
    another for its target (``E||c_out·y||² = d_out``), both folded into the weights by :meth:`final` (a
    config has room for only one scale); its config must have ``normalize="none"``. ``b_dec`` starts at
    the targets' geometric median (or mean), and ``mse_scale`` (TopK's normalised MSE) is fixed, all from
    the first ``init_batches`` batches (:mod:`.statistics`).
    """

    kind = "sae"

    def __init__(self, sae: SAE, site: str, site_out: str | None = None):
        self.sae = self.module = sae
        self.spec = training_spec(sae.cfg.architecture)
        self.site, self.site_out = site, site_out
        self.sites = (site, site_out) if site_out is not None else (site,)
        self.n_latents = sae.cfg.d_sae
        self.mse_scale, self.in_scale, self.out_scale = 1.0, 1.0, 1.0
        self.transcoder = sae.cfg.is_transcoder or site_out is not None
        if self.transcoder:
            what = f"a transcoder (d_in={sae.cfg.d_in}, d_out={sae.cfg.output_dim})"
            if site_out is None:
                raise ConfigError(f"{what} needs site_out, the site of its target")
            if site_out == site:
                raise ConfigError(f"a transcoder's site_out must differ from its site {site!r}")
            if sae.cfg.normalize != "none":
                raise ConfigError(f"train transcoders with cfg.normalize='none' (TrainSettings.input_scaling scales input and target separately), got {sae.cfg.normalize!r}")
        if not sae.cfg.sites:
            fields = _site(site)
            if site_out is not None:
                fields.update(_site(site_out, out=True))
            sae.cfg = sae.cfg.replace(sites=[Site(**fields)])

    def inputs(self, batch: dict[str, Tensor], name: str) -> dict[str, Tensor]:
        sae = self.sae
        x = batch[self.site]
        _check(x, sae.cfg.d_in, f"entry {name!r} (site {self.site!r})")
        out = {self.site: x.to(device=sae.device, dtype=sae.dtype)}
        if self.site_out is not None:
            y = batch[self.site_out]
            _check(y, sae.cfg.output_dim, f"entry {name!r} (site_out {self.site_out!r})", x.shape[0])
            out[self.site_out] = y.to(device=sae.device, dtype=sae.dtype)
        return out

    @torch.no_grad()
    def init_weights(self, settings: Any, unit_norm: bool, arch: ArchSettings) -> None:
        sae, s = self.sae, settings
        g = torch.Generator().manual_seed(s.seed)
        sae.reset_parameters(generator=g)
        norm = s.decoder_init_norm if s.decoder_init_norm is not None else (1.0 if unit_norm else 0.1)
        sae.W_dec.mul_(norm)
        enc = self.spec.encoder_init_norm
        enc_norm = enc if s.decoder_init_norm is None and enc is not None else norm
        if self.transcoder:
            # Input and output live in different spaces: no tied init, unit-norm random encoder columns.
            w = torch.randn(sae.cfg.d_in, sae.cfg.d_sae, generator=g)
            sae.W_enc.copy_(w / w.norm(dim=0, keepdim=True) * enc_norm)
        elif sae.cfg.output_dim == sae.cfg.d_in:
            sae.W_enc.copy_(sae.W_dec.T * (enc_norm / norm))
        self.spec.init(sae, arch)

    @torch.no_grad()
    def prepare(self, batches: list[dict[str, Tensor]], settings: Any) -> list[bool]:
        sae, dtype = self.sae, self.sae.dtype
        keep = inlier_mask([b[self.site] for b in batches], "input scale", dtype)
        if self.transcoder:
            keep = [a and b for a, b in zip(keep, inlier_mask([b[self.site_out] for b in batches], "target scale", dtype))]
            if 2 * sum(keep) <= len(keep):
                raise DegenerateDataError(
                    f"input and target scale: only {sum(keep)} of the first {len(keep)} batches have both an inlier "
                    "input and an inlier target (see the warnings): no majority to set the scales from"
                )
        batches = [b for b, k in zip(batches, keep) if k]
        xs = [b[self.site] for b in batches]
        scaling = settings.input_scaling == "scale"
        if self.transcoder:
            ys = [b[self.site_out] for b in batches]
            if scaling:
                self.in_scale = robust_scale(xs, sae.cfg.d_in, "input scale", dtype)
                self.out_scale = robust_scale(ys, sae.cfg.output_dim, "target scale", dtype)
            targets = [y * self.out_scale for y in ys]
        else:
            if scaling and sae.cfg.normalize == "none":
                c = robust_scale(xs, sae.cfg.d_in, "input scale", dtype)
                sae.cfg = sae.cfg.replace(normalize="scale", norm_scale=c)
            targets = [sae.normalize_input(x)[0] for x in xs]
        what = "transcoder targets" if self.transcoder else "inputs"
        b_dec, self.mse_scale = robust_centre_and_mse_scale(targets, what, dtype, settings.b_dec_init)
        if b_dec is not None:
            sae.b_dec.copy_(b_dec.to(dtype))
        return keep

    def normalise(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """``(x, target)`` in training coordinates (``target`` ``None`` for an SAE: its input)."""
        x = inputs[self.site]
        if not self.transcoder:
            return self.sae.normalize_input(x)[0], None
        return x * self.in_scale, inputs[self.site_out] * self.out_scale

    def loss(self, inputs: dict[str, Tensor], ctx: StepContext, arch: ArchSettings) -> LossOutput:
        x, y = self.normalise(inputs)
        out = self.spec.loss(self.sae, x, y, arch, ctx)
        with torch.no_grad():
            goal = x if y is None else y
            var = (goal - goal.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-30)
            out.metrics["fvu"] = out.metrics["mse"] / var
        return out

    def decoders(self) -> list[Tensor]:
        return [self.sae.W_dec]

    def after_step(self, inputs: dict[str, Tensor], out: LossOutput, arch: ArchSettings, first: bool) -> None:
        self.spec.after_step(self.sae, arch, out, first)

    def synced_buffers(self) -> list[Tensor]:
        return [getattr(self.sae, n) for n in self.spec.synced_buffers]

    def state_dict(self) -> dict[str, Any]:
        return {"mse_scale": self.mse_scale, "in_scale": self.in_scale, "out_scale": self.out_scale,
                "cfg": self.sae.cfg.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mse_scale, self.in_scale, self.out_scale = state["mse_scale"], state["in_scale"], state["out_scale"]
        self.sae.cfg = SAEConfig.from_dict(state["cfg"])

    def final(self, settings: Any, state: Any, metadata: dict[str, Any]) -> SAE:
        sae = copy.deepcopy(self.sae)
        if self.transcoder:
            fold_transcoder_scales(sae, self.in_scale, self.out_scale)
        elif settings.fold_input_scaling and sae.cfg.normalize == "scale" and state.initialised:
            fold_scale(sae)
        sae.cfg = sae.cfg.replace(metadata={**sae.cfg.metadata, "training": metadata})
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


# Multi-layer SAEs ---------------------------------------------------------------------------------------


class MultiLayerObjective(Objective):
    """One MLSAE over ``sites`` (default: its config's ``blocks.{i}.hook_resid_post``): the batch's rows at
    every site, stacked ``(n_layers, N, d)``, are each an example (methods §1.2); the loss is
    :class:`~sae_hooks.saes.multilayer.MultiLayerTraining`'s. Dead latents count tokens (``N`` per step).
    ``b_dec`` starts at the geometric median of the first batches' standardised inputs pooled over layers
    (at most 4096 rows); the weights keep their initialisation (MLSAE's: tied, unit-norm rows)."""

    kind = "mlsae"
    MEDIAN_ROWS = 4096

    def __init__(self, sae: MultiLayerSAE, sites: Sequence[str] | None = None):
        if isinstance(sites, str):
            raise ConfigError(f"an MLSAE entry reads several sites (a list), got the string {sites!r}")
        self.sae = self.module = sae
        self.spec = training_spec(sae.cfg.architecture)
        self.sites = tuple(sites or [s.hook or s.module for s in sae.cfg.sites])  # type: ignore[misc]
        if not self.sites or any(s is None for s in self.sites):
            raise ConfigError("an MLSAE entry needs its sites (none given and none in its config)")
        self.n_latents = sae.cfg.d_sae

    def inputs(self, batch: dict[str, Tensor], name: str) -> dict[str, Tensor]:
        n = None
        out = {}
        for s in self.sites:
            _check(batch[s], self.sae.cfg.d_in, f"entry {name!r} (site {s!r})", n)
            n = batch[s].shape[0]
            out[s] = batch[s].to(device=self.sae.device, dtype=self.sae.dtype)
        return out

    def stack(self, inputs: dict[str, Tensor]) -> Tensor:
        return torch.stack([inputs[s] for s in self.sites])

    @torch.no_grad()
    def prepare(self, batches: list[dict[str, Tensor]], settings: Any) -> list[bool]:
        sae = self.sae
        rows = [self.stack(b).reshape(-1, sae.cfg.d_in) for b in batches]
        keep = inlier_mask(rows, "MLSAE inputs", sae.dtype)  # degenerate batches: refused, or left out
        xs = torch.cat([sae.normalize_input(x)[0] for x, k in zip(rows, keep) if k])
        sae.b_dec.copy_(geometric_median(xs[: self.MEDIAN_ROWS]).to(sae.dtype))
        unit_norm_rows_(sae.W_dec)
        return keep

    def loss(self, inputs: dict[str, Tensor], ctx: StepContext, arch: ArchSettings) -> LossOutput:
        return self.spec.loss(self.sae, self.stack(inputs), None, arch, ctx)

    def decoders(self) -> list[Tensor]:
        return [self.sae.W_dec]

    def final(self, settings: Any, state: Any, metadata: dict[str, Any]) -> MultiLayerSAE:
        sae = copy.deepcopy(self.sae)
        sae.cfg = sae.cfg.replace(metadata={**sae.cfg.metadata, "training": metadata})
        return sae


# Jacobian SAE pairs --------------------------------------------------------------------------------------


class JacobianObjective(Objective):
    """Both SAEs of a :class:`~sae_hooks.saes.jacobian.JacobianSAEPair` on MLP inputs read at ``site``
    (default the pair's ``hook_in``); the loss is JSAE's (:class:`~sae_hooks.saes.jacobian.JacobianTraining`).
    The decoder rows of both SAEs are kept at unit norm; the dead-latent counter covers both SAEs'
    latents (input SAE first). No data statistics: the pair keeps its initialisation."""

    kind = "jsae"
    needs_statistics = False

    def __init__(self, pair: JacobianSAEPair, site: str | None = None):
        if site is not None and not isinstance(site, str):
            raise ConfigError(f"a Jacobian pair entry reads one site (the MLP input), got {site!r}")
        self.pair = self.module = pair
        self.spec: JacobianTraining = JacobianTraining()
        self.sites = (site or pair.cfg.hook_in,)
        self.n_latents = pair.sae_in.cfg.d_sae + pair.sae_out.cfg.d_sae

    def inputs(self, batch: dict[str, Tensor], name: str) -> dict[str, Tensor]:
        x = batch[self.sites[0]]
        sae = self.pair.sae_in
        _check(x, sae.cfg.d_in, f"entry {name!r} (site {self.sites[0]!r})")
        return {self.sites[0]: x.to(device=sae.device, dtype=sae.dtype)}

    def loss(self, inputs: dict[str, Tensor], ctx: StepContext, arch: ArchSettings) -> LossOutput:
        return self.spec.loss(self.pair, inputs[self.sites[0]], None, arch, ctx)

    def decoders(self) -> list[Tensor]:
        return [self.pair.sae_in.W_dec, self.pair.sae_out.W_dec]

    def after_step(self, inputs: dict[str, Tensor], out: LossOutput, arch: ArchSettings, first: bool) -> None:
        self.pair.cfg.jacobian_coefficient = arch.jacobian_coefficient  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        return {"pair_cfg": self.pair.cfg.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pair.cfg = type(self.pair.cfg).from_dict(state["pair_cfg"])

    def final(self, settings: Any, state: Any, metadata: dict[str, Any]) -> JacobianSAEPair:
        pair = copy.deepcopy(self.pair)
        pair.cfg.metadata = {**pair.cfg.metadata, "training": metadata}
        return pair
