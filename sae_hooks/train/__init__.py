"""Training SAEs in place: activation sources, a shuffling buffer, per-architecture losses, a trainer
feeding many SAEs from one forward pass, and resumable checkpoints. The trainer only sees tensors."""

from .buffer import ShuffleBuffer
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistributedTrainer, distributed_context, rank_slice
from .sources import ActivationReader, DiskSource, IteratorSource, LiveSource, pack_texts, save_activations, token_mask
from .trainer import Trainer, TrainEntry, TrainSettings, fold_scale, geometric_median, pick_device

__all__ = [
    "ShuffleBuffer", "load_checkpoint", "save_checkpoint",
    "ActivationReader", "DiskSource", "IteratorSource", "LiveSource", "save_activations", "pack_texts",
    "token_mask", "DistributedTrainer", "distributed_context", "rank_slice", "Trainer", "TrainEntry", "TrainSettings", "fold_scale", "geometric_median", "pick_device",
]
