"""Cross-layer transcoders (CLTs): one encoder per layer, decoders from layer ``i`` to every layer ``j >= i``.

Layer ``i``'s encoder reads that layer's MLP input ``x_i`` (``(..., d_in)``): ``a_i = act(x_i @ W_enc[i] + b_enc[i])``
(``(..., d_sae)``; JumpReLU ``a * (a > threshold[i])`` when thresholds are present, else ReLU). Layer ``j``'s MLP
output is replaced by ``y_j = sum_{i <= j} a_i @ W_dec[i][:, j - i] + b_dec[j] (+ x_j @ W_skip[j])`` (``(..., d_out)``).
This is what circuit-tracer's ``CrossLayerTranscoder`` and Gemma Scope 2's ``JumpReLUMultiLayerSAE`` compute.

Not an :class:`~sae_hooks.saes.base.SAE` (it has many sites and one latent set per layer); attach it with
``model.add_sae(clt)`` (see :mod:`sae_hooks.intervene.clt`). Loaders: :mod:`sae_hooks.hub.formats.clt`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeMismatchError


class CrossLayerTranscoder(nn.Module):
    """A CLT over ``n_layers`` layers.

    Attributes:
        W_enc: ``(n_layers, d_in, d_sae)``; b_enc: ``(n_layers, d_sae)``; threshold: ``(n_layers, d_sae)`` or ``None``.
        W_dec: ``W_dec[i]`` is ``(d_sae, n_layers - i, d_out)``: layer ``i``'s decoders to layers ``i..n_layers-1``.
        b_dec: ``(n_layers, d_out)``; W_skip: ``(n_layers, d_in, d_out)`` or ``None`` (applied as ``x @ W_skip[j]``).
        hooks_in / hooks_out: each layer's input / output site (TransformerLens names or module paths).
    """

    def __init__(
        self,
        W_enc: Tensor,
        b_enc: Tensor,
        W_dec: Sequence[Tensor],
        b_dec: Tensor,
        threshold: Tensor | None = None,
        W_skip: Tensor | None = None,
        hooks_in: Sequence[str] | None = None,
        hooks_out: Sequence[str] | None = None,
        model_name: str | None = None,
        metadata: dict | None = None,
    ):
        super().__init__()
        n, d_in, d_sae = W_enc.shape
        d_out = b_dec.shape[-1]
        expect = {"b_enc": (b_enc, (n, d_sae)), "b_dec": (b_dec, (n, d_out))}
        if threshold is not None:
            expect["threshold"] = (threshold, (n, d_sae))
        if W_skip is not None:
            expect["W_skip"] = (W_skip, (n, d_in, d_out))
        if len(W_dec) != n:
            raise ShapeMismatchError(f"W_dec: expected {n} per-layer decoders, got {len(W_dec)}")
        for i, w in enumerate(W_dec):
            expect[f"W_dec[{i}]"] = (w, (d_sae, n - i, d_out))
        for name, (t, shape) in expect.items():
            if tuple(t.shape) != shape:
                raise ShapeMismatchError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        if threshold is not None and bool((threshold < 0).any()):
            raise ConfigError("negative JumpReLU thresholds let negative pre-activations through; not supported")
        for hooks, what in ((hooks_in, "hooks_in"), (hooks_out, "hooks_out")):
            if hooks is not None and len(hooks) != n:
                raise ConfigError(f"{what}: expected {n} sites (one per layer), got {len(hooks)}")
        self.n_layers, self.d_in, self.d_sae, self.d_out = n, d_in, d_sae, d_out
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(b_enc)
        self.W_dec = nn.ParameterList([nn.Parameter(w) for w in W_dec])
        self.b_dec = nn.Parameter(b_dec)
        self.threshold = nn.Parameter(threshold, requires_grad=False) if threshold is not None else None
        self.W_skip = nn.Parameter(W_skip) if W_skip is not None else None
        self.hooks_in = list(hooks_in) if hooks_in is not None else None
        self.hooks_out = list(hooks_out) if hooks_out is not None else None
        self.model_name = model_name
        self.metadata = dict(metadata or {})

    def encode_layer(self, x: Tensor, layer: int) -> Tensor:
        """Latents of layer ``layer``: ``(..., d_in) -> (..., d_sae)``."""
        pre = x.to(self.W_enc.dtype) @ self.W_enc[layer] + self.b_enc[layer]
        if self.threshold is None:
            return torch.relu(pre)
        return pre * (pre > self.threshold[layer])

    def decode_layer(self, latents: Sequence[Tensor | None], layer: int, x: Tensor | None = None) -> Tensor:
        """Layer ``layer``'s output from the latents of layers ``0..layer`` (``None`` entries contribute nothing);
        ``x`` is that layer's input, needed when there is a skip connection."""
        out = self.b_dec[layer]
        for i in range(layer + 1):
            a = latents[i]
            if a is not None:
                out = out + a @ self.W_dec[i][:, layer - i]
        if self.W_skip is not None:
            if x is None:
                raise ConfigError("this CLT has a skip connection: decode_layer needs the layer's input x")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip[layer]
        return out

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """Every layer's output from every layer's input (``n_layers`` tensors ``(..., d_in)``)."""
        if len(xs) != self.n_layers:
            raise ShapeMismatchError(f"expected {self.n_layers} layer inputs, got {len(xs)}")
        acts = [self.encode_layer(x, i) for i, x in enumerate(xs)]
        return [self.decode_layer(acts, j, xs[j]) for j in range(self.n_layers)]

    def __repr__(self) -> str:
        return (f"CrossLayerTranscoder(n_layers={self.n_layers}, d_in={self.d_in}, d_sae={self.d_sae}, "
                f"d_out={self.d_out}, jumprelu={self.threshold is not None}, skip={self.W_skip is not None})")


def is_clt(obj: object) -> bool:
    return isinstance(obj, CrossLayerTranscoder)


__all__ = ["CrossLayerTranscoder", "is_clt"]
