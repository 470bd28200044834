"""Dashboards for any SAE through any adapter: the same statistics whichever way the model is wrapped;
multi-layer SAEs show activation by layer, Jacobian pairs their top Jacobian entries (checked against
brute force over the same tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _dash_browser import dump_dom, needs_chromium
from conftest import tiny_hf_gpt2, tl_major

pytest.importorskip("transformers")


def _tokens(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, 100, (12, 16), generator=g)
    t[:, 0] = 0  # BOS, left out of the statistics
    return t


def _record(folder: Path, i: int) -> dict:
    text = (folder / "data" / "latents" / str(i // 1000) / f"{i}.js").read_text()
    return json.loads(text[len("dashLatent(") : -3])


def _stats(sae, model, site=None):
    from sae_hooks.eval.dashboard import CollectorSettings, stream

    return stream(sae, model, [_tokens()[:6], _tokens()[6:]], site=site, bos_token_id=0,
                  settings=CollectorSettings(n_top=4, n_samples=4, left=3, right=1), progress=False).stats


def _hook_reads(model, paths, tokens):
    got = {}
    hooks = [model.get_submodule(p).register_forward_hook(
        lambda m, a, o, p=p: got.__setitem__(p, (o[0] if isinstance(o, tuple) else o).detach())) for p in paths]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return got


def test_same_statistics_through_module_paths_torch_adapter_and_transformer_lens(sae):
    from sae_hooks.adapters.torch import attach, detach

    hf = tiny_hf_gpt2()
    plain = _stats(sae, hf, site="transformer.h.0")["sae"]
    truth = sae.encode(_hook_reads(hf, ["transformer.h.0"], _tokens())["transformer.h.0"][_tokens() != 0]).detach()
    assert torch.equal(plain.count, (truth > 0).sum(0))
    torch.testing.assert_close(plain.max, truth.max(0).values.clamp_min(0))
    torch.testing.assert_close(plain.top["keys"][:, 0], truth.max(0).values.clamp_min(0).where(truth.max(0).values > 0, -torch.inf))
    # The torch adapter: the SAE's own TransformerLens hook name, resolved by the adapter.
    attached = attach(hf)
    via_torch = _stats(sae, attached)["sae"]
    detach(hf)
    assert torch.equal(via_torch.count, plain.count) and torch.equal(via_torch.top["tokens"], plain.top["tokens"])
    torch.testing.assert_close(via_torch.top["keys"], plain.top["keys"])
    # TransformerLens 4 bridge around the same module.
    if (tl_major() or 0) < 4:
        pytest.skip("TransformerBridge needs TransformerLens 4")
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    from sae_hooks.adapters.transformer_lens import attach as tl_attach

    bridge = tl_attach(build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config))
    via_tl = _stats(sae, bridge)["sae"]
    assert torch.equal(via_tl.count, plain.count)
    torch.testing.assert_close(via_tl.top["keys"], plain.top["keys"], rtol=1e-4, atol=1e-5)
    assert torch.equal(via_tl.top["tokens"], plain.top["tokens"])


@pytest.fixture(scope="module")
def mlsae_dash(tmp_path_factory):
    from sae_hooks.adapters.torch import attach
    from sae_hooks.eval.dashboard import build_dashboard
    from sae_hooks.saes import make_mlsae

    hf = tiny_hf_gpt2()
    mlsae = make_mlsae(32, 2, d_sae=48, k=4, seed=0)
    with torch.no_grad():
        mlsae.b_dec.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("mlsae") / "dash"
    build_dashboard(mlsae, attach(hf), _tokens(), out, batch_size=5, bos_token_id=0, progress=False)
    reads = _hook_reads(hf, ["transformer.h.0", "transformer.h.1"], _tokens())
    keep = _tokens() != 0
    per_layer = torch.stack([(mlsae.encode(reads[p][keep]) > 0).float().mean(0) for p in reads]).detach()
    return out, per_layer


def test_multilayer_sae_shows_activation_by_layer(mlsae_dash):
    out, per_layer = mlsae_dash
    index = json.loads((out / "data" / "index.js").read_text()[len("window.DASH_INDEX = ") : -2])
    assert index["layer_names"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    i = int(per_layer.sum(0).argmax())
    rec = _record(out, i)
    assert [x["name"] for x in rec["layers"]] == index["layer_names"]
    assert [x["density"] for x in rec["layers"]] == pytest.approx(per_layer[:, i].tolist(), rel=1e-3)
    assert rec["density"] == pytest.approx(float(per_layer[:, i].mean()), rel=1e-3)  # over (token, layer) examples


@needs_chromium
def test_multilayer_page_draws_the_layer_chart(mlsae_dash):
    out, per_layer = mlsae_dash
    i = int(per_layer.sum(0).argmax())
    dom = dump_dom(out / "latent.html", f"#{i}")
    body = dom[dom.index('<div id="latent">') :]
    chart = body[body.index('id="by-layer"') :]
    assert chart.count("<rect") >= 2 and "blocks.1.hook_resid_post: density" in chart


@pytest.fixture(scope="module")
def pair_dash(tmp_path_factory):
    from sae_hooks.eval.dashboard import build_dashboard
    from sae_hooks.saes import make_jsae_pair

    hf = tiny_hf_gpt2()
    pair = make_jsae_pair(hf.transformer.h[0].mlp, 0, 24, 3, hook_in="transformer.h.0.ln_2",
                          hook_out="transformer.h.0.mlp", seed=1)
    with torch.no_grad():
        for s in (pair.sae_in, pair.sae_out):
            s.b_enc.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("pair") / "dash"
    build_dashboard(pair, hf, _tokens(), out, batch_size=5, bos_token_id=0, progress=False)
    x = _hook_reads(hf, ["transformer.h.0.ln_2"], _tokens())["transformer.h.0.ln_2"][_tokens() != 0]
    with torch.no_grad():
        J = pair.jacobian(x)
    sums: dict[tuple[int, int], list[float]] = {}
    lat = pair.encode_pair(x)
    for n in range(x.shape[0]):
        for o in range(J.out_indices.shape[1]):
            for i in range(J.in_indices.shape[1]):
                if lat["lat_in"].values[n, i] > 0 and lat["lat_out"].values[n, o] > 0:
                    key = (int(J.in_indices[n, i]), int(J.out_indices[n, o]))
                    sums.setdefault(key, []).append(float(J.values[n, o, i]))
    return out, sums


def test_jacobian_pair_lists_top_jacobian_entries(pair_dash):
    out, sums = pair_dash
    assert (out / "input" / "index.html").is_file() and (out / "output" / "index.html").is_file()
    assert "input SAE" in (out / "index.html").read_text()
    (i, o), vals = max(sums.items(), key=lambda kv: sum(abs(v) for v in kv[1]))
    rec = _record(out / "input", i)
    j, mean, count = rec["jacobian"]["entries"][0]
    assert (j, count) == (o, len(vals))
    assert mean == pytest.approx(sum(vals) / len(vals), rel=1e-3)
    back = _record(out / "output", o)["jacobian"]["entries"]
    assert [i, pytest.approx(mean, rel=1e-3), len(vals)] in back
    assert rec["jacobian"]["href"] == "../output/latent.html#"


@needs_chromium
def test_jacobian_page_links_to_the_other_sae(pair_dash):
    out, sums = pair_dash
    (i, o), _ = max(sums.items(), key=lambda kv: sum(abs(v) for v in kv[1]))
    dom = dump_dom(out / "input" / "latent.html", f"#{i}")
    body = dom[dom.index('<div id="latent">') :]
    table = body[body.index('id="jacobian"') :]
    assert f'href="../output/latent.html#{o}">output latent {o}</a>' in table
