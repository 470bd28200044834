"""The one CE/KL runner against hand computations: padding and BOS masked the same way for CE, KL and
the splice; SAELens's ``ce_loss_score``; KL directions as named; one definition shared by MLSAE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_hf_gpt2
from sae_hooks import make_sae
from sae_hooks.eval import fvu, hooks_splice_runner, keep_mask, next_token_ce, reconstruction_metrics, scored_mask, splice_metrics


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (3, 12), generator=g)
    ids[:, 0] = 0  # BOS
    ids[1, 5] = 0  # a BOS inside a packed row
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # right padding
    return ids, mask


def _sae(seed=3):
    torch.manual_seed(seed)
    s = make_sae("relu", 32, 48)
    with torch.no_grad():
        s.b_enc.normal_(0, 0.3)
        s.b_dec.normal_(0, 0.2)
    return s


def _logits_with(model, ids, mask, fn):
    """Logits with ``fn`` applied to block 0's output at (row, pos) pairs chosen by Python loops."""
    def hook(mod, args, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                if mask[b, t] and ids[b, t] != 0:
                    h[b, t] = fn(h[b, t])
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = model.transformer.h[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(ids, attention_mask=mask).logits
    finally:
        handle.remove()


def test_splice_metrics_match_a_loop_over_positions() -> None:
    model = tiny_hf_gpt2()
    sae = _sae()
    ids, mask = _batch()
    clean = _logits_with(model, ids, mask, lambda h: h)
    spliced = _logits_with(model, ids, mask, lambda h: sae(h))
    zeroed = _logits_with(model, ids, mask, torch.zeros_like)
    ce = {"clean": [], "sae": [], "zero": []}
    kl_s, kl_z = [], []
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not (mask[b, t] and mask[b, t + 1] and ids[b, t] != 0):
                continue  # only predictions from kept positions of real tokens
            for name, lg in (("clean", clean), ("sae", spliced), ("zero", zeroed)):
                ce[name].append(-F.log_softmax(lg[b, t], -1)[ids[b, t + 1]].item())
            p = F.softmax(clean[b, t], -1)
            kl_s.append((p * (p.log() - F.log_softmax(spliced[b, t], -1))).sum().item())
            kl_z.append((p * (p.log() - F.log_softmax(zeroed[b, t], -1))).sum().item())
    mean = {k: sum(v) / len(v) for k, v in ce.items()}
    run = hooks_splice_runner(model, "transformer.h.0", bos_token_id=0)
    got = splice_metrics(run, sae, [{"input_ids": ids, "attention_mask": mask}])
    assert got["predicted_tokens"] == len(kl_s) == 3 * 11 - 3 - 1 - 4  # BOS rows, mid-row BOS, padding
    for k in ("clean", "sae", "zero"):
        assert got[f"ce_{k}"] == pytest.approx(mean[k], rel=1e-5)
    # (the random model barely needs block 0, so the score's denominator is small: compare at 1e-3)
    assert got["ce_loss_score"] == pytest.approx((mean["zero"] - mean["sae"]) / (mean["zero"] - mean["clean"]), rel=1e-3)
    assert got["kl_clean_sae"] == pytest.approx(sum(kl_s) / len(kl_s), rel=1e-4)
    assert got["kl_clean_zero"] == pytest.approx(sum(kl_z) / len(kl_z), rel=1e-4)
    assert got["kl_div_score"] == pytest.approx(1 - got["kl_clean_sae"] / got["kl_clean_zero"], rel=1e-6)
    # The clean CE is the model's own loss with the same predictions masked out (-100 labels).
    labels = ids.clone()
    labels[:, 1:][~scored_mask(keep_mask(ids, mask, 0), mask)] = -100
    with torch.no_grad():
        own = model(ids, attention_mask=mask, labels=labels).loss.item()
    assert got["ce_clean"] == pytest.approx(own, rel=1e-5)


def test_kl_direction_is_the_named_one() -> None:
    """KL(clean‖SAE) differs from KL(SAE‖clean); torch's kl_div(input=log q, target=log p) is KL(p‖q)."""
    from sae_hooks.eval.splice import kl_div

    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, 5, 7, generator=g) * 2, torch.randn(2, 5, 7, generator=g)
    ref = F.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_div(p, q), ref)
    assert not torch.allclose(kl_div(p, q), kl_div(q, p))


def test_next_token_ce_is_per_prediction() -> None:
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 6, 11, generator=g), torch.randint(0, 11, (2, 6), generator=g)
    ce = next_token_ce(logits, ids)
    assert ce.shape == (2, 5)
    assert ce[1, 3].item() == pytest.approx(-logits[1, 3].log_softmax(-1)[ids[1, 4]].item(), rel=1e-6)


def test_no_scored_prediction_raises() -> None:
    model = tiny_hf_gpt2()
    with pytest.raises(ValueError, match="no scored predictions"):
        splice_metrics(hooks_splice_runner(model, "transformer.h.0", bos_token_id=0), _sae(), [torch.zeros(2, 4, dtype=torch.long)])


def test_reconstruction_metrics_pool_batches() -> None:
    sae = _sae()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(n, 32, generator=g) + 1.5 for n in (7, 19, 4)]
    r = reconstruction_metrics(sae, xs)
    x = torch.cat(xs)
    x_hat = sae(x)
    manual = ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    # pooling: the same per-batch reconstructions give the FVU of the concatenation (to float64 rounding);
    # a forward over the concatenation may round differently in float32 (thread-count dependent)
    per_batch = torch.cat([sae(b) for b in xs])
    assert r["fvu"] == pytest.approx(manual, rel=1e-5) and r["fvu"] == pytest.approx(fvu(x, per_batch), rel=1e-9)
    lat = sae.encode(x)
    assert r["l0"] == pytest.approx((lat != 0).sum(-1).float().mean().item())
    assert r["dead_fraction"] == pytest.approx((lat == 0).all(0).float().mean().item())
    assert r["tokens"] == 30 and math.isclose(r["explained_variance"], 1 - r["fvu"])
