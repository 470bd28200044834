"""Training in place: activation sources, a shuffling buffer, ONE trainer for every objective (SAEs,
transcoders, multi-layer SAEs, Jacobian pairs), robust start-of-run statistics, resumable checkpoints and
``torch.distributed``. Losses belong to the architectures (:mod:`sae_hooks.saes`); the trainer only sees tensors."""

from .buffer import ShuffleBuffer
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistributedTrainer, distributed_context, rank_slice
from .objectives import JacobianObjective, MultiLayerObjective, Objective, SAEObjective, fold_scale, fold_transcoder_scales
from .sources import ActivationReader, DiskSource, IteratorSource, LiveSource, pack_texts, save_activations, token_mask
from .statistics import geometric_median
from .trainer import LocalSync, Trainer, TrainEntry, TrainSettings, pick_device, register_optimizer

__all__ = [
    "ShuffleBuffer", "load_checkpoint", "save_checkpoint",
    "ActivationReader", "DiskSource", "IteratorSource", "LiveSource", "save_activations", "pack_texts",
    "token_mask", "DistributedTrainer", "distributed_context", "rank_slice", "Trainer", "TrainEntry", "TrainSettings",
    "fold_scale", "fold_transcoder_scales", "geometric_median", "pick_device", "register_optimizer", "LocalSync",
    "Objective", "SAEObjective", "MultiLayerObjective", "JacobianObjective",
]
