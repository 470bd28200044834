"""TransformerLens 4.3's bridge gives wrong logits in KV-cached generate (issue 10): the adapter warns once,
and ``use_past_kv_cache=False`` (what the docs pass) gives Hugging Face ``generate``'s tokens."""

from __future__ import annotations

import copy
import importlib.metadata
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformer_lens.model_bridge")


def test_kv_cache_warning_and_exact_generation_without_cache() -> None:
    if not importlib.metadata.version("transformer_lens").startswith("4.3."):
        pytest.skip("the defect and the warning concern TransformerLens 4.3")
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    from sae_hooks.adapters import transformer_lens as tl_adapter
    from sae_hooks.app.default_model import default_model_path

    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = tl_adapter.attach(build_bridge_from_module(copy.deepcopy(hf), "GPT2LMHeadModel", hf_config=hf.config))
    tokens = torch.tensor([[0, 464, 2068, 318, 257, 1332]])
    kw = dict(max_new_tokens=12, do_sample=False, verbose=False, stop_at_eos=False)
    with torch.no_grad():
        truth = hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=12, do_sample=False,
                            pad_token_id=0)
        tl_adapter._warned.clear()
        with pytest.warns(UserWarning, match="use_past_kv_cache=False"):
            bridge.generate(tokens, **kw)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")  # once per process: no second warning, none without the cache
            bridge.generate(tokens, **kw)
            exact = bridge.generate(tokens, use_past_kv_cache=False, **kw)
        assert not [w for w in seen if "use_past_kv_cache=False" in str(w.message)]
    assert torch.equal(exact, truth)
