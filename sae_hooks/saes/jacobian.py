"""Jacobian SAE pairs (JSAE; Farnik, Lawson, Houghton, Aitchison, ICML 2025), in one place: the frozen MLP
copy, the sparse Jacobian, the pair, its config and folder format, and its training spec (loss).

A :class:`JacobianSAEPair` holds two TopK SAEs around one MLP: ``sae_in`` on the MLP input
(``blocks.L.ln2.hook_normalized`` in the paper's TransformerLens naming) and ``sae_out`` on the MLP output
(``blocks.L.hook_mlp_out``), plus a frozen copy of the MLP (:class:`FrozenMLP`) so the
Jacobian between the two latent sets can be computed on the active entries only
(:func:`sparse_jacobian`).

Which hook is the MLP input depends on the framework: in a legacy ``HookedTransformer`` loaded with
``fold_ln=True`` (what the paper used), ``ln2.hook_normalized`` is the MLP input. In a TransformerLens 4
``TransformerBridge`` ``ln2.hook_normalized`` is the *pre-affine* normalised residual; the MLP input
is ``blocks.L.ln2.hook_out`` (= ``blocks.L.mlp.hook_in``). :func:`jsae_hooks` picks by ``bridge=``, and
``sae_hooks.train.jsae.check_mlp_input`` checks that ``MLP(input) == mlp_out`` on a model.

The pair is saved as one folder (atomically): ``pair.json`` (format, version, layer, hooks, MLP
activation), ``input/`` and ``output/`` (native SAE folders) and ``mlp.safetensors`` (the frozen MLP).

**The Jacobian** between two SAEs' latents around one MLP, on the active entries only (JSAE, methods §2.2).

The map ``s_in -> x_hat = s_in @ W_dec_in + b_dec_in -> y = MLP(x_hat) -> s_out = ReLU(TopK(y @ W_enc_out + b_enc_out))``
is linear except for the MLP's elementwise activation and TopK. With the TopK sets held fixed, its
Jacobian restricted to the ``k_out`` active output latents ``O`` and the ``k_in`` active input latents ``I``:

* GPT-2-style MLP ``y = act(x W_in + b_in) W_out + b_out``::

      J[o, i] = sum_m B[m, o] * act'(z_m) * A[i, m],   A = W_dec_in @ W_in,  B = W_out @ W_enc_out

* gated (Llama-style) MLP ``y = (act(x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out``::

      J[o, i] = sum_m B[m, o] * (act(g_m) * A[i, m] + act'(g_m) * u_m * G[i, m]),   G = W_dec_in @ W_gate

* with a post-MLP RMSNorm (Gemma 2/3: ``hook_mlp_out`` is ``post_feedforward_layernorm(MLP(x))``), the MLP
  output ``y`` goes through ``n(y) = s * y / r``, ``r = sqrt(mean(y²) + eps)``, ``s`` the norm's scale
  (``1 + weight`` for Gemma). ``dn/dy = diag(s) / r - (s * y) yᵀ / (d r³)``, so ``B`` becomes, per token,
  ``B'[m, o] = (W_out @ (s ⊙ W_enc_out))[m, o] / r - c_o (W_out @ y)[m] / (d r³)``,
  ``c = (s * y) @ W_enc_out``: a shared matrix and a rank-one term, still ``k_out x d_mlp`` per token.

Only ``k_out x k_in`` entries per token are formed, never ``d_sae x d_sae``. ``act'`` comes from one
autograd call on the elementwise activation. Rows of output latents whose value is 0 (TopK kept a
non-positive pre-activation, which ReLU zeroes) are 0, as the derivative of ReLU there is 0.

The MLP is a :class:`FrozenMLP`: a weight copy in the canonical layout, built from a Hugging Face
GPT-2 / GPT-NeoX / Llama-style MLP module or a TransformerLens MLP by :meth:`FrozenMLP.from_module`
(duck-typed: no framework import).

Training (:class:`JacobianTraining`, methods §2.3-2.4), per batch of MLP inputs ``x (N, d_model)`` read at
the pair's ``hook_in``::

    loss = MSE(x_hat, x) + MSE(y_hat, y) + λ(t) · mean|J|,     y = MLP(x)

MSEs are per-element means; ``mean|J|`` is over tokens × k_out × k_in. The output SAE is trained on
``MLP(x)`` of the *true* input (computed with the pair's frozen MLP copy), never on ``MLP(x_hat)``, and
the MLP is linearised at ``x``. λ rises linearly from 0 over ``jacobian_warmup`` (5 %) of the steps. The
trainer (:mod:`sae_hooks.train`) keeps both SAEs' decoder rows at unit norm; the paper's Adam (β 0.9/0.999),
learning-rate warm-up over 1 % and linear decay over the last 20 % of steps and gradient clipping at norm 1
are what :func:`sae_hooks.train.jsae.train_jsae` sets.

Attaching a pair to a model is the attach layer's job (:mod:`sae_hooks.intervene`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
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
from ..errors import ConfigError, SAEFormatError, ShapeMismatchError, did_you_mean
from .base import SAE, SparseLatents
from .registry import build_sae
from .training import ArchSettings, LossOutput, StepContext, TrainingSpec, fired_and_l0


def _gelu_new(z: Tensor) -> Tensor:
    return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * torch.pow(z, 3.0))))


def _gelu_fast(z: Tensor) -> Tensor:
    return 0.5 * z * (1.0 + torch.tanh(z * 0.7978845608 * (1.0 + 0.044715 * z * z)))


#: Elementwise MLP activations by name (TransformerLens / Hugging Face names).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_new,
    "gelu_fast": _gelu_fast,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

#: Hugging Face / torch activation classes -> names above.
_ACT_CLASSES = {
    "NewGELUActivation": "gelu_new",
    "GELUTanh": "gelu_new",
    "PytorchGELUTanh": "gelu_new",
    "FastGELUActivation": "gelu_fast",
    "GELUActivation": "gelu",
    "GELU": "gelu",
    "ReLU": "relu",
    "SiLU": "silu",
    "SiLUActivation": "silu",
}


def activation_name(act: object) -> str:
    """Name in :data:`ACTIVATIONS` of an activation module/function/string; :class:`ConfigError` if unknown."""
    if isinstance(act, str):
        name = act
    elif type(act).__name__ in _ACT_CLASSES:
        name = _ACT_CLASSES[type(act).__name__]
        if name == "gelu" and getattr(act, "approximate", "none") == "tanh":
            name = "gelu_new"
    else:
        name = {F.gelu: "gelu", F.relu: "relu", F.silu: "silu", torch.relu: "relu"}.get(act, "")  # type: ignore[arg-type]
    if name not in ACTIVATIONS:
        raise ConfigError(f"unsupported MLP activation {act!r}; supported: {sorted(ACTIVATIONS)}")
    return name


class FrozenMLP(nn.Module):
    """A frozen copy of an MLP in the canonical layout (buffers, so nothing trains them).

    ``W_in (d_model, d_mlp)``, ``b_in (d_mlp)``, ``W_out (d_mlp, d_model)``, ``b_out (d_model)``, and for a
    gated MLP ``W_gate (d_model, d_mlp)`` (+ ``b_gate``). ``act`` names the elementwise activation.
    ``post_norm_weight (d_model)``: a post-MLP RMSNorm applied to the output (Gemma's
    ``post_feedforward_layernorm``): ``y / sqrt(mean(y²) + post_norm_eps) * (post_norm_offset + weight)``,
    computed in float32 at least, as Hugging Face does.
    """

    def __init__(self, W_in: Tensor, W_out: Tensor, act: str, b_in: Tensor | None = None, b_out: Tensor | None = None,
                 W_gate: Tensor | None = None, b_gate: Tensor | None = None, *,
                 post_norm_weight: Tensor | None = None, post_norm_eps: float = 1e-6, post_norm_offset: float = 0.0):
        super().__init__()
        if W_in.dim() != 2 or W_out.dim() != 2 or W_out.shape != (W_in.shape[1], W_in.shape[0]):
            raise ShapeMismatchError(
                f"MLP weights must be W_in (d_model, d_mlp) and W_out (d_mlp, d_model); got {tuple(W_in.shape)}, {tuple(W_out.shape)}"
            )
        if W_gate is not None and W_gate.shape != W_in.shape:
            raise ShapeMismatchError(f"W_gate must have W_in's shape {tuple(W_in.shape)}, got {tuple(W_gate.shape)}")
        self.act_name = activation_name(act)
        d_model, d_mlp = W_in.shape
        # Contiguous copies: the layout a saved-and-loaded pair has, so both compute bit-identically (a
        # transposed view of the source weights takes another matmul path).
        own_copy = lambda v: v.detach().clone(memory_format=torch.contiguous_format)  # noqa: E731
        t = lambda v, n: own_copy(v if v is not None else torch.zeros(n, dtype=W_in.dtype))  # noqa: E731
        self.register_buffer("W_in", own_copy(W_in))
        self.register_buffer("b_in", t(b_in, d_mlp))
        self.register_buffer("W_out", own_copy(W_out))
        self.register_buffer("b_out", t(b_out, d_model))
        if W_gate is not None:
            self.register_buffer("W_gate", own_copy(W_gate))
            self.register_buffer("b_gate", t(b_gate, d_mlp))
        if post_norm_weight is not None:
            if post_norm_weight.shape != (d_model,):
                raise ShapeMismatchError(f"post_norm_weight must have shape ({d_model},), got {tuple(post_norm_weight.shape)}")
            self.register_buffer("post_norm_weight", own_copy(post_norm_weight))
        self.post_norm_eps, self.post_norm_offset = float(post_norm_eps), float(post_norm_offset)

    @property
    def gated(self) -> bool:
        return hasattr(self, "W_gate")

    @property
    def post_norm(self) -> bool:
        """Whether the output goes through a post-MLP RMSNorm (Gemma's ``post_feedforward_layernorm``)."""
        return hasattr(self, "post_norm_weight")

    def post_norm_scale(self) -> Tensor:
        """The post-MLP norm's scale ``s`` ``(d_model,)`` (``offset + weight``)."""
        return self.post_norm_offset + self.post_norm_weight

    def _normed(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(n(y), r)`` of the post-MLP norm, ``r`` ``(..., 1)``; in float32 at least, cast back to ``y``'s dtype."""
        yf = y if y.dtype in (torch.float32, torch.float64) else y.float()
        r = (yf.pow(2).mean(-1, keepdim=True) + self.post_norm_eps).sqrt()
        return (yf / r * self.post_norm_scale().to(yf.dtype)).to(y.dtype), r.to(y.dtype)

    @property
    def d_model(self) -> int:
        return self.W_in.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.W_in.shape[1]

    def act(self, z: Tensor) -> Tensor:
        return ACTIVATIONS[self.act_name](z)

    def act_and_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(act(z), act'(z))`` elementwise, ``act'`` from one autograd call; both detached."""
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            a = self.act(zz)
            (g,) = torch.autograd.grad(a.sum(), zz)
        return a.detach(), g

    def forward(self, x: Tensor) -> Tensor:
        """``MLP(x)``: ``(..., d_model) -> (..., d_model)``."""
        x = x.to(self.W_in.dtype)
        u = x @ self.W_in + self.b_in
        h = self.act(x @ self.W_gate + self.b_gate) * u if self.gated else self.act(u)
        y = h @ self.W_out + self.b_out
        return self._normed(y)[0] if self.post_norm else y

    def forward_with_grads(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(MLP(x), terms)`` where ``terms`` holds what the Jacobian needs, each ``(..., d_mlp)``:
        ``{"act_grad": act'(z)}`` (plain) or ``{"act": act(g), "act_grad_u": act'(g) * u}`` (gated); with a
        post-MLP norm also ``"post_y"`` (the output before the norm, ``(..., d_model)``) and ``"post_r"``
        (its RMS, ``(..., 1)``)."""
        x = x.to(self.W_in.dtype)
        u = x @ self.W_in + self.b_in
        if self.gated:
            a, g = self.act_and_grad(x @ self.W_gate + self.b_gate)
            y, terms = (a * u) @ self.W_out + self.b_out, {"act": a, "act_grad_u": g * u}
        else:
            a, g = self.act_and_grad(u)
            y, terms = a @ self.W_out + self.b_out, {"act_grad": g}
        if not self.post_norm:
            return y, terms
        normed, r = self._normed(y)
        return normed, {**terms, "post_y": y, "post_r": r}

    @classmethod
    def from_module(cls, module: nn.Module, act: object | None = None, post_norm: nn.Module | None = None) -> FrozenMLP:
        """Copy the weights of a GPT-2 (``c_fc``/``c_proj``), GPT-NeoX (``dense_h_to_4h``/``dense_4h_to_h``),
        Llama-style (``gate_proj``/``up_proj``/``down_proj``) or TransformerLens (``W_in``/``W_out``[/``W_gate``])
        MLP. Wrappers exposing ``original_component`` (TransformerLens 4 bridge) are unwrapped.

        ``post_norm``: the RMSNorm applied to the MLP's output before it joins the residual stream (Gemma's
        ``layer.post_feedforward_layernorm``, TransformerLens's ``blocks[L].ln2_post``): it becomes part of
        the frozen MLP, so the pair's output site is Gemma's ``hook_mlp_out``."""
        if post_norm is not None:
            mlp = cls.from_module(module, act)
            return cls(mlp.W_in, mlp.W_out, mlp.act_name, mlp.b_in, mlp.b_out, getattr(mlp, "W_gate", None),
                       getattr(mlp, "b_gate", None), **_post_norm_params(post_norm))
        inner = getattr(module, "original_component", None) or getattr(module, "_original_component", None)
        if isinstance(inner, nn.Module):
            module = inner
        if hasattr(module, "c_fc") and hasattr(module, "c_proj"):  # HF GPT-2 Conv1D: weight (in, out)
            return cls(module.c_fc.weight, module.c_proj.weight, act or module.act,
                       module.c_fc.bias, module.c_proj.bias)
        if hasattr(module, "dense_h_to_4h"):  # GPT-NeoX nn.Linear: weight (out, in)
            a, b = module.dense_h_to_4h, module.dense_4h_to_h
            return cls(a.weight.T, b.weight.T, act or module.act, a.bias, b.bias)
        if hasattr(module, "gate_proj") and hasattr(module, "up_proj") and hasattr(module, "down_proj"):
            g, u, d = module.gate_proj, module.up_proj, module.down_proj
            return cls(u.weight.T, d.weight.T, act or module.act_fn, u.bias, d.bias, W_gate=g.weight.T, b_gate=g.bias)
        if isinstance(getattr(module, "W_in", None), Tensor) and isinstance(getattr(module, "W_out", None), Tensor):
            name = act or getattr(getattr(module, "cfg", None), "act_fn", None)
            if name is None:
                raise ConfigError(f"cannot tell the activation of {type(module).__name__}; pass act=<name>")
            W_gate = getattr(module, "W_gate", None)
            b_in = getattr(module, "b_in", None)
            if W_gate is not None and b_in is not None and bool(b_in.abs().max() > 0):
                # TL's GatedMLP adds b_in after the product (act(x W_gate) * x W_in + b_in): not this layout.
                raise ConfigError("a TransformerLens GatedMLP with non-zero b_in is not covered by FrozenMLP")
            return cls(module.W_in, module.W_out, name, None if W_gate is not None else b_in,
                       getattr(module, "b_out", None), W_gate=W_gate)
        raise ConfigError(
            f"cannot read MLP weights from {type(module).__name__}: expected c_fc/c_proj (GPT-2), dense_h_to_4h "
            "(GPT-NeoX), gate_proj/up_proj/down_proj (Llama) or W_in/W_out (TransformerLens)"
        )


def _post_norm_params(norm: nn.Module) -> dict[str, Any]:
    """``post_norm_weight`` / ``_eps`` / ``_offset`` of an RMSNorm module (Hugging Face or TransformerLens)."""
    inner = getattr(norm, "original_component", None) or getattr(norm, "_original_component", None)
    if isinstance(inner, nn.Module):
        norm = inner
    name = type(norm).__name__
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor):
        weight = getattr(norm, "w", None)  # TransformerLens RMSNorm (Gemma's 1 + w already folded in)
    if isinstance(norm, nn.LayerNorm) or "RMS" not in name or not isinstance(weight, Tensor):
        raise ConfigError(f"post_norm must be an RMSNorm with a weight (Gemma's post_feedforward_layernorm), got {name}")
    eps = next((getattr(norm, a) for a in ("eps", "variance_epsilon", "epsilon")
                if isinstance(getattr(norm, a, None), (int, float))), None)
    if eps is None:
        eps = getattr(getattr(norm, "cfg", None), "eps", 1e-6)
    # Gemma's Hugging Face RMSNorm scales by (1 + weight); TransformerLens stores 1 + weight as w already.
    offset = 1.0 if name.startswith("Gemma") and hasattr(norm, "weight") else 0.0
    return {"post_norm_weight": weight, "post_norm_eps": float(eps), "post_norm_offset": offset}


@dataclass
class SparseJacobian:
    """``values (..., k_out, k_in)``: ``d s_out[out_indices[o]] / d s_in[in_indices[i]]``."""

    values: Tensor
    in_indices: Tensor  # (..., k_in)
    out_indices: Tensor  # (..., k_out)

    def abs_counts(self, thresholds: tuple[float, ...] = (0.005, 0.01, 0.02)) -> dict[float, float]:
        """Mean number of ``|J| > t`` entries per token (out of ``k_out * k_in``), for each threshold."""
        return jacobian_abs_counts(self.values, thresholds)


def check_pair_saes(sae_in: SAE, sae_out: SAE, mlp: FrozenMLP) -> None:
    """Raise :class:`ConfigError` / :class:`ShapeMismatchError` unless the pair fits the efficient Jacobian."""
    for role, sae in (("input", sae_in), ("output", sae_out)):
        if not sae.sparse:
            raise ConfigError(f"the {role} SAE must be TopK-style (sparse latents), got architecture {sae.cfg.architecture!r}")
        if sae.cfg.normalize != "none" or sae.cfg.skip:
            raise ConfigError(
                f"the {role} SAE has normalize={sae.cfg.normalize!r}, skip={sae.cfg.skip}: the efficient Jacobian "
                "covers un-normalised SAEs without skip paths (as in the JSAE paper)"
            )
    if sae_in.cfg.output_dim != mlp.d_model or sae_out.cfg.d_in != mlp.d_model:
        raise ShapeMismatchError(
            f"input SAE writes {sae_in.cfg.output_dim}, output SAE reads {sae_out.cfg.d_in}, MLP d_model is {mlp.d_model}"
        )


def sparse_jacobian(
    sae_in: SAE, sae_out: SAE, mlp: FrozenMLP, terms: dict[str, Tensor], lat_in: SparseLatents, lat_out: SparseLatents
) -> Tensor:
    """The Jacobian ``(..., k_out, k_in)`` on the active sets (formulas in the module docstring).

    ``terms`` come from :meth:`FrozenMLP.forward_with_grads` at the point where the MLP is linearised.
    Differentiable w.r.t. ``sae_in.W_dec`` and ``sae_out.W_enc`` (for the Jacobian sparsity loss).
    """
    if mlp.post_norm:  # B' = (W_out @ (s ⊙ W_enc)) / r - c (W_out @ y)ᵀ / (d r³), per token (module docstring)
        scale = mlp.post_norm_scale().to(sae_out.W_enc.dtype)
        y, r = terms["post_y"].to(sae_out.W_enc.dtype), terms["post_r"].to(sae_out.W_enc.dtype)
        B = mlp.W_out @ (scale[:, None] * sae_out.W_enc)
        enc_O = sae_out.W_enc.T[lat_out.indices]  # (..., k_out, d_model)
        c = (enc_O @ (scale * y)[..., :, None])[..., 0]  # (..., k_out)
        v = y @ mlp.W_out.T  # (..., d_mlp)
        B_O = B.T[lat_out.indices] / r[..., None] - c[..., :, None] * v[..., None, :] / (mlp.d_model * r.pow(3))[..., None]
    else:
        B = mlp.W_out @ sae_out.W_enc  # (d_mlp, d_sae_out)
        B_O = B.T[lat_out.indices]  # (..., k_out, d_mlp)
    A_I = (sae_in.W_dec @ mlp.W_in)[lat_in.indices]  # (..., k_in, d_mlp)
    if mlp.gated:
        G_I = (sae_in.W_dec @ mlp.W_gate)[lat_in.indices]
        J = (B_O * terms["act"][..., None, :]) @ A_I.transpose(-1, -2)
        J = J + (B_O * terms["act_grad_u"][..., None, :]) @ G_I.transpose(-1, -2)
    else:
        J = (B_O * terms["act_grad"][..., None, :]) @ A_I.transpose(-1, -2)  # (..., k_out, k_in)
    return J * (lat_out.values > 0).to(J.dtype)[..., None]


def jacobian_abs_counts(J: Tensor, thresholds: tuple[float, ...] = (0.005, 0.01, 0.02)) -> dict[float, float]:
    """Mean count per token of ``|J| > t`` (JSAE's ``jac_abs_above_t``); ``J`` is ``(..., k_out, k_in)``."""
    a = J.detach().abs().flatten(-2)
    return {t: (a > t).sum(-1).float().mean().item() for t in thresholds}


# The pair ----------------------------------------------------------------------------------------

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

    def encode_pair(self, x: Tensor, use_reconstruction: bool = False, training: bool = False) -> dict[str, Any]:
        """Everything one step needs, for MLP inputs ``x (..., d_model)``.

        The output SAE encodes ``MLP(x)`` (the true input, as in training) or ``MLP(x_hat)`` with
        ``use_reconstruction=True`` (JSAE's evals.py); the MLP is linearised at the same point.
        ``training=True`` runs the SAEs' training encoders (same values, sparse backward).
        Returns ``lat_in``, ``x_hat``, ``y`` (the MLP output), ``lat_out``, ``y_hat``, ``jacobian`` (``(..., k_out, k_in)``).
        """
        lat_in = self._encode(self.sae_in, x, training)
        x_hat = self.sae_in.decode(lat_in)
        mlp_point = x_hat.detach() if use_reconstruction else x
        with torch.no_grad():
            y, terms = self.mlp.forward_with_grads(mlp_point)
        lat_out = self._encode(self.sae_out, y, training)
        y_hat = self.sae_out.decode(lat_out)
        J = sparse_jacobian(self.sae_in, self.sae_out, self.mlp, terms, lat_in, lat_out)
        return {"lat_in": lat_in, "x_hat": x_hat, "y": y, "lat_out": lat_out, "y_hat": y_hat, "jacobian": J}

    @staticmethod
    def _encode(sae: SAE, x: Tensor, training: bool) -> SparseLatents:
        # check_pair_saes: no input normalisation, so the training encoder takes x as it is
        if training:
            return sae.encode_normalized(sae.flatten_input(x).to(sae.dtype), training=True)[0]  # type: ignore[return-value]
        return sae.encode_with_state(x)[0]  # type: ignore[return-value]

    def jacobian(self, x: Tensor, use_reconstruction: bool = False) -> SparseJacobian:
        """The sparse Jacobian at MLP inputs ``x (..., d_model)``."""
        out = self.encode_pair(x, use_reconstruction)
        return SparseJacobian(out["jacobian"], out["lat_in"].indices, out["lat_out"].indices)

    def loss(self, x: Tensor, jacobian_coefficient: float) -> tuple[Tensor, dict[str, float]]:
        """JSAE's loss (methods §2.3): ``MSE_in + MSE_out + λ · mean|J|`` (per-element means)."""
        out = JacobianTraining.pair_loss(self, x, jacobian_coefficient)
        return out.loss, {k: float(v) for k, v in out.metrics.items()} | {"loss": out.loss.item()}

    # Persistence ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the pair folder atomically (see the module docstring)."""
        path = Path(path)
        header = {"format": PAIR_FORMAT, "format_version": PAIR_FORMAT_VERSION, **self.cfg.to_dict(),
                  "mlp_act": self.mlp.act_name}
        if self.mlp.post_norm:
            header["mlp_post_norm"] = {"eps": self.mlp.post_norm_eps, "offset": self.mlp.post_norm_offset}
        with atomic_dir(path) as tmp:
            self.sae_in.save(tmp / "input")
            self.sae_out.save(tmp / "output")
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.mlp.state_dict().items()}
            save_file(tensors, str(tmp / MLP_FILE), metadata={"format": PAIR_FORMAT})
            (tmp / PAIR_FILE).write_text(json.dumps(header, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> JacobianSAEPair:
        """Load a folder written by :meth:`save`."""
        path = Path(path)
        data = read_versioned_json(path / PAIR_FILE, PAIR_FORMAT, PAIR_FORMAT_VERSION, "missing; not a JSAE pair folder")
        act = data.pop("mlp_act", None)
        post = data.pop("mlp_post_norm", None)
        cfg = JSAEPairConfig.from_dict(data)
        mlp_path = path / MLP_FILE
        t = read_safetensors(mlp_path, device)
        needed = {"W_in", "b_in", "W_out", "b_out"}
        if not needed <= set(t):
            raise SAEFormatError(f"{mlp_path}: missing tensors {sorted(needed - set(t))}")
        if (post is None) != ("post_norm_weight" not in t):
            raise SAEFormatError(f"{path}: pair.json's mlp_post_norm and {MLP_FILE}'s post_norm_weight must come together")
        norm = {} if post is None else {"post_norm_weight": t["post_norm_weight"], "post_norm_eps": post["eps"],
                                        "post_norm_offset": post["offset"]}
        mlp = FrozenMLP(t["W_in"], t["W_out"], act, t["b_in"], t["b_out"], t.get("W_gate"), t.get("b_gate"), **norm)
        return cls(SAE.load(path / "input", device=device), SAE.load(path / "output", device=device), mlp, cfg)


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
    post_norm: nn.Module | None = None,
) -> JacobianSAEPair:
    """A fresh pair of TopK SAEs (SAELens standard init: W_enc = W_dec^T, unit-norm rows, zero biases,
    ``apply_b_dec_to_input=False``) around ``mlp`` (a :class:`FrozenMLP` or an MLP module to copy).

    ``post_norm``: Gemma's post-MLP norm (``model.layers[L].post_feedforward_layernorm``): the pair's MLP
    function becomes ``post_norm ∘ mlp`` and its default sites ``blocks.L.ln2.hook_out`` (the MLP's input)
    -> ``blocks.L.hook_mlp_out`` (Gemma's, after that norm)."""
    if isinstance(mlp, FrozenMLP):
        if post_norm is not None:
            raise ConfigError("post_norm= applies when copying an MLP module; a FrozenMLP carries its own post_norm_weight")
        frozen = mlp
    else:
        frozen = FrozenMLP.from_module(mlp, post_norm=post_norm)
    default_in, default_out = jsae_hooks(layer, bridge or frozen.post_norm)
    hook_in, hook_out = hook_in or default_in, hook_out or default_out
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    saes = []
    for hook in (hook_in, hook_out):
        sae = build_sae(SAEConfig(architecture="topk", d_in=frozen.d_model, d_sae=d_sae, k=k,
                                  sites=[Site(hook=hook)], model_name=model_name))
        sae.reset_parameters(gen)
        saes.append(sae)
    return JacobianSAEPair(saes[0], saes[1], frozen, JSAEPairConfig(layer, hook_in, hook_out, model_name))


# Training -------------------------------------------------------------------------------------------


@dataclass
class JSAESettings(ArchSettings):
    """``jacobian_coefficient`` λ of the loss; ``jacobian_warmup``: λ rises linearly from 0 over this
    fraction of the run's steps."""

    jacobian_coefficient: float = 1.0
    jacobian_warmup: float = 0.05


class JacobianTraining(TrainingSpec):
    """JSAE's loss (see the module docstring). Unit-norm decoder rows for both SAEs."""

    settings = JSAESettings

    @staticmethod
    def coefficient_at(settings: JSAESettings, step: int, total_steps: int | None) -> float:
        warm = settings.jacobian_warmup * max(1, total_steps or 1)
        return settings.jacobian_coefficient * (min(1.0, step / warm) if warm > 0 else 1.0)

    @staticmethod
    def pair_loss(pair: JacobianSAEPair, x: Tensor, coefficient: float) -> LossOutput:
        out = pair.encode_pair(x, training=True)
        mse_in = F.mse_loss(out["x_hat"], x.to(out["x_hat"].dtype))
        mse_out = F.mse_loss(out["y_hat"], out["y"])
        jac = out["jacobian"].abs().mean()
        loss = mse_in + mse_out + coefficient * jac
        fired_in, l0_in = fired_and_l0(out["lat_in"], pair.sae_in.cfg.d_sae)
        fired_out, l0_out = fired_and_l0(out["lat_out"], pair.sae_out.cfg.d_sae)
        metrics = {"mse_in": mse_in.detach(), "mse_out": mse_out.detach(), "jacobian_l1": jac.detach(),
                   "l0_in": l0_in, "l0_out": l0_out, "jacobian_coefficient": torch.tensor(float(coefficient))}
        return LossOutput(loss, torch.cat([fired_in, fired_out]), metrics)

    def loss(self, pair: JacobianSAEPair, x: Tensor, target: Tensor | None, settings: JSAESettings, ctx: StepContext) -> LossOutput:
        return self.pair_loss(pair, x, self.coefficient_at(settings, ctx.step, ctx.total_steps))


def jacobian_metrics(pair: JacobianSAEPair, x: Tensor, thresholds: tuple[float, ...] = (0.005, 0.01, 0.02),
                     use_reconstruction: bool = False) -> dict[float, float]:
    """Mean count per token of ``|J| > t`` at MLP inputs ``x (N, d_model)`` (for evaluation code)."""
    with torch.no_grad():
        return pair.jacobian(x, use_reconstruction).abs_counts(thresholds)


__all__ = [
    "ACTIVATIONS", "FrozenMLP", "JSAEPairConfig", "JSAESettings", "JacobianSAEPair", "JacobianTraining", "SparseJacobian",
    "activation_name", "check_pair_saes", "jacobian_abs_counts", "jacobian_metrics", "jsae_hooks", "make_jsae_pair",
    "sparse_jacobian",
]
