"""Cross-layer transcoders from their two published layouts into :class:`~sae_hooks.saes.clt.CrossLayerTranscoder`.

* ``circuit_tracer`` (``CrossLayerTranscoder.to_safetensors`` / ``load_clt`` in
  ``circuit_tracer/transcoder/cross_layer_transcoder.py``, decoderesearch/circuit-tracer@4bb8c0e):
  ``W_enc_{i}.safetensors`` holds ``W_enc_{i} (d_sae, d_model)`` (used as ``x @ W_enc.T``), ``b_enc_{i}``,
  ``b_dec_{i}`` and, for JumpReLU, ``threshold_{i} (1, d_sae)``; ``W_dec_{i}.safetensors`` holds
  ``W_dec_{i} (d_sae, n_layers - i, d_model)``. Sites: an optional ``config.yaml``'s ``feature_input_hook`` /
  ``feature_output_hook`` (block-relative TransformerLens names), else ``load_clt``'s defaults ``hook_resid_mid``
  -> ``hook_mlp_out``.
* ``gemma_scope_2`` (Gemma Scope 2 ``clt/<width>/params_layer_{i}.safetensors``, the keys circuit-tracer's
  ``load_gemma_scope_2_clt`` reads): ``w_enc (d_in, d_sae)``, ``w_dec (d_sae, n_layers, d_in)`` (only the slices
  ``j >= i`` are used), ``b_enc``, ``b_dec``, ``threshold`` and optionally ``affine_skip_connection (d_in, d_in)``
  (``x @ A``). Sites: the MLP input after its pre-norm (``ln2.hook_out``: ``pre_feedforward_layernorm``'s output, as our Gemma Scope 2
  transcoders)
  -> ``hook_mlp_out``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..._files import read_safetensors
from ...errors import SAEFormatError
from ...saes.clt import CrossLayerTranscoder
from ._common import make_site, read_feature_hooks, tensor
from .gemma_scope import gemma3_model

CT_ENC, CT_DEC = re.compile(r"^W_enc_(\d+)\.safetensors$"), re.compile(r"^W_dec_(\d+)\.safetensors$")
GS2 = re.compile(r"^params_layer_(\d+)\.safetensors$")
LAYOUTS = ("circuit_tracer", "gemma_scope_2")


def detect_layout(files: list[str]) -> str | None:
    """``"circuit_tracer"``, ``"gemma_scope_2"`` or ``None`` from the file names of a folder."""
    if any(CT_ENC.match(f) for f in files):
        return "circuit_tracer"
    if any(GS2.match(f) for f in files):
        return "gemma_scope_2"
    return None


def _layers(folder: Path, pattern: re.Pattern[str], what: str) -> list[Path]:
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := pattern.match(p.name))}
    n = len(found)
    if not n or sorted(found) != list(range(n)):
        raise SAEFormatError(f"{folder}: expected {what} files numbered 0..n-1, found layers {sorted(found)}")
    return [found[i] for i in range(n)]


def _sites(hin: str, hout: str, n: int, model: str | None) -> tuple[list[str], list[str], list]:
    sites = [make_site(f"blocks.{i}.{hin}", f"blocks.{i}.{hout}", model) for i in range(n)]
    return [s.hook for s in sites], [s.hook_out or s.hook for s in sites], sites


def _circuit_tracer(folder: Path) -> dict:
    enc = _layers(folder, CT_ENC, "W_enc_{i}.safetensors")
    dec = _layers(folder, CT_DEC, "W_dec_{i}.safetensors")
    n = len(enc)
    if len(dec) != n:
        raise SAEFormatError(f"{folder}: {n} W_enc_*.safetensors but {len(dec)} W_dec_*.safetensors")
    W_enc, b_enc, b_dec, thr, W_dec = [], [], [], [], []
    for i in range(n):
        raw, src = read_safetensors(enc[i]), str(enc[i])
        W_enc.append(tensor(raw, f"W_enc_{i}", src, 2).T)
        b_enc.append(tensor(raw, f"b_enc_{i}", src, 1))
        b_dec.append(tensor(raw, f"b_dec_{i}", src, 1))
        if f"threshold_{i}" in raw:
            thr.append(raw[f"threshold_{i}"].reshape(-1))
        extra = sorted(set(raw) - {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}"})
        if extra:
            raise SAEFormatError(f"{src}: unexpected tensors {extra}")
        rawd = read_safetensors(dec[i])
        W_dec.append(tensor(rawd, f"W_dec_{i}", str(dec[i]), 3))
    if thr and len(thr) != n:
        raise SAEFormatError(f"{folder}: threshold_i present in {len(thr)} of {n} W_enc files")
    hin, hout = read_feature_hooks(folder / "config.yaml", "hook_resid_mid", "hook_mlp_out")
    return dict(W_enc=torch.stack(W_enc), b_enc=torch.stack(b_enc), b_dec=torch.stack(b_dec), W_dec=W_dec,
                threshold=torch.stack(thr) if thr else None, hin=hin, hout=hout)


def _gemma_scope_2(folder: Path) -> dict:
    files = _layers(folder, GS2, "params_layer_{i}.safetensors")
    n = len(files)
    keys = {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"}
    W_enc, b_enc, b_dec, thr, W_dec, skip = [], [], [], [], [], []
    for i, f in enumerate(files):
        raw, src = read_safetensors(f), str(f)
        extra = sorted(set(raw) - keys - {"affine_skip_connection"})
        if extra:
            raise SAEFormatError(f"{src}: unexpected tensors {extra}")
        W_enc.append(tensor(raw, "w_enc", src, 2))
        w_dec = tensor(raw, "w_dec", src, 3)
        if w_dec.shape[1] != n:
            raise SAEFormatError(f"{src}: w_dec {tuple(w_dec.shape)} should be (d_sae, {n} layers, d_in)")
        W_dec.append(w_dec[:, i:].contiguous())
        b_enc.append(tensor(raw, "b_enc", src, 1))
        b_dec.append(tensor(raw, "b_dec", src, 1))
        thr.append(tensor(raw, "threshold", src, 1))
        if "affine_skip_connection" in raw:
            skip.append(tensor(raw, "affine_skip_connection", src, 2))
    if skip and len(skip) != n:
        raise SAEFormatError(f"{folder}: affine_skip_connection present in {len(skip)} of {n} files")
    return dict(W_enc=torch.stack(W_enc), b_enc=torch.stack(b_enc), b_dec=torch.stack(b_dec), W_dec=W_dec,
                threshold=torch.stack(thr), W_skip=torch.stack(skip) if skip else None,
                hin="ln2.hook_out", hout="hook_mlp_out")


def load_clt(
    folder: str | Path,
    *,
    layout: str | None = None,
    model_name: str | None = None,
    hook_in: str | None = None,
    hook_out: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> CrossLayerTranscoder:
    """Load a cross-layer transcoder from a local folder (layout detected from the file names).

    Args:
        folder: the folder with ``W_enc_*/W_dec_*.safetensors`` (circuit-tracer) or ``params_layer_*.safetensors``
            (Gemma Scope 2, e.g. ``clt/width_262k_l0_medium_affine``).
        layout: ``"circuit_tracer"`` or ``"gemma_scope_2"`` to skip detection.
        model_name: the model (fills in module paths; for Gemma Scope 2 guessed from a ``gemma-scope-2-*`` path).
        hook_in / hook_out: block-relative TransformerLens names overriding the layout's sites
            (e.g. ``"ln2.hook_out"``); the layer prefix ``blocks.{i}.`` is added.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SAEFormatError(f"{folder}: not a folder (a CLT is a folder of per-layer safetensors files)")
    found = detect_layout([p.name for p in folder.iterdir()])
    layout = layout or found
    if layout not in LAYOUTS:
        raise SAEFormatError(f"{folder}: no cross-layer transcoder layout matches (expected W_enc_0.safetensors... "
                             f"for circuit_tracer or params_layer_0.safetensors... for gemma_scope_2); "
                             f"layout={layout!r} not one of {list(LAYOUTS)}")
    parts = _circuit_tracer(folder) if layout == "circuit_tracer" else _gemma_scope_2(folder)
    if layout == "gemma_scope_2" and model_name is None:
        model_name = gemma3_model(None, str(folder.resolve()))
    n = parts["W_enc"].shape[0]
    hooks_in, hooks_out, sites = _sites(hook_in or parts["hin"], hook_out or parts["hout"], n, model_name)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype or t.dtype).contiguous()

    clt = CrossLayerTranscoder(
        cast(parts["W_enc"]), cast(parts["b_enc"]), [cast(w) for w in parts["W_dec"]], cast(parts["b_dec"]),
        threshold=cast(parts["threshold"]), W_skip=cast(parts.get("W_skip")),
        hooks_in=hooks_in, hooks_out=hooks_out, model_name=model_name,
        metadata={"source_format": f"clt_{layout}", "source": str(folder)},
    )
    # Module paths (when the model family is known) for adapters whose hook names do not resolve.
    clt.modules_in = [s.module for s in sites]
    clt.modules_out = [s.module_out for s in sites]
    return clt


__all__ = ["load_clt", "detect_layout", "LAYOUTS"]
