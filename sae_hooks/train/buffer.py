"""A shuffling activation buffer, sized in tokens, that keeps sites aligned row by row.

The buffer fills to ``size_tokens`` rows from a source, shuffles them (one permutation shared by all
sites), and serves ``batch_tokens`` rows per batch until only ``refill_at * size_tokens`` remain; then
it refills and reshuffles, so old and new rows mix (as in SAELens's mixing buffer). Defaults work
together: 2**16-token buffer, 4096-token batches, refill at half (8 batches per refill). At the end
of the source the remaining rows are served; a final partial batch is dropped unless
``drop_last=False``.

``state_dict()`` holds everything needed to continue exactly: the rows still in the buffer, the
generator state, and the source's position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .sources import ActivationSource, Chunk


class ShuffleBuffer:
    def __init__(
        self,
        source: ActivationSource,
        batch_tokens: int = 4096,
        size_tokens: int = 2**16,
        refill_at: float = 0.5,
        seed: int = 0,
        drop_last: bool = True,
        device: str | torch.device | None = None,
    ):
        if batch_tokens <= 0 or size_tokens < batch_tokens:
            raise ConfigError(f"buffer size_tokens={size_tokens} must be >= batch_tokens={batch_tokens} > 0")
        if not 0.0 <= refill_at < 1.0:
            raise ConfigError(f"refill_at must be in [0, 1), got {refill_at}")
        self.source = source
        self.sites = list(source.sites)
        self.batch_tokens = batch_tokens
        self.size_tokens = size_tokens
        self.refill_rows = max(int(refill_at * size_tokens), 0)
        self.drop_last = drop_last
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: Chunk = {}
        self.exhausted = False
        self.tokens_served = 0

    def __len__(self) -> int:
        return 0 if not self.rows else next(iter(self.rows.values())).shape[0]

    def _refill(self) -> None:
        parts: list[Chunk] = [self.rows] if len(self) else []
        n = len(self)
        while n < self.size_tokens and not self.exhausted:
            chunk = self.source.next_chunk()
            if chunk is None:
                self.exhausted = True
                break
            missing = [s for s in self.sites if s not in chunk]
            if missing:
                raise ConfigError(f"source chunk lacks sites {missing}")
            parts.append({s: chunk[s] for s in self.sites})
            n += chunk[self.sites[0]].shape[0]
        if not parts:
            return
        # One pass per site: every row (kept or new) is written once to its place in a fresh buffer
        # (no concatenation first: half the memory traffic of cat + gather). The order is exactly
        # ``cat(parts)[perm]``: row j goes to where perm puts it, ``inverse(perm)[j]``.
        perm = torch.randperm(n, generator=self.generator)
        pos = torch.empty_like(perm)
        pos[perm] = torch.arange(n)
        rows = {}
        for s in self.sites:
            first = parts[0][s]
            out = torch.empty((n, *first.shape[1:]), dtype=first.dtype, device=first.device)
            where = pos.to(first.device)
            a = 0
            for p in parts:
                t = p[s]
                out.index_copy_(0, where[a : a + t.shape[0]], t.to(out.device, out.dtype))
                a += t.shape[0]
            rows[s] = out
        self.rows = rows

    def next_batch(self) -> dict[str, Tensor] | None:
        """``{site: (batch_tokens, d)}`` or ``None`` when the source and the buffer are empty."""
        if len(self) <= self.refill_rows or len(self) < self.batch_tokens:
            if not self.exhausted:
                self._refill()
        n = len(self)
        if n == 0 or (n < self.batch_tokens and (self.drop_last or not self.exhausted)):
            if self.exhausted:
                self.rows = {}
            return None
        take = min(self.batch_tokens, n)
        batch = {s: t[:take] for s, t in self.rows.items()}
        self.rows = {s: t[take:] for s, t in self.rows.items()}
        self.tokens_served += take
        if self.device is not None:
            batch = {s: t.to(self.device, non_blocking=True) for s, t in batch.items()}
        return batch

    def __iter__(self):
        while (batch := self.next_batch()) is not None:
            yield batch

    # Checkpointing -------------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``(json_state, tensors)``: the source position and counters, and the buffered rows + RNG."""
        meta = {"source": self.source.state_dict(), "exhausted": self.exhausted, "tokens_served": self.tokens_served,
                "batch_tokens": self.batch_tokens}
        tensors = {f"rows.{s}": t.contiguous().cpu() for s, t in self.rows.items()}
        tensors["generator"] = self.generator.get_state()
        return meta, tensors

    def load_state_dict(self, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        saved = meta.get("batch_tokens")
        if saved is not None and saved != self.batch_tokens:  # another batch size would not continue the same run
            raise ConfigError(
                f"the checkpoint was taken with batch_tokens={saved}, this buffer serves {self.batch_tokens}; "
                f"resume with the same batch size (--batch-tokens {saved})"
            )
        self.source.load_state_dict(meta["source"])
        self.exhausted = bool(meta["exhausted"])
        self.tokens_served = int(meta["tokens_served"])
        self.generator.set_state(tensors["generator"])
        self.rows = {s: tensors[f"rows.{s}"] for s in self.sites if f"rows.{s}" in tensors}
