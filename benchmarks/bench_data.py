#!/usr/bin/env python
"""Does the data path keep up with training? Tokens/s delivered vs consumed, in one process.

* live: a randomly initialised GPT-2-small-shaped model (768 wide, 12 layers) read at
  ``transformer.h.<layer>`` by :class:`LiveSource` (forward stopped after that block), alone and
  through a :class:`ShuffleBuffer`; the buffer alone over in-memory chunks; and the TopK SAE training
  step alone (``d_sae``, ``k``) on batches of the same size. The buffer must cost a small fraction
  of the step; the model forward is what a live run waits for on CPU.
* disk: :func:`save_activations` writing ``--disk-tokens`` activations (a one-layer embedding model, so the
  time is the store's own: reading the site, safetensors shards, atomic folder) vs
  :class:`DiskSource` replaying them shuffled (shard order and rows) through a :class:`ShuffleBuffer`.

    python benchmarks/bench_data.py [--device cpu] [--batch-tokens 4096] [--disk-tokens 262144]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch import nn


def gpt2_small(device: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval().to(device).requires_grad_(False)


def rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:12,.0f} tok/s"


def drain(buffer, limit: int) -> int:  # noqa: ANN001
    n = 0
    while n < limit and (b := buffer.next_batch()) is not None:
        n += next(iter(b.values())).shape[0]
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--seqs", type=int, default=8, help="sequences per forward pass")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--forwards", type=int, default=12, help="forward passes timed for the live source")
    ap.add_argument("--d-sae", type=int, default=32768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--disk-tokens", type=int, default=2**18)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sae_hooks import make_sae
    from sae_hooks.train import DiskSource, IteratorSource, LiveSource, ShuffleBuffer, TrainEntry, TrainSettings, save_activations

    g = torch.Generator().manual_seed(0)
    model = gpt2_small(args.device)
    site = f"transformer.h.{args.layer}"
    ids = torch.randint(1, 50257, (args.forwards * args.seqs, args.seq_len), generator=g)
    ids[:, 0] = 0
    batches = [ids[i * args.seqs : (i + 1) * args.seqs] for i in range(args.forwards)]
    per_forward = args.seqs * (args.seq_len - 1)
    print(f"device {args.device}, {args.threads} threads; GPT-2-small shape (random), site {site}, "
          f"{args.seqs}x{args.seq_len} tokens per forward, {args.batch_tokens}-token training batches")

    # Live source alone (one forward per chunk, stopped after the site).
    LiveSource(model, [site], batches[:1], bos_token_id=0).next_chunk()  # warm-up
    src = LiveSource(model, [site], batches, bos_token_id=0)
    t = time.perf_counter()
    n_live = 0
    while (c := src.next_chunk()) is not None:
        n_live += c[site].shape[0]
    t_live = time.perf_counter() - t
    print(f"live source (model forward)          {rate(n_live, t_live)}")

    # The same forwards through a shuffle buffer. drop_last=False: this stream is finite and shorter
    # than a long run, so a dropped final partial batch would read as buffer cost.
    buf = ShuffleBuffer(LiveSource(model, [site], batches, bos_token_id=0), batch_tokens=args.batch_tokens,
                        size_tokens=4 * args.batch_tokens, drop_last=False, device=args.device)
    t = time.perf_counter()
    n_buf = drain(buf, 10**12)
    t_buf = time.perf_counter() - t
    assert n_buf == n_live, (n_buf, n_live)
    print(f"live source + shuffle buffer         {rate(n_buf, t_buf)}   (forward share {t_live / t_buf:.0%})")

    # The buffer alone: in-memory chunks of one forward's size.
    chunks = [torch.randn(per_forward, 768, generator=g) for _ in range(16)]
    buf = ShuffleBuffer(IteratorSource(lambda: iter(chunks * 8), site=site), batch_tokens=args.batch_tokens,
                        size_tokens=2**16, device=args.device)
    t = time.perf_counter()
    n_mem = drain(buf, 10**12)
    t_mem = time.perf_counter() - t
    print(f"shuffle buffer alone (in memory)     {rate(n_mem, t_mem)}")

    # What training consumes.
    entry = TrainEntry("sae", site, make_sae("topk", 768, args.d_sae, k=args.k), TrainSettings(lr=1e-4, warmup_steps=10, init_batches=1),
                       device=args.device)
    xs = [torch.randn(args.batch_tokens, 768, generator=g).to(args.device) for _ in range(2)]
    entry.train_step(xs[0])
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        entry.train_step(xs[i % 2])
        times.append(time.perf_counter() - t)
    t_step = statistics.median(times)
    print(f"SAE training step (d_sae {args.d_sae}, k {args.k}) {rate(args.batch_tokens, t_step)}")
    print(f"buffer overhead per training batch   {args.batch_tokens / (n_mem / t_mem) / t_step:.1%} of a step")

    # Disk: write vs replay.
    emb = nn.Sequential(nn.Embedding(50257, 768)).requires_grad_(False)
    n_rows = max(1, args.disk_tokens // per_forward)
    disk_ids = torch.randint(1, 50257, (n_rows * args.seqs, args.seq_len), generator=g)
    disk_ids[:, 0] = 0
    disk_batches = [disk_ids[i * args.seqs : (i + 1) * args.seqs] for i in range(n_rows)]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "acts")
        t = time.perf_counter()
        save_activations(emb, ["0"], disk_batches, out, bos_token_id=0, shard_tokens=2**15)
        t_write = time.perf_counter() - t
        n_disk = n_rows * per_forward
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2**20
        print(f"activation store: write (save_activations) {rate(n_disk, t_write)}   ({size:,.0f} MiB)")
        for shuffle in (False, True):
            buf = ShuffleBuffer(DiskSource(out, shuffle=shuffle), batch_tokens=args.batch_tokens, size_tokens=2**16,
                                device=args.device)
            t = time.perf_counter()
            n = drain(buf, 10**12)
            t_read = time.perf_counter() - t
            print(f"activation store: replay{' shuffled' if shuffle else '         '}     {rate(n, t_read)}   "
                  f"({t_write / t_read * n / n_disk:.1f}x the write rate)")


if __name__ == "__main__":
    main()
