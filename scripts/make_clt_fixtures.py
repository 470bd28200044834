#!/usr/bin/env python3
"""Golden cross-layer transcoder (CLT) fixtures in the two published layouts, read by circuit-tracer itself.

Runs INSIDE a venv with ``circuit_tracer`` at decoderesearch/circuit-tracer@4bb8c0e (``--no-deps`` beside
``torch==2.13.0``; the one built for scripts/make_circuit_tracer_fixtures.py):

* ``circuit_tracer_relu`` / ``circuit_tracer_jumprelu``: ``CrossLayerTranscoder.to_safetensors`` writes
  ``W_enc_{i}.safetensors`` (``W_enc_i (d_sae, d_model)``, ``b_enc_i``, ``b_dec_i``, ``threshold_i``) and
  ``W_dec_{i}.safetensors`` (``W_dec_i (d_sae, n_layers - i, d_model)``); ``load_clt`` reads them back.
* ``gemma_scope_2_affine`` (golden output from ``decode(encode(x), input_acts=x)``; ``forward`` asserts there): Gemma Scope 2's ``clt/<width>/params_layer_{i}.safetensors`` (``w_enc (d_in, d_sae)``,
  ``w_dec (d_sae, n_layers, d_in)``, ``b_enc``, ``b_dec``, ``threshold``, ``affine_skip_connection (d_in, d_in)``;
  the keys ``load_gemma_scope_2_clt`` reads). No library writes this layout, so the files are written here with
  safetensors and read by ``load_gemma_scope_2_clt``. That function stacks ``range(max(paths))`` layers, i.e. one
  fewer than the keys it is given (``paths`` from ``enumerate``), so it is passed one extra, unused key.

Golden outputs: ``encode`` (latents per layer) and ``forward`` (each layer's output: the sum of the decoders writing
to it, + ``b_dec`` + skip) on ``x (n_layers, n_pos, d_model)``. Nothing from circuit-tracer is copied here.

    /work/wt/hub-refvenv/ls/bin/python scripts/make_clt_fixtures.py tests/fixtures/golden/clt
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

N, D, F, P = 3, 8, 16, 5


def _rand(g: torch.Generator, *shape: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def main(out: Path) -> None:
    from circuit_tracer.transcoder.cross_layer_transcoder import (
        CrossLayerTranscoder,
        load_clt,
        load_gemma_scope_2_clt,
    )

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifest: dict = {}
    cpu = torch.device("cpu")
    for seed, (name, act) in enumerate((("circuit_tracer_relu", "relu"), ("circuit_tracer_jumprelu", "jump_relu"))):
        g = torch.Generator().manual_seed(seed)
        clt = CrossLayerTranscoder(N, F, D, activation_function=act, lazy_decoder=False, device=cpu,
                                   dtype=torch.float32)
        with torch.no_grad():
            clt.W_enc.copy_(_rand(g, N, F, D))
            clt.b_enc.copy_(_rand(g, N, F, scale=0.1))
            clt.b_dec.copy_(_rand(g, N, D, scale=0.1))
            for i in range(N):
                clt.W_dec[i].copy_(_rand(g, F, N - i, D))
            if act == "jump_relu":
                clt.activation_function.threshold.copy_(torch.rand(N, 1, F, generator=g) * 0.3)
        folder = out / name
        clt.to_safetensors(str(folder))
        ref = load_clt(str(folder), device=cpu, dtype=torch.float32, lazy_decoder=False)
        x = torch.randn(N, P, D, generator=g)
        with torch.no_grad():
            save_file({"x": x, "latents": ref.encode(x).contiguous(), "out": ref(x).contiguous()},
                      str(folder / "golden.safetensors"))
        manifest[name] = {"layout": "circuit_tracer", "n_layers": N, "jumprelu": act == "jump_relu"}

    g = torch.Generator().manual_seed(7)
    folder = out / "gemma_scope_2_affine" / "clt" / "width_16_l0_medium_affine"
    folder.mkdir(parents=True)
    for i in range(N):
        save_file({"w_enc": _rand(g, D, F), "w_dec": _rand(g, F, N, D), "b_enc": _rand(g, F, scale=0.1),
                   "b_dec": _rand(g, D, scale=0.1), "threshold": torch.rand(F, generator=g) * 0.3,
                   "affine_skip_connection": _rand(g, D, D, scale=0.1)},
                  str(folder / f"params_layer_{i}.safetensors"))
    paths = {i: str(folder / f"params_layer_{i}.safetensors") for i in range(N)}
    paths[N] = paths[N - 1]  # see the module docstring: the function loads range(max(paths)) layers
    ref = load_gemma_scope_2_clt(paths, device=cpu, dtype=torch.float32)
    x = torch.randn(N, P, D, generator=g)
    with torch.no_grad():  # forward() refuses a skip connection; decode(input_acts=x) adds x @ W_skip[layer]
        lat = ref.encode(x)
        save_file({"x": x, "latents": lat.contiguous(), "out": ref.decode(lat.to_sparse(), input_acts=x).contiguous()},
                  str(out / "gemma_scope_2_affine" / "golden.safetensors"))
    manifest["gemma_scope_2_affine"] = {"layout": "gemma_scope_2", "n_layers": N, "jumprelu": True,
                                        "folder": "gemma_scope_2_affine/clt/width_16_l0_medium_affine"}
    import importlib.metadata as md

    env = {"circuit-tracer": md.version("circuit-tracer"), "torch": torch.__version__, "commit": "4bb8c0e"}
    (out / "manifest.json").write_text(json.dumps({"environment": env, "fixtures": manifest}, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
