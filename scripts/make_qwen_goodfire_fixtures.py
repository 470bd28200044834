#!/usr/bin/env python3
"""Golden Qwen Scope (``layerN.sae.pt``) and Goodfire (``<model>-SAE-lN.pt(h)``) fixtures, read by SAELens itself.

Runs INSIDE a venv with ``sae-lens==6.54.12`` (beside ``torch==2.13.0``). The files are what the releases ship (model
cards, and SAELens's loaders ``qwen_scope_sae_huggingface_loader`` / ``get_goodfire_huggingface_loader``): a pickled
dict of four tensors, Qwen Scope ``W_enc (d_sae, d_in)``, ``W_dec (d_in, d_sae)``, ``b_enc``, ``b_dec``; Goodfire
``encoder_linear.{weight,bias}`` / ``decoder_linear.{weight,bias}`` (an ``nn.Linear`` pair's state dict). SAELens's
``SAE.from_pretrained_with_cfg_and_sparsity(release, sae_id)`` reads each through the release's own loader (its
``hf_hub_download`` pointed at the local file, as SAELens's own tests do; the loader's ``cfg_overrides`` shrink
``d_in``/``d_sae`` to the fixture's), and its SAE's ``encode`` / ``forward`` on ``x`` are the golden outputs. Nothing from SAELens is copied here.

    /work/wt/perf-saelens-venv/bin/python scripts/make_qwen_goodfire_fixtures.py tests/fixtures/golden/qwen_goodfire
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file

D, F = 16, 64


def main(out: Path) -> None:
    import sae_lens
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders as L

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    cases = {
        "qwen_scope": ("qwen-scope-3-1.7b-base-w32k-l50", "layer7", "Qwen/SAE-Res-Qwen3-1.7B-Base-W32K-L0_50",
                       "layer7.sae.pt"),
        "goodfire_8b": ("goodfire-llama-3.1-8b-instruct", "layer_19", "Goodfire/Llama-3.1-8B-Instruct-SAE-l19",
                        "Llama-3.1-8B-Instruct-SAE-l19.pth"),
        "goodfire_70b": ("goodfire-llama-3.3-70b-instruct", "layer_50", "Goodfire/Llama-3.3-70B-Instruct-SAE-l50",
                         "Llama-3.3-70B-Instruct-SAE-l50.pt"),
    }
    manifest = {}
    for name, (release, sae_id, repo, fname) in cases.items():
        folder = out / name
        folder.mkdir()
        W_enc, W_dec = torch.randn(F, D, generator=g) * 0.3, torch.randn(D, F, generator=g) * 0.3
        b_enc, b_dec = torch.randn(F, generator=g) * 0.1, torch.randn(D, generator=g) * 0.1
        if name == "qwen_scope":
            raw = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
        else:
            raw = OrderedDict([("encoder_linear.weight", W_enc), ("encoder_linear.bias", b_enc),
                               ("decoder_linear.weight", W_dec), ("decoder_linear.bias", b_dec)])
        path = folder / fname
        torch.save(raw, path)
        L.hf_hub_download = lambda repo_id, filename, force_download=False, _p=str(path): _p  # noqa: E731
        loader = L.NAMED_PRETRAINED_SAE_LOADERS[L.get_conversion_loader_name(release)]

        def shrunk(repo_id, folder_name, device, force_download, cfg_overrides, _loader=loader):  # noqa: ANN001, ANN202
            assert (repo_id, folder_name) == (repo, fname)  # what the release lists
            return _loader(repo_id, folder_name, device=device, force_download=force_download,
                           cfg_overrides={**(cfg_overrides or {}), "d_in": D, "d_sae": F})

        sae, cfg, _ = SAE.from_pretrained_with_cfg_and_sparsity(release, sae_id, device="cpu", converter=shrunk)
        x = torch.randn(6, 3, D, generator=g) * 2
        with torch.no_grad():
            save_file({"x": x, "latents": sae.encode(x).contiguous(), "recon": sae(x).contiguous()},
                      str(folder / "golden.safetensors"))
        manifest[name] = {"release": release, "sae_id": sae_id, "repo_id": repo, "file": f"{name}/{fname}", "hook_name": sae.cfg.metadata.hook_name,
                          "model_name": sae.cfg.metadata.model_name, "architecture": sae.cfg.architecture(),
                          "k": getattr(sae.cfg, "k", None)}
    env = {"sae-lens": sae_lens.__version__, "torch": torch.__version__}
    (out / "manifest.json").write_text(json.dumps({"environment": env, "fixtures": manifest}, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
