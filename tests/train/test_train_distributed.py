"""Distributed training on CPU (gloo, 2 processes on 127.0.0.1): data-parallel equals one process on the
whole batch, SAE-per-rank sharding equals training every SAE in one process, only rank 0 writes, and a
resumed distributed run equals the uninterrupted one.

One spawn (module fixture) runs every scenario; each writes its weights to a folder the tests compare
against single-process runs made here."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from sae_hooks import load_native, make_sae
from sae_hooks.errors import ConfigError
from sae_hooks.train import IteratorSource, ShuffleBuffer, Trainer, TrainEntry, TrainSettings
from sae_hooks.train.distributed import DistributedTrainer, assign_entries, rank_slice

WORLD = 2
STEPS = 8
TIMEOUT_S = 120
D, D_SAE = 16, 64


# Data and entries, built identically in the workers and here ------------------------------------


def planted_batches(n: int = STEPS, rows: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Sparse combinations of 48 planted unit directions plus noise, ``n`` batches of ``(rows, D)``."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(48, D, generator=g), dim=-1)
    out = []
    for _ in range(n):
        coef = torch.rand(rows, 48, generator=g) * (torch.rand(rows, 48, generator=g) < 0.08)
        out.append(coef @ feats * 3 + 0.05 * torch.randn(rows, D, generator=g) + 1.0)
    return out


def make_entry(arch: str, seed: int = 0, site: str = "x", name: str | None = None) -> TrainEntry:
    extra = {"k": 4} if arch in ("topk", "batchtopk") else {}
    l1 = {"l1_coefficient": 0.5} if arch in ("relu", "gated") else {}
    settings = TrainSettings(seed=seed, lr=3e-3, warmup_steps=2, dead_tokens=96, total_steps=STEPS, arch=l1)
    return TrainEntry(name or f"{arch}-s{seed}", site, make_sae(arch, D, D_SAE, **extra), settings)


def shard_entries() -> list[TrainEntry]:
    return [make_entry("topk", 0, "a"), make_entry("topk", 1, "b"), make_entry("relu", 0, "a"), make_entry("relu", 1, "b")]


def two_site_batches() -> list[dict[str, torch.Tensor]]:
    return [{"a": a, "b": b} for a, b in zip(planted_batches(seed=1), planted_batches(seed=2))]


def stream_chunks() -> list[torch.Tensor]:
    return planted_batches(n=12, rows=32, seed=3)


def buffered(rank: int | None, world: int = WORLD) -> ShuffleBuffer:
    """A checkpointable buffer over this rank's share of the stream (``rank=None``: all of it)."""
    data = stream_chunks() if rank is None else rank_slice(stream_chunks(), rank, world)
    return ShuffleBuffer(IteratorSource(data), batch_tokens=16, size_tokens=64, seed=0)


def weights(entries: list[TrainEntry]) -> dict[str, torch.Tensor]:
    return {f"{e.name}.{k}": v.detach().clone().contiguous() for e in entries for k, v in e.sae.state_dict().items()}


# Worker ---------------------------------------------------------------------------------------------


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from datetime import timedelta

    from sae_hooks.train.distributed import distributed_context

    out_dir = Path(out)
    replaced: list[str] = []
    real_replace = os.replace

    def spy_replace(src, dst, *a, **k):  # noqa: ANN001, ANN002, ANN003
        replaced.append(str(dst))
        return real_replace(src, dst, *a, **k)

    with distributed_context(timeout=timedelta(seconds=60)) as info:
        assert (info.rank, info.world_size, info.backend) == (rank, WORLD, "gloo")
        # 1. Data-parallel: each rank half of every batch (and an uneven 40/24 split).
        for arch in ("topk", "relu", "jumprelu", "gated"):
            for split in ("even", "uneven"):
                if split == "uneven" and arch not in ("topk", "relu"):
                    continue
                cut = 32 if split == "even" else 40
                mine = [b[:cut] if rank == 0 else b[cut:] for b in planted_batches()]
                trainer = DistributedTrainer([make_entry(arch)], "ddp")
                trainer.fit(mine, max_steps=STEPS)
                if rank == 0:
                    tensors = weights(trainer.entries)
                    tensors["tokens_seen"] = torch.tensor([trainer.tokens_seen])
                    tensors["aux"] = torch.tensor([trainer.entries[0].state.metrics["aux"]])
                    save_file(tensors, str(out_dir / f"ddp-{arch}-{split}.safetensors"))
        # 2. Sharding: 4 entries over 2 ranks, every rank the same data.
        trainer = DistributedTrainer(shard_entries(), "shard")
        (out_dir / f"local-{rank}.json").write_text(json.dumps([e.name for e in trainer.local]))
        trainer.fit(two_site_batches(), max_steps=STEPS)
        os.replace = spy_replace
        try:
            trainer.save(out_dir / "shard-final")
            # 3. Checkpoint + resume, data-parallel and sharded, with checkpointable buffers.
            for mode in ("ddp", "shard"):
                entries = [make_entry("topk", 0)] if mode == "ddp" else [make_entry("topk", 0), make_entry("relu", 0)]
                share = rank if mode == "ddp" else None
                full = DistributedTrainer(entries, mode)
                full.fit(buffered(share), max_steps=STEPS)
                full.gather()
                first = DistributedTrainer([make_entry(e.name.split("-")[0]) for e in entries], mode)
                first.fit(buffered(share), max_steps=STEPS // 2, checkpoint_dir=out_dir / f"ckpt-{mode}", checkpoint_every=STEPS // 2)
                resumed = DistributedTrainer([make_entry(e.name.split("-")[0]) for e in entries], mode)
                buf = buffered(share)
                resumed.load_checkpoint(out_dir / f"ckpt-{mode}", buf)
                resumed.fit(buf, max_steps=STEPS)
                resumed.gather()
                if rank == 0:
                    save_file(weights(full.entries), str(out_dir / f"resume-{mode}-full.safetensors"))
                    save_file(weights(resumed.entries), str(out_dir / f"resume-{mode}-resumed.safetensors"))
        finally:
            os.replace = real_replace
        (out_dir / f"writes-{rank}.json").write_text(json.dumps(replaced))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return out


# Single-process references ----------------------------------------------------------------------


@pytest.mark.parametrize("arch,split", [("topk", "even"), ("relu", "even"), ("jumprelu", "even"), ("gated", "even"),
                                        ("topk", "uneven"), ("relu", "uneven")])
def test_data_parallel_equals_one_process_on_the_whole_batch(runs: Path, arch: str, split: str) -> None:
    torch.set_num_threads(1)
    ref = Trainer([make_entry(arch)]).fit(planted_batches(), max_steps=STEPS)
    got = load_file(str(runs / f"ddp-{arch}-{split}.safetensors"))
    assert int(got.pop("tokens_seen")) == ref.tokens_seen == STEPS * 64
    aux = float(got.pop("aux"))
    if arch == "topk":  # dead latents appeared, so the AuxK term (with its global normaliser) was live
        assert ref.entries[0].state.metrics["aux"] > 0
        assert aux == pytest.approx(ref.entries[0].state.metrics["aux"], rel=1e-4)
    expected = weights(ref.entries)
    assert set(got) == set(expected)
    init = weights([make_entry(arch)])
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)
    assert any((expected[k] - init[k]).abs().max() > 1e-3 for k in expected)  # training moved the weights


def test_sharding_equals_training_every_entry_in_one_process(runs: Path) -> None:
    local = [json.loads((runs / f"local-{r}.json").read_text()) for r in range(WORLD)]
    assert sorted(local[0] + local[1]) == sorted(e.name for e in shard_entries())
    assert len(local[0]) == len(local[1]) == 2  # balanced, disjoint
    torch.set_num_threads(1)
    ref = Trainer(shard_entries()).fit(two_site_batches(), max_steps=STEPS)
    for e in ref.entries:
        saved = load_native(runs / "shard-final" / e.name)
        final = e.final_sae()
        for k, v in final.state_dict().items():
            assert torch.equal(saved.state_dict()[k], v), (e.name, k)
        assert saved.cfg.metadata["training"]["steps"] == STEPS


def test_only_rank0_writes(runs: Path) -> None:
    writes = [json.loads((runs / f"writes-{r}.json").read_text()) for r in range(WORLD)]
    assert writes[1] == []
    assert any("shard-final" in w for w in writes[0])
    assert any("ckpt-ddp" in w for w in writes[0]) and any("ckpt-shard" in w for w in writes[0])
    meta = json.loads((runs / "ckpt-ddp" / "trainer.json").read_text())
    assert meta["buffer"]["world_size"] == WORLD and meta["step"] == STEPS // 2
    keys = load_file(str(runs / "ckpt-ddp" / "tensors.safetensors")).keys()
    assert {"buffer.rank0.rng.torch", "buffer.rank1.rng.torch", "buffer.rank1.generator"} <= set(keys)


@pytest.mark.parametrize("mode", ["ddp", "shard"])
def test_resumed_distributed_run_equals_uninterrupted(runs: Path, mode: str) -> None:
    full = load_file(str(runs / f"resume-{mode}-full.safetensors"))
    resumed = load_file(str(runs / f"resume-{mode}-resumed.safetensors"))
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    init = weights([make_entry("topk")])
    assert not torch.equal(full["topk-s0.W_dec"], init["topk-s0.W_dec"])


# Without a process group ----------------------------------------------------------------------------


def test_assignment_is_balanced_and_deterministic() -> None:
    big = TrainEntry("big", "x", make_sae("relu", D, 4 * D_SAE), TrainSettings())
    small = [make_entry("relu", s, name=f"s{s}") for s in range(4)]
    owner = assign_entries([*small, big], 2)
    assert owner == [1, 1, 1, 1, 0]  # the big one alone balances the four small ones
    assert assign_entries([*small, big], 2) == owner
    with pytest.raises(ConfigError, match="at least one entry per rank"):
        assign_entries(small[:1], 2)


def test_rank_slice_partitions_and_reiterates() -> None:
    items = list(range(7))
    parts = [list(rank_slice(items, r, 3)()) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert list(rank_slice(lambda: iter(items), 1, 3)()) == [1, 4]
    with pytest.raises(ConfigError):
        rank_slice(items, 3, 3)


def test_trainer_needs_a_process_group() -> None:
    with pytest.raises(ConfigError, match="not initialised"):
        DistributedTrainer([make_entry("topk")], "ddp")


# The command line under torchrun ----------------------------------------------------------------------


@pytest.mark.slow
def test_cli_under_torchrun(tmp_path: Path) -> None:
    import subprocess
    import sys

    from sae_hooks.train.sources import save_activations

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, D), torch.nn.Linear(D, D))
    save_activations(model, ["1"], [torch.randint(1, 50, (4, 32)) for _ in range(8)], tmp_path / "acts", shard_tokens=128)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "sae_hooks.app.cli", "train", "--activations", str(tmp_path / "acts"), "--distributed", "ddp",
           "--steps", "100", "--batch-tokens", "64", "--buffer-tokens", "128", "--d-sae", "32", "--k", "4",
           "--out", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "4",
           "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("1-topk-s0:") == 1  # rank 0 alone reports (and saves)
    # 8 shards x 128 rows; each rank reads its own 4 (512 rows = 16 batches of 32), so the data runs
    # out after 16 steps of 64 global rows: every row seen once (without sharding: 32 steps, twice).
    sae = load_native(tmp_path / "out" / "1-topk-s0")
    assert sae.cfg.metadata["training"]["steps"] == 16
    assert sae.cfg.metadata["training"]["tokens_seen"] == 16 * 64 == 8 * 128
    meta = json.loads((tmp_path / "ckpt" / "trainer.json").read_text())
    assert meta["buffer"]["world_size"] == 2 and meta["step"] == 16
    assert [r["source"]["position"] for r in meta["buffer"]["ranks"]] == [4, 4]
