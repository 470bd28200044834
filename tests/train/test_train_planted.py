"""Planted-dictionary recovery: d=32, 64 unit features, 3 active per sample (magnitudes U[0.5, 1.5]).

Metric: for each planted feature, the max cosine similarity with any decoder row; averaged over the
64 features ("mean max cosine similarity", MMCS). Threshold 0.9.
"""

from __future__ import annotations

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.train import Trainer, TrainEntry, TrainSettings

from conftest import PLANTED_ACTIVE as ACTIVE, PLANTED_D_IN as D_IN, PLANTED_FEATURES as N_FEATURES, planted_batches, planted_dictionary


def mmcs(dictionary: torch.Tensor, W_dec: torch.Tensor) -> float:
    W = W_dec / W_dec.norm(dim=-1, keepdim=True)
    return (dictionary @ W.T).max(-1).values.mean().item()


CASES = {
    "topk": (dict(k=3), TrainSettings(lr=3e-3)),
    "relu": ({}, TrainSettings(lr=3e-3, arch={"l1_coefficient": 1.5})),
    "jumprelu": ({}, TrainSettings(lr=1e-2, arch={"l0_coefficient": 0.5, "init_threshold": 1.0, "bandwidth": 0.05})),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(CASES))
def test_planted_features_recovered(arch: str) -> None:
    torch.manual_seed(0)
    dictionary = planted_dictionary()
    extra, settings = CASES[arch]
    sae = make_sae(arch, D_IN, 128, **extra)
    entry = TrainEntry(arch, "x", sae, settings)
    steps = 600
    Trainer([entry]).fit(planted_batches(dictionary, steps, 256), max_steps=steps)
    score = mmcs(dictionary, sae.W_dec.detach())
    print(f"{arch}: MMCS {score:.4f}, metrics {entry.state.metrics}")
    assert score >= 0.9, f"{arch} recovered planted features with MMCS {score:.3f} < 0.9"
    # A random decoder scores far lower: the test can fail.
    assert mmcs(dictionary, torch.randn(128, D_IN)) < 0.7


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["batchtopk", "gated"])
def test_other_architectures_learn(arch: str) -> None:
    """BatchTopK and Gated recover the planted features too (MMCS ≈ 0.96 / 0.97 in 600 steps; Gated
    was ≈ 0.65 before its encoder started at norm 0.1), reduce FVU, and have sane sparsity."""
    dictionary = planted_dictionary()
    extra = dict(k=3) if arch == "batchtopk" else dict(apply_b_dec_to_input=True)
    sae = make_sae(arch, D_IN, 128, **extra)
    entry = TrainEntry(arch, "x", sae, TrainSettings(lr=3e-3, arch={"l1_coefficient": 5.0} if arch == "gated" else {}))
    Trainer([entry]).fit(planted_batches(dictionary, 600, 256), max_steps=600)
    m = entry.state.metrics
    score = mmcs(dictionary, sae.W_dec.detach())
    print(f"{arch}: MMCS {score:.4f}, metrics {m}")
    assert score >= 0.9, f"{arch} recovered planted features with MMCS {score:.3f} < 0.9"
    assert m["fvu"] < 0.3
    assert m["l0"] < 8 if arch == "gated" else m["l0"] < 20
    if arch == "batchtopk":
        # Inference with the learned threshold gives about k active latents per token.
        x = next(planted_batches(dictionary, 1, 2048, seed=9))
        f = entry.final_sae().encode(x)
        assert 1.5 <= (f > 0).sum(-1).float().mean().item() <= 6
        assert float(sae.threshold) > 0
