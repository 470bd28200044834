"""Multi-layer SAEs and Jacobian pairs are objectives of the one trainer: a run stopped (or SIGKILLed) and resumed from a
checkpoint equals the uninterrupted run bit for bit, and both train under ``torch.distributed`` (gloo,
2 processes): the Jacobian pair's data-parallel run equals one process on the whole batch; the MLSAE's
ranks stay identical and its loss falls."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from sae_hooks.saes import make_jsae_pair, make_mlsae
from sae_hooks.saes.jacobian import FrozenMLP, JacobianSAEPair
from sae_hooks.train import IteratorSource, ShuffleBuffer, Trainer, TrainEntry, TrainSettings, load_checkpoint
from sae_hooks.train.distributed import DistributedTrainer, rank_slice

D, L, STEPS = 16, 3, 12
SITES = [f"blocks.{i}.hook_resid_post" for i in range(L)]
JSITE = "blocks.0.ln2.hook_normalized"


def _mlp() -> FrozenMLP:
    g = torch.Generator().manual_seed(5)
    return FrozenMLP(torch.randn(D, 40, generator=g) * 0.4, torch.randn(40, D, generator=g) * 0.3, "gelu_new",
                     torch.randn(40, generator=g) * 0.1, torch.randn(D, generator=g) * 0.1)


def _layer_chunks(n: int = 10, rows: int = 32) -> list[dict[str, torch.Tensor]]:
    """Residual-like data: a shared sparse code, each layer its own mixing and offset."""
    g = torch.Generator().manual_seed(3)
    feats = torch.nn.functional.normalize(torch.randn(40, D, generator=g), dim=-1)
    mix = [torch.eye(D) + 0.3 * torch.randn(D, D, generator=g) for _ in range(L)]
    out = []
    for _ in range(n):
        code = torch.rand(rows, 40, generator=g) * (torch.rand(rows, 40, generator=g) < 0.1)
        base = code @ feats * 3
        out.append({s: base @ mix[i] + 0.5 * i + 0.05 * torch.randn(rows, D, generator=g) for i, s in enumerate(SITES)})
    return out


def _mlp_inputs(n: int = 10, rows: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.randn(rows, D, generator=g) * 1.5 for _ in range(n)]


def mlsae_entry() -> TrainEntry:
    sae = make_mlsae(D, L, d_sae=64, k=4, seed=0)
    settings = TrainSettings(lr=3e-3, eps=6.25e-10, warmup_steps=2, dead_tokens=48, init_batches=2, total_steps=STEPS,
                             arch={"aux_k": 16})
    return TrainEntry("mlsae", None, sae, settings, init_weights=False)


def jsae_entry() -> TrainEntry:
    pair = make_jsae_pair(_mlp(), 0, 48, 4, seed=0)
    settings = TrainSettings(lr=3e-3, warmup_steps=2, grad_clip=1.0, total_steps=STEPS,
                             arch={"jacobian_coefficient": 0.5, "jacobian_warmup": 0.25})
    return TrainEntry("jsae", None, pair, settings)


def _buffer(kind: str, data=None) -> ShuffleBuffer:  # noqa: ANN001
    if kind == "mlsae":
        source = IteratorSource(data or _layer_chunks(), sites=SITES)
    else:
        source = IteratorSource(data or _mlp_inputs(), site=JSITE)
    return ShuffleBuffer(source, batch_tokens=24, size_tokens=96, seed=1)


def _weights(entry: TrainEntry) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in entry.sae.state_dict().items()}


@pytest.mark.parametrize("kind", ["mlsae", "jsae"])
def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path: Path, kind: str) -> None:
    make = mlsae_entry if kind == "mlsae" else jsae_entry
    init = _weights(make())
    full = Trainer([make()]).fit(_buffer(kind), max_steps=STEPS)
    first, buf = Trainer([make()]), _buffer(kind)
    first.fit(buf, max_steps=7, checkpoint_dir=tmp_path / "ck", checkpoint_every=5)  # stopped at 7; checkpoint at 5
    torch.manual_seed(999)  # the stop leaves the global RNG anywhere
    resumed, buf2 = Trainer([make()]), _buffer(kind)
    meta = load_checkpoint(resumed, tmp_path / "ck", buf2)
    assert meta["step"] == 5 and meta["entries"][kind]["kind"] == kind
    resumed.fit(buf2, max_steps=STEPS)
    a, b = full.entries[0], resumed.entries[0]
    assert a.state.step == b.state.step == STEPS and a.state.tokens_seen == b.state.tokens_seen == STEPS * 24
    for k, v in _weights(a).items():
        assert torch.equal(v, _weights(b)[k]), k
    assert torch.equal(a.tokens_since_fired, b.tokens_since_fired)
    for (ka, va), (kb, vb) in zip(a.optimizer.state_dict()["state"].items(), b.optimizer.state_dict()["state"].items()):
        assert torch.equal(va["exp_avg"], vb["exp_avg"])
    assert any(not torch.equal(v, init[k]) for k, v in _weights(a).items() if v.is_floating_point())
    # decoder rows stay unit norm (the one constraint applies to every decoder of the objective)
    decs = [a.sae.W_dec] if kind == "mlsae" else [a.sae.sae_in.W_dec, a.sae.sae_out.W_dec]
    for W in decs:
        torch.testing.assert_close(W.norm(dim=-1), torch.ones(W.shape[0]))
    # the final model saves in its own format and carries the training metadata
    path = resumed.save(tmp_path / "out")[kind]
    if kind == "jsae":
        loaded = JacobianSAEPair.load(path)
        assert loaded.cfg.metadata["training"]["steps"] == STEPS and loaded.cfg.jacobian_coefficient == 0.5
        torch.testing.assert_close(loaded.sae_in.W_dec, b.sae.sae_in.W_dec)
    else:
        from sae_hooks import load_native

        loaded = load_native(path)
        assert loaded.cfg.metadata["training"]["sites"] == SITES
        torch.testing.assert_close(loaded.W_dec, b.sae.W_dec)


def test_mlsae_entry_matches_its_loss_convention() -> None:
    """One step by hand: Adam on MLSAE's mean_l(MSE_l / Var_l) (no AuxK yet), b_dec from the geometric median."""
    entry = mlsae_entry()
    entry.settings.init_batches = 1
    sae = entry.sae
    batch = _layer_chunks(1)[0]
    ref = make_mlsae(D, L, d_sae=64, k=4, seed=0)
    x = torch.stack([batch[s] for s in SITES])
    from sae_hooks.train.statistics import geometric_median

    with torch.no_grad():
        ref.b_dec.copy_(geometric_median(ref.normalize_input(x.reshape(-1, D))[0]).float())
    xs, st = ref.normalize_input(x.reshape(-1, D))
    pre = (xs - ref.b_dec) @ ref.W_enc
    v, i = pre.topk(4, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    x_hat = ((f @ ref.W_dec + ref.b_dec) * st.scale + st.shift).reshape(L, -1, D)
    expected = ((x_hat - x).pow(2).mean((1, 2)) / x.reshape(L, -1).var(-1)).mean()
    metrics = Trainer([entry]).step(batch)["mlsae"]
    assert metrics is not None
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(sae.b_dec.detach(), ref.b_dec.detach(), atol=2e-3, rtol=0)  # moved by one Adam step


# Distributed (gloo) ----------------------------------------------------------------------------------


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from datetime import timedelta

    from sae_hooks.train.distributed import distributed_context

    with distributed_context(timeout=timedelta(seconds=60)):
        # JSAE, data-parallel: each rank half of every batch
        mine = [{JSITE: x[:16] if rank == 0 else x[16:]} for x in _mlp_inputs(STEPS)]
        trainer = DistributedTrainer([jsae_entry()], "ddp")
        trainer.fit(mine, max_steps=STEPS)
        # MLSAE, data-parallel through a sharded stream, with a checkpoint and a resume
        chunks = _layer_chunks(20)
        full = DistributedTrainer([mlsae_entry()], "ddp")
        hist: list[float] = []
        full.fit(_buffer("mlsae", rank_slice(chunks, rank, 2)), max_steps=STEPS, log=lambda s, m: hist.extend([m["mlsae/loss"]] if m else []), log_every=1)
        first = DistributedTrainer([mlsae_entry()], "ddp")
        first.fit(_buffer("mlsae", rank_slice(chunks, rank, 2)), max_steps=6, checkpoint_dir=Path(out) / "ck", checkpoint_every=6)
        resumed = DistributedTrainer([mlsae_entry()], "ddp")
        buf = _buffer("mlsae", rank_slice(chunks, rank, 2))
        resumed.load_checkpoint(Path(out) / "ck", buf)
        resumed.fit(buf, max_steps=STEPS)
        tensors = {f"jsae.{k}": v for k, v in _weights(trainer.entries[0]).items()}
        tensors.update({f"mlsae.{k}": v for k, v in _weights(full.entries[0]).items()})
        tensors.update({f"resumed.{k}": v for k, v in _weights(resumed.entries[0]).items()})
        if rank == 0:
            tensors["loss"] = torch.tensor(hist)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(out) / f"rank{rank}.safetensors"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlsae_and_jsae_train_under_torch_distributed(tmp_path: Path) -> None:
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail("distributed workers did not finish within 180 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    loss = r0.pop("loss")
    for k, v in r1.items():
        assert torch.equal(v, r0[k]), k  # every rank took the same steps
    # the Jacobian pair's losses are means over tokens: data-parallel == one process on the whole batch
    torch.set_num_threads(1)
    ref = Trainer([jsae_entry()]).fit([{JSITE: x} for x in _mlp_inputs(STEPS)], max_steps=STEPS)
    for k, v in _weights(ref.entries[0]).items():
        torch.testing.assert_close(r0[f"jsae.{k}"], v, atol=1e-5, rtol=0)
    # the MLSAE trained (loss falls) and its resumed distributed run equals the uninterrupted one
    assert len(loss) == STEPS - 1  # the first batch waits for the second (init_batches=2)
    assert loss[-3:].mean() < 0.8 * loss[:3].mean()
    for k in [k for k in r0 if k.startswith("mlsae.")]:
        assert torch.equal(r0[k], r0["resumed." + k[6:]]), k


def test_entry_errors_name_what_is_wrong() -> None:
    from sae_hooks import make_sae
    from sae_hooks.errors import ConfigError, ShapeMismatchError

    with pytest.raises(ConfigError, match="not a transcoder"):
        TrainEntry("e", "x", make_sae("relu", D, 32)).train_step(torch.randn(4, D), target=torch.randn(4, D))
    with pytest.raises(ConfigError, match="several sites"):
        TrainEntry("m", "blocks.0.hook_resid_post", make_mlsae(D, L, d_sae=32, k=4))
    with pytest.raises(ConfigError, match="cannot train a Linear"):
        TrainEntry("l", "x", torch.nn.Linear(2, 2))
    j = jsae_entry()
    with pytest.raises(ConfigError, match=f"lacks \\['{JSITE}'\\]"):
        j.train_step({"elsewhere": torch.randn(4, D)})
    m = mlsae_entry()
    with pytest.raises(ShapeMismatchError, match="blocks.1.hook_resid_post"):
        m.train_step({s: torch.randn(4, D if i != 1 else D + 1) for i, s in enumerate(SITES)})


_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {here!r})
import torch
from test_objectives_resume import STEPS, _buffer, jsae_entry, mlsae_entry
from sae_hooks.train import Trainer
make = mlsae_entry if {kind!r} == "mlsae" else jsae_entry

def log(step, metrics):
    if step == 8:
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-run, after the checkpoint of step 6

Trainer([make()]).fit(_buffer({kind!r}), max_steps=STEPS, checkpoint_dir={ck!r}, checkpoint_every=3, log=log, log_every=1)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlsae", "jsae"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path, kind: str) -> None:
    import signal
    import subprocess
    import sys

    ck = str(tmp_path / "ck")
    code = _KILLED_RUN.format(here=str(Path(__file__).parent), kind=kind, ck=ck)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    make = mlsae_entry if kind == "mlsae" else jsae_entry
    full = Trainer([make()]).fit(_buffer(kind), max_steps=STEPS)
    resumed, buf = Trainer([make()]), _buffer(kind)
    assert load_checkpoint(resumed, ck, buf)["step"] == 6
    resumed.fit(buf, max_steps=STEPS)
    for k, v in _weights(full.entries[0]).items():
        assert torch.equal(v, _weights(resumed.entries[0])[k]), k
