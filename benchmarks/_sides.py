"""One benchmark side, run in a fresh process by ``benchmarks/matrix.py`` with that side's own Python.

    python _sides.py '{"side": "ours" | "sparsify" | "saelens", "d_in": 768, "d_sae": 32768, "k": 32,
                       "tokens": 2048, "steps": 3, "warmup": 1, "threads": 2, "infer": 3}'

Imports only the side's own library (sparsify and SAELens live in their own virtual environments).
Prints one line ``RESULT {json}``: per-step training times, wall and CPU (forward, backward, Adam,
decoder constraint; no model), the peak RSS of the training part, and inference encode/decode times.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def batches(a: dict, torch, n: int = 2):  # noqa: ANN001, ANN201
    """The same ``n`` input batches on every side: anisotropic Gaussian with an offset (a fixed seed)."""
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(a["d_in"], generator=g) * 2 + 0.1
    offset = torch.randn(a["d_in"], generator=g)
    return [torch.randn(a["tokens"], a["d_in"], generator=g) * scale + offset for _ in range(n)]


def timed(fn, sync) -> float:  # noqa: ANN001
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def timed_cpu(fn, sync) -> tuple[float, float]:  # noqa: ANN001
    """(wall seconds, CPU seconds of this process: all threads, user + system)."""
    sync()
    t, c = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - t, time.process_time() - c


# Each side returns (train_step(x) -> None, encode(x) -> latents, decode(latents) -> x_hat).


def ours(a: dict, torch):  # noqa: ANN001, ANN201
    from sae_hooks import make_sae
    from sae_hooks.train import TrainEntry, TrainSettings

    sae = make_sae("topk", a["d_in"], a["d_sae"], k=a["k"])
    import dataclasses

    # Newer trainers collect init_batches batches for the data statistics before the first step.
    first = {"init_batches": 1} if "init_batches" in {f.name for f in dataclasses.fields(TrainSettings)} else {}
    entry = TrainEntry("sae", "x", sae, TrainSettings(lr=a["lr"], warmup_steps=10, **first), device=a["device"])
    autocast = torch.bfloat16 if a.get("bf16") else None

    def step(x):  # noqa: ANN001, ANN202
        entry.train_step(x, autocast_dtype=autocast)

    def encode(x):  # noqa: ANN001, ANN202
        return sae.encode_with_state(x)

    def decode(lat):  # noqa: ANN001, ANN202
        return sae.decode(*lat)

    return step, encode, decode


def sparsify(a: dict, torch):  # noqa: ANN001, ANN201
    """sparsify 1.3.3's own per-step sequence (sparsify/trainer.py, loss_fn="fvu", optimizer="adam")."""
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    sae = SparseCoder(a["d_in"], SparseCoderConfig(num_latents=a["d_sae"], k=a["k"]), device=a["device"])
    opt = torch.optim.Adam(sae.parameters(), lr=a["lr"])
    sched = get_linear_schedule_with_warmup(opt, 10, 10**6)
    since_fired = torch.zeros(a["d_sae"], dtype=torch.long, device=a["device"])
    state = {"first": True}

    def step(x):  # noqa: ANN001, ANN202
        if state["first"]:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
            state["first"] = False
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > 10_000_000
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead, total_variance=total_variance)
        did_fire = torch.zeros(a["d_sae"], dtype=torch.bool, device=x.device)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())
        float(out.auxk_loss.detach())
        (out.fvu + (1 / 32) * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        since_fired.add_(x.shape[0])
        since_fired[did_fire] = 0

    def encode(x):  # noqa: ANN001, ANN202
        return sae.encode(x)[:2]

    def decode(lat):  # noqa: ANN001, ANN202
        return sae.decode(*lat)

    return step, encode, decode


def saelens(a: dict, torch):  # noqa: ANN001, ANN201
    """SAELens's TopK training SAE and its SAETrainer._train_step (Adam, grad-norm clip 1.0)."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    cfg = TopKTrainingSAEConfig(d_in=a["d_in"], d_sae=a["d_sae"], k=a["k"], dtype="float32", device=a["device"])
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=a["lr"], betas=(0.9, 0.999))
    since_fired = torch.zeros(a["d_sae"], device=a["device"])
    n = {"steps": 0}

    def step(x):  # noqa: ANN001, ANN202
        sae.train()
        out = sae.training_forward_pass(step_input=TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=since_fired > 10_000_000, n_training_steps=n["steps"],
            is_logging_step=False,
        ))
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        n["steps"] += 1

    def encode(x):  # noqa: ANN001, ANN202
        return sae.encode(x)

    def decode(f):  # noqa: ANN001, ANN202
        return sae.decode(f)

    return step, encode, decode


def main() -> None:
    a = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(a["threads"])
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if a["device"].startswith("cuda") else (lambda: None)
    xs = [x.to(a["device"]) for x in batches(a, torch)]
    base = rss_gb()
    step, encode, decode = {"ours": ours, "before": ours, "sparsify": sparsify, "saelens": saelens}[a["side"]](a, torch)
    times, cpu = [], []
    for i in range(a["warmup"] + a["steps"]):
        dt, dc = timed_cpu(lambda: step(xs[i % len(xs)]), sync)
        if i >= a["warmup"]:
            times.append(dt)
            cpu.append(dc)
    peak = peak_gb()
    enc, dec = [], []
    with torch.no_grad():
        # No untimed encode warm-up: the training steps ran the same kernels (at the big cells one encode
        # costs about a training step). One untimed decode: it costs milliseconds, so its first-call
        # allocations would otherwise dominate the median of a few repeats.
        decode(encode(xs[0][:8]))
        for i in range(a["infer"]):
            x = xs[i % len(xs)]
            holder = {}
            enc.append(timed(lambda: holder.update(lat=encode(x)), sync))
            dec.append(timed(lambda: decode(holder["lat"]), sync))
    print("RESULT " + json.dumps({"train": times, "cpu": cpu, "peak_gb": peak, "base_gb": base, "encode": enc, "decode": dec}))


if __name__ == "__main__":
    main()
