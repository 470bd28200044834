"""Attention-output SAEs of Kissane et al. (``ckkissane/attention-output-saes``; SAELens release
``gpt2-small-hook-z-kk``): ``<name>.pt`` (a ``state_dict`` of ``W_enc (act_size, d_sae)``, ``W_dec (d_sae, act_size)``,
``b_enc``, ``b_dec`` -- our layout) beside ``<name>_cfg.json`` (``act_size``, ``dict_size``, ``act_name``, ``layer``,
``model_name``, ...), as ``AutoEncoder.save`` writes them (``common/torch_modules/autoencoder.py``).

Forward (``AutoEncoder.forward`` there): ``acts = relu((x - b_dec) @ W_enc + b_enc)``, ``x_hat = acts @ W_dec + b_dec``
on the concatenated heads of ``attn.hook_z`` (``act_size = n_heads * d_head``): a standard ReLU SAE with
``apply_b_dec_to_input`` and ``reshape="hook_z"``. The ``.pt`` is read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..._files import expect_object, read_json
from ...config import SAEConfig
from ...errors import SAEFormatError
from ...saes import SAE
from ._common import LoadOptions, build, check_shape, file_dtype, float_state, get, make_site, positive_int, tensor, torch_load_weights

NAME = "connor_rob_hook_z"
SUFFIX = "_cfg.json"


def _pair(files: list[str]) -> tuple[str, str] | None:
    pts = [f for f in files if f.endswith(".pt") and "/" not in f]
    if len(pts) != 1:
        return None
    cfg = pts[0][: -len(".pt")] + SUFFIX
    return (pts[0], cfg) if cfg in files else None


def detect(files: list[str]) -> bool:
    """One ``<name>.pt`` and its ``<name>_cfg.json``."""
    return _pair(files) is not None


def needed(files: list[str]) -> list[str]:
    pt, cfg = _pair(files)  # type: ignore[misc]
    return [pt, cfg]


def load(path: str | Path, opts: LoadOptions | None = None) -> SAE:
    """``path`` is the ``.pt`` file."""
    opts = opts or LoadOptions()
    path = Path(path)
    cpath = path.with_name(path.name[: -len(".pt")] + SUFFIX)
    raw_cfg = read_json(cpath)
    expect_object(raw_cfg, str(cpath))
    src = str(cpath)
    act_size = positive_int(raw_cfg, "act_size", src)
    dict_size = positive_int(raw_cfg, "dict_size", src)
    act_name = get(raw_cfg, "act_name", str, src, None)
    state = float_state(torch_load_weights(path, opts.map_location), str(path))
    wsrc = str(path)
    state = {k: tensor(state, k, wsrc) for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    check_shape(state["W_enc"], (act_size, dict_size), "W_enc", wsrc, f"{cpath.name} says act_size, dict_size")
    check_shape(state["W_dec"], (dict_size, act_size), "W_dec", wsrc)
    check_shape(state["b_enc"], (dict_size,), "b_enc", wsrc)
    check_shape(state["b_dec"], (act_size,), "b_dec", wsrc)
    hook = opts.hook
    if hook is None and act_name:
        m = re.fullmatch(r"blocks\.(\d+)\.(?:attn\.)?hook_z", act_name)
        hook = f"blocks.{m.group(1)}.attn.hook_z" if m else act_name
    if hook is None:
        raise SAEFormatError(f"{src}: no act_name; pass hook=")
    model = opts.model_name or {"gpt2-small": "gpt2"}.get(raw_cfg.get("model_name"), raw_cfg.get("model_name"))
    cfg = SAEConfig(
        architecture="relu",
        d_in=act_size,
        d_sae=dict_size,
        dtype=file_dtype(state, "W_enc"),
        apply_b_dec_to_input=True,
        reshape="hook_z" if hook.endswith("hook_z") else "none",
        sites=[make_site(hook, None, model)],
        model_name=model,
        metadata={"source_format": NAME},
    )
    return build(cfg, state, wsrc, opts)
