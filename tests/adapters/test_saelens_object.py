"""A SAELens SAE *object* is accepted by ``add_sae`` on every adapter, converted duck-typed (SAELens is never
imported; issue 10 item (ii)). The object here exposes SAELens's API (``cfg.to_dict()``, ``state_dict()``,
``W_enc``...) over the config and weights SAELens itself wrote in ``tests/fixtures/golden/saelens``; the
truth is SAELens's own encode/decode outputs saved beside them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

pytest.importorskip("transformers")
from sae_hooks.adapters.torch import attach  # noqa: E402

GOLDEN = Path(__file__).parents[1] / "fixtures" / "golden" / "saelens"


class _SAELensLikeCfg:
    def __init__(self, data):
        self._data = data

    def to_dict(self):
        return copy.deepcopy(self._data)


class _SAELensLikeSAE(nn.Module):
    """SAELens's in-memory SAE API (cfg.to_dict(), parameters W_enc/W_dec/b_enc/b_dec) over its saved files."""

    def __init__(self, folder: Path):
        super().__init__()
        self.cfg = _SAELensLikeCfg(json.loads((folder / "cfg.json").read_text()))
        for name, t in load_file(str(folder / "sae_weights.safetensors")).items():
            self.register_parameter(name, nn.Parameter(t))


@pytest.mark.parametrize("kind", ["standard", "jumprelu"])
def test_add_sae_accepts_a_saelens_sae_object(kind) -> None:
    folder = GOLDEN / kind
    if not folder.exists():
        pytest.skip(f"no golden fixture {folder}")
    obj = _SAELensLikeSAE(folder)
    golden = load_file(str(folder / "golden.safetensors"))
    d_in = obj.cfg.to_dict()["d_in"]

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(d_in, d_in)

        def forward(self, x):
            return self.layer(x)

    torch.manual_seed(0)
    model = attach(Toy(), hook_names={"blocks.0.hook_resid_pre": "layer:input"})
    att = model.add_sae(obj)  # at the site the SAELens config names
    assert att.sites == ["blocks.0.hook_resid_pre"] and att.sae is not obj
    torch.testing.assert_close(att.sae.encode(golden["x"]), golden["latents"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(att.sae(golden["x"]), golden["recon"], atol=1e-5, rtol=1e-5)
    with model.sae_capture() as cache, torch.no_grad():
        model(golden["x"])
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre.hook_sae_acts_post"], golden["latents"], atol=1e-5, rtol=1e-5)
    model.remove_sae(obj)  # the original object finds its attachment
    assert not model.sae_manager.attachments
    with pytest.raises(TypeError, match="SAELens"):
        model.add_sae(object())
