"""Read and replace the hidden-state tensor of a module's input or output, whatever its container.

Hugging Face blocks return tuples ``(hidden, attn_weights, ...)`` or ``ModelOutput`` dicts; most modules
return a bare tensor. The hidden state is the tensor, element 0 of a tuple/list, or field 0 of a dict.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def hidden_of(value: Any) -> Tensor | None:
    """The hidden-state tensor in a module's output (``(batch, seq, d)`` for a transformer block),
    or ``None`` when there is none."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    if isinstance(value, dict) and value:  # transformers ModelOutput
        first = next(iter(value.values()))
        return first if isinstance(first, Tensor) else None
    return None


def with_hidden(value: Any, new: Tensor) -> Any:
    """``value`` with its hidden-state element replaced by ``new`` (other elements untouched)."""
    if isinstance(value, Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    key = next(iter(value))
    value[key] = new  # ModelOutput: item assignment keeps attribute access in sync
    return value


__all__ = ["hidden_of", "with_hidden"]
