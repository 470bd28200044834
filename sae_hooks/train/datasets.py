"""Token batches from Hugging Face datasets: text columns tokenised and packed, or pre-tokenised ``input_ids``.

>>> ds = load_dataset_any("monology/pile-uncopyrighted", split="train", streaming=True)
>>> batches = TokenBatches(ds, tokenizer, seq_len=128, batch_size=16, shuffle=True, seed=0)
>>> batch = batches.next_batch()            # (16, 128) int64; None when the data is exhausted
>>> state = batches.state_dict()            # {"epoch": 0, "example": 143, "offset": 57}: the dataset position

Packing (text columns): each document is tokenised without special tokens and preceded by BOS;
the documents are concatenated and cut into rows of ``seq_len`` tokens that each start with BOS, as
:func:`sae_hooks.train.sources.pack_texts` does (a model trained with BOS at position 0 sees it there,
and activations at BOS are dropped by the sources). A tokenizer without a BOS token uses its EOS
token as separator; with neither, rows are plain slices of the stream. Pre-tokenised columns
(``input_ids``) are used as they are: concatenated and cut into rows of ``seq_len``, nothing added.

Resuming: the position is the epoch, the index of the example whose tokens come next (in the shuffled
order) and how many of its tokens were already used. :meth:`TokenBatches.load_state_dict` skips the
examples before it without tokenising them, re-tokenises that one example and drops the used tokens,
so a resumed run sees exactly the batches the uninterrupted run would have seen.

Needs the ``datasets`` library (``pip install 'sae-hooks[datasets]'``); imported only here.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .sources import LiveSource

_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".arrow": "arrow"}


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("training from datasets needs the datasets library: pip install 'sae-hooks[datasets]'") from e
    return datasets


def load_dataset_any(
    name_or_path: str | os.PathLike,
    *,
    split: str = "train",
    config: str | None = None,
    streaming: bool = False,
    revision: str | None = None,
) -> Any:
    """A ``datasets.Dataset`` (or ``IterableDataset`` when ``streaming``) from what the user names:

    * a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
    * a data file (``.parquet``, ``.json``/``.jsonl``, ``.csv``, ``.txt``, ``.arrow``) or a folder of them;
    * otherwise a Hub dataset id (``HF_ENDPOINT``, the cache and ``HF_HUB_OFFLINE`` apply, as for any
      ``datasets.load_dataset`` call; ``streaming=True`` reads without downloading the whole corpus).
    """
    ds_lib = _datasets()
    path = Path(name_or_path)
    if path.exists():
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                              or (path / "state.json").exists()):
            ds = ds_lib.load_from_disk(str(path))
            if isinstance(ds, ds_lib.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"{path}: no split {split!r}; it has {sorted(ds)}")
                ds = ds[split]
            return ds.to_iterable_dataset() if streaming else ds
        files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.suffix in _FILE_BUILDERS)
        builders = {_FILE_BUILDERS[p.suffix] for p in files}
        if not files or len(builders) != 1:
            raise ConfigError(
                f"{path}: expected a save_to_disk folder or data files of one kind ({', '.join(sorted(_FILE_BUILDERS))}); "
                f"found {sorted({p.suffix for p in files}) or 'none'}"
            )
        return ds_lib.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train", streaming=streaming)
    return ds_lib.load_dataset(str(name_or_path), config, split=split, streaming=streaming, revision=revision)


def text_column(features: Sequence[str] | None, column: str | None) -> str:
    """The column to read: ``column`` if given, else ``input_ids``, else ``text``."""
    names = list(features or [])
    if column is not None:
        if names and column not in names:
            raise ConfigError(f"the dataset has no column {column!r}; its columns are {names}")
        return column
    for name in ("input_ids", "text", "content"):
        if name in names:
            return name
    raise ConfigError(f"cannot tell which column holds the text; pass --column (columns: {names})")


class TokenBatches:
    """Fixed-length ``(batch_size, seq_len)`` token batches from a dataset, with a resumable position.

    Args:
        dataset: a ``datasets.Dataset`` or ``IterableDataset``.
        tokenizer: a Hugging Face tokenizer (not needed for a pre-tokenised column).
        column: the text or ``input_ids`` column (default: ``input_ids``, else ``text``).
        bos_token_id: the separator / row start for text columns (default: the tokenizer's BOS, else EOS).
        shuffle, seed, shuffle_buffer: shuffle the examples (a map-style dataset exactly; a streaming one
            through a ``shuffle_buffer``-example buffer), with ``seed + epoch`` for each epoch.
        epochs: passes over the data.
        rank, world_size: keep this rank's share of the examples (``datasets.distributed.split_dataset_by_node``).
    """

    def __init__(
        self,
        dataset: Any,
        tokenizer: Any,
        seq_len: int,
        batch_size: int,
        *,
        column: str | None = None,
        bos_token_id: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 10_000,
        epochs: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ):
        if seq_len < 2 or batch_size < 1:
            raise ConfigError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.dataset = dataset
        names = getattr(dataset, "column_names", None)
        self.column = text_column(names, column)
        self.pretokenized = self.column == "input_ids"
        self.tokenizer = tokenizer
        if not self.pretokenized and tokenizer is None:
            raise ConfigError(f"column {self.column!r} holds text: a tokenizer is needed")
        if bos_token_id is None and not self.pretokenized:
            bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.bos_token_id = None if self.pretokenized else bos_token_id
        self.seq_len, self.batch_size = seq_len, batch_size
        self.shuffle, self.seed, self.shuffle_buffer, self.epochs = shuffle, seed, shuffle_buffer, epochs
        self.epoch, self.example, self.offset = 0, 0, 0  # position of the next unused token
        self._it: Iterator[Any] | None = None
        self._pending: deque[list] = deque()  # [example index, offset, tokens] segments not yet used

    # Position -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """Where the next batch starts: ``{"epoch", "example", "offset"}`` (JSON-able)."""
        if self._pending:
            ex, off, _ = self._pending[0]
            return {"epoch": self.epoch, "example": ex, "offset": off}
        return {"epoch": self.epoch, "example": self.example, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.example, self.offset = int(state["epoch"]), int(state["example"]), int(state["offset"])
        self._it, self._pending = None, deque()

    # Reading --------------------------------------------------------------------------------------

    def _ordered(self, epoch: int) -> Any:
        ds = self.dataset
        if self.shuffle:
            if hasattr(ds, "set_epoch") and not hasattr(ds, "__len__"):  # IterableDataset
                ds = ds.shuffle(seed=self.seed + epoch, buffer_size=self.shuffle_buffer)
            else:
                ds = ds.shuffle(seed=self.seed + epoch)
        return ds

    def _tokens(self, example: dict[str, Any]) -> list[int]:
        value = example[self.column]
        if self.pretokenized:
            return [int(t) for t in value]
        if not isinstance(value, str):
            raise ConfigError(f"column {self.column!r} must hold strings (or use input_ids), got {type(value).__name__}")
        ids = self.tokenizer(value, add_special_tokens=False, verbose=False)["input_ids"]  # rows are cut below
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + list(ids)

    def _next_segment(self) -> bool:
        """Append the next example's tokens to the pending segments; False at the end of the data."""
        while True:
            if self.epoch >= self.epochs:
                return False
            if self._it is None:
                self._it = iter(self._ordered(self.epoch).skip(self.example))
            example = next(self._it, None)
            if example is None:
                self.epoch, self.example, self.offset, self._it = self.epoch + 1, 0, 0, None
                self._pending.clear()  # a partial row at the end of an epoch is dropped
                continue
            tokens = self._tokens(example)
            start, self.offset = self.offset, 0
            if start < len(tokens):
                self._pending.append([self.example, start, tokens[start:]])
            self.example += 1
            return True

    def _take(self, n: int) -> list[int] | None:
        """The next ``n`` tokens of the packed stream (None if fewer are left in this epoch)."""
        while sum(len(seg[2]) for seg in self._pending) < n:  # an epoch boundary clears the pending tokens
            if not self._next_segment():
                return None
        out: list[int] = []
        while len(out) < n:
            seg = self._pending[0]
            k = min(n - len(out), len(seg[2]))
            out.extend(seg[2][:k])
            seg[1] += k
            seg[2] = seg[2][k:]
            if not seg[2]:
                self._pending.popleft()
        if not self._pending:
            self.offset = 0
        return out

    def next_row(self) -> list[int] | None:
        if self.bos_token_id is None:
            return self._take(self.seq_len)
        body = self._take(self.seq_len - 1)
        return None if body is None else [self.bos_token_id, *body]

    def next_batch(self) -> Tensor | None:
        """The next ``(batch_size, seq_len)`` batch (the last one may have fewer rows); None when done."""
        rows = []
        while len(rows) < self.batch_size:
            row = self.next_row()
            if row is None:
                break
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long) if rows else None

    def __iter__(self) -> Iterator[Tensor]:
        while (batch := self.next_batch()) is not None:
            yield batch

    def peek(self) -> Tensor | None:
        """The next batch, without moving the position."""
        state = self.state_dict()
        batch = self.next_batch()
        self.load_state_dict(state)
        return batch


class DatasetSource(LiveSource):
    """A :class:`~sae_hooks.train.sources.LiveSource` fed by :class:`TokenBatches`, whose checkpointed
    position is the dataset position (resuming skips examples, not forward passes)."""

    def __init__(self, model: Any, sites: Sequence[str], batches: TokenBatches, **reader_kwargs: Any):
        super().__init__(model, sites, [], **reader_kwargs)
        self.batches = batches

    def next_chunk(self) -> dict[str, Tensor] | None:
        batch = self.batches.next_batch()
        if batch is None:
            return None
        self.forward_passes += 1
        return self.reader.read(batch, torch.ones_like(batch))

    def state_dict(self) -> dict[str, Any]:
        return {"dataset": self.batches.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "dataset" not in state:
            raise ConfigError("the checkpoint was not written by a --dataset run (no dataset position)")
        self.batches.load_state_dict(state["dataset"])


# Command line ---------------------------------------------------------------------------------------


def add_dataset_args(parser: Any) -> None:
    """``--dataset --split --column --streaming --dataset-config`` (used by ``sae-hooks train`` and ``dashboard``)."""
    parser.add_argument("--dataset", metavar="NAME_OR_PATH",
                        help="Hugging Face dataset: Hub id, save_to_disk folder, or parquet/json/csv/txt file(s) "
                             "(instead of --texts)")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--column", help="text or input_ids column (default: input_ids, else text)")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it whole")
    parser.add_argument("--dataset-config", help="dataset configuration name (e.g. a FineWeb sample)")


def token_batches(args: Any, tokenizer: Any, *, shuffle: bool = True, rank: int = 0, world: int = 1) -> TokenBatches:
    """:class:`TokenBatches` from parsed ``--dataset ... --seq-len --batch-size --seed --epochs`` arguments."""
    ds = load_dataset_any(args.dataset, split=args.split, config=args.dataset_config, streaming=args.streaming)
    return TokenBatches(ds, tokenizer, args.seq_len, args.batch_size, column=args.column, shuffle=shuffle,
                        seed=getattr(args, "seed", 0), epochs=getattr(args, "epochs", 1), rank=rank, world_size=world)


def dataset_source(model: Any, tokenizer: Any, sites: Sequence[str], args: Any, *, rank: int = 0,
                   world: int = 1) -> tuple[DatasetSource, Tensor]:
    """The live source of ``sae-hooks train --dataset`` and its first batch (for the site widths)."""
    batches = token_batches(args, tokenizer, rank=rank, world=world)
    first = batches.peek()
    if first is None:
        raise ConfigError(f"{args.dataset}: no full row of {args.seq_len} tokens in split {args.split!r}")
    source = DatasetSource(model, sites, batches, bos_token_id=batches.bos_token_id if batches.bos_token_id is not None
                           else getattr(tokenizer, "bos_token_id", None),
                           autocast_dtype=torch.bfloat16 if getattr(args, "bf16", False) else None)
    return source, first
