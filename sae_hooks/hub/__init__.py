"""Hub and on-disk formats: loading every common SAE format, the release registry, and publishing."""

from .detect import AmbiguousFormatError, UnknownFormatError, detect_format
from .load import UnknownSourceError, list_sae_ids, load, load_many
from .publish import push_to_hub
from .releases import SAEIdNotFoundError, UnsupportedReleaseError, list_pretrained

__all__ = [
    "AmbiguousFormatError", "UnknownFormatError", "detect_format",
    "UnknownSourceError", "list_sae_ids", "load", "load_many",
    "push_to_hub",
    "SAEIdNotFoundError", "UnsupportedReleaseError", "list_pretrained",
]
