#!/usr/bin/env python3
"""Golden Llama Scope fixtures written and evaluated by the authors' own code (OpenMOSS lm-saes 0.1).

Runs INSIDE a separate venv where ``lm_saes`` at OpenMOSS/Language-Model-SAEs@eb5088af (2024-10-30, the Llama Scope
release; ``pip install --no-deps --ignore-requires-python`` of that commit, with ``transformer-lens==2.16.1`` for
``transformer_lens.hook_points`` and ``torch==2.13.0``) is importable. Nothing from lm-saes is copied here: the
script only calls its public API.

For each fixture: build ``lm_saes.SAEConfig``, write ``hyperparams.json`` with ``SAEConfig.save_hyperparameters``,
set seeded random weights (non-zero biases, decoder column norms between 0.5 and 2) on a ``SparseAutoEncoder`` and
write the checkpoint with ``SparseAutoEncoder.save_pretrained`` (``checkpoints/final.safetensors`` as on the Hub),
then load the folder back with ``SparseAutoEncoder.from_pretrained`` (the authors' loader) and record its
``encode``/``decode``/``forward`` on ``x`` (5, 3, d_model) in ``golden.safetensors``.

Usage::

    /work/wt/hub-refvenv/lm/bin/python scripts/make_lmsaes_fixtures.py tests/fixtures/golden/lm_saes

``--new`` makes the newer layout instead (``config.json`` + ``sae_weights.safetensors``), inside a venv with
``llamascopium`` at OpenMOSS/Language-Model-SAEs@95281ac (2.0.0b34; ``transformer-lens<3`` because it imports
``HookedTransformer``): ``SAEConfig.save_hyperparameters`` + ``SparseAutoEncoder.save_pretrained`` write the files,
``SparseAutoEncoder.from_pretrained(folder, fold_activation_scale=True)`` gives the golden outputs; the unfolded
model (``fold_activation_scale=False``, the authors' default) is also recorded: ``latents_unfolded`` on
``normalize_activations`` inputs and ``recon_unfolded`` after ``denormalize_activations``::

    /work/wt/hub-refvenv/ls/bin/python scripts/make_lmsaes_fixtures.py --new tests/fixtures/golden/lm_saes_new
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

D, F = 8, 16


def weights(seed: int, d_out: int = D) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(d_out, F, generator=g)
    dec = dec / dec.norm(dim=0, keepdim=True) * (0.5 + 1.5 * torch.rand(F, generator=g))  # column norms 0.5..2
    return {
        "encoder.weight": torch.randn(F, D, generator=g) * 0.7,
        "encoder.bias": torch.randn(F, generator=g) * 0.5,
        "decoder.weight": dec,
        "decoder.bias": torch.randn(d_out, generator=g) * 0.3,
    }


FIXTURES = {
    # name: (SAEConfig kwargs, seed, extra checkpoints {relpath: seed})
    "jumprelu_sae": (dict(hook_point_in="blocks.3.hook_resid_post", act_fn="jumprelu", jump_relu_threshold=0.4,
                          norm_activation="dataset-wise", dataset_average_activation_norm={"in": 5.0, "out": 5.0},
                          apply_decoder_bias_to_pre_encoder=False), 1, {}),
    "jumprelu_transcoder": (dict(hook_point_in="blocks.3.ln2.hook_normalized", hook_point_out="blocks.3.hook_mlp_out",
                                 act_fn="jumprelu", jump_relu_threshold=0.3, norm_activation="dataset-wise",
                                 dataset_average_activation_norm={"in": 4.0, "out": 9.0},
                                 apply_decoder_bias_to_pre_encoder=False), 2, {}),
    "topk_pruned": (dict(hook_point_in="blocks.5.hook_resid_post", act_fn="topk", top_k=3,
                         norm_activation="dataset-wise", dataset_average_activation_norm={"in": 0.3, "out": 0.3},
                         apply_decoder_bias_to_pre_encoder=True), 3, {"checkpoints/pruned.safetensors": 4}),
    "topk_to_jumprelu": (dict(hook_point_in="blocks.1.hook_mlp_out", act_fn="topk", top_k=3, jump_relu_threshold=0.2,
                              norm_activation="dataset-wise", dataset_average_activation_norm={"in": 2.0, "out": 2.0},
                              apply_decoder_bias_to_pre_encoder=False), 5, {}),
    "relu_defaults": (dict(hook_point_in="blocks.2.hook_resid_post", norm_activation="inference"), 6, {}),
}
#: Fixtures whose hyperparams.json is then cut down to these keys, so the authors' defaults apply on loading.
MINIMAL = {"relu_defaults": ("d_model", "d_sae", "hook_point_in", "norm_activation")}


def main(out: Path) -> None:
    from lm_saes import SAEConfig, SparseAutoEncoder

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifest = {}
    for name, (kw, seed, extra) in FIXTURES.items():
        folder = out / name
        (folder / "checkpoints").mkdir(parents=True)
        cfg = SAEConfig(d_model=D, d_sae=F, device="cpu", dtype=torch.float32, **kw)
        cfg.save_hyperparameters(str(folder))
        if name in MINIMAL:
            hp = json.loads((folder / "hyperparams.json").read_text())
            (folder / "hyperparams.json").write_text(json.dumps({k: hp[k] for k in MINIMAL[name]}, indent=4))
        sae = SparseAutoEncoder(cfg)
        sae.load_state_dict(weights(seed))
        sae.save_pretrained(str(folder / "checkpoints" / "final.safetensors"))
        for rel, s in extra.items():
            other = SparseAutoEncoder(cfg)
            other.load_state_dict(weights(s))
            other.save_pretrained(str(folder / rel))
        # The authors' loader, reading the folder as a user would.
        ref = SparseAutoEncoder.from_pretrained(str(folder))
        x = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(100 + seed)) * 2.0
        with torch.no_grad():
            latents = ref.encode(x)
            golden = {"x": x, "latents": latents, "decoded": ref.decode(latents), "recon": ref.forward(x)}
        save_file({k: v.contiguous() for k, v in golden.items()}, str(folder / "golden.safetensors"))
        manifest[name] = {"path": f"lm_saes/{name}", "files": sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
            "act_fn_after_loading": ref.cfg.act_fn, "decoder_norms_before": [
                round(float(v), 6) for v in weights(extra.get("checkpoints/pruned.safetensors", seed))[
                    "decoder.weight"].norm(dim=0)],
            "l0": float((latents != 0).float().sum(-1).mean())}
    import importlib.metadata as md

    env = {p: md.version(p) for p in ("lm-saes", "torch", "transformer-lens", "safetensors")}
    env["lm_saes_commit"] = os.environ.get("LM_SAES_COMMIT", "eb5088af")
    (out / "manifest.json").write_text(json.dumps({"environment": env, "fixtures": manifest}, indent=1) + "\n")
    print(json.dumps(env), len(manifest), "fixtures")


NEW = {
    # name: (config kwargs, seed, norms {in, out} or None)
    "jumprelu_sae": (dict(hook_point_in="blocks.3.hook_resid_post", hook_point_out="blocks.3.hook_resid_post",
                          act_fn="jumprelu", norm_activation="dataset-wise"), 11, (5.0, 5.0)),
    "jumprelu_transcoder": (dict(hook_point_in="blocks.3.ln2.hook_normalized", hook_point_out="blocks.3.hook_mlp_out",
                                 act_fn="jumprelu", norm_activation="dataset-wise"), 12, (4.0, 9.0)),
    "topk_sae": (dict(hook_point_in="blocks.5.hook_resid_post", hook_point_out="blocks.5.hook_resid_post",
                      act_fn="topk", top_k=3, norm_activation="dataset-wise"), 13, (0.3, 0.3)),
}


def main_new(out: Path) -> None:
    from llamascopium.models.sae import SAEConfig, SparseAutoEncoder

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifest = {}
    for name, (kw, seed, norms) in NEW.items():
        folder = out / name
        folder.mkdir()
        cfg = SAEConfig(d_model=D, expansion_factor=F / D, device="cpu", dtype=torch.float32, **kw)
        sae = SparseAutoEncoder(cfg)
        w = weights(seed)
        g = torch.Generator().manual_seed(seed + 1000)
        params = {"W_E": w["encoder.weight"].T.contiguous(), "b_E": w["encoder.bias"],
                  "W_D": w["decoder.weight"].T.contiguous(), "b_D": w["decoder.bias"]}
        if kw["act_fn"] == "jumprelu":
            params["activation_function.log_jumprelu_threshold"] = torch.log(0.2 + torch.rand(F, generator=g))
        with torch.no_grad():
            for k, v in params.items():
                sae.get_parameter(k).copy_(v)
        sae.set_dataset_average_activation_norm({kw["hook_point_in"]: norms[0], kw["hook_point_out"]: norms[1]})
        cfg.save_hyperparameters(folder)
        sae.save_pretrained(folder)
        x = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(100 + seed)) * 2.0
        ref = SparseAutoEncoder.from_pretrained(str(folder), fold_activation_scale=True)
        raw = SparseAutoEncoder.from_pretrained(str(folder))
        with torch.no_grad():
            latents = ref.encode(x)
            golden = {"x": x, "latents": latents, "decoded": ref.decode(latents), "recon": ref.forward(x)}
            batch, scale = raw.normalize_activations({kw["hook_point_in"]: x, kw["hook_point_out"]: x},
                                                      return_scale_factor=True)
            lu = raw.encode(batch[kw["hook_point_in"]])
            golden["latents_unfolded"] = lu
            golden["recon_unfolded"] = raw.denormalize_activations(
                {kw["hook_point_out"]: raw.decode(lu)}, scale)[kw["hook_point_out"]]
        save_file({k: v.contiguous() for k, v in golden.items()}, str(folder / "golden.safetensors"))
        manifest[name] = {"path": f"lm_saes_new/{name}", "files": sorted(p.name for p in folder.iterdir()),
                          "l0": float((latents != 0).float().sum(-1).mean())}
    import importlib.metadata as md

    env = {p: md.version(p) for p in ("llamascopium", "torch", "transformer-lens", "safetensors")}
    env["commit"] = os.environ.get("LM_SAES_COMMIT", "95281ac")
    (out / "manifest.json").write_text(json.dumps({"environment": env, "fixtures": manifest}, indent=1) + "\n")
    print(json.dumps(env), len(manifest), "fixtures")


if __name__ == "__main__":
    if sys.argv[1] == "--new":
        main_new(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
