"""Every place that takes a site accepts every spelling: TL name, module path, ``path:input`` (issue 9 item 1).

Truth: the Hugging Face model's own ``output_hidden_states`` (``hidden_states[L]`` is the input of block L,
i.e. ``blocks.L.hook_resid_pre`` = ``blocks.{L-1}.hook_resid_post``), and raw forward hooks.
"""

from __future__ import annotations

import json

import pytest
import torch

from sae_hooks.errors import HookNotFoundError
from sae_hooks.sites import HookDictSites, ModuleSites, hidden_of, site_hooks, with_hidden
from sae_hooks.train.sources import ActivationReader, DiskSource, LiveSource, save_activations


@pytest.fixture(scope="module")
def embedded():
    from sae_hooks.app.demo import load_default_model

    model, tok = load_default_model()
    return model.eval(), tok


def _tokens(n: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 4096, (n, seq), generator=g)
    ids[:, 0] = 0  # BOS
    return ids


def _hidden_states(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


SPELLINGS = ["blocks.1.hook_resid_post", "transformer.h.1", "transformer.h.2:input", "blocks.2.hook_resid_pre"]


@pytest.mark.parametrize("site", SPELLINGS)
def test_activation_reader_reads_every_spelling_on_a_plain_hf_model(embedded, site) -> None:
    model, _ = embedded
    ids = _tokens()
    truth = _hidden_states(model, ids)[2]  # output of block 1 = input of block 2
    keep = ids != 0
    got = ActivationReader(model, [site], bos_token_id=0).read(ids)
    assert list(got) == [site]  # chunks keyed by the spelling given
    torch.testing.assert_close(got[site], truth[keep])


def test_misspelled_site_raises_at_construction_with_close_matches(embedded) -> None:
    model, _ = embedded
    with pytest.raises(HookNotFoundError, match="blocks.1.hook_resid_post"):
        ActivationReader(model, ["blocks.1.hook_resid_pots"])
    with pytest.raises(HookNotFoundError, match="transformer.h.1"):
        LiveSource(model, ["transformer.h.1x"], [_tokens()])


def test_live_source_and_save_activations_take_tl_names(embedded, tmp_path) -> None:
    model, _ = embedded
    batches = [_tokens(seed=s) for s in range(3)]
    site = "blocks.0.hook_resid_post"
    keep = [b != 0 for b in batches]
    truth = torch.cat([_hidden_states(model, b)[1][k] for b, k in zip(batches, keep)])
    live = LiveSource(model, [site], batches, bos_token_id=0)
    torch.testing.assert_close(torch.cat([c[site] for c in iter(live.next_chunk, None)]), truth)
    out = save_activations(model, [site, "transformer.h.1:input"], batches, tmp_path / "acts", shard_tokens=16,
                           bos_token_id=0)
    replay = DiskSource(out)
    chunks = list(iter(replay.next_chunk, None))
    torch.testing.assert_close(torch.cat([c[site] for c in chunks]), truth)
    torch.testing.assert_close(torch.cat([c["transformer.h.1:input"] for c in chunks]), truth)


def test_cli_train_and_eval_with_a_tl_name_on_a_plain_hf_model(tmp_path, capsys) -> None:
    from sae_hooks.app.cli import main
    from sae_hooks.native import load

    site = "blocks.1.hook_resid_post"
    out = tmp_path / "out"
    assert main(["train", "--site", site, "--arch", "topk", "--k", "8", "--d-sae", "256", "--steps", "4",
                 "--batch-tokens", "128", "--buffer-tokens", "512", "--seq-len", "32", "--batch-size", "4",
                 "--out", str(out), "--no-progress"]) == 0
    (saved,) = list(out.iterdir())
    sae = load(saved)
    assert sae.cfg.sites[0].hook == site
    capsys.readouterr()
    # default site (the SAE's own TL name) and an explicit module-path spelling of the same tensor agree
    assert main(["eval", str(saved), "--seq-len", "32", "--batch-size", "4", "--batches", "1"]) == 0
    by_name = json.loads(capsys.readouterr().out)
    assert main(["eval", str(saved), "--site", "transformer.h.1", "--seq-len", "32", "--batch-size", "4",
                 "--batches", "1"]) == 0
    by_path = json.loads(capsys.readouterr().out)
    assert by_name == pytest.approx(by_path)
    assert by_name["ce_sae"] != pytest.approx(by_name["ce_clean"])  # the SAE was really spliced


def test_eval_runner_takes_every_spelling(embedded) -> None:
    from sae_hooks.eval import hooks_splice_runner

    model, _ = embedded
    ids = _tokens()

    def replace(x, keep):
        return x * 0.5

    runs = [hooks_splice_runner(model, s)(ids, None, replace) for s in SPELLINGS]
    # independent truth: a raw forward hook halving block 1's hidden state
    handle = model.transformer.h[1].register_forward_hook(lambda m, a, o: (o[0] * 0.5, *o[1:]) if isinstance(o, tuple) else o * 0.5)
    try:
        with torch.no_grad():
            truth = model(ids).logits
    finally:
        handle.remove()
    for got in runs:
        torch.testing.assert_close(got, truth)


def test_module_sites_canonical_names_and_widths(embedded) -> None:
    model, _ = embedded
    sites = ModuleSites(model)
    assert sites.resolve("transformer.h.1") == "blocks.1.hook_resid_post"
    assert sites.resolve("transformer.h.1:output") == "blocks.1.hook_resid_post"
    assert sites.resolve("transformer.h.1.mlp.c_fc") == "blocks.1.mlp.hook_pre"
    assert sites.resolve("transformer.h.1.attn.c_attn") == "transformer.h.1.attn.c_attn"  # no TL name
    assert sites.site_width("blocks.1.mlp.hook_pre") == 4 * 128
    with pytest.raises(HookNotFoundError, match="hook_mlp_out"):
        sites.resolve("blocks.1.hook_mlp_outt")
    with pytest.raises(HookNotFoundError, match="transformer.h.1"):
        sites.resolve("transformer.h.1:inptu")


def test_hidden_of_and_with_hidden_on_every_container() -> None:
    from transformers.modeling_outputs import BaseModelOutput

    t, u = torch.ones(2), torch.zeros(2)
    extra = torch.arange(3.0)
    assert hidden_of(t) is t and with_hidden(t, u) is u
    assert hidden_of((t, extra)) is t and with_hidden((t, extra), u)[0] is u and with_hidden((t, extra), u)[1] is extra
    assert hidden_of([t, extra]) is t and with_hidden([t, extra], u) == [u, extra]
    out = BaseModelOutput(last_hidden_state=t)
    assert hidden_of(out) is t
    assert with_hidden(out, u).last_hidden_state is u
    assert hidden_of(("not a tensor",)) is None and hidden_of(None) is None


@pytest.mark.parametrize("kind", ["bridge_hf", "hooked_transformer"])
def test_tl_model_names_go_through_hook_points_and_module_paths_work(kind) -> None:
    from conftest import build_tl_model

    model = build_tl_model(kind)
    ids = _tokens(seq=8) % 100
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    layer = site_hooks(model)
    assert isinstance(layer, HookDictSites)
    spellings = {"blocks.0.hook_resid_post": "blocks.0.hook_resid_post"}
    if kind == "bridge_hf":  # module paths of the wrapped HF model
        spellings.update({"transformer.h.0": "blocks.0.hook_resid_post", "transformer.h.1:input": "blocks.1.hook_resid_pre"})
    else:  # the HookedTransformer's own module tree
        spellings.update({"blocks.0.mlp": "blocks.0.hook_mlp_out"})
    reader = ActivationReader(model, list(spellings), stop_early=False)
    got = reader.read(ids)
    for site, tl_name in spellings.items():
        torch.testing.assert_close(got[site], cache[tl_name].flatten(0, 1), msg=site)
    assert layer.resolve("blocks.0.hook_resid_post") == "blocks.0.hook_resid_post"
    if kind == "bridge_hf":
        assert layer.resolve("transformer.h.0") == "blocks.0.hook_resid_post"
    with pytest.raises(HookNotFoundError, match="blocks.0.hook_resid_post"):
        layer.resolve("blocks.0.hook_resid_pots")
    # hooks are temporary: nothing left behind on the hook points
    assert not any(hp._forward_hooks for hp in model.hook_dict.values())
