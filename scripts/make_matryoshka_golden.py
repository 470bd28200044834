"""Golden fixture: a SAELens 6 Matryoshka BatchTopK *training* checkpoint (``save_model``, cfg architecture
``matryoshka_batchtopk``) and SAELens's own outputs on it. Run with a venv holding sae-lens 6.54.12 (see
scripts/make_golden_fixtures.py for how those venvs are built; torch pinned to the CPU wheel):

    /work/wt/methods-refvenv/bin/python scripts/make_matryoshka_golden.py

Writes ``tests/fixtures/golden/saelens/matryoshka_batchtopk_training/`` with ``cfg.json``,
``sae_weights.safetensors`` and ``golden.safetensors``:

* ``x`` (15, 8); ``latents`` = SAELens's inference encoding (the checkpoint converted by SAELens's own
  ``save_inference_model`` to a JumpReLU SAE with the learned ``topk_threshold``, reloaded, ``encode``);
  ``recon`` = that SAE's ``forward``;
* ``latents_batch_topk`` = the training SAE's ``encode`` (the batch top-k of the training pass);
* ``prefix_recon_{4,8,16}`` = the training SAE's ``_iterable_decode(latents, include_outer_loss=True)``,
  i.e. SAELens's own nested-prefix reconstructions.

Weights are seeded and every term matters: non-zero biases, decoder rows with norms in [0.5, 2] (SAELens's
``rescale_acts_by_decoder_norm=True`` default then changes the numbers), and a threshold between two observed
activations.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import sae_lens
from sae_lens import SAE
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
from sae_lens.saes.sae import SAEMetadata

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / "saelens" / "matryoshka_batchtopk_training"


def main() -> int:
    g = torch.Generator().manual_seed(4242)
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=8, d_sae=16, k=3.0, matryoshka_widths=[4, 8, 16], apply_b_dec_to_input=True,
        metadata=SAEMetadata(model_name="tiny-model", hook_name="blocks.0.hook_resid_pre", context_size=16, prepend_bos=True),
    )
    sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(8, 16, generator=g) * 1.5 / 8**0.5)
        w = torch.randn(16, 8, generator=g)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True) * (0.5 + 1.5 * torch.rand(16, 1, generator=g)))
        sae.b_enc.copy_(torch.randn(16, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(8, generator=g) * 0.3)
    x = torch.randn(15, 8, generator=g)
    with torch.no_grad():
        acts = sae.encode(x)  # batch top-k, scaled by the decoder norms
        vals = acts[acts > 0].sort().values
        m = len(vals) // 2
        sae.topk_threshold.fill_(float(vals[m - 1] + vals[m]) / 2)
    OUT.mkdir(parents=True, exist_ok=True)
    sae.save_model(str(OUT))
    loaded = MatryoshkaBatchTopKTrainingSAE.load_from_disk(str(OUT), device="cpu")
    loaded.eval()
    with tempfile.TemporaryDirectory() as tmp:
        loaded.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp, device="cpu")
        inference.eval()
        with torch.no_grad():
            latents = inference.encode(x)
            recon = inference(x)
    tensors = {"x": x, "latents": latents, "recon": recon}
    with torch.no_grad():
        tensors["latents_batch_topk"] = loaded.encode(x)
        for width, rec in loaded._iterable_decode(latents, include_outer_loss=True):
            tensors[f"prefix_recon_{width}"] = rec
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "golden.safetensors"),
              metadata={"library": "sae_lens", "version": sae_lens.__version__})
    (OUT / "README.md").write_text(
        f"Made by scripts/make_matryoshka_golden.py with sae-lens {sae_lens.__version__}, torch {torch.__version__}.\n"
        "MatryoshkaBatchTopKTrainingSAE.save_model (training checkpoint, cfg architecture 'matryoshka_batchtopk').\n"
        + json.dumps({k: list(v.shape) for k, v in tensors.items()}) + "\n"
    )
    print(f"wrote {OUT}: latents active {(latents > 0).float().mean():.2f}, threshold {float(sae.topk_threshold):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
