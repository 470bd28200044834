#!/usr/bin/env python
"""Training throughput (tokens/s): sae-hooks' in-place trainer vs sparsify 1.3.3's trainer.

Same model (the embedded default model unless ``--model``), same site (``transformer.h.1``, i.e.
sparsify hookpoint ``h.1``), width, k, batch (``--seqs`` sequences of ``--seq-len`` tokens per
forward pass, BOS excluded on both sides), optimiser (Adam; AuxK off on both: no latent can die
in so few steps), measured in the same run. sparsify runs in a subprocess with the Python of its own
virtual environment (``.venv-ref-sparsify`` or ``.venv-bench-sparsify``: ``torch==2.13.0`` then
``eai-sparsify==1.3.3``). Each side trains ``--warmup`` steps first (not timed), then ``--steps``
timed steps; model forward and SAE step are both included. ``--rounds`` runs per side, interleaved
(ours, sparsify, ours, ...); medians.

    python benchmarks/bench_train.py [--device cuda] [--d-sae 4096 --k 32 --steps 50]
    python benchmarks/bench_train.py --gpt2-small      # random GPT-2-small-shaped model, site h.6, d_sae 32768
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SPARSIFY_CHILD = r"""
import json, sys, time, tempfile, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from sparsify import SparseCoderConfig, TrainConfig, Trainer
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
model = AutoModelForCausalLM.from_pretrained(a["model"]).to(a["device"]).eval()
ids = torch.load(a["ids"])

def run(n):
    ds = Dataset.from_dict({"input_ids": ids[: n * a["seqs"]].tolist()}).with_format("torch")
    cfg = TrainConfig(SparseCoderConfig(num_latents=a["d_sae"], k=a["k"]), batch_size=a["seqs"], optimizer="adam",
                      lr=a["lr"], lr_warmup_steps=10, auxk_alpha=0.0, hookpoints=[f"h.{a['layer']}"], exclude_tokens=[0],
                      log_to_wandb=False, save_every=10**9, save_dir=tempfile.mkdtemp())
    tr = Trainer(cfg, ds, model)
    if a["device"].startswith("cuda"): torch.cuda.synchronize()
    t = time.perf_counter(); tr.fit()
    if a["device"].startswith("cuda"): torch.cuda.synchronize()
    return time.perf_counter() - t

t_warm = run(a["warmup"])
t_all = run(a["warmup"] + a["steps"])
print("RESULT " + json.dumps({"seconds": t_all - t_warm}))
"""


def find_sparsify_python(explicit: str | None = None) -> Path | None:
    if explicit:
        return Path(explicit) if Path(explicit).exists() else None
    for name in (".venv-ref-sparsify", ".venv-bench-sparsify", "../perf-sparsify-venv"):
        py = ROOT / name / "bin" / "python"
        if py.exists():
            return py
    return None


def ours(args, ids) -> float:  # noqa: ANN001
    import torch
    from transformers import AutoModelForCausalLM

    from sae_hooks import make_sae
    from sae_hooks.train import LiveSource, ShuffleBuffer, Trainer, TrainEntry, TrainSettings

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device).eval()
    model.requires_grad_(False)
    batch_tokens = args.seqs * (args.seq_len - 1)  # BOS dropped

    def run(n: int) -> float:
        batches = [ids[i * args.seqs : (i + 1) * args.seqs] for i in range(n)]
        site = f"transformer.h.{args.layer}"
        source = LiveSource(model, [site], batches, bos_token_id=0)
        buffer = ShuffleBuffer(source, batch_tokens=batch_tokens, size_tokens=4 * batch_tokens, refill_at=0.5,
                               device=args.device)
        entry = TrainEntry("sae", site, make_sae("topk", model.config.n_embd, args.d_sae, k=args.k),
                           TrainSettings(lr=args.lr, warmup_steps=10, arch={"aux_coefficient": 0.0}), device=args.device)
        trainer = Trainer([entry], autocast_dtype=torch.bfloat16 if args.bf16 else None)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.fit(buffer, max_steps=n)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        assert trainer.step_count == n, trainer.step_count
        return time.perf_counter() - t

    return run(args.warmup + args.steps) - run(args.warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF causal LM folder (default: the embedded model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for our SAE step")
    ap.add_argument("--layer", type=int, default=1, help="train on the output of transformer.h.<layer>")
    ap.add_argument("--gpt2-small", action="store_true",
                    help="a randomly initialised GPT-2-small-shaped model (768 wide, 12 layers); layer 6, "
                         "d_sae 32768, 8 x 128 tokens, 5 steps unless given")
    ap.add_argument("--rounds", type=int, default=3, help="fresh runs per side, interleaved; medians reported")
    ap.add_argument("--sparsify-python", help="the Python of a venv with eai-sparsify==1.3.3")
    args = ap.parse_args()
    if args.gpt2_small:
        import sys
        import tempfile

        import transformers

        given = set(a.split("=")[0] for a in sys.argv[1:])
        for flag, value in (("--layer", 6), ("--d-sae", 32768), ("--seqs", 8), ("--steps", 5), ("--warmup", 2)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
        cfg = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024,
                                      bos_token_id=0, eos_token_id=0)
        import torch as _torch

        _torch.manual_seed(0)
        args.model = tempfile.mkdtemp(prefix="gpt2-small-random-")
        transformers.GPT2LMHeadModel(cfg).save_pretrained(args.model)
    if args.model is None:
        from sae_hooks.app.default_model import default_model_path

        args.model = str(default_model_path())

    import tempfile

    import torch

    g = torch.Generator().manual_seed(0)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    n_rows = (args.warmup + args.steps) * args.seqs
    ids = torch.randint(1, vocab, (n_rows, args.seq_len), generator=g)
    ids[:, 0] = 0
    tokens = args.steps * args.seqs * (args.seq_len - 1)

    py = find_sparsify_python(args.sparsify_python)
    if py is None:
        print("sparsify venv not found (.venv-ref-sparsify / .venv-bench-sparsify); no comparison")
    t_ours, t_sp = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = Path(tmp) / "ids.pt"
        torch.save(ids, ids_path)
        child_args = {**vars(args), "ids": str(ids_path), "model": args.model}
        for _ in range(args.rounds):  # interleaved: ours, sparsify, ours, ...
            t_ours.append(ours(args, ids))
            if py is None:
                continue
            proc = subprocess.run([str(py), "-c", SPARSIFY_CHILD, json.dumps(child_args)], capture_output=True,
                                  text=True, env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": ""})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print("sparsify run failed:\n" + proc.stdout[-2000:] + proc.stderr[-4000:])
                py = None
                continue
            t_sp.append(json.loads(lines[-1][7:])["seconds"])
    med = statistics.median
    print(f"sae-hooks : {tokens / med(t_ours):10,.0f} tok/s  ({args.steps} steps, median {med(t_ours):.2f}s of "
          f"{', '.join(f'{t:.2f}' for t in t_ours)})")
    if not t_sp:
        return
    print(f"sparsify  : {tokens / med(t_sp):10,.0f} tok/s  ({args.steps} steps, median {med(t_sp):.2f}s of "
          f"{', '.join(f'{t:.2f}' for t in t_sp)})")
    print(f"ratio (sae-hooks / sparsify): {med(t_sp) / med(t_ours):.2f}x   "
          f"[d_model {AutoConfig.from_pretrained(args.model).n_embd}, layer {args.layer}, d_sae {args.d_sae}, k {args.k}, "
          f"{args.seqs}x{args.seq_len} tokens/batch, device {args.device}, {args.rounds} rounds interleaved]")


if __name__ == "__main__":
    main()
