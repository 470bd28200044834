"""TransformerLens and nnsight models as live training sources: the activations a source delivers equal a
hand-captured truth (forward hooks on the Hugging Face modules, random non-trivial norm weights), sites in
any spelling, and a short training run gives the same SAE as on the plain Hugging Face model."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomize_norms, tiny_hf_gpt2, tl_major
from sae_hooks import make_sae
from sae_hooks.train import IteratorSource, LiveSource, ShuffleBuffer, Trainer, TrainEntry, TrainSettings

pytest.importorskip("transformers")

#: site as given -> (HF module path, "output" | "input") where the same tensor is hooked by hand.
SITES = {
    "blocks.0.hook_resid_post": ("transformer.h.0", "output"),
    "blocks.0.ln2.hook_out": ("transformer.h.0.ln_2", "output"),  # MLP input: after ln_2's (random) affine
    "blocks.1.mlp.hook_in": ("transformer.h.1.mlp", "input"),
    "blocks.1.hook_mlp_out": ("transformer.h.1.mlp", "output"),
}
#: module-path spellings per framework (a TL 4.3 bridge rewires the HF tree below each block, so there
#: only block paths are module paths; through nnsight every HF path is)
PATHS = {
    "bridge": {"transformer.h.1": ("transformer.h.1", "output")},
    "nnsight": {"transformer.h.1.mlp:input": ("transformer.h.1.mlp", "input"),
                "transformer.h.0.ln_2": ("transformer.h.0.ln_2", "output")},
}


def _hf():
    hf = tiny_hf_gpt2()
    randomize_norms(hf, seed=5)
    return hf


def _wrap(kind: str, hf):
    if kind == "torch":
        return hf
    if kind == "bridge":
        if (tl_major() or 0) < 4:
            pytest.skip("TransformerBridge needs TransformerLens 4")
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        return build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config)
    if kind == "nnsight":
        nnsight = pytest.importorskip("nnsight")
        return nnsight.NNsight(hf)
    raise ValueError(kind)


def _batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (3, 12), generator=g)
        ids[:, 0] = 0  # BOS
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0  # right padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _truth(hf, batch, sites: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """The activations at every site by forward hooks on the HF modules, BOS and padding dropped."""
    got, handles = {}, []
    modules = dict(hf.named_modules())
    for site, (path, side) in sites.items():
        if side == "output":
            fn = (lambda s: lambda m, a, o: got.__setitem__(s, (o[0] if isinstance(o, tuple) else o).detach().clone()))(site)
            handles.append(modules[path].register_forward_hook(fn))
        else:
            fn = (lambda s: lambda m, a: got.__setitem__(s, a[0].detach().clone()))(site)
            handles.append(modules[path].register_forward_pre_hook(fn))
    with torch.no_grad():
        hf(**batch)
    for h in handles:
        h.remove()
    keep = batch["attention_mask"].bool() & (batch["input_ids"] != 0)
    return {s: t[keep] for s, t in got.items()}


@pytest.mark.parametrize("kind", ["bridge", "nnsight"])
def test_framework_source_delivers_the_hand_captured_activations(kind: str) -> None:
    hf = _hf()
    ref = copy.deepcopy(hf)  # the truth comes from an unwrapped copy with the same weights
    model = _wrap(kind, hf)
    sites = {**SITES, **PATHS[kind]}
    batches = _batches(2)
    source = LiveSource(model, list(sites), batches, bos_token_id=0)
    for batch in batches:
        chunk = source.next_chunk()
        truth = _truth(ref, batch, sites)
        assert truth["blocks.0.ln2.hook_out"].norm() > 0 and truth["blocks.1.hook_mlp_out"].norm() > 0
        for site in sites:
            # the bridge runs eager attention, the HF model its default kernel: float rounding only
            torch.testing.assert_close(chunk[site], truth[site], rtol=1e-5, atol=1e-5, msg=f"{kind} {site}")
    assert source.next_chunk() is None and source.forward_passes == 2


def test_hooked_transformer_source_reads_its_own_names() -> None:
    """A legacy HookedTransformer (TransformerLens 2.x/3.x): TL names and its own module paths, vs run_with_cache."""
    from conftest import build_tl_model

    model = build_tl_model("hooked_transformer")
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 0
    chunk = LiveSource(model, ["blocks.0.hook_resid_post", "blocks.1.ln2.hook_normalized"], [ids], bos_token_id=0).next_chunk()
    _, cache = model.run_with_cache(ids)
    for site in chunk:
        torch.testing.assert_close(chunk[site], cache[site][:, 1:].reshape(-1, cache[site].shape[-1]))


def _train(model, site: str, steps: int = 6) -> torch.nn.Module:
    batches = _batches(8)
    entry = TrainEntry("e", site, make_sae("topk", 32, 64, k=4), TrainSettings(lr=3e-3, warmup_steps=0, seed=1))
    buffer = ShuffleBuffer(LiveSource(model, [site], batches, bos_token_id=0), batch_tokens=32, size_tokens=128, seed=0)
    Trainer([entry]).fit(buffer, max_steps=steps)
    assert entry.state.step == steps and entry.state.skipped == 0
    return entry.final()


@pytest.mark.parametrize("kind", ["bridge", "nnsight"])
def test_training_through_a_framework_equals_training_on_the_hf_model(kind: str) -> None:
    hf = _hf()
    reference = _train(copy.deepcopy(hf), "transformer.h.0")
    trained = _train(_wrap(kind, hf), "blocks.0.hook_resid_post")
    for name, tensor in reference.state_dict().items():
        # float rounding of the activations only (the bridge runs its own attention kernel), which W_enc's folded
        # input scale magnifies in absolute terms: compare relative to each tensor's norm
        rel = (trained.state_dict()[name] - tensor).norm() / tensor.norm()
        assert rel < 1e-4, (kind, name, rel.item())  # another site or data: ~1
    # and it learned something: the trained SAE reconstructs the activations better than its initialisation
    x = torch.cat([c["blocks.0.hook_resid_post"] for c in iter(LiveSource(_wrap(kind, _hf()), ["blocks.0.hook_resid_post"],
                                                                            _batches(2), bos_token_id=0).next_chunk, None)])
    fresh = make_sae("topk", 32, 64, k=4)
    assert (trained(x) - x).pow(2).sum() < (fresh(x) - x).pow(2).sum()


def test_iterator_source_unchanged_by_the_nnsight_unwrap() -> None:
    """The duck-typed unwrap applies to wrappers holding an nn.Module as _module only, never to plain data."""
    src = IteratorSource([torch.ones(2, 3)], site="x")
    assert torch.equal(src.next_chunk()["x"], torch.ones(2, 3))
