"""Cost of splicing an SAE through the TransformerLens adapter.

Prints: time(forward with the SAE spliced in) / (time(plain forward) + time(the SAE's own forward on
the same activations)). The goal is <= 1.05: the hook machinery itself should cost almost nothing.
Both sides run in this process, interleaved, and the medians of many repeats are compared.

    python benchmarks/bench_splice.py [--d-model 256 --layers 4 --batch 8 --seq 128 --d-sae 4096 --k 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build_model(d_model: int, layers: int, device: str):
    import transformers
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=d_model, n_layer=layers, n_head=max(1, d_model // 64), vocab_size=4096, n_positions=512,
        bos_token_id=0, eos_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval().to(device)
    return build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=cfg)


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--arch", default="topk")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    from sae_hooks import make_sae
    from sae_hooks.adapters.transformer_lens import attach

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model = attach(build_model(args.d_model, args.layers, args.device))
    hook = f"blocks.{args.layers // 2}.hook_resid_post"
    sae = make_sae(args.arch, args.d_model, args.d_sae, k=args.k if args.arch == "topk" else None).to(args.device)
    tokens = torch.randint(1, 4096, (args.batch, args.seq), device=args.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
        acts = cache[hook]
        for _ in range(3):  # warm-up
            model(tokens), sae(acts)
        plain, sae_only, spliced, by_hand = [], [], [], []
        for _ in range(args.repeats):
            plain.append(timed(lambda: model(tokens), sync))
            sae_only.append(timed(lambda: sae(acts), sync))
            with model.saes(sae, hook=hook):
                spliced.append(timed(lambda: model(tokens), sync))
            with model.hooks(fwd_hooks=[(hook, lambda x, hook: sae(x))]):  # what a user writes by hand
                by_hand.append(timed(lambda: model(tokens), sync))
    base = statistics.median(plain) + statistics.median(sae_only)
    ratio = statistics.median(spliced) / base
    print(f"device={args.device} d_model={args.d_model} layers={args.layers} batch={args.batch} seq={args.seq} "
          f"{args.arch} d_sae={args.d_sae} k={args.k} threads={torch.get_num_threads()}")
    print(f"plain forward          {statistics.median(plain) * 1e3:8.2f} ms")
    print(f"SAE forward alone      {statistics.median(sae_only) * 1e3:8.2f} ms")
    print(f"forward with SAE       {statistics.median(spliced) * 1e3:8.2f} ms")
    print(f"plain hook + sae(x)    {statistics.median(by_hand) * 1e3:8.2f} ms")
    print(f"splice overhead ratio  {ratio:8.3f}  (goal <= 1.05)")
    print(f"add_sae / hand hook    {statistics.median(spliced) / statistics.median(by_hand):8.3f}")


if __name__ == "__main__":
    main()
