"""``argparse`` ``type=`` validators: every CLI argument is checked when it is parsed, so a bad value
ends in a one-line usage error (exit status 2) instead of a traceback or a run that does something
else than asked (``--shard-tokens 0`` used to write empty shards forever)."""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable

#: Largest count accepted for token/step arguments (2**40 tokens is far beyond any run; it stops typos
#: such as an extra zero row from allocating absurd buffers).
MAX_COUNT = 2**40


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_in(low: int, high: int = MAX_COUNT) -> Callable[[str], int]:
    """An integer in ``[low, high]``."""

    def parse(text: str) -> int:
        value = _int(text)
        if not low <= value <= high:
            bound = f">= {low}" if high == MAX_COUNT else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in "invalid <name> value" messages
    return parse


positive_int = int_in(1)
nonnegative_int = int_in(0)


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value:g}")
    return value


def nonnegative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value:g}")
    return value


def existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        what = "does not exist" if not os.path.exists(text) else "is not a folder"
        raise argparse.ArgumentTypeError(f"{text!r} {what}")
    return text


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        what = "does not exist" if not os.path.exists(text) else "is not a regular file"
        raise argparse.ArgumentTypeError(f"{text!r} {what}")
    return text


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def model_source(text: str) -> str:
    """An existing folder, or something shaped like a Hub model id (``gpt2``, ``EleutherAI/pythia-70m``)."""
    if os.path.isdir(text) or (_HUB_ID.match(text) and not os.path.exists(text)):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a model folder nor a Hub model id ('namespace/name')")


def output_dir(text: str) -> str:
    """A folder to write (it may not exist yet) whose name is not an existing file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return text


def device(text: str) -> str:
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps ...)") from None
    return text
