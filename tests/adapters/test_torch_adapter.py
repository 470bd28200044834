"""The plain-PyTorch adapter: sites, tuples, padding, batch 1, long sequences, capture, errors, leaks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sae_hooks import make_sae
from sae_hooks.errors import HookNotFoundError
from sae_hooks.saes.base import SparseLatents

transformers = pytest.importorskip("transformers")
from sae_hooks.adapters.torch import attach, detach  # noqa: E402

KEY = "blocks.0.hook_resid_post.hook_sae_acts_post"


@pytest.fixture
def model(hf):
    return attach(copy.deepcopy(hf))


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _layer0_out(hf, tokens, **kw):
    got = {}
    h = hf.transformer.h[0].register_forward_hook(lambda m, a, o: got.__setitem__("x", o))
    with torch.no_grad():
        hf(tokens, **kw)
    h.remove()
    return got["x"]


class TupleLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x), x.sum(-1)  # (hidden, aux): only hidden may be replaced


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = TupleLayer()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h, aux = self.layer(x)
        return self.head(h), aux


def test_tuple_output_only_hidden_replaced():
    torch.manual_seed(0)
    toy = attach(Toy())
    s = make_sae("relu", 8, 16)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = toy.head(s(toy.layer.lin(x)))
        with toy.saes(s, hook="layer"):
            out, aux = toy(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(aux, x.sum(-1))  # untouched second element


def test_input_site_and_spellings(model, hf, sae):
    tokens = torch.randint(1, 100, (2, 5))
    x0 = _layer0_out(hf, tokens)
    att = model.add_sae(sae, "transformer.h.1:input", splice=False)
    assert att.name == "blocks.1.hook_resid_pre"  # the canonical (TL) name of that module site
    with model.sae_capture() as cache:
        model(tokens)
    assert torch.allclose(cache["blocks.1.hook_resid_pre.hook_sae_input"], x0, atol=1e-6)
    assert torch.allclose(cache["blocks.1.hook_resid_pre.hook_sae_acts_post"], sae.encode(x0), atol=1e-6)
    model.remove_sae("blocks.1.hook_resid_pre")  # either spelling finds it
    # A module without a TL name keeps its module spelling.
    att = model.add_sae(make_sae("relu", 96, 8), "transformer.h.0.attn.c_attn")
    assert att.name == "transformer.h.0.attn.c_attn"


def test_left_padding_positions_count_from_first_real_token(model, sae):
    tokens = torch.randint(1, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    with model.saes(sae, skip_positions=0):
        with model.sae_capture(KEY) as cache:
            model(tokens, attention_mask=mask)
    lat = cache[KEY]
    assert lat[0, 3].abs().sum() == 0 and lat[1, 0].abs().sum() == 0
    assert lat[0, 4].abs().sum() > 0 and lat[1, 1].abs().sum() > 0
    assert lat[0, :3].abs().sum() > 0  # padding is never "position 0"


def test_batch_size_one_splice_and_error_term(model, hf, sae):
    tokens = torch.randint(1, 100, (1, 9))
    with torch.no_grad():
        clean = hf(tokens).logits
        with model.saes(sae, error_term=True):
            assert torch.allclose(model(tokens).logits, clean, atol=1e-5)
        truth = copy.deepcopy(hf)
        truth.transformer.h[0].register_forward_hook(lambda m, a, o: sae(o))
        with model.saes(sae):
            assert torch.allclose(model(tokens).logits, truth(tokens).logits, atol=1e-5)


def test_long_sequence_steer_last_position_only(model, hf, sae):
    tokens = torch.randint(1, 100, (2, 64))  # n_positions
    with torch.no_grad():
        clean = hf(tokens).logits
        with model.saes(sae, splice=False) as (att,):
            att.steer(4, 5.0, positions=[-1])
            out = model(tokens).logits
    assert torch.allclose(out[:, :-1], clean[:, :-1], atol=1e-5)  # causal: earlier positions unchanged
    assert (out[:, -1] - clean[:, -1]).abs().max() > 1e-3


def test_capture_is_opt_in_and_topk_stays_sparse(model, monkeypatch):
    topk = make_sae("topk", 32, 64, k=4, sites=["blocks.0.hook_resid_post"])
    tokens = torch.randint(1, 100, (2, 5))
    calls = []
    original = SparseLatents.to_dense
    monkeypatch.setattr(SparseLatents, "to_dense", lambda self: calls.append(1) or original(self))
    with model.saes(topk, error_term=True):
        with torch.no_grad():
            model(tokens)
        assert calls == []  # nothing recorded, nothing densified
        with model.sae_capture("*.hook_sae_recons") as cache:
            model(tokens)
        assert calls == [] and list(cache) == ["blocks.0.hook_resid_post.hook_sae_recons"]
        with model.sae_capture() as cache:
            model(tokens)
        assert calls and cache[KEY].shape == (2, 5, 64) and (cache[KEY] != 0).sum(-1).max() <= 4
    with pytest.raises(HookNotFoundError, match="hook_sae_acts_post"):
        cache["blocks.0.hook_resid_post.hook_sae_acts_psot"]


def test_wrong_path_errors(model, sae):
    with pytest.raises(HookNotFoundError, match=r"Did you mean: 'transformer\.h\.0\.attn'"):
        model.add_sae(sae, "transformer.h.0.atn")
    with pytest.raises(HookNotFoundError, match="blocks.0.hook_resid_post"):
        model.add_sae(sae, "blocks.0.hook_resid_psot")
    toy = attach(Toy())
    with pytest.raises(HookNotFoundError, match="hook_names="):
        toy.add_sae(make_sae("relu", 8, 16), "blocks.0.hook_resid_post")


def test_explicit_hook_names_for_a_custom_model():
    torch.manual_seed(0)
    toy = attach(Toy(), hook_names={"blocks.0.hook_resid_post": "layer", "blocks.0.hook_resid_pre": "layer:input"})
    s = make_sae("relu", 8, 16, sites=["blocks.0.hook_resid_pre"])
    x = torch.randn(1, 3, 8)
    with toy.saes(s) as (att,):
        assert att.name == "blocks.0.hook_resid_pre"
        with torch.no_grad():
            assert torch.allclose(toy(x)[0], toy.head(toy.layer.lin(s(x))), atol=1e-6)
    with pytest.raises(HookNotFoundError, match="no module"):
        attach(Toy(), hook_names={"blocks.0.hook_resid_post": "layr"})


def test_no_hooks_left_after_exceptions(model, sae):
    before = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with model.saes(sae, error_term=True):
            assert _hook_count(model) == before + 1
            model(torch.randint(1, 100, (1, 4)))
            raise RuntimeError("boom")
    assert _hook_count(model) == before
    # A multi-site attach that fails on its last site leaves nothing behind.
    with pytest.raises(HookNotFoundError):
        model.add_sae(sae, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "transformer.h.9"])
    assert _hook_count(model) == before and not model.sae_manager.attachments
    # A forward that fails inside the SAE (wrong width at a site of unknown width) leaves only the
    # attachment's own hook, which reset_saes removes.
    bad = make_sae("relu", 16, 8)
    for known in ("transformer.h.0.attn", "transformer.h.0.attn:input"):  # known width: refused at attach time
        with pytest.raises(Exception, match="reads 16 features"):
            model.add_sae(bad, known)
    model.add_sae(bad, "transformer.h.0.mlp.act")  # an activation function: width unknown until it runs
    with pytest.raises(Exception, match="16"):
        model(torch.randint(1, 100, (1, 4)))
    model.reset_saes()
    assert _hook_count(model) == before
    detach(model)
    assert _hook_count(model) == before - 1 and "add_sae" not in model.__dict__


def test_module_only_site_attaches_with_no_arguments(model, tmp_path):
    from sae_hooks import Site, load_native, save

    s = make_sae("relu", 32, 16, sites=[Site(module="transformer.h.1")])
    save(s, tmp_path / "sae")
    att = model.add_sae(load_native(tmp_path / "sae"))
    assert att.name == "blocks.1.hook_resid_post"
