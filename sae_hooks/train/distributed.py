"""Training past one process with ``torch.distributed`` (launched with ``torchrun``).

Two modes, both driven by :class:`DistributedTrainer`:

* ``"ddp"`` (data-parallel): every rank holds every SAE and reads its own shard of the data. After
  each backward, the gradients are summed across ranks weighted by each rank's share of the tokens
  (``n_rank / n_total``: the gradient of the loss of the whole global batch, whose losses are means
  over tokens), *before* the decoder's parallel gradient is removed, the gradient clipped and Adam
  stepped; so every rank takes the same step and the unit-norm projection that follows gives the same
  weights everywhere. The rest of the step is made global too: the first batch (input scale, ``b_dec``
  geometric median, the TopK MSE scale) is all-gathered, "fired" flags are OR-ed and token counts
  summed (dead latents agree), the AuxK normaliser is the variance of the residual over every rank's
  rows, NaN/inf skips are decided by all ranks together, and the metrics are averaged. TopK keeps its
  sparse decode and sparse backward: only the dense parameter gradients travel. ``batchtopk``'s batch
  top-k is taken per rank (as with a ``world_size`` times smaller batch) and its inference threshold
  averaged across ranks; the other architectures equal one process on the global batch.
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
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError
from ..saes.base import SAE
from . import checkpoint as _ckpt
from .trainer import EntryState, Trainer, TrainEntry, TrainSettings, _flat_metrics, _progress_bar, _summary

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
    """What :meth:`TrainEntry.train_step` calls (``entry.sync``) to make one data-parallel step global.

    ``n_local``/``n_total`` (this rank's and all ranks' rows in the current batch) are set by
    :meth:`DistributedTrainer.step` before the entries step.
    """

    def __init__(self, group: Any = None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.n_local = 0
        self.n_total = 0

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, group=self.group)
        return int(t.item()) == 0

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else torch.device("cpu")

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

    def after_backward(self, sae: SAE) -> None:
        """Sum the gradients weighted by ``n_local / n_total`` (one flat all-reduce; a gradient absent
        everywhere stays ``None``), and average the BatchTopK threshold the loss just updated."""
        params = [p for p in sae.parameters() if p.requires_grad]
        w = self.n_local / self.n_total
        flat = [p.grad.reshape(-1) * w if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=flat[0].dtype, device=flat[0].device)
        buf = torch.cat([*flat, present])
        thr = getattr(sae, "threshold", None)
        avg_thr = sae.cfg.architecture == "batchtopk" and isinstance(thr, Tensor) and not thr.requires_grad
        if avg_thr:
            buf = torch.cat([buf, thr.reshape(-1).to(buf.dtype) / self.world])
        dev = buf.device
        buf = buf.to(self._device())
        dist.all_reduce(buf, group=self.group)
        buf = buf.to(dev)
        i = 0
        for p in params:
            n = p.numel()
            p.grad = torch.empty_like(p).copy_(buf[i : i + n].view_as(p))  # the parameter's strides (fused Adam)
            i += n
        got = buf[i : i + len(params)] > 0
        for p, g in zip(params, got.tolist()):
            if not g:
                p.grad = None
        i += len(params)
        if avg_thr:
            with torch.no_grad():
                thr.copy_(buf[i:].view_as(thr).to(thr.dtype))

    def aux_denom(self, residual: Tensor) -> Tensor:
        """``mean ||e − mean e||²`` over every rank's rows (AuxK's normaliser of the whole batch)."""
        dev = self._device()
        s = torch.cat([residual.sum(0), residual.new_tensor([residual.shape[0]])]).to(dev)
        dist.all_reduce(s, group=self.group)
        mean = (s[:-1] / s[-1]).to(residual.device)
        q = (residual - mean).pow(2).sum().reshape(1).to(dev)
        dist.all_reduce(q, group=self.group)
        return (q[0] / s[-1]).to(residual.device)

    def fired(self, fired: Tensor, n: int) -> tuple[Tensor, int]:
        """Latents that fired on any rank, and the total rows of this step."""
        t = torch.cat([fired.to(torch.int64), torch.tensor([n], dtype=torch.int64, device=fired.device)]).to(self._device())
        dist.all_reduce(t, group=self.group)
        t = t.to(fired.device)
        return t[:-1] > 0, int(t[-1].item())

    def metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Token-weighted mean over ranks (``dead_fraction`` and ``lr`` are already global)."""
        keys = [k for k in metrics if k not in ("dead_fraction", "lr")]
        w = self.n_local / self.n_total
        t = torch.tensor([metrics[k] * w for k in keys], dtype=torch.float64, device=self._device())
        dist.all_reduce(t, group=self.group)
        return {**metrics, **{k: float(v) for k, v in zip(keys, t.tolist())}}


# The trainer --------------------------------------------------------------------------------------


class _RankBuffers:
    """Every rank's buffer state (and RNG), packed as one "buffer" for :func:`~.checkpoint.save_checkpoint`."""

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


def _entry_state(e: TrainEntry) -> dict[str, Any]:
    opt = e.optimizer.state_dict()
    opt["state"] = {i: {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in s.items()} for i, s in opt["state"].items()}
    return {
        "sae": {k: v.detach().cpu() for k, v in e.sae.state_dict().items()},
        "cfg": e.sae.cfg.to_dict(),
        "optimizer": opt,
        "dead": e.tokens_since_fired.cpu(),
        "state": dict(vars(e.state)),
        "settings": e.settings.to_dict(),
    }


def _load_entry_state(e: TrainEntry, st: dict[str, Any]) -> None:
    from ..config import SAEConfig

    e.sae.cfg = SAEConfig.from_dict(st["cfg"])
    e.sae.load_state_dict(st["sae"])
    e.optimizer.load_state_dict(st["optimizer"])
    e.tokens_since_fired = st["dead"].to(e.sae.device)
    e.state = EntryState(**st["state"])
    e.settings = TrainSettings.from_dict(st["settings"])


class DistributedTrainer:
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
        self.mode, self.group = mode, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.all = Trainer(entries, autocast_dtype=autocast_dtype)  # the checkpoint/save view, canonical counters
        self.autocast_dtype = autocast_dtype
        if mode == "shard":
            self.owner = assign_entries(self.all.entries, self.world_size)
        else:
            self.owner = [self.rank] * len(self.all.entries)
        self.local = [e for e, r in zip(self.all.entries, self.owner) if r == self.rank]
        if device is not None:
            for e in self.local:
                e.sae.to(device)  # parameters move in place: the optimiser keeps them
                e.tokens_since_fired = e.tokens_since_fired.to(device)
        self.sync = GradSync(group) if mode == "ddp" else None
        for e in self.all.entries:
            e.sync = self.sync
        self.sites = sorted({s for e in self.local for s in e.sites})

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def entries(self) -> list[TrainEntry]:
        """Every entry (in shard mode, those of other ranks are stale until :meth:`gather`)."""
        return self.all.entries

    @property
    def step_count(self) -> int:
        return self.all.step_count

    @property
    def tokens_seen(self) -> int:
        return self.all.tokens_seen

    def _cpu_or_cuda(self) -> torch.device:
        return self.sync._device() if self.sync else (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        )

    def _agree(self, has_batch: bool, n: int) -> tuple[bool, int]:
        """All ranks have a batch? and the total rows (one all-reduce)."""
        t = torch.tensor([0 if has_batch else 1, n], dtype=torch.int64, device=self._cpu_or_cuda())
        dist.all_reduce(t, group=self.group)
        return int(t[0].item()) == 0, int(t[1].item())

    def step(self, batch: dict[str, Tensor] | Tensor, _n_total: int | None = None) -> dict[str, dict[str, float] | None]:
        """One step of this rank's entries on its ``batch`` (collective in ``ddp`` mode: every rank calls it)."""
        if isinstance(batch, Tensor):
            sites = sorted({e.site for e in self.all.entries})
            if len(sites) != 1:
                raise ConfigError(f"a bare tensor batch is ambiguous with sites {sites}; pass a dict")
            batch = {sites[0]: batch}
        missing = [s for s in self.sites if s not in batch]
        if missing:
            raise ConfigError(f"rank {self.rank}: batch lacks sites {missing} (has {sorted(batch)})")
        n_local = int(next(iter(batch.values())).shape[0])
        if self.sync is not None:
            n_total = _n_total if _n_total is not None else self._agree(True, n_local)[1]
            self.sync.n_local, self.sync.n_total = n_local, n_total
        else:
            n_total = n_local
        out = {}
        for e in self.local:
            x, target = e.batch_args(batch)
            out[e.name] = e.train_step(x, self.autocast_dtype, target=target)
        self.all.step_count += 1
        self.all.tokens_seen += n_total
        return out

    def fit(
        self,
        data: Any,
        max_steps: int | None = None,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        progress: bool = False,
        log: Callable[[int, dict[str, Any]], None] | None = None,
        log_every: int = 10,
    ) -> DistributedTrainer:
        """As :meth:`Trainer.fit`; every rank calls it with its own ``data``. The run stops when any
        rank runs out of data; ``progress`` and ``log`` act on rank 0 only (``log`` gets every entry's
        metrics, gathered from all ranks)."""
        if max_steps is not None:
            for e in self.all.entries:
                if e.settings.total_steps is None:
                    e.settings.total_steps = max_steps
        next_batch = data.next_batch if hasattr(data, "next_batch") else iter(data).__next__
        bar = _progress_bar(progress and self.is_main, max_steps, self.step_count)
        t0, tok0 = time.perf_counter(), self.tokens_seen
        try:
            while max_steps is None or self.step_count < max_steps:
                try:
                    batch = next_batch()
                except StopIteration:
                    batch = None
                n = 0 if batch is None else (batch.shape[0] if isinstance(batch, Tensor) else int(next(iter(batch.values())).shape[0]))
                every, n_total = self._agree(batch is not None, n)
                if not every:
                    break
                results = self.step(batch, _n_total=n_total)  # type: ignore[arg-type]
                at_log = self.step_count % log_every == 0
                if at_log:  # collective in shard mode: every rank takes part, whether it logs or not
                    results = self._gather_results(results)
                if bar is not None:
                    bar.update(1)
                    if at_log:
                        rate = (self.tokens_seen - tok0) / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(_summary(results, rate), refresh=False)
                if log is not None and at_log and self.is_main:
                    log(self.step_count, _flat_metrics(results))
                if checkpoint_dir is not None and checkpoint_every and self.step_count % checkpoint_every == 0:
                    self.save_checkpoint(checkpoint_dir, data if hasattr(data, "state_dict") else None)
        finally:
            if bar is not None:
                bar.close()
        return self

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
        mine = {e.name: _entry_state(e) for e in self.local}
        parts: list[Any] = [None] * self.world_size if self.is_main else None  # type: ignore[assignment]
        dist.gather_object(mine, parts, dst=self._global_rank(0), group=self.group)
        if self.is_main:
            for r, part in enumerate(parts):
                if r == self.rank:
                    continue
                for name, st in part.items():
                    _load_entry_state(self.all.entry(name), st)

    def _global_rank(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _barrier(self) -> None:
        if dist.get_backend(self.group) == "nccl":
            dist.barrier(group=self.group, device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier(group=self.group)

    def save_checkpoint(self, path: str | os.PathLike, buffer: Any = None) -> Path:
        """Rank 0 writes one checkpoint of every entry plus each rank's buffer and RNG (collective)."""
        self.gather()
        parts: list[Any] = [None] * self.world_size if self.is_main else None  # type: ignore[assignment]
        dist.gather_object(_rank_state(buffer), parts, dst=self._global_rank(0), group=self.group)
        if self.is_main:
            _ckpt.save_checkpoint(self.all, path, _RankBuffers(parts))
        self._barrier()
        return Path(path)

    def load_checkpoint(self, path: str | os.PathLike, buffer: Any = None) -> dict[str, Any]:
        """Every rank reads ``path`` (written by :meth:`save_checkpoint` with the same world size)."""
        path = Path(path)
        meta = _ckpt.load_checkpoint(self.all, path, _RankLoader(buffer, self.rank, self.world_size, path))
        for e in self.local:  # load_checkpoint left them on their device; keep the dead counters there too
            e.tokens_since_fired = e.tokens_since_fired.to(e.sae.device)
        return meta

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """Rank 0 saves every entry's final SAE (native format) to ``out_dir/<name>`` (collective);
        returns the paths on rank 0, ``{}`` elsewhere."""
        self.gather()
        paths = self.all.save(out_dir) if self.is_main else {}
        self._barrier()
        return paths


__all__ = [
    "MODES", "DistInfo", "DistributedTrainer", "GradSync", "assign_entries", "distributed_context", "env_info",
    "rank_slice", "shard_disk_source",
]
