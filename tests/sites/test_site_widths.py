"""Widths are checked before the forward pass: every site whose width the site layer states (from module
weights or the config) has that width in a real forward pass, on every family and on TransformerLens
bridges; an SAE of the wrong width is refused by ``add_sae`` itself in every adapter (typed error naming
the site and both widths, nothing left installed); where the width is not knowable it is checked at the
first forward pass."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from conftest import build_tl_model, hf_family_cases, tiny_hf_gpt2
from sae_hooks import make_sae
from sae_hooks.errors import ShapeMismatchError
from sae_hooks.sites import HookDictSites, ModuleSites
from sae_hooks.sites import names as hooknames

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=FutureWarning)

# Module sites whose width cannot be read from weights or config: element-wise modules (activations,
# dropouts), rotary tables, whole models, token-id inputs. They are measured at the first forward pass.
UNKNOWABLE = re.compile(r"(act|act_fn|drop|dropout|resid_dropout|emb_dropout|post_attention_dropout|post_mlp_dropout"
                        r"|rotary_emb|intermediate_act_fn|transform_act_fn)(:input)?$|^[a-z_]+(:input)?$"
                        r"|(embed_in|wte|wpe|embed_tokens|_embeddings):input$")


def _layer0_sites(ms: ModuleSites) -> list[str]:
    fam = ms.family
    assert fam is not None
    names = [n for n in hooknames.hook_names(fam, 1)]
    paths = [p for p in ms.modules if p and not re.search(rf"^{re.escape(fam.layers)}\.[1-9]", p)]
    return names + paths + [p + ":input" for p in paths]


def _measured(model: torch.nn.Module, layer, site: str) -> int | None:  # noqa: ANN001
    """The last-axis width at ``site`` in a real forward pass (``None`` if the site holds no tensor)."""
    got: list[int] = []
    try:
        remove = layer.install(site, lambda x: got.append(x.shape[-1]))
    except Exception:  # noqa: BLE001 - e.g. ':normalized' of a non-norm: not a site
        return None
    try:
        with torch.no_grad():
            model(torch.randint(1, 100, (1, 5)))
    except Exception:  # noqa: BLE001 - a site without a tensor (the root's token ids): no width
        pass
    finally:
        remove()
    return got[0] if got else None


@pytest.mark.parametrize("family", list(hf_family_cases()))
def test_stated_widths_are_the_forward_widths(family: str) -> None:
    cfg, cls, _ = hf_family_cases()[family]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    ms = ModuleSites(model)
    unknown, checked = [], 0
    for site in _layer0_sites(ms):
        try:
            ms.resolve(site)
        except Exception:  # noqa: BLE001
            continue
        actual = _measured(model, ms, site)
        if actual is None:
            continue
        stated = ms.site_width(site)
        if stated is None:
            unknown.append(site)
        else:
            assert stated == actual, f"{family}: site_width({site!r}) = {stated}, forward width {actual}"
            checked += 1
    # Every TL name and every weight-carrying module is known; the rest are element-wise / whole-model sites.
    assert not [s for s in unknown if s.startswith(("blocks.", "hook_", "ln_final"))], unknown
    assert [s for s in unknown if not UNKNOWABLE.search(s.rsplit(".", 1)[-1] if "." in s else s)
            and not UNKNOWABLE.search(s)] == [] or family == "bert", unknown
    assert checked >= 30


def _check_stated_widths(model, sites: HookDictSites) -> int:  # noqa: ANN001
    """Assert every width ``sites`` states equals the width the hook really carries in a forward pass (``hook_z``:
    heads × d_head); return how many hooks had a stated width."""
    _, cache = model.run_with_cache(torch.randint(1, 100, (1, 5)))
    known = 0
    for name, x in cache.items():
        stated = sites.site_width(name)
        if stated is None:
            continue
        width = x.shape[-2] * x.shape[-1] if name.endswith("hook_z") and x.dim() == 4 else x.shape[-1]
        assert stated == width, (name, stated, tuple(x.shape))
        known += 1
    return known


@pytest.mark.parametrize("kind", ["bridge_hf", "bridge_native", "hooked_transformer"])
def test_tl_stated_widths_are_the_forward_widths(kind: str) -> None:
    model = build_tl_model(kind)
    sites = HookDictSites(model)
    assert _check_stated_widths(model, sites) >= (20 if kind == "hooked_transformer" else 40)
    tl4 = () if kind == "hooked_transformer" else ("blocks.0.hook_in", "blocks.1.ln2.hook_out", "unembed.hook_in")
    for name in (*tl4, "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.0.attn.hook_z",
                 "blocks.0.mlp.hook_pre", "blocks.1.ln2.hook_normalized", "ln_final.hook_normalized"):
        assert sites.site_width(name) is not None, name


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3", "gpt_neox"])
def test_bridge_of_every_family_states_forward_widths(family: str) -> None:
    """Bridges over Llama/Gemma/Qwen3/NeoX carry rotary, per-head and q/k-norm hooks whose last axis is not a
    model width: the stated widths must still all be the real ones."""
    from conftest import tl_major

    if (tl_major() or 0) < 4:
        pytest.skip("build_bridge_from_module needs TransformerLens 4")
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    cfg, cls, arch = hf_family_cases()[family]
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    model = build_bridge_from_module(hf, arch, hf_config=hf.config)
    assert _check_stated_widths(model, HookDictSites(model)) >= 40


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _wrong_width_refused(model, root: torch.nn.Module, site: str, width: int) -> None:  # noqa: ANN001
    before = _hooks(root)
    sae = make_sae("relu", width + 3, 16)
    with pytest.raises(ShapeMismatchError) as err:
        model.add_sae(sae, site)
    msg = str(err.value)
    assert str(width + 3) in msg and f"(..., {width})" in msg and "cannot attach at" in msg, msg
    assert _hooks(root) == before and not model.sae_manager.attachments
    model.add_sae(make_sae("relu", width, 16), site).remove()  # the right width attaches


SITES = ["blocks.0.hook_in", "blocks.0.ln2.hook_out", "blocks.0.ln1.hook_in", "blocks.0.mlp.hook_in",
         "blocks.0.mlp.hook_out", "blocks.0.attn.hook_out", "blocks.1.hook_resid_mid", "ln_final.hook_out",
         "blocks.0.mlp.hook_pre", "blocks.0.attn.hook_z"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_torch_adapter_refuses_wrong_width_at_add_sae(family: str) -> None:
    from sae_hooks.adapters.torch import attach

    cfg, cls, _ = hf_family_cases()[family]
    torch.manual_seed(0)
    model = attach(cls(cfg).eval())
    for site in SITES:
        width = _measured(model, model.sae_manager.backend, site)
        _wrong_width_refused(model, model, site, width)


def test_nnsight_adapter_refuses_wrong_width_at_add_sae() -> None:
    nnsight = pytest.importorskip("nnsight")
    from sae_hooks.adapters.nnsight import attach

    model = attach(nnsight.NNsight(tiny_hf_gpt2()))
    for site in [*SITES, "transformer.h.0.mlp.c_fc", "transformer.h.1.ln_2:normalized"]:
        width = _measured(model._module, model.sae_manager.backend, site)
        _wrong_width_refused(model, model._module, site, width)


@pytest.mark.parametrize("kind", ["bridge_hf", "bridge_native", "hooked_transformer"])
def test_tl_refuses_wrong_width_at_add_sae(kind: str) -> None:
    from sae_hooks.adapters.transformer_lens import attach

    model = attach(build_tl_model(kind))
    _, cache = model.run_with_cache(torch.randint(1, 100, (1, 5)))
    sites = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.0.hook_mlp_out", "blocks.0.mlp.hook_post",
             "blocks.0.ln2.hook_normalized", "ln_final.hook_normalized"]
    if kind != "hooked_transformer":
        sites += [*SITES[:-1], "blocks.0.mlp.out.hook_in", "unembed.hook_in"]
    for site in sites:
        before = sum(len(model.hook_dict[n].fwd_hooks) for n in model.hook_dict)
        width = cache[site].shape[-1]
        with pytest.raises(ShapeMismatchError, match=re.escape(site)):
            model.add_sae(make_sae("relu", width + 3, 16), site)
        assert sum(len(model.hook_dict[n].fwd_hooks) for n in model.hook_dict) == before
        model.add_sae(make_sae("relu", width, 16), site).remove()


def test_unknowable_width_is_checked_at_first_forward() -> None:
    from sae_hooks.adapters.torch import attach

    model = attach(tiny_hf_gpt2())
    hooks = _hooks(model)
    assert model.sae_manager.backend.site_width("transformer.h.0.mlp.act") is None
    model.add_sae(make_sae("relu", 33, 16), "transformer.h.0.mlp.act")  # accepted: width not knowable
    with pytest.raises(ShapeMismatchError, match=r"'transformer.h.0.mlp.act'.* reads 33 features.*\(1, 4, 128\)"):
        model(torch.randint(1, 100, (1, 4)))
    model.reset_saes()
    assert _hooks(model) == hooks
