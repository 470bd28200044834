"""The Jacobian between two SAEs' latents around one MLP, on the active entries only (JSAE, methods §2.2).

The map ``s_in -> x_hat = s_in @ W_dec_in + b_dec_in -> y = MLP(x_hat) -> s_out = ReLU(TopK(y @ W_enc_out + b_enc_out))``
is linear except for the MLP's elementwise activation and TopK. With the TopK sets held fixed, its
Jacobian restricted to the ``k_out`` active output latents ``O`` and the ``k_in`` active input latents ``I``:

* GPT-2-style MLP ``y = act(x W_in + b_in) W_out + b_out``::

      J[o, i] = sum_m B[m, o] * act'(z_m) * A[i, m],   A = W_dec_in @ W_in,  B = W_out @ W_enc_out

* gated (Llama-style) MLP ``y = (act(x W_gate + b_gate) * (x W_in + b_in)) W_out + b_out``::

      J[o, i] = sum_m B[m, o] * (act(g_m) * A[i, m] + act'(g_m) * u_m * G[i, m]),   G = W_dec_in @ W_gate

Only ``k_out x k_in`` entries per token are formed, never ``d_sae x d_sae``. ``act'`` comes from one
autograd call on the elementwise activation. Rows of output latents whose value is 0 (TopK kept a
non-positive pre-activation, which ReLU zeroes) are 0, as the derivative of ReLU there is 0.

The MLP is a :class:`FrozenMLP`: a weight copy in the canonical layout, built from a Hugging Face
GPT-2 / GPT-NeoX / Llama-style MLP module or a TransformerLens MLP by :meth:`FrozenMLP.from_module`
(duck-typed: no framework import).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, ShapeMismatchError
from .saes.base import SAE, SparseLatents


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
    """

    def __init__(self, W_in: Tensor, W_out: Tensor, act: str, b_in: Tensor | None = None, b_out: Tensor | None = None,
                 W_gate: Tensor | None = None, b_gate: Tensor | None = None):
        super().__init__()
        if W_in.dim() != 2 or W_out.dim() != 2 or W_out.shape != (W_in.shape[1], W_in.shape[0]):
            raise ShapeMismatchError(
                f"MLP weights must be W_in (d_model, d_mlp) and W_out (d_mlp, d_model); got {tuple(W_in.shape)}, {tuple(W_out.shape)}"
            )
        if W_gate is not None and W_gate.shape != W_in.shape:
            raise ShapeMismatchError(f"W_gate must have W_in's shape {tuple(W_in.shape)}, got {tuple(W_gate.shape)}")
        self.act_name = activation_name(act)
        d_model, d_mlp = W_in.shape
        t = lambda v, n: (v if v is not None else torch.zeros(n, dtype=W_in.dtype)).detach().clone()  # noqa: E731
        self.register_buffer("W_in", W_in.detach().clone())
        self.register_buffer("b_in", t(b_in, d_mlp))
        self.register_buffer("W_out", W_out.detach().clone())
        self.register_buffer("b_out", t(b_out, d_model))
        if W_gate is not None:
            self.register_buffer("W_gate", W_gate.detach().clone())
            self.register_buffer("b_gate", t(b_gate, d_mlp))

    @property
    def gated(self) -> bool:
        return hasattr(self, "W_gate")

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
        return h @ self.W_out + self.b_out

    def forward_with_grads(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(MLP(x), terms)`` where ``terms`` holds what the Jacobian needs, each ``(..., d_mlp)``:
        ``{"act_grad": act'(z)}`` (plain) or ``{"act": act(g), "act_grad_u": act'(g) * u}`` (gated)."""
        x = x.to(self.W_in.dtype)
        u = x @ self.W_in + self.b_in
        if self.gated:
            a, g = self.act_and_grad(x @ self.W_gate + self.b_gate)
            return (a * u) @ self.W_out + self.b_out, {"act": a, "act_grad_u": g * u}
        a, g = self.act_and_grad(u)
        return a @ self.W_out + self.b_out, {"act_grad": g}

    @classmethod
    def from_module(cls, module: nn.Module, act: object | None = None) -> FrozenMLP:
        """Copy the weights of a GPT-2 (``c_fc``/``c_proj``), GPT-NeoX (``dense_h_to_4h``/``dense_4h_to_h``),
        Llama-style (``gate_proj``/``up_proj``/``down_proj``) or TransformerLens (``W_in``/``W_out``[/``W_gate``])
        MLP. Wrappers exposing ``original_component`` (TransformerLens 4 bridge) are unwrapped."""
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
