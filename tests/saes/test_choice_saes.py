"""Feature Choice / Mutual Choice selections, their sparse kernels, losses and aux_zipf_loss (hand formulas)."""

from __future__ import annotations

import pytest
import torch

from sae_hooks.saes import make_sae, training_spec
from sae_hooks.saes.choice import (
    aux_zipf_loss, feature_choice_select, mutual_choice_select, uniform_capacities,
    zipf_capacities, zipf_expected_density, zipf_weights,
)
from sae_hooks.saes.kernels import gather_encode_ragged, sparse_decode_ragged, token_major
from sae_hooks.saes.training import StepContext, dead_reconstruction, auxk_nmse


def choice_step(sae, x, mse_scale=1.0, first=True, **settings):
    """One training loss of the architecture's spec (+ its after-step update), AuxK off unless asked."""
    spec = training_spec(sae.cfg.architecture)
    s = spec.settings.from_dict({"aux_coefficient": 0.0, **settings})
    ctx = StepContext(step=0 if first else 1, mse_scale=mse_scale, dead=torch.zeros(sae.cfg.d_sae, dtype=torch.bool))
    out = spec.loss(sae, x, None, s, ctx)
    spec.after_step(sae, s, out, first)
    return out


def _sae(arch, d=8, f=32, k=3, seed=0):
    torch.manual_seed(seed)
    sae = make_sae(arch, d, f, k=k)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return sae


def test_mutual_choice_keeps_exactly_k_times_n_entries_the_largest_of_the_batch():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(40, 64, generator=g) + 0.5
    k = 5
    rows, cols, vals = mutual_choice_select(pre, k)
    assert rows.numel() == k * 40
    torch.testing.assert_close(pre[rows, cols], vals)
    cutoff = vals.min()
    mask = torch.zeros_like(pre, dtype=torch.bool)
    mask[rows, cols] = True
    assert (pre[~mask] <= cutoff).all() and (vals > 0).all()
    per_token = torch.bincount(rows, minlength=40)
    assert per_token.max() > per_token.min()  # variable latents per token


def test_mutual_choice_drops_non_positive_entries():
    pre = -torch.rand(10, 16)
    pre[0, 3] = 1.0
    rows, cols, vals = mutual_choice_select(pre, 2)
    assert rows.tolist() == [0] and cols.tolist() == [3]


def test_feature_choice_takes_at_most_m_tokens_per_feature_its_largest():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(50, 20, generator=g)
    caps = torch.randint(0, 6, (20,), generator=g)
    rows, cols, vals = feature_choice_select(pre, caps)
    counts = torch.bincount(cols, minlength=20)
    assert (counts <= caps).all()
    for i in range(20):
        col = pre[:, i]
        expect = col.topk(int(caps[i])).values if caps[i] > 0 else col[:0]
        expect = expect[expect > 0]
        got = vals[cols == i].sort(descending=True).values
        torch.testing.assert_close(got, expect)
        assert set(rows[cols == i].tolist()) == set(torch.nonzero(col >= (expect.min() if expect.numel() else 1e9)).flatten().tolist()) or expect.numel() == 0


def test_capacities():
    caps = uniform_capacities(32, 4, 64)
    assert caps.tolist() == [8] * 32
    assert uniform_capacities(1000, 2, 10).tolist() == [1] * 1000  # never 0: every feature may fire
    density = torch.tensor([0.1, 0.5, 0.0, 0.3])
    z = zipf_capacities(density, total=100, alpha=1.0)
    w = torch.tensor([1, 1 / 2, 1 / 3, 1 / 4])
    m = (100 * w / w.sum()).round().clamp_min(1).long()  # by rank: 0.5 -> rank 1, 0.3 -> 2, 0.1 -> 3, 0 -> 4
    assert z.tolist() == [m[2], m[0], m[3], m[1]]


@pytest.mark.parametrize("choice", ["mutual", "feature"])
def test_choice_selections_through_the_ragged_kernels_match_dense_autograd(choice: str):
    g = torch.Generator().manual_seed(2)
    n, d, f = 12, 6, 10
    x = torch.randn(n, d, generator=g, requires_grad=True)
    W_enc = torch.randn(d, f, generator=g, requires_grad=True)
    b_enc = torch.randn(f, generator=g, requires_grad=True)
    W_dec = torch.randn(f, d, generator=g, requires_grad=True)
    with torch.no_grad():
        pre = x @ W_enc + b_enc
    if choice == "mutual":
        rows, cols, vals = mutual_choice_select(pre, 2)
    else:
        rows, cols, vals = feature_choice_select(pre, torch.tensor([3, 1, 2, 4, 0, 2, 3, 1, 2, 2]))
    target = torch.randn(n, d, generator=g)

    sel = token_major(rows, cols, vals, n)  # choice selections come in no token order
    acts = torch.relu(gather_encode_ragged(x, W_enc, b_enc, sel))
    out = sparse_decode_ragged(acts, sel.cols, sel.crow, W_dec)
    loss = ((out - target) ** 2).sum()
    grads = torch.autograd.grad(loss, [x, W_enc, b_enc, W_dec])

    mask = torch.zeros(n, f)
    mask[rows, cols] = 1
    dense = torch.relu(x @ W_enc + b_enc) * mask
    ref = ((dense @ W_dec - target) ** 2).sum()
    ref_grads = torch.autograd.grad(ref, [x, W_enc, b_enc, W_dec])
    torch.testing.assert_close(out, dense @ W_dec)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_dense_n_by_f_tensor_is_saved_for_backward():
    sae = _sae("mutual_choice", d=8, f=512, k=2)
    x = torch.randn(64, 8)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = choice_step(sae, x)
    out.loss.backward()
    assert (64, 512) not in saved
    assert sae.W_enc.grad is not None and sae.W_enc.grad.shape == (8, 512)


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice"])
def test_choice_loss_equals_a_hand_computation(arch):
    sae = _sae(arch)
    x = torch.randn(16, 8)
    out = choice_step(sae, x, 0.7)
    pre = x @ sae.W_enc + sae.b_enc
    pre = pre.detach()
    if arch == "mutual_choice":
        keep = pre >= pre.flatten().topk(3 * 16).values.min()
    else:
        # k·N/F = 48/32 = 1.5: one token each, a second one for the 16 features whose 2nd-best is largest
        top2 = pre.topk(2, dim=0).values
        m = torch.ones(32, dtype=torch.long)
        m[top2[1].topk(16).indices] = 2
        keep = pre >= top2.gather(0, (m - 1)[None]).squeeze(0)
    f = torch.relu(pre) * keep
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = ((x_hat - x) ** 2).sum(-1).mean()
    torch.testing.assert_close(out.loss, 0.7 * mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["l0"], (f > 0).sum(-1).float().mean())
    # thresholds after the first step: smallest kept value (global, or per feature)
    if arch == "mutual_choice":
        torch.testing.assert_close(sae.threshold, f[f > 0].min())
    else:
        low = torch.where(f > 0, f, torch.inf).min(0).values
        hit = torch.isfinite(low)
        torch.testing.assert_close(sae.threshold[hit], low[hit])
    torch.testing.assert_close(sae.feature_density, (f > 0).float().mean(0))


def test_feature_choice_has_no_dead_feature_when_every_feature_has_a_positive_preactivation():
    sae = _sae("feature_choice", f=64, k=2)
    x = torch.randn(128, 8)
    pre = x @ sae.W_enc + sae.b_enc
    assert (pre.max(0).values > 0).all()
    out = choice_step(sae, x)
    assert out.fired.all()


def test_zipf_curve_and_weights_by_hand():
    ranks = torch.arange(1, 9, dtype=torch.float64)
    density = 0.4 * ranks.pow(-1.3)
    density[6] = 0.001  # under the curve (rank 7)
    density[7] = 0.0  # dead
    perm = torch.tensor([3, 0, 7, 5, 1, 6, 2, 4])
    d = density[perm]
    expected = zipf_expected_density(d)  # fit on the upper half: exact power law there
    torch.testing.assert_close(expected, (0.4 * ranks.pow(-1.3))[perm], rtol=1e-9, atol=1e-12)
    w = zipf_weights(d)
    ref = (1 - d / expected).clamp(0, 1)
    torch.testing.assert_close(w, ref)
    assert w[perm == 7].item() == 1.0 and 0.9 < w[perm == 6].item() < 1.0
    assert (w[(perm < 6)] < 1e-9).all()
    # a fixed alpha fits the scale only: c = mean(log d + α log r) over the upper half
    e2 = zipf_expected_density(d, alpha=1.0)
    c = (density[:4].log() + ranks[:4].log()).mean()
    torch.testing.assert_close(e2, (c.exp() / ranks)[perm], rtol=1e-9, atol=1e-12)


def test_aux_zipf_loss_equals_the_hand_formula_and_reduces_to_auxk():
    sae = _sae("mutual_choice", f=16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 8, generator=g)
    pre = (x @ sae.W_enc + sae.b_enc).detach()
    residual = torch.randn(10, 8, generator=g)
    w = torch.zeros(16)
    w[[1, 4, 9, 12, 15]] = torch.tensor([1.0, 0.25, 0.5, 1.0, 0.75])
    loss = aux_zipf_loss(sae, x, pre, residual, w, aux_k=2)
    score = (torch.relu(pre) * w).masked_fill(w == 0, -torch.inf)
    idx = score.topk(2, dim=-1).indices
    recon = torch.zeros(10, 8)
    for n in range(10):
        for i in idx[n]:
            recon[n] += w[i] * torch.relu(pre[n, i]) * sae.W_dec[i]
    ref = ((recon - residual) ** 2).sum(-1).mean() / ((residual - residual.mean(0)) ** 2).sum(-1).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    # 0/1 weights: OpenAI's AuxK on the dead set
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 5, 11]] = True
    auxk = auxk_nmse(dead_reconstruction(sae, x, pre, dead, 2), residual)
    torch.testing.assert_close(aux_zipf_loss(sae, x, pre, residual, dead.float(), 2), auxk)
    assert aux_zipf_loss(sae, x, pre, residual, torch.zeros(16), 2) is None


def test_aux_zipf_loss_skips_the_entries_of_the_main_allocation():
    sae = _sae("mutual_choice", f=16)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 8, generator=g)
    pre = (x @ sae.W_enc + sae.b_enc).detach()
    residual = torch.randn(6, 8, generator=g)
    w = torch.full((16,), 0.5)
    rows, cols, _ = mutual_choice_select(pre, 2)
    loss = aux_zipf_loss(sae, x, pre, residual, w, aux_k=3, selected=(rows, cols))
    chosen = torch.zeros(6, 16, dtype=torch.bool)
    chosen[rows, cols] = True
    recon = torch.zeros(6, 8)
    for n in range(6):  # by hand: the 3 best unselected entries of each token
        order = sorted((i for i in range(16) if not chosen[n, i]), key=lambda i: -float(torch.relu(pre[n, i]) * w[i]))
        for i in order[:3]:
            recon[n] += w[i] * torch.relu(pre[n, i]) * sae.W_dec[i]
    ref = ((recon - residual) ** 2).sum(-1).mean() / ((residual - residual.mean(0)) ** 2).sum(-1).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, aux_zipf_loss(sae, x, pre, residual, w, aux_k=3))  # the exclusion matters here


def test_inference_is_per_token_and_uses_the_thresholds():
    for arch in ("mutual_choice", "feature_choice"):
        sae = _sae(arch)
        x = torch.randn(20, 8)
        choice_step(sae, x)
        x = torch.randn(20, 8)  # new tokens (the training batch sits exactly on the thresholds)
        batch = sae.encode(x)
        single = torch.stack([sae.encode(x[i]) for i in range(20)])
        torch.testing.assert_close(batch, single)
        pre = x @ sae.W_enc + sae.b_enc
        torch.testing.assert_close(batch, torch.relu(pre) * (pre > sae.threshold))


def test_training_with_aux_zipf_and_zipf_capacities_after_the_first_step():
    sae = _sae("feature_choice", f=64, k=2)
    g = torch.Generator().manual_seed(7)
    choice_step(sae, torch.randn(64, 8, generator=g))
    with torch.no_grad():
        sae.feature_density[:8] = 0.0  # some under-used features
    out = choice_step(sae, torch.randn(64, 8, generator=g), first=False, aux_coefficient=0.5, capacities="zipf")
    assert out.metrics["aux"] > 0
    out.loss.backward()
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
    with pytest.raises(Exception, match="capacities"):
        training_spec("feature_choice").settings.from_dict({"capacities": "exp"})
    with pytest.raises(Exception, match="aux"):
        training_spec("mutual_choice").settings.from_dict({"aux": "ghost"})


def test_fractional_budget_mutual_choice_keeps_round_budget_times_n():
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(40, 64, generator=g) + 3.0  # all positive: the count is the budget alone
    rows, _, vals = mutual_choice_select(pre, 5.3)
    assert rows.numel() == round(5.3 * 40) == 212
    assert vals.min() >= pre.flatten().sort(descending=True).values[211]


def test_fractional_uniform_capacities_give_the_remainder_to_the_best_next_matches():
    # T = round(2.25·8) = 18 over F = 4 features: ⌊4.5⌋ = 4 each, the 2 left to the two features
    # whose 5th-largest value is largest (hand-picked below)
    pre = torch.arange(32, dtype=torch.float32).reshape(8, 4) + 1  # column j: j+1, j+5, ..., j+29
    pre[:, 1] += 100.0
    pre[:, 3] += 50.0
    sae = make_sae("feature_choice", 4, 4, k=2)
    rows, cols, vals = sae.select(pre, budget=2.25)
    counts = torch.bincount(cols, minlength=4)
    assert counts.tolist() == [4, 5, 4, 5] and rows.numel() == 18
    for j in range(4):  # each feature's largest values
        torch.testing.assert_close(vals[cols == j].sort(descending=True).values, pre[:, j].sort(descending=True).values[: counts[j]])
    assert uniform_capacities(4, 2.25, 8).tolist() == [round(18 / 4)] * 4  # rounded without next values
    nxt = torch.tensor([0.0, 3.0, 1.0, 2.0])
    assert uniform_capacities(4, 2.25, 8, next_values=nxt).tolist() == [4, 5, 4, 5]
    # an integer budget keeps the old rule: k·N/F each
    assert sae.select(pre, budget=2.0)[0].numel() == 16


def test_choice_budget_setting_is_validated_and_used_in_training():
    from sae_hooks.errors import ConfigError
    from sae_hooks.saes.choice import ChoiceSettings

    with pytest.raises(ConfigError, match="budget"):
        ChoiceSettings(budget=0.0)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    for arch in ("mutual_choice", "feature_choice"):
        sae = _sae(arch, d=8, f=16, k=2)
        with torch.no_grad():
            sae.b_enc.fill_(20.0)  # every pre-activation positive: the count is the budget alone
        out = choice_step(sae, x, budget=3.5)
        assert out.metrics["l0"].item() == pytest.approx(round(3.5 * 64) / 64)
