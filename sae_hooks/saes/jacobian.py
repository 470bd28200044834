"""Jacobian SAE pairs (JSAE; Farnik, Lawson, Houghton, Aitchison, ICML 2025).

A :class:`JacobianSAEPair` holds two TopK SAEs around one MLP: ``sae_in`` on the MLP input
(``blocks.L.ln2.hook_normalized`` in the paper's TransformerLens naming) and ``sae_out`` on the MLP output
(``blocks.L.hook_mlp_out``), plus a frozen copy of the MLP (:class:`~sae_hooks.jacobian.FrozenMLP`) so the
Jacobian between the two latent sets can be computed on the active entries only
(:func:`~sae_hooks.jacobian.sparse_jacobian`).

Which hook is the MLP input depends on the framework: in a legacy ``HookedTransformer`` loaded with
``fold_ln=True`` (what the paper used), ``ln2.hook_normalized`` is the MLP input. In a TransformerLens 4
``TransformerBridge`` ``ln2.hook_normalized`` is the *pre-affine* normalised residual; the MLP input
is ``blocks.L.ln2.hook_out`` (= ``blocks.L.mlp.hook_in``). :func:`jsae_hooks` picks by ``bridge=``, and
the trainer checks that ``MLP(input) == mlp_out`` on the first batch.

The pair is saved as one folder (atomically): ``pair.json`` (format, version, layer, hooks, MLP
activation), ``input/`` and ``output/`` (native SAE folders) and ``mlp.safetensors`` (the frozen MLP).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from .._atomic import atomic_dir
from .._files import read_safetensors, read_versioned_json
from ..config import SAEConfig, Site
from ..errors import ConfigError, SAEFormatError, did_you_mean
from ..jacobian import FrozenMLP, SparseJacobian, check_pair_saes, sparse_jacobian
from .base import SAE
from .registry import build_sae

PAIR_FORMAT = "sae_hooks.jsae_pair"
PAIR_FORMAT_VERSION = 1
PAIR_FILE = "pair.json"
MLP_FILE = "mlp.safetensors"


def jsae_hooks(layer: int, bridge: bool = False) -> tuple[str, str]:
    """``(hook_in, hook_out)`` of the MLP of block ``layer`` (see the module docstring for ``bridge``)."""
    hook_in = f"blocks.{layer}.ln2.hook_out" if bridge else f"blocks.{layer}.ln2.hook_normalized"
    return hook_in, f"blocks.{layer}.hook_mlp_out"


@dataclass
class JSAEPairConfig:
    """Where the pair sits and how it was trained. ``jacobian_coefficient`` is λ of the loss."""

    layer: int
    hook_in: str
    hook_out: str
    model_name: str | None = None
    jacobian_coefficient: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JSAEPairConfig:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = "".join(did_you_mean(str(k), known, 1) for k in unknown)
            raise ConfigError(f"unknown key(s) {unknown} in JSAE pair config.{hints} Known keys: {known}")
        for key in ("layer", "hook_in", "hook_out"):
            if key not in data:
                raise ConfigError(f"JSAE pair config is missing required key {key!r}")
        return cls(**data)


class JacobianSAEPair(nn.Module):
    """Two TopK SAEs around one MLP and a frozen MLP copy.

    Shapes: ``x`` is the MLP input ``(..., d_model)``; latents are sparse ``(..., k)``; the Jacobian is
    ``(..., k_out, k_in)``.
    """

    def __init__(self, sae_in: SAE, sae_out: SAE, mlp: FrozenMLP, cfg: JSAEPairConfig):
        super().__init__()
        check_pair_saes(sae_in, sae_out, mlp)
        self.sae_in, self.sae_out, self.mlp, self.cfg = sae_in, sae_out, mlp, cfg

    def encode_pair(self, x: Tensor, use_reconstruction: bool = False) -> dict[str, Any]:
        """Everything one step needs, for MLP inputs ``x (..., d_model)``.

        The output SAE encodes ``MLP(x)`` (the true input, as in training) or ``MLP(x_hat)`` with
        ``use_reconstruction=True`` (JSAE's evals.py); the MLP is linearised at the same point.
        Returns ``lat_in``, ``x_hat``, ``y`` (the MLP output), ``lat_out``, ``y_hat``, ``jacobian`` (``(..., k_out, k_in)``).
        """
        lat_in, _ = self.sae_in.encode_with_state(x)
        x_hat = self.sae_in.decode(lat_in)
        mlp_point = x_hat.detach() if use_reconstruction else x
        with torch.no_grad():
            y, terms = self.mlp.forward_with_grads(mlp_point)
        lat_out, _ = self.sae_out.encode_with_state(y)
        y_hat = self.sae_out.decode(lat_out)
        J = sparse_jacobian(self.sae_in, self.sae_out, self.mlp, terms, lat_in, lat_out)
        return {"lat_in": lat_in, "x_hat": x_hat, "y": y, "lat_out": lat_out, "y_hat": y_hat, "jacobian": J}

    def jacobian(self, x: Tensor, use_reconstruction: bool = False) -> SparseJacobian:
        """The sparse Jacobian at MLP inputs ``x (..., d_model)``."""
        out = self.encode_pair(x, use_reconstruction)
        return SparseJacobian(out["jacobian"], out["lat_in"].indices, out["lat_out"].indices)

    def loss(self, x: Tensor, jacobian_coefficient: float) -> tuple[Tensor, dict[str, float]]:
        """JSAE's loss (methods §2.3): ``MSE_in + MSE_out + λ · mean|J|`` (per-element means)."""
        out = self.encode_pair(x)
        mse_in = F.mse_loss(out["x_hat"], x.to(out["x_hat"].dtype))
        mse_out = F.mse_loss(out["y_hat"], out["y"])
        jac = out["jacobian"].abs().mean()
        loss = mse_in + mse_out + jacobian_coefficient * jac
        return loss, {"mse_in": mse_in.item(), "mse_out": mse_out.item(), "jacobian_l1": jac.item(), "loss": loss.item()}

    # Persistence ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the pair folder atomically (see the module docstring)."""
        from ..native import save as save_native

        path = Path(path)
        header = {"format": PAIR_FORMAT, "format_version": PAIR_FORMAT_VERSION, **self.cfg.to_dict(),
                  "mlp_act": self.mlp.act_name}
        with atomic_dir(path) as tmp:
            save_native(self.sae_in, tmp / "input")
            save_native(self.sae_out, tmp / "output")
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.mlp.state_dict().items()}
            save_file(tensors, str(tmp / MLP_FILE), metadata={"format": PAIR_FORMAT})
            (tmp / PAIR_FILE).write_text(json.dumps(header, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> JacobianSAEPair:
        """Load a folder written by :meth:`save`."""
        from ..native import load as load_native

        path = Path(path)
        data = read_versioned_json(path / PAIR_FILE, PAIR_FORMAT, PAIR_FORMAT_VERSION, "missing; not a JSAE pair folder")
        act = data.pop("mlp_act", None)
        cfg = JSAEPairConfig.from_dict(data)
        mlp_path = path / MLP_FILE
        t = read_safetensors(mlp_path, device)
        needed = {"W_in", "b_in", "W_out", "b_out"}
        if not needed <= set(t):
            raise SAEFormatError(f"{mlp_path}: missing tensors {sorted(needed - set(t))}")
        mlp = FrozenMLP(t["W_in"], t["W_out"], act, t["b_in"], t["b_out"], t.get("W_gate"), t.get("b_gate"))
        return cls(load_native(path / "input", device=device), load_native(path / "output", device=device), mlp, cfg)


def make_jsae_pair(
    mlp: FrozenMLP | nn.Module,
    layer: int,
    d_sae: int,
    k: int,
    *,
    hook_in: str | None = None,
    hook_out: str | None = None,
    bridge: bool = False,
    model_name: str | None = None,
    seed: int | None = None,
) -> JacobianSAEPair:
    """A fresh pair of TopK SAEs (SAELens standard init: W_enc = W_dec^T, unit-norm rows, zero biases,
    ``apply_b_dec_to_input=False``) around ``mlp`` (a :class:`FrozenMLP` or an MLP module to copy)."""
    frozen = mlp if isinstance(mlp, FrozenMLP) else FrozenMLP.from_module(mlp)
    default_in, default_out = jsae_hooks(layer, bridge)
    hook_in, hook_out = hook_in or default_in, hook_out or default_out
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    saes = []
    for hook in (hook_in, hook_out):
        sae = build_sae(SAEConfig(architecture="topk", d_in=frozen.d_model, d_sae=d_sae, k=k,
                                  sites=[Site(hook=hook)], model_name=model_name))
        sae.reset_parameters(gen)
        saes.append(sae)
    return JacobianSAEPair(saes[0], saes[1], frozen, JSAEPairConfig(layer, hook_in, hook_out, model_name))


__all__ = ["JSAEPairConfig", "JacobianSAEPair", "jsae_hooks", "make_jsae_pair"]
