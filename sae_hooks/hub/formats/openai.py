"""OpenAI ``sparse_autoencoder`` GPT-2 small SAEs (Gao et al. 2024): one ``.pt`` state dict per layer.

Not on the Hub: ``az://openaipublic/sparse-autoencoder/gpt2-small/{location}_v5_{32k|128k}/autoencoders/{layer}.pt``.
Opened ONLY with ``torch.load(weights_only=True)`` (the file holds tensors, a string and a small dict).

Keys: ``pre_bias (d)``, ``encoder.weight (n, d)``, ``latent_bias (n)``, ``decoder.weight (d, n)``, ``activation``
(``"TopK"`` or ``"ReLU"``), ``activation_state_dict`` (``{"k": 32, "postact_fn": "ReLU"}``), training statistics
(ignored). ``Autoencoder.from_state_dict`` turns ``normalize`` on exactly when the activation is TopK:

    x' = (x - mean(x)) / (std(x) + 1e-5)          (per token, unbiased std)  -> our normalize="standardize"
    f  = ReLU(TopK(W_enc (x' - pre_bias) + latent_bias))                        -> apply_b_dec_to_input, b_enc
    x_hat = (W_dec f + pre_bias) * std + mean

Hook from the release folder name (``resid_post_mlp`` -> ``hook_resid_post``, ``resid_post_attn`` ->
``hook_resid_mid``, ``resid_delta_mlp`` -> ``hook_mlp_out``, ``resid_delta_attn`` -> ``hook_attn_out``,
``mlp_post_act`` -> ``mlp.hook_post``) and the layer from the file name.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ...config import SAEConfig
from ...errors import SAEFormatError, UnknownArchitectureError
from ...saes import SAE
from ._common import LoadOptions, build, check_shape, file_dtype, make_site, t_, tensor, torch_load_weights

NAME = "openai"
LOCATIONS = {
    "resid_post_mlp": "hook_resid_post",
    "resid_post_attn": "hook_resid_mid",
    "resid_delta_mlp": "hook_mlp_out",
    "resid_delta_attn": "hook_attn_out",
    "mlp_post_act": "mlp.hook_post",
}
_CONFIG_NAMES = ("cfg.json", "config.json", "hyperparams.json")


def detect(files: list[str]) -> bool:
    """Exactly one ``*.pt`` file (the SAE itself) and no JSON config beside it."""
    pts = [f for f in files if f.endswith(".pt") and "/" not in f]
    # ``ae.pt`` is dictionary_learning's weights file (its config.json is missing), never an OpenAI SAE.
    return (len(pts) == 1 and pts[0] != "ae.pt" and not any(c in files for c in _CONFIG_NAMES)
            and pts[0][: -len(".pt")] + "_cfg.json" not in files)  # <name>_cfg.json: connor_rob_hook_z


def needed(files: list[str]) -> list[str]:
    return [f for f in files if f.endswith(".pt") and "/" not in f][:1]


def hook_of(where: str) -> str | None:
    loc = next((name for name in LOCATIONS if name in where), None)
    m = re.search(r"(\d+)\.pt$", where)
    if loc is None or m is None:
        return None
    return f"blocks.{int(m.group(1))}.{LOCATIONS[loc]}"


def load(path: str | Path, opts: LoadOptions | None = None) -> SAE:
    """``path`` is the ``.pt`` file or a folder holding exactly one."""
    opts = opts or LoadOptions()
    path = Path(path)
    if path.is_dir():
        pts = sorted(p for p in path.iterdir() if p.suffix == ".pt")
        if len(pts) != 1:
            raise SAEFormatError(f"{path}: expected exactly one .pt file, found {[p.name for p in pts]}")
        path = pts[0]
    source = str(path)
    raw = torch_load_weights(path, opts.map_location)
    activation = raw.get("activation", "ReLU")
    act_state = raw.get("activation_state_dict", {}) or {}
    if not isinstance(activation, str) or not isinstance(act_state, dict):
        raise SAEFormatError(f"{source}: 'activation' must be a string and 'activation_state_dict' a dict")
    if activation not in ("TopK", "ReLU"):
        raise UnknownArchitectureError(f"{source}: activation {activation!r} is not supported (TopK, ReLU)")
    postact = act_state.get("postact_fn", "ReLU")
    if activation == "TopK" and postact != "ReLU":
        raise UnknownArchitectureError(f"{source}: TopK postact_fn {postact!r} is not supported (ReLU)")
    enc = tensor(raw, "encoder.weight", source, 2)
    dec = tensor(raw, "decoder.weight", source, 2)
    n, d = enc.shape
    check_shape(dec, (d, n), "decoder.weight", source)
    state = {
        "W_enc": t_(enc),
        "b_enc": tensor(raw, "latent_bias", source, 1),
        "W_dec": t_(dec),
        "b_dec": tensor(raw, "pre_bias", source, 1),
    }
    check_shape(state["b_enc"], (n,), "latent_bias", source)
    check_shape(state["b_dec"], (d,), "pre_bias", source)
    k = None
    if activation == "TopK":
        k = act_state.get("k")
        if isinstance(k, torch.Tensor):
            k = int(k.item())
        if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= n:
            raise SAEFormatError(f"{source}: activation_state_dict.k must be an integer in [1, {n}], got {k!r}")
    where = "/".join(p for p in (opts.repo_id or "", opts.sae_id or "", str(path)) if p)
    hook = opts.hook or hook_of(where)
    model = opts.model_name or "gpt2"
    cfg = SAEConfig(
        architecture="topk" if k else "relu",
        d_in=d,
        d_sae=n,
        k=k,
        dtype=file_dtype(state, "W_enc"),
        apply_b_dec_to_input=True,
        normalize="standardize" if k else "none",
        norm_eps=1e-5,
        sites=[make_site(hook, None, model)] if hook else [],
        model_name=model,
        metadata={"source_format": NAME, "openai_activation": activation},
    )
    return build(cfg, state, source, opts)
