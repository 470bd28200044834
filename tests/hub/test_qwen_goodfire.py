"""Qwen Scope (``layerN.sae.pt``) and Goodfire (``<model>-SAE-lN.pt(h)``) SAEs against SAELens 6.54.12 itself:
files in the releases' layout, golden outputs from ``SAE.from_pretrained_with_cfg_and_sparsity`` through each
release's own loader (scripts/make_qwen_goodfire_fixtures.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sae_hooks
from sae_hooks.errors import SAEFormatError, ShapeMismatchError, UnsafeCheckpointError
from sae_hooks.hub.detect import candidates

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "qwen_goodfire"
FIX = json.loads((ROOT / "manifest.json").read_text())["fixtures"]
ATOL = 1e-5


def _copy_as_repo(tmp_path: Path, name: str) -> Path:
    """The file under a folder named like its Hub repo (the Qwen Scope k and model are in the repo id)."""
    f = FIX[name]
    folder = tmp_path / f["repo_id"].replace("/", "--")
    folder.mkdir(parents=True)
    shutil.copy(ROOT / f["file"], folder)
    return folder / Path(f["file"]).name


@pytest.mark.parametrize("name", sorted(FIX))
def test_matches_saelens(name, tmp_path):
    f = FIX[name]
    g = load_file(str(ROOT / name / "golden.safetensors"))
    sae = sae_hooks.load(_copy_as_repo(tmp_path, name))
    assert sae.cfg.metadata["source_format"] == ("qwen_scope" if name == "qwen_scope" else "goodfire")
    assert sae.cfg.sites[0].hook == f["hook_name"] and sae.cfg.model_name == f["model_name"]
    layer = int(f["hook_name"].split(".")[1])
    assert sae.cfg.sites[0].module == f"model.layers.{layer}"
    assert sae.cfg.k == f["k"]
    torch.testing.assert_close(sae.encode(g["x"]), g["latents"], atol=ATOL, rtol=0)
    torch.testing.assert_close(sae(g["x"]), g["recon"], atol=ATOL, rtol=0)
    assert (g["latents"] > 0).float().mean() > 0.05


def test_detection_is_unambiguous():
    assert [f.name for f in candidates(["layer3.sae.pt"])] == ["qwen_scope"]
    assert [f.name for f in candidates(["Llama-3.3-70B-Instruct-SAE-l50.pt"])] == ["goodfire"]
    assert [f.name for f in candidates(["Llama-3.1-8B-Instruct-SAE-l19.pth", "README.md", "config.yaml"])] == ["goodfire"]
    assert [f.name for f in candidates(["5.pt"])] == ["openai"]


def test_qwen_without_repo_id_says_where_k_is(tmp_path):
    shutil.copy(ROOT / FIX["qwen_scope"]["file"], tmp_path)
    with pytest.raises(SAEFormatError, match="L0_<k>"):
        sae_hooks.load(tmp_path / "layer7.sae.pt")


def test_pickled_objects_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"W_enc": Evil()}, tmp_path / "layer1.sae.pt")
    with pytest.raises(UnsafeCheckpointError):
        sae_hooks.load(tmp_path / "layer1.sae.pt")


def test_wrong_shapes_named(tmp_path):
    raw = torch.load(ROOT / FIX["goodfire_70b"]["file"], weights_only=True)
    raw["decoder_linear.weight"] = raw["decoder_linear.weight"].T.contiguous()
    torch.save(raw, tmp_path / "Llama-3.3-70B-Instruct-SAE-l50.pt")
    with pytest.raises(ShapeMismatchError, match="decoder_linear.weight"):
        sae_hooks.load(tmp_path / "Llama-3.3-70B-Instruct-SAE-l50.pt")


def test_hub_repos_load(hub_server):
    q = FIX["qwen_scope"]
    data = (ROOT / q["file"]).read_bytes()
    hub_server.create_repo(q["repo_id"], {"layer7.sae.pt": data, "layer8.sae.pt": data, "README.md": b"x"})
    assert sae_hooks.hub.list_sae_ids(["layer7.sae.pt", "layer8.sae.pt", "README.md"]) == ["layer7.sae.pt", "layer8.sae.pt"]
    sae = sae_hooks.load(q["repo_id"], "layer8.sae.pt")
    assert sae.cfg.k == 50 and sae.cfg.sites[0].hook == "blocks.8.hook_resid_post"
    gf = FIX["goodfire_8b"]
    hub_server.create_repo(gf["repo_id"], {"Llama-3.1-8B-Instruct-SAE-l19.pth": (ROOT / gf["file"]).read_bytes(),
                                           "config.yaml": b"a: 1\n", "README.md": b"x"})
    sae = sae_hooks.load(gf["repo_id"], "Llama-3.1-8B-Instruct-SAE-l19.pth")
    g = load_file(str(ROOT / "goodfire_8b" / "golden.safetensors"))
    torch.testing.assert_close(sae.encode(g["x"]), g["latents"], atol=ATOL, rtol=0)


def test_releases_load_by_name(hub_server):
    q = FIX["qwen_scope"]
    hub_server.create_repo(q["repo_id"], {"layer7.sae.pt": (ROOT / q["file"]).read_bytes()})
    sae = sae_hooks.load(q["release"], q["sae_id"])
    assert sae.cfg.k == 50 and sae.cfg.model_name == "Qwen/Qwen3-1.7B-Base"
    g = load_file(str(ROOT / "qwen_scope" / "golden.safetensors"))
    torch.testing.assert_close(sae(g["x"]), g["recon"], atol=ATOL, rtol=0)
    gf = FIX["goodfire_70b"]
    hub_server.create_repo(gf["repo_id"], {Path(gf["file"]).name: (ROOT / gf["file"]).read_bytes()})
    sae = sae_hooks.load(gf["release"], gf["sae_id"])
    assert sae.cfg.sites[0].hook == "blocks.50.hook_resid_post"
