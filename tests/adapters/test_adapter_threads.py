"""One attached model run from several threads at once, through the TransformerLens bridge, nnsight and a
cross-layer transcoder: every call gets what it gets alone (its own token filter, positions and capture).

The truth is the same calls run one at a time. (The torch adapter's version is
``tests/reliability/test_attach_threads.py``.) TransformerLens's own hooks (``run_with_cache``,
``run_with_hooks``) and nnsight traces are model-global in those libraries, so concurrent *traces* use one
nnsight model per thread; concurrent plain calls share one model.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch

from conftest import build_tl_model, random_relu_sae, run_concurrently, tiny_hf_gpt2, token_batches

N_THREADS, CALLS, SKIPPED = 4, 6, 7


def _sae(seed: int = 3) -> torch.nn.Module:
    return random_relu_sae(seed=seed)


def _inputs() -> list[torch.Tensor]:
    return token_batches(N_THREADS * CALLS, SKIPPED)  # the filtered token, at a different position in each input


def _concurrently(run: Callable[[int, torch.Tensor], torch.Tensor], inputs: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """``{i: run(thread, inputs[i])}`` with the inputs spread over ``N_THREADS`` threads started together."""
    return run_concurrently(run, inputs, N_THREADS)


def _assert_same(got: dict[int, torch.Tensor], expected: list[torch.Tensor]) -> None:
    wrong = [i for i in range(len(expected)) if i not in got or not torch.equal(got[i], expected[i])]
    assert wrong == [], f"{len(wrong)} of {len(expected)} concurrent calls differ from their single-thread result"


@pytest.mark.parametrize("kind", ["bridge_hf", "bridge_native", "hooked_transformer"])
def test_transformer_lens_threads(kind: str) -> None:
    from sae_hooks.adapters.transformer_lens import attach

    torch.set_num_threads(1)
    model = attach(build_tl_model(kind))
    att = model.add_sae(_sae(), "blocks.0.hook_resid_post", skip_tokens=[SKIPPED], error_term=True)
    att.ablate([1, 2, 3, 4, 5])  # the edit moves the output at every position the token filter lets through

    def run(t: int, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids)

    inputs = _inputs()
    expected = [run(0, ids) for ids in inputs]
    _assert_same(_concurrently(run, inputs), expected)
    # The filter is exercised: without it (and without the edit) the outputs differ.
    with torch.no_grad():
        unfiltered = model.add_sae(_sae(), "blocks.0.hook_resid_post", error_term=True, replace=True)
        unfiltered.ablate([1, 2, 3, 4, 5])
        assert not torch.allclose(model(inputs[0]), expected[0], atol=1e-4)
        unfiltered.clear_edits()
        assert not torch.allclose(model(inputs[0]), expected[0], atol=1e-4)


def test_nnsight_plain_calls_share_one_model() -> None:
    nnsight = pytest.importorskip("nnsight")
    from sae_hooks.adapters.nnsight import attach

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    model = attach(nnsight.NNsight(tiny_hf_gpt2()))
    model.add_sae(_sae(), "blocks.0.hook_resid_post", skip_tokens=[SKIPPED])

    def run(t: int, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), model.sae_capture("*.hook_sae_acts_post") as cache:
            logits = model(ids).logits
        (acts,) = cache.values()  # this thread's forward only
        return torch.cat([logits.flatten(), acts.flatten()])

    inputs = _inputs()
    expected = [run(0, ids) for ids in inputs]
    _assert_same(_concurrently(run, inputs), expected)


def test_nnsight_traces_one_model_per_thread() -> None:
    nnsight = pytest.importorskip("nnsight")
    from sae_hooks.adapters.nnsight import attach

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    hf, sae = tiny_hf_gpt2(), _sae()
    models = []
    for _ in range(N_THREADS):  # one SAE object shared by every model
        m = attach(nnsight.NNsight(copy.deepcopy(hf)))
        m.add_sae(sae, "blocks.0.hook_resid_post", skip_tokens=[SKIPPED], error_term=True)
        models.append(m)

    def run(t: int, ids: torch.Tensor) -> torch.Tensor:
        model = models[t]
        with torch.no_grad(), model.trace(ids):
            taps = model.sae_taps["blocks.0.hook_resid_post"]
            acts = taps.hook_sae_acts_post.output.clone().save()
            taps.hook_sae_acts_post.output[:, :, :8] = 0
            logits = model.output.logits.save()
        return torch.cat([logits.flatten(), acts.flatten()])

    inputs = _inputs()
    expected = [run(0, ids) for ids in inputs]
    _assert_same(_concurrently(run, inputs), expected)


def test_cross_layer_transcoder_threads() -> None:
    """A CLT keeps each forward pass's latents until its later layers decode them: per thread."""
    from sae_hooks.adapters.torch import attach
    from sae_hooks.saes.clt import CrossLayerTranscoder

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n, d, f = 2, 32, 48
    r = lambda *s, sc=0.3: torch.randn(*s, generator=g) * sc  # noqa: E731
    clt = CrossLayerTranscoder(r(n, d, f), r(n, f, sc=0.1), [r(f, n - i, d) for i in range(n)], r(n, d, sc=0.1),
                               threshold=torch.rand(n, f, generator=g) * 0.2)
    model = attach(tiny_hf_gpt2())
    model.add_sae(clt, site=["transformer.h.0.ln_2", "transformer.h.1.ln_2"],
                  site_out=["transformer.h.0.mlp", "transformer.h.1.mlp"])

    def run(t: int, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits

    inputs = _inputs()
    expected = [run(0, ids) for ids in inputs]
    _assert_same(_concurrently(run, inputs), expected)
