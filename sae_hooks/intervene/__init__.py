"""Interventions and the attach layer every adapter shares.

* :mod:`.functions`: what happens to the activation at a site (record, splice, error term, ablation,
  steering, position filters) -- pure functions of tensors;
* :mod:`.manager`: ``add_sae`` / ``remove_sae`` / ``saes()`` bookkeeping over an adapter's
  :class:`Backend`;
* :mod:`.pair`: attaching a Jacobian SAE pair through the same manager.
"""

from .functions import (
    RECORD_NAMES,
    AblationMode,
    ForwardContext,
    LatentEdit,
    NullRecorder,
    PositionSpec,
    Recorder,
    SiteIntervention,
    Steering,
    position_mask,
)
from .manager import Attachment, Backend, Remover, SAEManager
from .pair import PairAttachment, attach_pair, is_pair, pair_attached
from .attribution import Attribution, attribute

__all__ = [
    "RECORD_NAMES", "AblationMode", "ForwardContext", "LatentEdit", "NullRecorder", "PositionSpec", "Recorder",
    "SiteIntervention", "Steering", "position_mask",
    "Attachment", "Backend", "Remover", "SAEManager",
    "PairAttachment", "attach_pair", "is_pair", "pair_attached", "Attribution", "attribute",
]
