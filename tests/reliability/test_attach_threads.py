"""One attached model used from several threads at once gives every call the outputs and captures it
gets alone: the per-forward state (tokens for ``skip_tokens``, positions, captures) belongs to the
thread running the forward pass."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import random_relu_sae, run_concurrently, tiny_hf_gpt2, token_batches
from sae_hooks.adapters.torch import attach

N_THREADS, CALLS = 4, 12


def _sae() -> torch.nn.Module:
    return random_relu_sae()


def _inputs() -> list[torch.Tensor]:
    return token_batches(N_THREADS * CALLS, 7)  # 7 is skipped, at a different position in each input


def _run(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), model.sae_capture("*.hook_sae_acts_post") as cache:
        logits = model(ids).logits
    (acts,) = cache.values()
    return logits, acts


def test_concurrent_calls_equal_their_single_thread_results() -> None:
    torch.set_num_threads(1)
    model = attach(tiny_hf_gpt2())
    model.add_sae(_sae(), site="transformer.h.0", skip_tokens=[7], error_term=False)
    inputs = _inputs()
    expected = [_run(model, ids) for ids in inputs]  # one at a time
    got = run_concurrently(lambda t, ids: _run(model, ids), inputs, N_THREADS)
    wrong = [i for i in range(len(inputs))
             if not (torch.equal(got[i][0], expected[i][0]) and torch.equal(got[i][1], expected[i][1]))]
    assert wrong == [], f"{len(wrong)} of {len(inputs)} concurrent calls differ from their single-thread result"
    # The skipped token really was skipped (no latents there), so the test exercises the token filter.
    ids, (_, acts) = inputs[0], expected[0]
    assert bool((acts[ids == 7] == 0).all()) and bool((acts[ids != 7] != 0).any())


def test_a_capture_records_only_its_own_thread(tmp_path) -> None:  # noqa: ANN001
    model = attach(tiny_hf_gpt2())
    model.add_sae(_sae(), site="transformer.h.0")
    started, done = threading.Event(), threading.Event()

    def other() -> None:
        started.set()
        with torch.no_grad():
            while not done.is_set():
                model(torch.randint(1, 100, (1, 9)))

    th = threading.Thread(target=other)
    th.start()
    started.wait()
    try:
        for _ in range(10):
            ids = torch.randint(1, 100, (3, 5))
            with torch.no_grad(), model.sae_capture("*.hook_sae_acts_post") as cache:
                model(ids)
            (acts,) = cache.values()
            assert acts.shape[:2] == (3, 5)  # never the other thread's (1, 9) forward
    finally:
        done.set()
        th.join(timeout=60)


@pytest.mark.parametrize("n", [2])
def test_generation_state_is_per_thread(n: int) -> None:
    """Two threads generating with one attached model keep their own absolute positions."""
    model = attach(tiny_hf_gpt2())
    att = model.add_sae(_sae(), site="transformer.h.0", error_term=True)
    att.steer(3, 2.0, positions=[4])  # steer only absolute position 4
    prompts = [torch.randint(1, 100, (1, 3), generator=torch.Generator().manual_seed(s)) for s in range(n)]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        alone = [model.generate(p, **kw) for p in prompts]

    def generate(t: int, prompt: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(prompt, **kw)

    got = run_concurrently(generate, prompts, n)  # thread i generates from prompt i
    for i in range(n):
        assert torch.equal(got[i], alone[i])
