"""Issue 14 items 1-2: a skipped BatchTopK batch leaves the inference threshold alone; the input scale,
``mse_scale`` and ``b_dec`` come from a robust estimate over the first batches, and a batch that cannot
give them is refused with a typed error naming the statistic."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.errors import DegenerateDataError
from sae_hooks.train import Trainer, TrainEntry, TrainSettings
from sae_hooks.train.statistics import geometric_median

D = 16


def healthy(n: int, rows: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(32, D, generator=g), dim=-1)
    return [(torch.rand(rows, 32, generator=g) * (torch.rand(rows, 32, generator=g) < 0.15)) @ feats * 4 + 0.5
            for _ in range(n)]


def entry(arch: str, **settings) -> TrainEntry:  # noqa: ANN003
    extra = {"k": 4} if "topk" in arch else {}
    s = TrainSettings(**{"lr": 3e-3, "warmup_steps": 5, "dead_tokens": 10_000, **settings})
    return TrainEntry(arch, "x", make_sae(arch, D, 64, **extra), s)


def test_skipped_batchtopk_batch_does_not_move_the_threshold() -> None:
    e = entry("batchtopk")
    trainer = Trainer([e])
    trainer.fit(healthy(20), max_steps=20)
    theta = e.sae.threshold.clone()
    assert 0 < float(theta) < 100
    huge = healthy(1, seed=7)[0] * 1e25  # finite input, but its squared error overflows: the loss is inf
    assert torch.isfinite(huge).all()
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        assert trainer.step(huge)["batchtopk"] is None
    assert torch.equal(e.sae.threshold, theta)  # main: 1.5 -> 1e28, and inference L0 stays 0
    trainer.fit(healthy(10, seed=3), max_steps=30)
    x = healthy(1, rows=512, seed=9)[0]
    l0 = (e.final().encode(x) > 0).sum(-1).float().mean().item()
    assert 0.5 <= l0 <= 12  # main: 0 (the threshold jumped to ~1e28)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu", "gated"])
@pytest.mark.parametrize("case,match", [
    ("zeros", r"input scale: batch 1 .* is 0"),
    ("tiny", r"input scale: batch 1 .* underflows torch.float32"),
    ("huge", r"input scale: batch 1 .* overflows torch.float32"),
    ("constant", r"mse_scale: .* every row is the same vector"),
])
def test_degenerate_first_batch_is_refused_naming_the_statistic(arch: str, case: str, match: str) -> None:
    x = healthy(1)[0]
    bad = {"zeros": torch.zeros_like(x), "tiny": x * 1e-30, "huge": x * 1e30, "constant": x[:1].expand_as(x).clone()}[case]
    trainer = Trainer([entry(arch, init_batches=1)])
    with pytest.raises(DegenerateDataError, match=match):
        trainer.step(bad)


def test_degenerate_batch_is_refused_without_input_scaling_too() -> None:
    trainer = Trainer([entry("topk", init_batches=1, input_scaling="none")])
    with pytest.raises(DegenerateDataError, match="is 0"):
        trainer.step(torch.zeros(64, D))


def test_an_outlier_first_batch_does_not_decide_the_run() -> None:
    """First batch ×1e6 (representable, so not refused): the median over the first 3 batches sets the scale,
    the outlier is left out of b_dec and mse_scale and not trained on, so training reaches the quality of a
    clean run (main: the outlier batch sets the scale; FVU stays ~1)."""
    data = healthy(120)
    clean = entry("topk")
    Trainer([clean]).fit(data, max_steps=120)
    poisoned = entry("topk")
    with pytest.warns(RuntimeWarning, match="1 of the first 3 batches"):
        Trainer([poisoned]).fit([data[0] * 1e6, *data[1:]], max_steps=120)
    c_clean = clean.sae.cfg.norm_scale
    c = poisoned.sae.cfg.norm_scale
    expected = math.sqrt(D / torch.stack([b.double().pow(2).sum(-1).mean() for b in data[1:3]]).mean().item())
    assert c == pytest.approx(expected, rel=1e-6)  # the median over the inliers {b1, b2}
    assert c == pytest.approx(c_clean, rel=0.2)
    assert poisoned.objective.mse_scale == pytest.approx(clean.objective.mse_scale, rel=0.5)
    x = healthy(1, rows=512, seed=11)[0]

    def fvu(e: TrainEntry) -> float:
        sae = e.final()
        return ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()

    assert fvu(clean) < 0.8
    assert fvu(poisoned) < 1.2 * fvu(clean)
    assert poisoned.state.skipped == 1 and poisoned.state.step == 119


def test_statistics_use_every_initial_batch() -> None:
    """b_dec starts at the geometric median of the first init_batches batches pooled (scaled), and the
    first steps are taken on those same batches once they are in."""
    data = healthy(4, seed=2)
    e = entry("topk", init_batches=3, b_dec_init="geometric_median", lr=1e-12)  # the step barely moves b_dec
    trainer = Trainer([e])
    assert trainer.step(data[0])["topk"] is None and trainer.step(data[1])["topk"] is None
    assert e.state.step == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.step(data[2])["topk"] is not None
    assert e.state.step == 3 and e.state.tokens_seen == 3 * 64
    c = e.sae.cfg.norm_scale
    msn = sorted(b.double().pow(2).sum(-1).mean().item() for b in data[:3])[1]
    assert c == pytest.approx(math.sqrt(D / msn), rel=1e-6)
    expected = geometric_median(torch.cat(data[:3]) * c).float()
    torch.testing.assert_close(e.sae.b_dec.detach(), expected, atol=1e-4, rtol=0)
