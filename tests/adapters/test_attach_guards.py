"""Smaller attach guards (issue 10 item 9): a removed attachment refuses edits; one module cannot get both
the nnsight and the torch adapter; an SAE on another device than the model is refused with a typed error."""

from __future__ import annotations

import copy

import pytest
import torch

from sae_hooks.errors import SAEHooksError

pytest.importorskip("transformers")
from sae_hooks.adapters.torch import attach  # noqa: E402


def test_removed_attachment_refuses_edits(hf, sae) -> None:
    model = attach(copy.deepcopy(hf))
    att = model.add_sae(sae)
    att.remove()
    for edit in (lambda: att.ablate(1), lambda: att.clamp(1, 2.0), lambda: att.steer(1, 3.0)):
        with pytest.raises(SAEHooksError, match="removed"):
            edit()
    assert not att.edits


def test_nnsight_then_torch_on_one_module_is_refused(hf) -> None:
    nnsight = pytest.importorskip("nnsight")
    from sae_hooks.adapters.nnsight import attach as attach_nn
    from sae_hooks.adapters.nnsight import detach as detach_nn

    envoy = attach_nn(nnsight.NNsight(copy.deepcopy(hf)))
    with pytest.raises(SAEHooksError, match="one adapter"):
        attach(envoy._module)
    detach_nn(envoy)
    attach(envoy._module)  # allowed once the nnsight adapter is gone


def test_sae_on_another_device_is_refused(hf, sae) -> None:
    model = attach(copy.deepcopy(hf))
    elsewhere = copy.deepcopy(sae).to("meta")
    with pytest.raises(SAEHooksError, match="meta"):
        model.add_sae(elsewhere)
    assert not model.sae_manager.attachments
