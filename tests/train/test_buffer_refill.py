"""The shuffle buffer's one-pass refill: exactly ``cat(kept rows, new chunks)[perm]`` for its generator's
permutation, the same permutation for every site (rows stay aligned)."""

from __future__ import annotations

import torch

from sae_hooks.train import IteratorSource, ShuffleBuffer


def test_refill_is_the_concatenation_permuted_by_the_generator() -> None:
    g = torch.Generator().manual_seed(0)
    chunks = [{"a": torch.randn(5, 3, generator=g), "b": torch.randn(5, 2, generator=g)} for _ in range(5)]
    buf = ShuffleBuffer(IteratorSource(chunks, sites=["a", "b"]), batch_tokens=4, size_tokens=15, refill_at=0.5, seed=7)
    ref = torch.Generator().manual_seed(7)
    first = buf.next_batch()  # fills with chunks 0-2, serves 4 rows
    perm = torch.randperm(15, generator=ref)
    rows = {s: torch.cat([c[s] for c in chunks[:3]])[perm] for s in "ab"}
    for s in "ab":
        assert torch.equal(first[s], rows[s][:4])
    buf.next_batch()  # 11 -> 7 rows left; 7 <= refill_at * size: the next call refills
    kept = {s: rows[s][8:] for s in "ab"}
    third = buf.next_batch()
    perm2 = torch.randperm(17, generator=ref)  # 7 kept rows + chunks 3 and 4 (filled until >= 15)
    for s in "ab":
        expected = torch.cat([kept[s], chunks[3][s], chunks[4][s]])[perm2]
        assert torch.equal(third[s], expected[:4])
