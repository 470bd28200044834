"""Transcoder training: planted recovery, scale folding, checkpoint resume, and the embedded model.

Planted truth: ``y = D · code(x)`` with ``code(x)`` the top-3 ReLU activations of a planted encoder
``E`` (d_in=24 → 64 latents), ``D`` 64 random unit directions in d_out=40. A TopK transcoder should
recover ``D``'s directions (mean max cosine, MMCS ≥ 0.9; random rows score < 0.6).
"""

from __future__ import annotations

import pytest
import torch

from sae_hooks import load_native, make_sae
from sae_hooks.errors import ConfigError, ShapeMismatchError
from sae_hooks.train import IteratorSource, ShuffleBuffer, Trainer, TrainEntry, TrainSettings, load_checkpoint, save_checkpoint

D_IN, D_OUT, N_LAT, K = 24, 40, 64, 3


def planted(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(D_IN, N_LAT, generator=g)
    enc = enc / enc.norm(dim=0, keepdim=True)
    dec = torch.randn(N_LAT, D_OUT, generator=g)
    return enc, dec / dec.norm(dim=-1, keepdim=True)


def planted_pairs(enc: torch.Tensor, dec: torch.Tensor, n: int, batch: int, seed: int = 2, x_scale: float = 3.0, y_scale: float = 0.2):
    """``{"in": x, "out": y}`` batches; x is sparse in ``enc``'s directions (so codes are recoverable)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.rand(batch, N_LAT, generator=g).argsort(-1)[:, :K]
        mag = torch.rand(batch, K, generator=g) + 0.5
        x = torch.zeros(batch, N_LAT).scatter(1, idx, mag) @ torch.linalg.pinv(enc)
        code = torch.relu(x @ enc).topk(K, -1)
        y = torch.zeros(batch, N_LAT).scatter(1, code.indices, code.values) @ dec
        yield {"in": x * x_scale, "out": y * y_scale}


def mmcs(truth: torch.Tensor, W: torch.Tensor) -> float:
    W = W / W.norm(dim=-1, keepdim=True)
    return (truth @ W.T).max(-1).values.mean().item()


@pytest.mark.slow
def test_planted_transcoder_recovers_decoder_directions() -> None:
    torch.manual_seed(0)
    enc, dec = planted()
    tc = make_sae("topk", D_IN, 128, d_out=D_OUT, k=K)
    entry = TrainEntry("tc", "in", tc, TrainSettings(lr=3e-3), site_out="out")
    Trainer([entry]).fit(planted_pairs(enc, dec, 500, 256), max_steps=500)
    score = mmcs(dec, tc.W_dec.detach())
    print(f"transcoder MMCS {score:.4f}, metrics {entry.state.metrics}")
    assert score >= 0.9
    assert entry.state.metrics["fvu"] < 0.3
    assert mmcs(dec, torch.randn(128, D_OUT)) < 0.6
    # The saved transcoder works in model coordinates: x and y had different scales (3 vs 0.2).
    final = entry.final_sae()
    assert final.cfg.normalize == "none" and final.cfg.is_transcoder
    assert final.cfg.sites[0].module == "in" and final.cfg.sites[0].module_out == "out"
    batch = next(planted_pairs(enc, dec, 1, 1024, seed=7))
    y, y_hat = batch["out"], final(batch["in"])
    fvu = (y - y_hat).pow(2).sum(-1).mean() / (y - y.mean(0)).pow(2).sum(-1).mean()
    assert fvu < 0.3, fvu


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "gated", "batchtopk"])
def test_skip_transcoder_fold_matches_training_coordinates(arch: str) -> None:
    """After a few steps, the folded transcoder on raw x equals the trained one on (c_in·x) divided by c_out."""
    extra = dict(k=4) if arch == "batchtopk" else {}
    tc = make_sae(arch, D_IN, 32, d_out=D_OUT, skip=True, **extra)
    entry = TrainEntry("tc", "in", tc, TrainSettings(lr=1e-2, warmup_steps=1), site_out="out")
    enc, dec = planted()
    Trainer([entry]).fit(planted_pairs(enc, dec, 5, 64), max_steps=5)
    assert tc.W_skip.abs().sum() > 0  # the skip path is trained
    x = next(planted_pairs(enc, dec, 1, 16, seed=5))["in"]
    c_in, c_out = entry.objective.in_scale, entry.objective.out_scale
    assert c_in != pytest.approx(c_out, rel=0.1)
    final = entry.final_sae()
    lat, st = tc.encode_with_state(x * c_in)
    expected = tc.reconstruct(x * c_in, lat, st) / c_out
    torch.testing.assert_close(final(x), expected, rtol=1e-4, atol=1e-5)


def test_transcoder_entry_errors() -> None:
    tc = make_sae("topk", D_IN, 32, d_out=D_OUT, k=2)
    with pytest.raises(ConfigError, match="site_out"):
        TrainEntry("tc", "in", tc)
    entry = TrainEntry("tc", "in", tc, site_out="out")
    with pytest.raises(ConfigError, match="target"):
        entry.train_step(torch.randn(8, D_IN))
    with pytest.raises(ShapeMismatchError, match="out"):
        entry.train_step(torch.randn(8, D_IN), target=torch.randn(8, D_IN))
    with pytest.raises(ConfigError, match="batch lacks sites"):
        Trainer([entry]).step({"in": torch.randn(8, D_IN)})


def _buffer() -> ShuffleBuffer:
    enc, dec = planted()
    source = IteratorSource(lambda: planted_pairs(enc, dec, 40, 32), sites=["in", "out"])
    return ShuffleBuffer(source, batch_tokens=64, size_tokens=256)


def _entry() -> TrainEntry:
    tc = make_sae("topk", D_IN, 64, d_out=D_OUT, k=K, skip=True)
    return TrainEntry("tc", "in", tc, TrainSettings(lr=3e-3, warmup_steps=2, dead_tokens=64, total_steps=14), site_out="out")


def test_transcoder_checkpoint_resume_equals_uninterrupted(tmp_path) -> None:
    full = Trainer([_entry()]).fit(_buffer(), max_steps=14)
    first, buf = Trainer([_entry()]), _buffer()
    first.fit(buf, max_steps=6)
    save_checkpoint(first, tmp_path / "ck", buf)
    resumed, buf2 = Trainer([_entry()]), _buffer()
    load_checkpoint(resumed, tmp_path / "ck", buf2)
    resumed.fit(buf2, max_steps=14)
    a, b = full.entries[0], resumed.entries[0]
    for k, v in a.sae.state_dict().items():
        assert torch.equal(v, b.sae.state_dict()[k]), k
    assert (a.objective.in_scale, a.objective.out_scale) == (b.objective.in_scale, b.objective.out_scale)
    # Saving and loading the folded transcoder round-trips.
    path = resumed.save(tmp_path / "out")["tc"]
    loaded = load_native(path)
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(loaded(x), b.final_sae()(x))
    assert loaded.cfg.metadata["training"]["site_out"] == "out"
    # A checkpoint is refused by an entry with a different site_out.
    other = TrainEntry("tc", "in", make_sae("topk", D_IN, 32, d_out=D_OUT, k=K), site_out="elsewhere")
    with pytest.raises(ConfigError, match="site_out"):
        load_checkpoint(Trainer([other]), tmp_path / "ck")


@pytest.mark.slow
def test_mlp_transcoder_on_embedded_model() -> None:
    """A TopK MLP transcoder at layer 1 of the embedded GPT-2 (ln_2 output → mlp output)."""
    import copy

    pytest.importorskip("transformers")
    from sae_hooks.adapters.torch import attach
    from sae_hooks.eval import hooks_splice_runner, keep_mask, next_token_ce, scored_mask, splice_metrics
    from sae_hooks.train import ActivationReader, LiveSource
    from sae_hooks.app.demo import load_default_model, pydoc_texts
    from sae_hooks.sites import site_hooks
    from sae_hooks.train.sources import pack_texts, token_mask

    model, tok = load_default_model()
    site_in, site_out = "transformer.h.1.ln_2", "transformer.h.1.mlp"
    train_texts, held = pydoc_texts()
    batches = pack_texts(tok, train_texts[:30], 64, 16, 0)
    eval_batches = pack_texts(tok, held, 64, 8, 0)[:2]
    # One forward pass gives aligned (x_in, y_out) rows: the MLP applied to x_in gives y_out.
    chunk = ActivationReader(model, [site_in, site_out], bos_token_id=0).read(eval_batches[0])
    with torch.no_grad():
        torch.testing.assert_close(model.transformer.h[1].mlp(chunk[site_in]), chunk[site_out], rtol=1e-4, atol=1e-5)

    source = LiveSource(model, [site_in, site_out], lambda: (b for _ in range(10) for b in batches), bos_token_id=0)
    buffer = ShuffleBuffer(source, batch_tokens=512, size_tokens=4096)
    tc = make_sae("topk", 128, 512, k=16)
    entry = TrainEntry("tc", site_in, tc, TrainSettings(lr=4e-3, warmup_steps=10), site_out=site_out)
    Trainer([entry]).fit(buffer, max_steps=150)
    final = entry.final_sae()
    assert final.cfg.is_transcoder

    # Held-out FVU of the target.
    reader = ActivationReader(model, [site_in, site_out], bos_token_id=0)
    held_rows = [reader.read(b) for b in eval_batches]
    x = torch.cat([c[site_in] for c in held_rows])
    y = torch.cat([c[site_out] for c in held_rows])
    with torch.no_grad():
        fvu = ((y - final(x)).pow(2).sum(-1).mean() / (y - y.mean(0)).pow(2).sum(-1).mean()).item()

    # CE: clean and MLP zero-ablated from the splice runner; spliced through the torch adapter.
    ref = splice_metrics(hooks_splice_runner(model, site_out, bos_token_id=0), final, eval_batches)
    spliced_model = attach(copy.deepcopy(model))
    spliced_model.add_sae(final, hook=site_in, hook_out=site_out, skip_tokens=[0])
    layer = site_hooks(model, [site_in, site_out])
    ce_sae = ce_manual = 0.0
    n = 0
    for ids in eval_batches:
        with torch.no_grad():
            logits = spliced_model(ids).logits
        scored = scored_mask(keep_mask(ids, None, 0))  # the positions splice_metrics scores
        ce_sae, n = ce_sae + next_token_ce(logits, ids)[scored].sum().item(), n + int(scored.sum())
        # Independent splice: read x at ln_2, write transcoder(x) at the mlp output (non-BOS tokens).
        keep = token_mask(ids, None, 0)[..., None]
        saved = {}
        removers = [layer.install(site_in, lambda t: saved.__setitem__("x", t)),
                    layer.install(site_out, lambda t: torch.where(keep, final(saved["x"]), t))]
        try:
            with torch.no_grad():
                ce_manual += next_token_ce(model(ids).logits, ids)[scored].sum().item()
        finally:
            for r in removers:
                r()
    ce_sae, ce_manual = ce_sae / n, ce_manual / n
    recovered = (ref["ce_zero"] - ce_sae) / (ref["ce_zero"] - ref["ce_clean"])
    print(f"transcoder: held-out FVU {fvu:.4f}, CE clean {ref['ce_clean']:.4f} spliced {ce_sae:.4f} "
          f"zero-ablated {ref['ce_zero']:.4f}, recovered {recovered:.4f}, train metrics {entry.state.metrics}")
    assert abs(ce_sae - ce_manual) < 1e-4
    assert fvu < 0.5
    assert recovered > 0.5


def test_cli_trains_a_transcoder(tmp_path) -> None:
    pytest.importorskip("transformers")
    from sae_hooks.app.cli import main

    out = tmp_path / "out"
    assert main(["train", "--site", "transformer.h.0.ln_2", "--site-out", "transformer.h.0.mlp", "--skip", "--arch", "topk",
                 "--k", "8", "--d-sae", "256", "--steps", "4", "--batch-tokens", "128", "--buffer-tokens", "512",
                 "--seq-len", "32", "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    (name,) = [p.name for p in out.iterdir()]
    assert name == "transformer.h.0.ln_2-topk-tc-s0"
    tc = load_native(out / name)
    assert tc.cfg.is_transcoder and tc.cfg.skip and tc.cfg.d_out == 128
    assert tc.cfg.sites[0].module == "transformer.h.0.ln_2" and tc.cfg.sites[0].module_out == "transformer.h.0.mlp"
    assert tc.cfg.metadata["training"]["tokens_seen"] == 4 * 128
    with pytest.raises(SystemExit):
        main(["train", "--site", "transformer.h.0.ln_2", "--site", "transformer.h.1.ln_2", "--site-out", "transformer.h.0.mlp",
              "--out", str(out)])
