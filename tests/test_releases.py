"""The release registry: well-formed data, pattern matching, hooks, friendly errors."""

from __future__ import annotations

import pytest

import sae_hooks
from sae_hooks.hub import releases as R
from sae_hooks.hub.detect import format_by_name


def test_table_is_well_formed():
    rows = sae_hooks.list_pretrained()
    names = {r["name"] for r in rows}
    assert {"gemma-scope-2b-pt-res", "gemma-scope-2b-pt-transcoders", "gpt2-small-res-jb", "llama-scope-lxr-8x",
            "openai-gpt2-small-v5-32k", "eleuther-pythia-160m-32k", "mlsae-pythia-70m-deduped-x64-k32"} <= names
    for rel in R.releases().values():
        format_by_name(rel.format)  # a known format
        assert rel.match(rel.example) is not None, (rel.name, rel.example, rel.path)
        hook, hook_out = rel.hooks_for(rel.match(rel.example))
        if rel.hooks:
            assert hook and "{" not in hook, rel.name
        assert rel.on_hub == (rel.repo_id is not None), rel.name
    assert all(r["model"] and "gemma-2-2b" in r["model"] for r in sae_hooks.list_pretrained("gemma-2-2b"))


def test_pattern_fields_fill_hooks():
    rel = R.get_release("gemma-scope-2b-pt-transcoders")
    fields = rel.match("layer_12/width_16k/average_l0_82")
    assert fields == {"layer": "12", "width": "16k", "l0": "82"}
    assert rel.hooks_for(fields) == ("blocks.12.ln2.hook_normalized", "blocks.12.hook_mlp_out")
    assert rel.match("layer_12/width_16k") is None
    assert R.get_release("gpt2-small-res-jb").hooks_for({"layer": "8", "site": "resid_pre"})[0] == \
        "blocks.8.hook_resid_pre"


def test_wrong_sae_id_offline_suggests_from_pattern(monkeypatch):
    # The Hub is unreachable here: suggestions come from the pattern (example with every layer).
    err = R.unknown_sae_id_error(R.get_release("llama-scope-lxr-8x"), "Llama3_1-8B-Base-L15R-9x", None)
    assert "Llama3_1-8B-Base-L15R-8x" in str(err) and "pattern" in str(err)


def test_openai_release_is_marked_not_on_hub():
    with pytest.raises(R.SAEIdNotFoundError, match=r"openaipublic.*resid_post_mlp_v5_32k/autoencoders/5\.pt"):
        sae_hooks.load("openai-gpt2-small-v5-32k", "resid_post_mlp_v5_32k/autoencoders/5.pt")


def test_unknown_release_name_suggests():
    assert "gemma-scope-2b-pt-res" in R.suggest("gemma-scope-2b-res")
