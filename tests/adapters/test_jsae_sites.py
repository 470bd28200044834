"""Jacobian pairs and TL names on Hugging Face models (issue 10 item 7): ``check_mlp_input`` takes TL names on a
plain HF model, and on Gemma (whose ``hook_mlp_out`` is after a post-MLP norm the Jacobian does not include)
it names the sites that do match. Truth: the frozen MLP applied to the real MLP input equals the real MLP
output at the suggested sites (checked by raw hooks here)."""

from __future__ import annotations

import copy

import pytest
import torch

from sae_hooks.errors import ConfigError
from sae_hooks.saes.jacobian import make_jsae_pair
from sae_hooks.train.jsae import check_mlp_input

transformers = pytest.importorskip("transformers")
from conftest import hf_family_cases as _cases, randomize_norms  # noqa: E402


def _model(name):
    cfg, cls, _ = _cases()[name]
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    randomize_norms(hf, seed=3)
    return hf


def _mlp(hf):
    return hf.transformer.h[1].mlp if hasattr(hf, "transformer") else hf.model.layers[1].mlp


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2"])
def test_check_mlp_input_with_tl_names_on_hf_models(name) -> None:
    hf = _model(name)
    tokens = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(5))
    mlp = _mlp(hf)
    # the raw truth: the real MLP's input and output
    seen = {}
    h1 = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    h2 = mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    with torch.no_grad():
        hf(tokens)
    h1.remove(), h2.remove()
    good = make_jsae_pair(copy.deepcopy(mlp), 1, 64, 4, hook_in="blocks.1.ln2.hook_out", hook_out="blocks.1.mlp.hook_out")
    torch.testing.assert_close(good.mlp(seen["in"]), seen["out"], atol=1e-4, rtol=1e-4)
    assert check_mlp_input(hf, good, tokens) < 1e-4
    # the paper's legacy names: hook_normalized is pre-affine, and Gemma's hook_mlp_out is after a norm
    legacy = make_jsae_pair(copy.deepcopy(mlp), 1, 64, 4)
    assert legacy.cfg.hook_in == "blocks.1.ln2.hook_normalized"
    with pytest.raises(ConfigError, match="hook_in='blocks.1.ln2.hook_out', hook_out='blocks.1.(hook_mlp_out|mlp.hook_out)'"):
        check_mlp_input(hf, legacy, tokens)
    if name == "gemma2":
        gemma_out = make_jsae_pair(copy.deepcopy(mlp), 1, 64, 4, hook_in="blocks.1.ln2.hook_out")
        with pytest.raises(ConfigError, match="hook_out='blocks.1.mlp.hook_out'"):
            check_mlp_input(hf, gemma_out, tokens)
