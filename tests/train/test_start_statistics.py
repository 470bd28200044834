"""Issue 14 items 1-2: a skipped BatchTopK batch leaves the inference threshold alone; the input scale,
``mse_scale`` and ``b_dec`` come from a robust estimate over the first batches, and a batch that cannot
give them is refused with a typed error naming the statistic."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.errors import ConfigError, DegenerateDataError
from sae_hooks.saes import SAE, make_mlsae
from sae_hooks.saes.registry import trainable_architectures
from sae_hooks.train import Trainer, TrainEntry, TrainSettings
from sae_hooks.train.statistics import geometric_median

D = 16


def healthy(n: int, rows: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(32, D, generator=g), dim=-1)
    return [(torch.rand(rows, 32, generator=g) * (torch.rand(rows, 32, generator=g) < 0.15)) @ feats * 4 + 0.5
            for _ in range(n)]


def sae_of(arch: str) -> SAE:
    try:
        return make_sae(arch, D, 64)
    except ConfigError:  # the sparsity is a count of latents (TopK, BatchTopK, choice, matryoshka ...)
        return make_sae(arch, D, 64, k=4)


def entry(arch: str, **settings) -> TrainEntry:  # noqa: ANN003
    s = TrainSettings(**{"lr": 3e-3, "warmup_steps": 5, "dead_tokens": 10_000, **settings})
    return TrainEntry(arch, "x", sae_of(arch), s)


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


SAE_ARCHS = [a for a in trainable_architectures() if a != "mlsae"]  # every SAE the trainer trains (MLSAE below)
DEGENERATE = {
    "zeros": lambda x: torch.zeros_like(x),
    "tiny": lambda x: x * 1e-30,
    "huge20": lambda x: x * 1e20,
    "huge": lambda x: x * 1e30,
    "constant": lambda x: x[:1].expand_as(x).clone(),
    "empty": lambda x: x[:0],
}


@pytest.mark.parametrize("arch", SAE_ARCHS)
@pytest.mark.parametrize("case,match", [
    ("zeros", r"input scale: batch 1 .* is 0"),
    ("tiny", r"input scale: batch 1 .* underflows torch.float32"),
    ("huge20", r"input scale: batch 1 .* overflows torch.float32"),
    ("huge", r"input scale: batch 1 .* overflows torch.float32"),
    ("constant", r"mse_scale: .* every row is the same vector"),
])
def test_degenerate_first_batch_is_refused_naming_the_statistic(arch: str, case: str, match: str) -> None:
    bad = DEGENERATE[case](healthy(1)[0])
    trainer = Trainer([entry(arch, init_batches=1)])
    with pytest.raises(DegenerateDataError, match=match) as info:
        trainer.step(bad)
    assert "nan" not in str(info.value).lower()  # issue 14: was "norm_scale must be a finite number, got nan"


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


# A degenerate first batch among healthy ones: left out of the statistics and not trained on, so the run is
# the clean run's; an empty batch is skipped wherever it comes. Independent truth: the same trainer on the
# healthy batches alone (init_batches one lower where the bad batch took a statistics slot), bit for bit.

STEPS = 24


def _weights(e: TrainEntry) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in e.objective.module.state_dict().items()}


def _assert_same_run(got: TrainEntry, want: TrainEntry) -> None:
    assert got.state.step == want.state.step == STEPS
    w_got, w_want = _weights(got), _weights(want)
    assert w_got.keys() == w_want.keys()
    for k in w_want:
        torch.testing.assert_close(w_got[k], w_want[k], rtol=0, atol=0, msg=k)
    assert got.sae.cfg.norm_scale == want.sae.cfg.norm_scale


@pytest.mark.parametrize("arch", SAE_ARCHS)
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_first_batch_among_healthy_ones_gives_the_clean_run(arch: str, case: str) -> None:
    data = healthy(STEPS)
    bad = DEGENERATE[case](data[0] * 1.7)
    # A statistics slot taken by a left-out batch: the clean run computes them from one batch fewer.
    clean = entry(arch, total_steps=STEPS, init_batches=3 if case == "empty" else 2)
    Trainer([clean]).fit(data, max_steps=STEPS)
    poisoned = entry(arch, total_steps=STEPS)  # init_batches=3 (the default)
    why = "0 rows" if case == "empty" else "1 of the first 3 batches"
    with pytest.warns(RuntimeWarning, match=why):
        Trainer([poisoned]).fit([bad, *data], max_steps=STEPS + 1)
    assert poisoned.state.skipped == 1
    _assert_same_run(poisoned, clean)


@pytest.mark.parametrize("case", ["zeros", "tiny", "huge20", "huge"])
def test_a_majority_of_degenerate_first_batches_is_refused(case: str) -> None:
    data = healthy(3)
    trainer = Trainer([entry("topk")])
    assert trainer.step(DEGENERATE[case](data[0]))["topk"] is None
    assert trainer.step(DEGENERATE[case](data[1]))["topk"] is None
    with pytest.raises(DegenerateDataError, match=r"input scale: batch 1 of the first 3 .* \(only [01] of the 3 batches could, not a majority\)"):
        trainer.step(data[2])


def test_empty_batches_are_skipped_anywhere_by_name() -> None:
    """Empty batches never reach the statistics (they wait for 3 real ones) and are skipped mid-run too."""
    data = healthy(6)
    e = entry("topk")
    trainer = Trainer([e])
    with pytest.warns(RuntimeWarning, match="skipped a batch because it has 0 rows"):
        for b in [data[0][:0], data[0], data[1][:0], data[1], data[2]]:
            trainer.step(b)
    assert e.state.initialised and e.state.step == 3 and e.state.skipped == 2
    before = _weights(e)
    with pytest.warns(RuntimeWarning, match="0 rows"):
        assert trainer.step(data[3][:0])["topk"] is None
    assert all(torch.equal(before[k], v) for k, v in _weights(e).items())


L = 3
MLSITES = [f"blocks.{i}.hook_resid_post" for i in range(L)]


def _layers(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    mix = [torch.eye(D) + 0.3 * torch.randn(D, D, generator=g) for _ in range(L)]
    return [{s: x @ mix[i] + 0.5 * i for i, s in enumerate(MLSITES)} for x in healthy(n, seed=4)]


def _settings(**settings) -> TrainSettings:  # noqa: ANN003
    return TrainSettings(**{"lr": 3e-3, "warmup_steps": 2, "dead_tokens": 10_000, "total_steps": STEPS, **settings})


def _mlsae(**settings) -> TrainEntry:  # noqa: ANN003
    s = _settings(**settings)
    return TrainEntry("mlsae", MLSITES, make_mlsae(D, L, d_sae=64, k=4, seed=0), s, init_weights=False)


@pytest.mark.parametrize("case", sorted(set(DEGENERATE) - {"constant"}))
def test_mlsae_degenerate_first_batch(case: str) -> None:
    """The MLSAE standardises each token, so only b_dec comes from the first batches: a degenerate batch is
    refused alone (init_batches=1), left out among healthy ones (the clean run's b_dec and weights). (A batch
    constant at each site is not degenerate here: its rows stacked over layers still vary, and each token
    is standardised.)"""
    data = _layers(STEPS)
    bad = {s: DEGENERATE[case](x) for s, x in data[0].items()}
    _refused_alone_left_out_among_healthy(_mlsae, bad, data, case, "MLSAE inputs: batch 1 of the first 1")


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("case", ["zeros", "tiny", "huge", "empty"])
def test_transcoder_degenerate_input_or_target(side: str, case: str) -> None:
    g = torch.Generator().manual_seed(2)
    W = torch.randn(D, D, generator=g) * 0.3
    data = [{"in": x, "out": torch.relu(x @ W)} for x in healthy(STEPS, seed=6)]

    def tc(**settings) -> TrainEntry:  # noqa: ANN003
        s = _settings(**settings)
        return TrainEntry("tc", "in", make_sae("topk", D, 64, k=4), s, site_out="out")

    bad = dict(data[0])
    bad[side] = DEGENERATE[case](bad[side])
    if case == "empty":
        bad = {s: x[:0] for s, x in bad.items()}
    statistic = "input scale" if side == "in" else "target scale"
    _refused_alone_left_out_among_healthy(tc, bad, data, case, f"{statistic}: batch 1 of the first 1")


def _refused_alone_left_out_among_healthy(make, bad, data, case: str, match: str) -> None:  # noqa: ANN001
    """``bad`` as the only statistics batch (``make(init_batches=1)``) is refused (an empty one is skipped
    instead); as the first of 3 it is left out: the run equals the clean run on ``data``, bit for bit."""
    if case != "empty":
        with pytest.raises(DegenerateDataError, match=match):
            Trainer([make(init_batches=1)]).step(bad)
    clean = make(init_batches=3 if case == "empty" else 2)
    Trainer([clean]).fit(data, max_steps=STEPS)
    poisoned = make()
    with pytest.warns(RuntimeWarning):
        Trainer([poisoned]).fit([bad, *data], max_steps=STEPS + 1)
    _assert_same_run(poisoned, clean)
