"""Loading through the local Hub server (tests/hubserver.py): downloads, load_many, revisions, offline mode,
push_to_hub round trip."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save

import sae_hooks
from sae_hooks.errors import HubUnavailableError
from sae_hooks.hub.releases import SAEIdNotFoundError

D, F = 8, 16


def sparsify_files(layer: int, seed: int) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"encoder.weight": torch.randn(F, D, generator=g), "encoder.bias": torch.randn(F, generator=g),
               "W_dec": torch.randn(F, D, generator=g), "b_dec": torch.randn(D, generator=g)}
    cfg = {"activation": "topk", "expansion_factor": 2, "normalize_decoder": True, "num_latents": 0, "k": 3,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}
    return {f"layers.{layer}/sae.safetensors": save(tensors), f"layers.{layer}/cfg.json": json.dumps(cfg).encode()}


def sparsify_repo(n_layers=3, seed=0) -> dict[str, bytes]:
    files = {"config.json": json.dumps({"model": "EleutherAI/pythia-70m"}).encode()}
    for i in range(n_layers):
        files.update(sparsify_files(i, seed + i))
    return files


def npz_bytes(seed=0) -> bytes:
    g = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(buf, W_enc=g.standard_normal((D, F)).astype(np.float32), W_dec=g.standard_normal((F, D)).astype(np.float32),
             b_enc=np.zeros(F, np.float32), b_dec=np.zeros(D, np.float32), threshold=np.full(F, 0.1, np.float32))
    return buf.getvalue()


def test_load_downloads_only_the_sae_asked_for(hub_server):
    hub_server.create_repo("EleutherAI/sae-tiny", sparsify_repo())
    sae = sae_hooks.load("EleutherAI/sae-tiny", "layers.1")
    assert sae.cfg.metadata["source_format"] == "sparsify" and sae.cfg.hook_name == "blocks.1.hook_resid_post"
    got = {r.path.split("/", 5)[-1] for r in hub_server.content_gets()}  # /{repo}/resolve/{rev}/{file}
    assert got == {"layers.1/cfg.json", "layers.1/sae.safetensors"}
    from safetensors.torch import load

    ref = load(hub_server.files("EleutherAI/sae-tiny")["layers.1/sae.safetensors"])
    assert torch.equal(sae.W_dec, ref["W_dec"]) and torch.equal(sae.W_enc, ref["encoder.weight"].T)


def test_load_many_gets_every_layer_in_natural_order(hub_server):
    hub_server.create_repo("EleutherAI/sae-many", sparsify_repo(n_layers=11))
    saes = sae_hooks.load_many("EleutherAI/sae-many")
    assert list(saes) == [f"layers.{i}" for i in range(11)]
    assert [s.cfg.hook_name for s in saes.values()] == [f"blocks.{i}.hook_resid_post" for i in range(11)]
    assert list(sae_hooks.load_many("EleutherAI/sae-many", "layers.1*")) == ["layers.1", "layers.10"]
    with pytest.raises(SAEIdNotFoundError, match="layers.0"):
        sae_hooks.load_many("EleutherAI/sae-many", "mlp*")


def test_root_without_sae_asks_for_sae_id(hub_server):
    hub_server.create_repo("EleutherAI/sae-root", sparsify_repo(2))
    with pytest.raises(SAEIdNotFoundError, match=r"layers\.0.*load_many"):
        sae_hooks.load("EleutherAI/sae-root")
    with pytest.raises(SAEIdNotFoundError, match=r"Closest SAEs: \['layers.1'"):
        sae_hooks.load("EleutherAI/sae-root", "layers.1x")


def test_revision_pinning(hub_server):
    hub_server.create_repo("org/sae-rev", sparsify_repo(1, seed=0))
    hub_server.tag("org/sae-rev", "v1")
    hub_server.commit("org/sae-rev", sparsify_files(0, seed=99))
    old = sae_hooks.load("org/sae-rev", "layers.0", revision="v1")
    new = sae_hooks.load("org/sae-rev", "layers.0")
    assert not torch.equal(old.W_enc, new.W_enc)
    from safetensors.torch import load

    v1 = load(hub_server.files("org/sae-rev", "v1")["layers.0/sae.safetensors"])
    assert torch.equal(old.W_enc, v1["encoder.weight"].T)
    sha = hub_server.head("org/sae-rev")
    assert torch.equal(sae_hooks.load("org/sae-rev", "layers.0", revision=sha).W_enc, new.W_enc)


def test_offline_after_first_download(hub_server, hf_offline):
    hub_server.create_repo("org/sae-off", sparsify_repo(2))
    online = sae_hooks.load("org/sae-off", "layers.0")
    hf_offline(True)
    hub_server.clear_requests()
    offline = sae_hooks.load("org/sae-off", "layers.0")
    assert torch.equal(online.W_enc, offline.W_enc)
    assert hub_server.content_gets() == []
    with pytest.raises(SAEIdNotFoundError, match="offline mode"):
        sae_hooks.load("org/sae-off", "layers.1")
    with pytest.raises(HubUnavailableError):
        sae_hooks.load("org/never-downloaded", "layers.0")
    assert sae_hooks.load("org/sae-off", "layers.0", local_files_only=True).cfg.d_sae == F


def test_release_resolves_through_registry(hub_server):
    sid = "layer_5/width_16k/average_l0_68"  # listed by SAELens for gemma-scope-2b-pt-res
    hub_server.create_repo("google/gemma-scope-2b-pt-res", {
        f"{sid}/params.npz": npz_bytes(), "layer_5/width_16k/average_l0_143/params.npz": npz_bytes(1),
        "layer_5/width_16k/average_l0_999/params.npz": npz_bytes(2)})  # on the Hub, not in the listing
    sae = sae_hooks.load("gemma-scope-2b-pt-res", sae_id=sid)
    assert sae.cfg.metadata["source_format"] == "gemma_scope"
    assert sae.cfg.hook_name == "blocks.5.hook_resid_post" and sae.cfg.model_name == "google/gemma-2-2b"
    assert sae.cfg.sites[0].module == "model.layers.5"
    hub_server.clear_requests()
    with pytest.raises(SAEIdNotFoundError, match="average_l0_68"):
        sae_hooks.load("gemma-scope-2b-pt-res", sae_id="layer_5/width_16k/average_l0_70")  # fits the pattern
    with pytest.raises(SAEIdNotFoundError, match="average_l0_68"):
        sae_hooks.load("gemma-scope-2b-pt-res", sae_id="layer5/width_16k/average_l0_68")  # does not
    assert hub_server.content_gets() == []  # refused from the listing, without a download
    assert list(sae_hooks.load_many("gemma-scope-2b-pt-res")) == [
        "layer_5/width_16k/average_l0_68", "layer_5/width_16k/average_l0_143"]


def test_canonical_release_id_maps_to_its_folder(hub_server):
    # SAELens's canonical ids name no folder: the listing maps them to the average_l0 folder they stand for.
    hub_server.create_repo("google/gemma-scope-2b-pt-res", {"layer_5/width_16k/average_l0_68/params.npz": npz_bytes()})
    listed = {r["sae_id"]: r["path"] for r in sae_hooks.list_pretrained("gemma-scope-2b-pt-res-canonical")}
    assert listed["layer_5/width_16k/canonical"] == "layer_5/width_16k/average_l0_68"
    a = sae_hooks.load("gemma-scope-2b-pt-res-canonical", "layer_5/width_16k/canonical")
    b = sae_hooks.load("google/gemma-scope-2b-pt-res", "layer_5/width_16k/average_l0_68")
    assert torch.equal(a.W_enc, b.W_enc) and a.cfg.hook_name == "blocks.5.hook_resid_post"


def test_push_to_hub_round_trip(hub_server):
    sae = sae_hooks.make_sae("topk", D, F, k=4, sites=["blocks.2.hook_resid_post"], model_name="gpt2",
                             metadata={"metrics": {"fvu": 0.12, "l0": 4.0}})
    with torch.no_grad():
        sae.b_enc.normal_()
    sha = sae_hooks.push_to_hub(sae, "me/my-sae", path_in_repo="blocks.2.hook_resid_post")
    assert isinstance(sha, str) and len(sha) == 40
    back = sae_hooks.load("me/my-sae", "blocks.2.hook_resid_post")
    assert back.cfg == sae.cfg
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), back.state_dict().values()))
    card = hub_server.files("me/my-sae")["blocks.2.hook_resid_post/README.md"].decode()
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "sae-hooks" and header["base_model"] == "gpt2"
    assert "sae-hooks" in header["tags"] and header["metrics"] == {"fvu": 0.12, "l0": 4.0}
    assert header["sae"]["sites"] == [{"hook": "blocks.2.hook_resid_post"}]
    # Pushing to a branch leaves main alone.
    sae_hooks.push_to_hub(sae, "me/my-sae", path_in_repo="other", revision="dev")
    assert "other/sae.safetensors" in hub_server.files("me/my-sae", "dev")
    assert "other/sae.safetensors" not in hub_server.files("me/my-sae")


def test_unknown_source_suggests_release():
    from sae_hooks.hub.load import UnknownSourceError

    with pytest.raises(UnknownSourceError, match="gemma-scope-2b-pt-res"):
        sae_hooks.load("gemma-scope-2b-pt-rez")
