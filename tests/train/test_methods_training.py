"""Issue 11 methods through the one trainer: planted recovery, exact resume, native save/load."""

from __future__ import annotations

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.errors import ConfigError
from sae_hooks.native import load as load_native
from sae_hooks.train import IteratorSource, ShuffleBuffer, Trainer, TrainEntry, TrainSettings, load_checkpoint
from sae_hooks.saes.matryoshka import prefix_fvu

from conftest import PLANTED_ACTIVE as ACTIVE, PLANTED_D_IN as D_IN, PLANTED_FEATURES as N_FEATURES, planted_batches, planted_dictionary


def mmcs(dictionary: torch.Tensor, W_dec: torch.Tensor, signed: bool = False) -> float:
    """Mean max cosine similarity; ``signed``: |cos| (a signed-TopK latent may hold a feature with a negative code)."""
    W = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = dictionary @ W.T
    return (cos.abs() if signed else cos).max(-1).values.mean().item()


CASES = {
    "mutual_choice": (dict(k=3), TrainSettings(lr=3e-3)),
    "feature_choice": (dict(k=3), TrainSettings(lr=3e-3)),
    "feature_choice-zipf": (dict(k=3), TrainSettings(lr=3e-3, arch={"capacities": "zipf"})),
    "matryoshka": (dict(k=3, matryoshka_widths=[16, 64]), TrainSettings(lr=3e-3)),
    "signed_topk": (dict(k=3), TrainSettings(lr=3e-3)),
    "signed_topk-pam": (dict(k=3), TrainSettings(lr=3e-3, optimizer="pam-sgd", optimizer_settings={"round_steps": 20})),
    "topk-pam": (dict(k=3), TrainSettings(lr=3e-3, optimizer="pam-sgd", optimizer_settings={"round_steps": 20})),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_planted_features_recovered(case: str) -> None:
    torch.manual_seed(0)
    arch = case.split("-")[0]
    dictionary = planted_dictionary()
    extra, settings = CASES[case]
    sae = make_sae(arch, D_IN, 128, **extra)
    entry = TrainEntry(case, "x", sae, settings)
    Trainer([entry]).fit(planted_batches(dictionary, 600, 256), max_steps=600)
    signed = arch == "signed_topk"
    score = mmcs(dictionary, sae.W_dec.detach(), signed)
    m = entry.state.metrics
    final = entry.final_sae()
    x = next(planted_batches(dictionary, 1, 1024, seed=9))
    l0 = (final.encode(x) != 0).sum(-1).float().mean().item()
    print(f"{case}: MMCS {score:.4f}, inference L0 {l0:.2f}, metrics {m}")
    assert score >= 0.9, f"{case} recovered planted features with MMCS {score:.3f} < 0.9"
    # Feature Choice makes every one of the 128 latents fire on its top tokens, though only 64 features exist:
    # the budget spent on the spare latents costs reconstruction (FVU ≈ 0.28 uniform, 0.34 Zipf).
    assert m["fvu"] < (0.4 if arch == "feature_choice" else 0.2)
    assert mmcs(dictionary, torch.randn(128, D_IN), signed) < 0.75
    assert 1.5 <= l0 <= 6, l0  # the inference rule gives about k latents per token
    if arch == "matryoshka":
        fvu = prefix_fvu(final, x)
        print("prefix FVU", fvu)
        assert fvu[16] > fvu[64] > fvu[128] and fvu[128] < 0.25


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(24, 16, generator=g)
    return [(torch.rand(32, 24, generator=g) * (torch.rand(32, 24, generator=g) < 0.15)) @ basis + 0.3
            for _ in range(n)]


RESUME = {
    "feature_choice": (dict(k=4), dict(arch={"capacities": "zipf"})),
    "mutual_choice": (dict(k=4), {}),
    "matryoshka": (dict(k=4, matryoshka_widths=[8, 16]), {}),
    "signed_topk-pam": (dict(k=4), dict(optimizer="pam-sgd", optimizer_settings={"round_steps": 5})),
    "relu-pam-sparse": ({}, dict(optimizer="pam-sgd", optimizer_settings={"round_steps": 4, "sparse_stats": True},
                                 arch={"l1_coefficient": 0.1})),
}


def _resumable_setup(case: str):
    data = _batches(40, seed=3)
    source = IteratorSource(lambda: iter(data), site="x")
    buffer = ShuffleBuffer(source, batch_tokens=48, size_tokens=256, seed=7)
    extra, settings = RESUME[case]
    entry = TrainEntry("e", "x", make_sae(case.split("-")[0], 16, 32, **extra),
                       TrainSettings(lr=5e-3, warmup_steps=3, dead_tokens=100, total_steps=30, **settings))
    return Trainer([entry]), buffer


@pytest.mark.parametrize("case", sorted(RESUME))
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, case: str) -> None:
    full, buf = _resumable_setup(case)
    full.fit(buf, max_steps=30)
    first, buf1 = _resumable_setup(case)
    ckpt = tmp_path / "ckpt"
    first.fit(buf1, max_steps=17, checkpoint_dir=ckpt, checkpoint_every=7)
    torch.manual_seed(1234)
    resumed, buf2 = _resumable_setup(case)
    assert load_checkpoint(resumed, ckpt, buf2)["step"] == 14
    resumed.fit(buf2, max_steps=30)
    a, b = full.entries[0], resumed.entries[0]
    for k, v in a.sae.state_dict().items():
        assert torch.equal(v, b.sae.state_dict()[k]), k
    if case.split("-")[1:2] == ["pam"]:
        assert a.objective.decoder_steps == b.objective.decoder_steps > 1
        assert b.objective.stats.sparse == case.endswith("sparse")
    # save / load natively: same function
    path = resumed.save(tmp_path / "out")["e"]
    loaded = load_native(path)
    x = _batches(1, seed=11)[0]
    final = b.final_sae()
    torch.testing.assert_close(loaded(x), final(x))
    assert loaded.cfg.architecture == case.split("-")[0]


def test_pam_decoder_is_the_ridge_solution_of_the_round_and_not_sgd() -> None:
    data = _batches(4, seed=5)
    sae = make_sae("signed_topk", 16, 32, k=4)
    entry = TrainEntry("p", "x", sae, TrainSettings(lr=1e-3, optimizer="pam-sgd", optimizer_settings={"round_steps": 2},
                                                    input_scaling="none", init_batches=1, warmup_steps=0))
    trainer = Trainer([entry])
    from sae_hooks.train.pam import DecoderStats

    with torch.no_grad():
        codes0 = sae.encode_normalized(data[0])[0]
    trainer.step(data[0])  # first batch: immediate solve from data[0] (before any encoder step), then a step
    obj = entry.objective
    assert obj.decoder_steps == 1
    ref = DecoderStats(32, 16)
    ref.add(codes0, data[0])
    W_ref, _ = ref.solve(1e-5)
    W1 = sae.W_dec.detach().clone()
    torch.testing.assert_close(W1.double(), W_ref, rtol=1e-4, atol=1e-5)  # the ridge solution, untouched by Adam
    assert obj.stats.n == 32  # data[0]'s codes under the stepped encoder, for the round
    trainer.step(data[1])  # the round of 2 steps ends: a solve from its statistics
    assert obj.decoder_steps == 2 and not torch.equal(W1, sae.W_dec)
    assert all(p is not sae.W_dec and p is not sae.b_dec for g in entry.optimizer.param_groups for p in g["params"])
    assert sae.W_dec.grad is None


def test_bad_settings_are_typed_errors() -> None:
    with pytest.raises(ConfigError, match="optimizer"):
        TrainSettings(optimizer="sgd")
    with pytest.raises(ConfigError, match="PAM-SGD"):
        TrainEntry("e", "x", make_sae("jumprelu", 8, 16), TrainSettings(optimizer="pam-sgd"))
    with pytest.raises(ConfigError, match="capacities"):
        TrainEntry("e", "x", make_sae("feature_choice", 8, 16, k=2), TrainSettings(arch={"capacities": "exp"}))
    with pytest.raises(ConfigError, match="round_stepz"):
        TrainEntry("e", "x", make_sae("topk", 8, 16, k=2), TrainSettings(optimizer="pam-sgd", optimizer_settings={"round_stepz": 3}))
    with pytest.raises(ConfigError, match="optimizer_settings"):
        TrainSettings(optimizer_settings={"round_steps": 3})


@pytest.mark.slow
def test_matryoshka_prefix_fvu_decreases_on_the_embedded_model() -> None:
    pytest.importorskip("transformers")
    from sae_hooks.app.demo import load_default_model, pydoc_texts
    from sae_hooks.train.sources import ActivationReader, pack_texts

    model, tok = load_default_model()
    train_texts, held = pydoc_texts()
    reader = ActivationReader(model, ["transformer.h.1"], bos_token_id=0)

    def acts(texts, n):
        out = torch.cat([reader.read(b)["transformer.h.1"] for b in pack_texts(tok, texts, 64, 16, 0)[: n // 900 + 1]])
        return out[:n]

    x, test = acts(train_texts, 8192), acts(held, 2048)
    torch.manual_seed(0)
    sae = make_sae("matryoshka", 128, 512, k=8, matryoshka_widths=[16, 64, 256])
    entry = TrainEntry("m", "transformer.h.1", sae, TrainSettings(lr=3e-3))
    g = torch.Generator().manual_seed(0)
    Trainer([entry]).fit((x[torch.randint(0, x.shape[0], (256,), generator=g)] for _ in range(300)), max_steps=300)
    fvu = prefix_fvu(entry.final(), test)
    print("embedded prefix FVU", fvu)
    widths = [16, 64, 256, 512]
    assert all(fvu[a] > fvu[b] for a, b in zip(widths, widths[1:]))
    assert fvu[512] < 0.5
