"""Training past one process with ``torch.distributed`` (launched with ``torchrun``).

Two modes, both driven by :class:`DistributedTrainer` (the one :class:`~.trainer.Trainer` loop, so every
objective -- SAEs, transcoders, multi-layer SAEs, Jacobian pairs -- trains distributed the same way):

* ``"ddp"`` (data-parallel): every rank holds every SAE and reads its own shard of the data. After
  each backward, the gradients are summed across ranks weighted by each rank's share of the tokens
  (``n_rank / n_total``: the gradient of the loss of the whole global batch, whose losses are means
  over tokens), *before* the decoder's parallel gradient is removed, the gradient clipped and Adam
  stepped; so every rank takes the same step and the unit-norm projection that follows gives the same
  weights everywhere. The rest of the step is made global too: the first batch (input scale, ``b_dec``
  geometric median, the TopK MSE scale) is all-gathered, batch by batch, "fired" flags are OR-ed and token counts
  summed (dead latents agree), the AuxK normaliser is the variance of the residual over every rank's
  rows, NaN/inf skips are decided by all ranks together, and the metrics are averaged. TopK keeps its
  sparse decode and sparse backward: only the dense parameter gradients travel. ``batchtopk``'s batch
  top-k is taken per rank (as with a ``world_size`` times smaller batch) and its inference threshold
  averaged across ranks (the buffers a training spec lists in ``synced_buffers``); the other
  architectures equal one process on the global batch.
* ``"shard"`` (SAE-per-rank, sparsify's ``distribute_modules``): every rank reads the *same* data and
  trains only its subset of the entries (:func:`assign_entries`, balanced by parameter count); no
  gradient communication. Rank 0 gathers the other ranks' entries to write checkpoints and final SAEs.

In both modes only rank 0 writes (atomically, through :func:`~.checkpoint.save_checkpoint` and
``SAE.save``); each rank's buffer position, buffered rows and RNG state travel to rank 0 and are stored
under ``buffer.rank<r>.*`` so that :meth:`DistributedTrainer.load_checkpoint` (same world size, a
filesystem every rank can read) continues exactly.

>>> with distributed_context() as info:                      # torchrun env -> process group
...     source = IteratorSource(rank_slice(batches, info.rank, info.world_size))
...     trainer = DistributedTrainer(entries, mode="ddp", device=info.device)
...     trainer.fit(ShuffleBuffer(source, batch_tokens=2048), max_steps=1000)
...     trainer.save("out/")                                 # rank 0 writes
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError
from . import checkpoint as _ckpt
from .trainer import Trainer, TrainEntry

MODES = ("ddp", "shard")


# Process group ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def env_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the variables ``torchrun`` sets (``(0, 1, 0)`` without)."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError as e:
        raise ConfigError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({e})") from None


@contextlib.contextmanager
def distributed_context(backend: str | None = None, timeout: timedelta = timedelta(minutes=30)) -> Iterator[DistInfo]:
    """Initialise the default process group from the ``torchrun`` environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and destroy it on exit, exceptions included.

    ``backend``: ``None`` = ``"nccl"`` when CUDA is available, else ``"gloo"``. With NCCL each process
    uses ``cuda:LOCAL_RANK``. A group that is already initialised is reused and left alone.
    """
    if not dist.is_available():  # pragma: no cover - every supported torch build has it
        raise ConfigError("torch.distributed is not available in this torch build")
    rank, world, local = env_info()
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    owned = not dist.is_initialized()
    if owned:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ConfigError("MASTER_ADDR / MASTER_PORT are not set: launch with `torchrun --nproc_per_node N ...`")
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    else:
        rank, world, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    try:
        yield DistInfo(rank, world, local, device, backend)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


# Data sharding ------------------------------------------------------------------------------------


def rank_slice(data: Iterable | Callable[[], Iterable], rank: int, world_size: int) -> Callable[[], Iterable]:
    """A re-iterable factory of every ``world_size``-th item of ``data`` from ``rank`` (for
    ``LiveSource`` token batches or ``IteratorSource`` items; model work is done only on kept items)."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, {world_size})")
    factory = data if callable(data) and not hasattr(data, "__iter__") else (lambda: data)
    return lambda: itertools.islice(iter(factory()), rank, None, world_size)


def shard_disk_source(source: Any, rank: int, world_size: int) -> Any:
    """Keep every ``world_size``-th chunk of a :class:`~.sources.DiskSource`'s plan from ``rank``
    (in place; returns it), so each rank reads only its own shards."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, {world_size})")
    if source.position:
        raise ConfigError("shard the DiskSource before reading from it")
    source._plan = source._plan[rank::world_size]
    return source


def assign_entries(entries: Sequence[TrainEntry], world_size: int) -> list[int]:
    """The rank of each entry: largest first to the least loaded rank (parameter count), ties to the
    lowest rank. Deterministic, so every rank computes the same assignment."""
    if world_size > len(entries):
        raise ConfigError(f"shard mode needs at least one entry per rank: {len(entries)} entries, {world_size} ranks")
    cost = [sum(p.numel() for p in e.sae.parameters()) for e in entries]
    load = [0] * world_size
    owner = [0] * len(entries)
    for i in sorted(range(len(entries)), key=lambda i: (-cost[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += cost[i]
    return owner


# The data-parallel hook ---------------------------------------------------------------------------


class GradSync:
    """What a :class:`~.trainer.TrainEntry` calls (``entry.sync``) to make one data-parallel step global;
    the single-process version is :class:`~.trainer.LocalSync`. ``n_total`` (all ranks' rows in the
    current batch) is set by :meth:`DistributedTrainer.step` before the entries step."""

    def __init__(self, group: Any = None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.n_total = 0

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else torch.device("cpu")

    def _sum(self, t: Tensor) -> Tensor:
        dev = t.device
        t = t.to(self._device())
        dist.all_reduce(t, group=self.group)
        return t.to(dev)

    def all_true(self, flag: bool) -> bool:
        return int(self._sum(torch.tensor([0 if flag else 1], dtype=torch.int64)).item()) == 0

    def gather_rows(self, x: Tensor) -> Tensor:
        """``(sum n_r, d)``: every rank's rows, in rank order (for the first-batch statistics)."""
        dev = x.device
        xs = x.to(self._device()).contiguous()
        n = torch.tensor([xs.shape[0]], dtype=torch.int64, device=xs.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n, group=self.group)
        m = max(int(s.item()) for s in sizes)
        pad = torch.zeros((m, xs.shape[1]), dtype=xs.dtype, device=xs.device)
        pad[: xs.shape[0]] = xs
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad, group=self.group)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(dev)

    def after_backward(self, params: Sequence[Tensor], n_local: int) -> None:
        """Sum the gradients weighted by ``n_local / n_total`` (one flat all-reduce; a gradient absent
        everywhere stays ``None``)."""
        w = n_local / self.n_total
        flat = [p.grad.reshape(-1) * w if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=flat[0].dtype, device=flat[0].device)
        buf = self._sum(torch.cat([*flat, present]))
        i = 0
        for p in params:
            n = p.numel()
            p.grad = buf[i : i + n].view_as(p).clone()
            i += n
        for p, g in zip(params, (buf[i : i + len(params)] > 0).tolist()):
            if not g:
                p.grad = None

    def average_(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor by its mean over ranks (e.g. BatchTopK's threshold after its update)."""
        if not tensors:
            return
        buf = self._sum(torch.cat([t.reshape(-1).double() for t in tensors]) / self.world)
        i = 0
        for t in tensors:
            t.copy_(buf[i : i + t.numel()].view_as(t).to(t.dtype))
            i += t.numel()

    def aux_denom(self, residual: Tensor) -> Tensor:
        """``mean ||e − mean e||²`` over every rank's rows (AuxK's normaliser of the whole batch)."""
        s = self._sum(torch.cat([residual.sum(0), residual.new_tensor([residual.shape[0]])]))
        mean = s[:-1] / s[-1]
        q = self._sum((residual - mean).pow(2).sum().reshape(1))
        return q[0] / s[-1]

    def fired(self, fired: Tensor, n: int) -> tuple[Tensor, int]:
        """Latents that fired on any rank, and the total rows of this step."""
        t = self._sum(torch.cat([fired.to(torch.int64), torch.tensor([n], dtype=torch.int64, device=fired.device)]))
        return t[:-1] > 0, int(t[-1].item())

    def metrics(self, metrics: dict[str, float], n_local: int) -> dict[str, float]:
        """Token-weighted mean over ranks (``dead_fraction`` and ``lr`` are already global)."""
        keys = [k for k in metrics if k not in ("dead_fraction", "lr")]
        w = n_local / self.n_total
        t = self._sum(torch.tensor([metrics[k] * w for k in keys], dtype=torch.float64))
        return {**metrics, **{k: float(v) for k, v in zip(keys, t.tolist())}}


# The trainer --------------------------------------------------------------------------------------


class _RankBuffers:
    """Every rank's buffer state (and RNG), packed as one "buffer" for :meth:`Trainer.state_dict`."""

    def __init__(self, parts: list[tuple[dict[str, Any] | None, dict[str, Tensor]]]):
        self.parts = parts

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        meta = {"distributed": True, "world_size": len(self.parts), "ranks": [m for m, _ in self.parts]}
        tensors = {f"rank{r}.{k}": v for r, (_, t) in enumerate(self.parts) for k, v in t.items()}
        return meta, tensors


class _RankLoader:
    """Hands this rank's part of a :class:`_RankBuffers` state to its buffer and RNG."""

    def __init__(self, buffer: Any, rank: int, world_size: int, path: Path):
        self.buffer, self.rank, self.world, self.path = buffer, rank, world_size, path

    def load_state_dict(self, meta: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        if not meta.get("distributed"):
            raise ConfigError(f"{self.path}: not a checkpoint of a distributed run")
        if meta["world_size"] != self.world:
            raise ConfigError(f"{self.path}: written by {meta['world_size']} ranks; resume with the same number (now {self.world})")
        pre = f"rank{self.rank}."
        mine = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        torch.set_rng_state(mine.pop("rng.torch"))
        buf_meta = meta["ranks"][self.rank]
        if self.buffer is not None:
            if buf_meta is None:
                raise ConfigError(f"{self.path}: the checkpoint has no buffer state")
            self.buffer.load_state_dict(buf_meta, mine)


def _rank_state(buffer: Any) -> tuple[dict[str, Any] | None, dict[str, Tensor]]:
    meta, tensors = buffer.state_dict() if buffer is not None else (None, {})
    tensors = {k: v.detach().cpu() for k, v in tensors.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    return meta, tensors


class DistributedTrainer(Trainer):
    """A :class:`~.trainer.Trainer` over several processes (see the module docstring).

    Args:
        entries: every entry, built identically on every rank (same names, same order).
        mode: ``"ddp"`` (each rank its own data, gradients averaged) or ``"shard"`` (each rank the same
            data, its own subset of the entries).
        device: where this rank trains (its entries are moved there); ``None`` = leave them.
        autocast_dtype: as for :class:`~.trainer.Trainer`.
        group: a process group (default: the world).
    """

    def __init__(
        self,
        entries: Sequence[TrainEntry],
        mode: str = "ddp",
        *,
        device: str | torch.device | None = None,
        autocast_dtype: torch.dtype | None = None,
        group: Any = None,
    ):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("torch.distributed is not initialised: use distributed_context() under torchrun")
        super().__init__(entries, autocast_dtype=autocast_dtype)
        self.mode, self.group = mode, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.owner = assign_entries(self.entries, self.world_size) if mode == "shard" else [self.rank] * len(self.entries)
        self.local = [e for e, r in zip(self.entries, self.owner) if r == self.rank]
        if device is not None:
            for e in self.local:
                e.objective.module.to(device)  # parameters move in place: the optimiser keeps them
                e.tokens_since_fired = e.tokens_since_fired.to(device)
        self.sync = GradSync(group)
        if mode == "ddp":
            for e in self.entries:
                e.sync = self.sync

    @property
    def is_main(self) -> bool:  # type: ignore[override]
        return self.rank == 0

    def _agree(self, has_batch: bool, n: int) -> tuple[bool, int]:
        t = self.sync._sum(torch.tensor([0 if has_batch else 1, n], dtype=torch.int64))
        return int(t[0].item()) == 0, int(t[1].item()) if self.mode == "ddp" else n

    def step(self, batch: dict[str, Tensor] | Tensor, _n_total: int | None = None) -> dict[str, dict[str, float] | None]:
        """One step of this rank's entries on its ``batch`` (collective in ``ddp`` mode: every rank calls it)."""
        batch = self._as_dict(batch)
        n_local = int(next(iter(batch.values())).shape[0])
        self.sync.n_total = _n_total if _n_total is not None else self._agree(True, n_local)[1]
        return super().step(batch, _n_total=self.sync.n_total)

    def _gather_results(self, results: dict[str, Any]) -> dict[str, Any]:
        if self.mode == "ddp":
            return results
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, results, group=self.group)
        return {k: v for p in parts for k, v in p.items()}

    # Gathering, saving, resuming -----------------------------------------------------------------

    def gather(self) -> None:
        """Shard mode: bring every entry's weights, optimiser and counters to rank 0 (collective)."""
        if self.mode != "shard":
            return
        mine = {e.name: e.state_dict() for e in self.local}
        parts: list[Any] = [None] * self.world_size if self.is_main else None  # type: ignore[assignment]
        dist.gather_object(mine, parts, dst=self._global_rank(0), group=self.group)
        if self.is_main:
            for r, part in enumerate(parts):
                if r != self.rank:
                    for name, (meta, tensors) in part.items():
                        self.entry(name).load_state_dict(meta, tensors, f"rank {r}")

    def _global_rank(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _barrier(self) -> None:
        if dist.get_backend(self.group) == "nccl":
            dist.barrier(group=self.group, device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier(group=self.group)

    def save_checkpoint(self, path: str | os.PathLike, buffer: Any = None) -> Path:
        """Rank 0 writes one checkpoint of every entry plus each rank's buffer and RNG (collective)."""
        if self.mode == "ddp" and any(e.pending for e in self.local):
            # each rank holds its own first batches for the statistics; a checkpoint keeps rank 0's only
            raise ConfigError(
                f"cannot checkpoint a data-parallel run at step {self.step_count}, before its first "
                f"{max(e.settings.init_batches for e in self.local)} batches (init_batches) are in: checkpoint later"
            )
        self.gather()
        parts: list[Any] = [None] * self.world_size if self.is_main else None  # type: ignore[assignment]
        dist.gather_object(_rank_state(buffer), parts, dst=self._global_rank(0), group=self.group)
        if self.is_main:
            _ckpt.save_checkpoint(self, path, _RankBuffers(parts))
        self._barrier()
        return Path(path)

    def load_checkpoint(self, path: str | os.PathLike, buffer: Any = None) -> dict[str, Any]:
        """Every rank reads ``path`` (written by :meth:`save_checkpoint` with the same world size)."""
        path = Path(path)
        return _ckpt.load_checkpoint(self, path, _RankLoader(buffer, self.rank, self.world_size, path))

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Rank 0 saves every entry's final model to ``out_dir/<name>`` (collective); returns the paths
        on rank 0, ``{}`` elsewhere."""
        self.gather()
        paths = super().save(out_dir) if self.is_main else {}
        self._barrier()
        return paths


__all__ = [
    "MODES", "DistInfo", "DistributedTrainer", "GradSync", "assign_entries", "distributed_context", "env_info",
    "rank_slice", "shard_disk_source",
]
