"""Training belongs to the architecture: the registry maps a name to the SAE class and its training spec,
refuses duplicates, checks each architecture's settings keys, and a new architecture trains (and shows up
in ``sae-hooks train --arch``) by registering one module's class and spec."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.errors import ConfigError
from sae_hooks.saes import SAE, SparseLatents, register_sae_class, trainable_architectures, training_spec
from sae_hooks.saes.registry import _REGISTRY, _SPECS
from sae_hooks.saes.relu import ReLUSAE
from sae_hooks.saes.training import ArchSettings, TrainingSpec, reconstruction_loss
from sae_hooks.train import Trainer, TrainEntry, TrainSettings


def test_registry_refuses_a_taken_name_unless_replace() -> None:
    with pytest.raises(ConfigError, match="'relu' is already registered"):
        register_sae_class(ReLUSAE)
    with pytest.raises(ConfigError, match="alias"):
        register_sae_class(ReLUSAE, "standard")
    spec = training_spec("relu")
    register_sae_class(ReLUSAE, spec=spec, replace=True)  # explicit replacement is allowed
    assert training_spec("relu") is spec and _REGISTRY["relu"] is ReLUSAE


def test_builtin_architectures_are_trainable_and_inference_only_ones_say_so() -> None:
    assert {"relu", "topk", "batchtopk", "jumprelu", "gated", "mlsae"} <= set(trainable_architectures())
    assert training_spec("standard") is training_spec("relu")  # aliases resolve
    with pytest.raises(ConfigError, match="groupmax.*inference only"):
        training_spec("groupmax")


def test_make_sae_takes_one_site_as_a_string() -> None:
    sae = make_sae("relu", 8, 16, sites="blocks.0.hook_resid_post")
    assert [s.hook for s in sae.cfg.sites] == ["blocks.0.hook_resid_post"]
    two = make_sae("relu", 8, 16, sites=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    assert len(two.cfg.sites) == 2


@pytest.mark.parametrize("arch,settings,bad", [
    ("relu", {"l1_coefficent": 1.0}, "l1_coefficient"),
    ("topk", {"l1_coefficient": 1.0}, "aux_k"),
    ("jumprelu", {"bandwith": 0.1}, "bandwidth"),
    ("batchtopk", {"threshold": 0.1}, "threshold_lr"),
])
def test_architecture_settings_have_strict_keys(arch: str, settings: dict, bad: str) -> None:
    extra = {"k": 4} if "topk" in arch else {}
    with pytest.raises(ConfigError, match=f"unknown .*Settings key.*{bad}"):
        TrainEntry("e", "x", make_sae(arch, 8, 16, **extra), TrainSettings(arch=settings))
    with pytest.raises(ConfigError, match="unknown training setting"):
        TrainSettings.from_dict({"normalize": "scale"})  # the trainer's knob is input_scaling now


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "gated", "mlsae"])
def test_training_encoder_gives_the_inference_latents(arch: str) -> None:
    """One encoder: training mode returns the same latents (only their gradients differ)."""
    torch.manual_seed(0)
    extra = {"k": 4} if arch in ("topk", "mlsae") else {}
    sae = make_sae(arch, 12, 40, **extra)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        if arch == "jumprelu":
            sae.threshold.fill_(0.1)
    x = torch.randn(30, 12)
    xn, _ = sae.normalize_input(x)
    inf, pre_inf = sae.encode_normalized(xn)
    tr, pre_tr = sae.encode_normalized(xn, training=True)
    dense = lambda z: z.to_dense() if isinstance(z, SparseLatents) else z  # noqa: E731
    torch.testing.assert_close(dense(tr), dense(inf))
    torch.testing.assert_close(pre_tr, pre_inf)
    if isinstance(tr, SparseLatents):
        assert tr.pre is not None and inf.pre is None  # pre-activations ride along for AuxK


class _SquareSAE(SAE):
    architecture = "square_test"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.clamp(0.0, 6.0)  # ReLU6


@dataclass
class _SquareSettings(ArchSettings):
    l1_coefficient: float = 0.5


class _SquareTraining(TrainingSpec):
    settings = _SquareSettings
    calls = 0

    def loss(self, sae, x, target, settings, ctx):  # noqa: ANN001, ANN201
        type(self).calls += 1
        f, _ = sae.encode_normalized(x, training=True)
        return reconstruction_loss(sae, x, target, f, settings.l1_coefficient * f.sum(-1).mean())[0]


def test_a_new_architecture_is_one_registration(tmp_path) -> None:  # noqa: ANN001
    register_sae_class(_SquareSAE, spec=_SquareTraining())
    try:
        g = torch.Generator().manual_seed(0)
        feats = torch.nn.functional.normalize(torch.randn(24, 12, generator=g), dim=-1)
        data = [(torch.rand(64, 24, generator=g) * (torch.rand(64, 24, generator=g) < 0.1)) @ feats for _ in range(60)]
        e = TrainEntry("sq", "x", make_sae("square_test", 12, 48), TrainSettings(lr=5e-3, warmup_steps=5, init_batches=1, arch={"l1_coefficient": 0.01}))
        Trainer([e]).fit(data, max_steps=60)
        assert _SquareTraining.calls == 60
        assert e.state.metrics["fvu"] < 0.9
        torch.testing.assert_close(e.sae.W_dec.norm(dim=-1), torch.ones(48))  # the spec's default: unit-norm decoder
        path = Trainer([e]).save(tmp_path)["sq"]
        from sae_hooks import load_native

        assert load_native(path).cfg.architecture == "square_test"
        from sae_hooks.app.cli import build_parser

        args = build_parser().parse_args(["train", "--arch", "square_test", "--site", "x", "--out", str(tmp_path)])
        assert args.arch == "square_test"  # the CLI's --arch choices come from the registry
    finally:
        _REGISTRY.pop("square_test", None)
        _SPECS.pop("square_test", None)
