"""``push_to_hub``: upload an SAE in the native format with a model card."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..native import save
from ..saes import SAE

LIBRARY_NAME = "sae-hooks"


def _metrics(metadata: dict[str, Any]) -> dict[str, float]:
    """Numbers from ``metadata["metrics"]`` (or top-level numeric entries such as ``l0``, ``fvu``)."""
    src = metadata.get("metrics") if isinstance(metadata.get("metrics"), dict) else metadata
    out = {}
    for k, v in src.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[str(k)] = v
    return out


def model_card(sae: SAE, repo_id: str | None = None, path_in_repo: str | None = None) -> str:
    """A ``README.md`` with a YAML header (``library_name``, ``tags``, ``base_model``, sites, metrics)."""
    cfg = sae.cfg
    sites = [s.to_dict() for s in cfg.sites]
    tags = [LIBRARY_NAME, "sparse-autoencoder", "interpretability", cfg.architecture]
    if cfg.is_transcoder:
        tags.append("transcoder")
    header: dict[str, Any] = {"library_name": LIBRARY_NAME, "tags": tags}
    if cfg.model_name:
        header["base_model"] = cfg.model_name
    header["sae"] = {
        "architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
        **({"d_out": cfg.d_out} if cfg.d_out is not None else {}),
        **({"k": cfg.k} if cfg.k is not None else {}),
        "dtype": cfg.dtype, "normalize": cfg.normalize, "sites": sites,
    }
    metrics = _metrics(cfg.metadata)
    if metrics:
        header["metrics"] = metrics
    folder = path_in_repo or "."
    load_args = f'"{repo_id}"' + (f', sae_id="{path_in_repo}"' if path_in_repo else "") if repo_id else '"<repo>"'
    hooks = ", ".join(s.get("hook", "?") for s in sites) or "unknown"
    body = [
        f"# {cfg.architecture} SAE ({cfg.d_in} -> {cfg.d_sae} latents)",
        "",
        f"Sparse autoencoder saved with [sae-hooks]; folder `{folder}` holds `cfg.json` and `sae.safetensors`.",
        "",
        f"- model: {cfg.model_name or 'unknown'}",
        f"- hook(s): {hooks}",
        "",
        "```python",
        "import sae_hooks",
        f"sae = sae_hooks.load({load_args})",
        "```",
    ]
    if metrics:
        body += ["", "| metric | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in metrics.items()]
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n" + "\n".join(body) + "\n"


def push_to_hub(
    sae: SAE,
    repo_id: str,
    *,
    path_in_repo: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload ``sae`` (native ``cfg.json`` + ``sae.safetensors`` + ``README.md``) to ``repo_id`` in one commit.

    ``path_in_repo`` puts the SAE in a sub-folder (load it back with ``load(repo_id, sae_id=path_in_repo)``).
    The repo is created if needed. Returns the commit sha.
    """
    from . import remote

    with tempfile.TemporaryDirectory(prefix="sae_hooks_push_") as tmp:
        folder = Path(tmp) / "sae"
        save(sae, folder)
        (folder / "README.md").write_text(model_card(sae, repo_id, path_in_repo))
        return remote.upload_folder(
            folder, repo_id, path_in_repo=path_in_repo, revision=revision, token=token,
            commit_message=commit_message or f"Upload {sae.cfg.architecture} SAE with sae-hooks",
            private=private,
        )
