#!/usr/bin/env python3
"""Golden circuit-tracer transcoder fixtures (``layer_N.safetensors``), written and evaluated by circuit-tracer itself.

Runs INSIDE a venv with ``circuit_tracer`` at decoderesearch/circuit-tracer@4bb8c0e (installed ``--no-deps`` next to
``torch==2.13.0``, ``transformer-lens<3``): ``SingleLayerTranscoder.to_safetensors`` writes each file and
``load_transcoder(path, layer, ...)`` reads it back; its ``encode``/``decode``/``forward`` on ``x`` (5, 3, d_model)
are the golden outputs. Nothing from circuit-tracer is copied here.

    /work/wt/hub-refvenv/ls/bin/python scripts/make_circuit_tracer_fixtures.py tests/fixtures/golden/circuit_tracer
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F_
from safetensors.torch import save_file

D, F = 8, 16


def main(out: Path) -> None:
    from circuit_tracer.transcoder.activation_functions import JumpReLU, TopK
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, load_transcoder

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cases = {"relu": (3, None, False), "jumprelu": (4, "jumprelu", False), "jumprelu_skip": (5, "jumprelu", True)}
    # No TopK case: to_safetensors writes a "k" tensor that load_transcoder then rejects ("Unexpected key(s) in
    # state_dict: 'k'") at this commit, so circuit-tracer cannot read its own TopK files back.
    manifest = {}
    for name, (layer, act, skip) in cases.items():
        g = torch.Generator().manual_seed(layer)
        folder = out / name
        folder.mkdir()
        if act == "jumprelu":
            fn = JumpReLU(torch.rand(F, generator=g) * 0.6 + 0.1, 0.1)
        elif act == "topk":
            fn = TopK(3)
        else:
            fn = F_.relu
        tc = SingleLayerTranscoder(D, F, fn, layer, skip_connection=skip, device=torch.device("cpu"),
                                   dtype=torch.float32)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(F, D, generator=g) * 0.7)
            tc.W_dec.copy_(torch.randn(F, D, generator=g) * 0.7)
            tc.b_enc.copy_(torch.randn(F, generator=g) * 0.4)
            tc.b_dec.copy_(torch.randn(D, generator=g) * 0.3)
            if skip:
                tc.W_skip.copy_(torch.randn(D, D, generator=g) * 0.3)
        path = folder / f"layer_{layer}.safetensors"
        tc.to_safetensors(str(path))
        ref = load_transcoder(str(path), layer, activation_fn=TopK(3) if act == "topk" else None,
                              device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
        x = torch.randn(5, 3, D, generator=torch.Generator().manual_seed(100 + layer)) * 2.0
        with torch.no_grad():
            lat = ref.encode(x)
            golden = {"x": x, "latents": lat, "decoded": ref.decode(lat, x if skip else None), "recon": ref(x)}
        save_file({k: v.contiguous() for k, v in golden.items()}, str(folder / "golden.safetensors"))
        manifest[name] = {"file": f"{name}/{path.name}", "layer": layer,
                          "l0": float((lat != 0).float().sum(-1).mean())}
    import importlib.metadata as md

    env = {p: md.version(p) for p in ("circuit-tracer", "torch", "safetensors")}
    env["commit"] = "4bb8c0e"
    (out / "manifest.json").write_text(json.dumps({"environment": env, "fixtures": manifest}, indent=1) + "\n")
    print(env, len(manifest))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
