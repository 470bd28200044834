"""The release registry against the vendored listings: every release's ids, layers, sites and example come from
(and are checked against) SAELens's ``pretrained_saes.yaml`` snapshot, never from memory."""

from __future__ import annotations

import gzip
import json
import re

import pytest
import yaml

import sae_hooks
from sae_hooks.hub import releases as R
from sae_hooks.hub.detect import format_by_name
from sae_hooks.hub.listings import HERE as LISTINGS, listings

LISTED = sorted(n for n, r in R.releases().items() if r.listed)


def _raw_saelens() -> dict:
    with gzip.open(LISTINGS / "saelens.json.gz", "rt") as f:
        return json.load(f)["releases"]


def test_table_is_well_formed():
    rows = sae_hooks.list_pretrained()
    names = {r["name"] for r in rows}
    assert {"gemma-scope-2b-pt-res", "gemma-scope-2b-pt-transcoders", "gpt2-small-res-jb", "llama_scope_lxr_8x",
            "openai-gpt2-small-v5-32k", "eleuther-pythia-160m-32k", "mlsae-pythia-70m-deduped-x64-k32"} <= names
    for rel in R.releases().values():
        if rel.format is not None:
            format_by_name(rel.format)  # a known format
        else:
            assert rel.why, rel.name  # an unsupported release says why
        assert rel.on_hub == (rel.repo_id is not None and rel.source == "hub"), rel.name
    assert all(r["model"] and "gemma-2-2b" in r["model"] for r in sae_hooks.list_pretrained(model="gemma-2-2b"))
    assert R.get_release("llama-scope-lxr-8x") is R.get_release("llama_scope_lxr_8x")  # older name kept


@pytest.mark.parametrize("name", LISTED)
def test_every_listed_release_matches_its_listing(name):
    rel, lst = R.get_release(name), listings()[name]
    assert rel.repo_id == lst.repo_id and rel.saes == lst.saes
    assert rel.resolve(rel.example) is not None  # the example is a listed id
    ids = {s.id for s in lst.saes}
    paths = {s.path for s in lst.saes}
    assert len(ids) == len(lst.saes), "duplicate ids in the listing"
    # Layers: exactly the set the listing's ids/paths name.
    expect = set()
    for s in lst.saes:
        nums = re.findall(r"(?:layer_|blocks\.|^l|/L|^L|layers\.)(\d+)", s.id + " " + s.path)
        if nums:
            expect.add(int(nums[0]))
    assert set(rel.layers) == expect
    # Sites: the hook of each SAE names its own layer (when the registry gives one).
    for row in rel.sae_rows():
        assert row["sae_id"] in ids and row["path"] in paths
        if row["hook"] and row["hook"] != "hook_embed":
            assert row["hook"].startswith(f"blocks.{row['layer']}."), row
        if row["hook_out"]:
            assert row["hook_out"] == f"blocks.{row['layer']}.hook_mlp_out", row


def test_snapshot_is_the_saelens_yaml_trimmed():
    # The vendored file keeps every release and every SAE id/path of SAELens 6.18.0's yaml.
    raw = _raw_saelens()
    assert len(raw) == 73 and sum(len(r["saes"]) for r in raw.values()) == 4500
    for name, r in raw.items():
        assert R.get_release(name) is not None
        assert len(r["saes"]) == len(R.get_release(name).saes)


def test_gemma_scope_1_facts_from_the_listing():
    # The facts issue 13 found wrong, now read off the listing.
    ids = {r["sae_id"] for r in sae_hooks.list_pretrained("gemma-scope-2b-pt-res")}
    assert {f"layer_5/width_16k/average_l0_{n}" for n in (18, 34, 68, 143, 309)} <= ids
    assert "layer_5/width_16k/average_l0_71" not in ids
    assert R.get_release("gemma-scope-9b-it-res").layers == [9, 20, 31]
    assert R.get_release("gemma-scope-9b-it-res").model == "google/gemma-2-9b-it"
    tc = R.get_release("gemma-scope-2b-pt-transcoders")
    assert tc.layers == list(range(26)) and tc.format == "gemma_scope"
    row = next(r for r in tc.sae_rows() if r["sae_id"] == "layer_12/width_16k/average_l0_6")
    assert (row["hook"], row["hook_out"]) == ("blocks.12.ln2.hook_normalized", "blocks.12.hook_mlp_out")
    att = R.get_release("gemma-scope-2b-pt-att").sae_rows()[0]
    assert att["hook"] == f"blocks.{att['layer']}.attn.hook_z"
    emb = next(r for r in sae_hooks.list_pretrained("gemma-scope-2b-pt-res") if r["sae_id"].startswith("embedding"))
    assert emb["hook"] == "hook_embed"
    for size in ("27b", "9b"):  # the rest of Gemma Scope 1 and the canonical aliases
        assert R.get_release(f"gemma-scope-{size}-pt-res-canonical").supported


def test_gemma_scope_2_all_folders_are_reachable():
    rel = R.get_release("gemma-scope-2-4b-pt-transcoders-all")
    assert rel.layers == list(range(34)) and len(rel.saes) == 34 * 8
    s = rel.resolve("layer_0_width_16k_l0_big_affine")
    assert s.path == "transcoder_all/layer_0_width_16k_l0_big_affine"
    assert rel.resolve(s.path) is s  # the repo path works as well
    assert R.get_release("gemma-scope-2-4b-pt-transcoders").layers == [9, 17, 22, 29]
    att = R.get_release("gemma-scope-2-27b-it-att")
    assert att.layers == [16, 31, 40, 53] and len(att.saes) == 4 * 3 * 3
    row = att.sae_rows()[0]
    assert row["path"].startswith("attn_out/") and row["hook"] == f"blocks.{row['layer']}.attn.hook_z"
    tc = R.get_release("gemma-scope-2-4b-pt-transcoders").sae_rows()[0]
    assert (tc["hook"], tc["hook_out"]) == (f"blocks.{tc['layer']}.ln2.hook_normalized",
                                            f"blocks.{tc['layer']}.hook_mlp_out")


def test_pattern_fields_fill_hooks_for_unlisted_releases():
    rel = R.get_release("openai-gpt2-small-v5-32k")
    assert not rel.listed
    fields = rel.match("resid_post_mlp_v5_32k/autoencoders/5.pt")
    assert fields == {"location": "resid_post_mlp", "layer": "5"}
    assert rel.match("resid_post_mlp_v5_32k/autoencoders") is None
    rel = R.get_release("gpt2-small-res-jb")
    assert [r["hook"] for r in rel.sae_rows()][:2] == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]


def test_wrong_sae_id_suggests_from_listing():
    err = R.unknown_sae_id_error(R.get_release("llama-scope-lxr-8x"), "l15r_9x")
    assert "l15r_8x" in str(err) and "listing" in str(err)
    err = R.unknown_sae_id_error(R.get_release("eleuther-pythia-160m-32k"), "layers.5.mpl", None)
    assert "layers.5.mlp" in str(err) and "pattern" in str(err)


def test_list_pretrained_release_lists_its_saes_without_download():
    rows = sae_hooks.list_pretrained("llama_scope_lxr_8x")
    assert [r["sae_id"] for r in rows] == [f"l{i}r_8x" for i in range(32)]
    assert rows[3]["path"] == "Llama3_1-8B-Base-L3R-8x" and rows[3]["layer"] == 3
    with pytest.raises(R.SAEIdNotFoundError, match="no vendored listing"):
        sae_hooks.list_pretrained("openai-gpt2-small-v5-32k")


def test_unsupported_release_is_refused_clearly():
    with pytest.raises(R.UnsupportedReleaseError, match="mntss/clt-gemma-2-2b-2.5M.*cross-layer transcoder"):
        sae_hooks.load("mntss-gemma-2-2b-2.5m-clt-as-per-layer", "layer_0")


def test_openai_release_is_marked_not_on_hub():
    with pytest.raises(R.SAEIdNotFoundError, match=r"openaipublic.*resid_post_mlp_v5_32k/autoencoders/5\.pt"):
        sae_hooks.load("openai-gpt2-small-v5-32k", "resid_post_mlp_v5_32k/autoencoders/5.pt")


def test_unknown_release_name_suggests():
    assert "gemma-scope-2b-pt-res" in R.suggest("gemma-scope-2b-res")


def test_docs_name_only_listed_ids():
    # Every "<release>", sae_id="<id>" pair in README/docs names a listed SAE.
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "sae_hooks").rglob("*.py"))]
    pairs = []
    for p in texts:
        for m in re.finditer(r"load\(\s*\"([\w.-]+)\",\s*(?:sae_id=)?\"([^\"]+)\"", p.read_text()):
            if R.get_release(m.group(1)) is not None:
                pairs.append((p.name, m.group(1), m.group(2)))
    assert pairs, "the docs show at least one release"
    for where, name, sid in pairs:
        rel = R.get_release(name)
        assert rel.resolve(sid) is not None or rel.match(sid) is not None, (where, name, sid)


def test_listing_yaml_round_trip_matches_vendor_script(tmp_path):
    # scripts/vendor_listings.py on a tiny yaml keeps ids, paths and norm factors.
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "vendor_listings.py"
    src = tmp_path / "p.yaml"
    src.write_text(yaml.safe_dump({"rel": {"repo_id": "o/r", "model": "m", "conversion_func": None, "saes": [
        {"id": "blocks.1.hook_resid_pre", "path": "1-res", "norm_scaling_factor": 0.5, "l0": 3},
        {"id": "blocks.2.hook_resid_pre"}]}}))
    out = tmp_path / "o.json.gz"
    argv = sys.argv
    sys.argv = ["x", str(src), "--source", "test", "--out", str(out)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    with gzip.open(out, "rt") as f:
        data = json.load(f)
    assert data["releases"]["rel"]["saes"] == [
        {"id": "blocks.1.hook_resid_pre", "path": "1-res", "norm_scaling_factor": 0.5},
        {"id": "blocks.2.hook_resid_pre"}]
