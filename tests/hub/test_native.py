"""Native format: exact round trip, atomic writes, typed errors on bad files."""

from __future__ import annotations

import json

import pytest
import torch

import sae_hooks
from sae_hooks import make_sae
from sae_hooks.errors import ConfigError, SAEFormatError, ShapeMismatchError
from sae_hooks.native import CONFIG_FILE, WEIGHTS_FILE

ARCHS = [
    ("relu", {}),
    ("topk", {"k": 3}),
    ("batchtopk", {"k": 3}),
    ("jumprelu", {}),
    ("gated", {"apply_b_dec_to_input": True}),
    ("skip_transcoder", {"d_out": 4, "sites": [{"hook": "blocks.0.ln2.hook_normalized", "hook_out": "blocks.0.hook_mlp_out"}]}),
]


@pytest.mark.parametrize("arch,extra", ARCHS)
def test_round_trip_is_exact(tmp_path, arch, extra):
    cfg = {"sites": [{"hook": "blocks.1.hook_resid_post", "module": "transformer.h.1"}], **extra}
    sae = make_sae(arch, 6, 12, normalize="standardize", model_name="tiny", metadata={"l0": 3.5}, **cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    sae.save(tmp_path / "sae")
    loaded = sae_hooks.load_native(tmp_path / "sae")
    assert type(loaded) is type(sae)
    assert loaded.cfg == sae.cfg
    for (name, a), (_, b) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(4, 6)
    assert torch.equal(loaded(x), sae(x))
    header = json.loads((tmp_path / "sae" / CONFIG_FILE).read_text())
    assert header["format_version"] == sae_hooks.FORMAT_VERSION
    assert header["sites"][0]["hook"] == sae.cfg.sites[0].hook


def test_load_casts_dtype(tmp_path):
    sae = make_sae("relu", 4, 8)
    sae.save(tmp_path / "s")
    loaded = sae_hooks.load_native(tmp_path / "s", dtype="bfloat16")
    assert loaded.W_enc.dtype == torch.bfloat16 and loaded.cfg.dtype == "bfloat16"


def test_failed_save_leaves_old_folder_intact(tmp_path, monkeypatch):
    sae = make_sae("relu", 4, 8)
    sae.save(tmp_path / "s")
    before = (tmp_path / "s" / WEIGHTS_FILE).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("sae_hooks.native.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        make_sae("relu", 4, 8).save(tmp_path / "s")
    assert (tmp_path / "s" / WEIGHTS_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary folder left


def test_truncated_weights_named(tmp_path):
    make_sae("relu", 4, 8).save(tmp_path / "s")
    w = tmp_path / "s" / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:50])
    with pytest.raises(SAEFormatError, match=r"sae\.safetensors"):
        sae_hooks.load_native(tmp_path / "s")


def test_shape_disagreeing_with_config_named(tmp_path):
    make_sae("relu", 4, 8).save(tmp_path / "s")
    cfg_path = tmp_path / "s" / CONFIG_FILE
    cfg = json.loads(cfg_path.read_text())
    cfg["d_sae"] = 9
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match=r"W_enc.*\(4, 8\).*\(4, 9\)"):
        sae_hooks.load_native(tmp_path / "s")


def test_unknown_key_and_future_version(tmp_path):
    make_sae("relu", 4, 8).save(tmp_path / "s")
    cfg_path = tmp_path / "s" / CONFIG_FILE
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "d_sea": 3}))
    with pytest.raises(ConfigError, match=r"cfg\.json.*d_sea.*d_sae"):
        sae_hooks.load_native(tmp_path / "s")
    cfg_path.write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(SAEFormatError, match="format_version 99"):
        sae_hooks.load_native(tmp_path / "s")
