"""Trainer mechanics: STE gradients, sparse TopK backward, NaN skipping, many SAEs from one batch,
exact resumption, normalisation folding, buffer and disk sources."""

from __future__ import annotations

import warnings

import pytest
import torch

from sae_hooks import load_native, make_sae
from sae_hooks.errors import ConfigError, SAEFormatError
from sae_hooks.train import (
    IteratorSource, ShuffleBuffer, Trainer, TrainEntry, TrainSettings, fold_scale, geometric_median,
    load_checkpoint, save_checkpoint,
)
from sae_hooks.saes.kernels import gather_encode, jumprelu, step


def test_jumprelu_threshold_gradients_match_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.rand(64, 10, generator=g) * 2
    theta = (torch.rand(10, generator=g) + 0.5).requires_grad_(True)
    eps = 0.3
    upstream = torch.randn(64, 10, generator=g)
    K = ((z - theta.detach()) / eps).abs().lt(0.5).float()
    assert K.sum() > 10  # some entries fall inside the kernel: the check is not vacuous
    # JumpReLU: d/dθ = -(θ/ε) K((z-θ)/ε), summed over the batch; d/dz = 1{z > θ}.
    zz = z.clone().requires_grad_(True)
    (jumprelu(zz, theta, eps) * upstream).sum().backward()
    expected = (-(theta.detach() / eps) * K * upstream).sum(0)
    torch.testing.assert_close(theta.grad, expected)
    torch.testing.assert_close(zz.grad, (z > theta.detach()).float() * upstream)
    # Step (L0): d/dθ = -(1/ε) K((z-θ)/ε); no gradient to z.
    theta.grad = None
    zz.grad = None
    (step(zz, theta, eps) * upstream).sum().backward()
    torch.testing.assert_close(theta.grad, (-(1 / eps) * K * upstream).sum(0))
    assert torch.count_nonzero(zz.grad) == 0
    # Forward values are exact.
    torch.testing.assert_close(jumprelu(z, theta.detach(), eps), z * (z > theta.detach()))


def test_sparse_topk_backward_equals_dense_autograd() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 12, generator=g, dtype=torch.float64)
    W = torch.randn(12, 40, generator=g, dtype=torch.float64)
    b = torch.randn(40, generator=g, dtype=torch.float64)
    up = torch.randn(50, 5, generator=g, dtype=torch.float64)
    idx = (x @ W + b).topk(5, dim=-1).indices
    leaves = [t.clone().requires_grad_(True) for t in (x, W, b)]
    (gather_encode(*leaves, idx) * up).sum().backward()
    dense = [t.clone().requires_grad_(True) for t in (x, W, b)]
    ((dense[0] @ dense[1] + dense[2]).gather(-1, idx) * up).sum().backward()
    for a, d in zip(leaves, dense):
        torch.testing.assert_close(a.grad, d.grad)


def _batches(n: int, d: int = 16, rows: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, d, generator=g) * 3 + 1 for _ in range(n)]


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated"])
def test_nan_batch_is_skipped_with_warning_and_no_weight_changes(arch: str) -> None:
    sae = make_sae(arch, 16, 32, **({"k": 4} if "topk" in arch else {}))
    entry = TrainEntry("e", "x", sae, TrainSettings(lr=1e-2, warmup_steps=0, dead_tokens=10))
    trainer = Trainer([entry])
    trainer.fit(_batches(3), max_steps=3)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    opt_before = {k: v["exp_avg"].clone() for k, v in entry.optimizer.state_dict()["state"].items()}
    for bad in (float("nan"), float("inf")):
        x = _batches(1, seed=5)[0]
        x[3, 2] = bad
        with pytest.warns(RuntimeWarning, match="NaN/inf"):
            assert trainer.step({"x": x})["e"] is None
    for k, v in sae.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in entry.optimizer.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], opt_before[k])
    assert entry.state.step == 3 and entry.state.skipped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.step({"x": _batches(1, seed=6)[0]})["e"] is not None  # training continues


def test_one_batch_feeds_many_saes_like_separate_training() -> None:
    """Two sites x two seeds in one trainer == each SAE trained alone on the same activations."""
    sites = ["a", "b"]
    data = [{"a": x, "b": y} for x, y in zip(_batches(12, seed=1), _batches(12, seed=2))]

    def entries(only=None):
        out = []
        for site in sites:
            for seed in (0, 1):
                name = f"{site}{seed}"
                if only is None or only == name:
                    sae = make_sae("topk", 16, 48, k=4)
                    out.append(TrainEntry(name, site, sae, TrainSettings(seed=seed, lr=3e-3, dead_tokens=64)))
        return out

    together = Trainer(entries()).fit(data, max_steps=12)
    for e in together.entries:
        alone = Trainer(entries(e.name)).fit([{e.site: b[e.site]} for b in data], max_steps=12).entries[0]
        for k, v in e.sae.state_dict().items():
            assert torch.equal(v, alone.sae.state_dict()[k]), (e.name, k)
    # different seeds give different SAEs; same seed at two sites starts from the same init
    w = {e.name: e.sae.W_dec for e in together.entries}
    assert not torch.equal(w["a0"], w["a1"])


def _resumable_setup(arch: str):
    data = _batches(40, seed=3)
    source = IteratorSource(lambda: iter(data), site="x")
    buffer = ShuffleBuffer(source, batch_tokens=48, size_tokens=256, seed=7)
    extra = {"k": 4} if "topk" in arch else {}
    entry = TrainEntry("e", "x", make_sae(arch, 16, 32, **extra), TrainSettings(lr=5e-3, warmup_steps=3, dead_tokens=100, total_steps=30))
    return Trainer([entry]), buffer


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "batchtopk"])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, arch: str) -> None:
    full, buf = _resumable_setup(arch)
    full.fit(buf, max_steps=30)
    # interrupted run: checkpoint every 7 steps, "crash" after step 17
    first, buf1 = _resumable_setup(arch)
    ckpt = tmp_path / "ckpt"
    first.fit(buf1, max_steps=17, checkpoint_dir=ckpt, checkpoint_every=7)  # "crash" at 17; last checkpoint: step 14
    torch.manual_seed(1234)  # the crash leaves the global RNG anywhere
    resumed, buf2 = _resumable_setup(arch)
    meta = load_checkpoint(resumed, ckpt, buf2)
    assert meta["step"] == 14 and resumed.step_count == 14
    resumed.fit(buf2, max_steps=30)
    a, b = full.entries[0], resumed.entries[0]
    assert a.state.tokens_seen == b.state.tokens_seen == 30 * 48
    for k, v in a.sae.state_dict().items():
        assert torch.equal(v, b.sae.state_dict()[k]), k
    assert torch.equal(a.tokens_since_fired, b.tokens_since_fired)
    # the final save carries training metadata
    path = resumed.save(tmp_path / "out")["e"]
    loaded = load_native(path)
    assert loaded.cfg.metadata["training"]["tokens_seen"] == 30 * 48
    assert loaded.cfg.normalize == "none"


def test_checkpoint_mismatch_and_missing_are_typed_errors(tmp_path) -> None:
    trainer, buf = _resumable_setup("topk")
    trainer.fit(buf, max_steps=2)
    save_checkpoint(trainer, tmp_path / "c", buf)
    other = Trainer([TrainEntry("other", "x", make_sae("topk", 16, 32, k=4))])
    with pytest.raises(ConfigError, match="entries"):
        load_checkpoint(other, tmp_path / "c")
    with pytest.raises(SAEFormatError, match="not a training checkpoint"):
        load_checkpoint(trainer, tmp_path / "nothing")


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "gated", "batchtopk"])
def test_fold_scale_preserves_the_function(arch: str) -> None:
    extra = {"k": 4} if "topk" in arch else {"apply_b_dec_to_input": True}
    sae = make_sae(arch, 16, 32, normalize="scale", norm_scale=2.5, dtype="float64", **extra)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.05)
    x = torch.randn(20, 16, dtype=torch.float64)
    before = sae(x)
    fold_scale(sae)
    assert sae.cfg.normalize == "none"
    torch.testing.assert_close(sae(x), before)


def test_geometric_median_is_robust_to_outliers() -> None:
    x = torch.randn(200, 4) * 0.1
    x[:20] += 100.0
    med = geometric_median(x)
    assert med.norm() < 1.0 < x.mean(0).norm()


def test_buffer_keeps_sites_aligned_and_serves_every_row_once() -> None:
    n = 1000
    rows = torch.arange(n, dtype=torch.float32)
    chunks = [{"a": rows[i : i + 100, None].repeat(1, 3), "b": -rows[i : i + 100, None]} for i in range(0, n, 100)]
    buf = ShuffleBuffer(IteratorSource(chunks, sites=["a", "b"]), batch_tokens=64, size_tokens=256, seed=0, drop_last=False)
    seen = []
    for batch in buf:
        assert torch.equal(batch["a"][:, 0], -batch["b"][:, 0])
        seen.append(batch["a"][:, 0])
    seen = torch.cat(seen)
    assert sorted(seen.tolist()) == list(range(n))
    assert not torch.equal(seen, rows)  # shuffled
    with pytest.raises(ConfigError):
        ShuffleBuffer(IteratorSource(chunks, sites=["a", "b"]), batch_tokens=512, size_tokens=256)
