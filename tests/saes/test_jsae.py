"""Jacobian SAE pairs: the efficient Jacobian against autograd, training sparsifies the Jacobian,
attach/capture/splice, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from sae_hooks.errors import ConfigError, SAEFormatError
from sae_hooks.saes.jacobian import FrozenMLP
from sae_hooks.intervene import attach_pair
from sae_hooks.saes import JacobianSAEPair, make_jsae_pair

from conftest import docstring_texts

transformers = pytest.importorskip("transformers")


def _randomize(pair: JacobianSAEPair, seed: int = 0) -> JacobianSAEPair:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sae in (pair.sae_in, pair.sae_out):
            sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g) * 0.3)
            sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=g) * 0.3)
            sae.b_enc.copy_(torch.randn(sae.b_enc.shape, generator=g) * 0.1)
            sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g) * 0.1)
    return pair


def _autograd_truth(pair: JacobianSAEPair, x: torch.Tensor, at_reconstruction: bool):
    """Per token: autograd Jacobian of s_in -> decode -> MLP -> encode_out -> ReLU, restricted to the
    active sets. Linearised at x_hat (the sandwich itself) or at x (MLP(x + decode(s) - decode(s0)))."""
    out = []
    for n in range(x.shape[0]):
        lat_in, _ = pair.sae_in.encode_with_state(x[n])
        x_hat0 = pair.sae_in.decode(lat_in)
        y = pair.mlp(x_hat0 if at_reconstruction else x[n])
        lat_out, _ = pair.sae_out.encode_with_state(y)
        I, O = lat_in.indices, lat_out.indices
        s0 = lat_in.to_dense()

        def f(s_active: torch.Tensor) -> torch.Tensor:
            s = s0.clone()
            s[I] = s_active
            x_hat = s @ pair.sae_in.W_dec + pair.sae_in.b_dec
            point = x_hat if at_reconstruction else x[n] + (x_hat - x_hat0)
            pre = pair.mlp(point) @ pair.sae_out.W_enc + pair.sae_out.b_enc
            return torch.relu(pre[O])  # TopK set held fixed

        out.append(torch.autograd.functional.jacobian(f, s0[I]))
    return torch.stack(out)


@pytest.mark.parametrize("at_reconstruction", [False, True])
def test_jacobian_gpt2_mlp_matches_autograd(at_reconstruction):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_inner=48, activation_function="gelu_new")
    block = transformers.models.gpt2.modeling_gpt2.GPT2Block(cfg).double().eval()
    pair = make_jsae_pair(block.mlp, layer=0, d_sae=40, k=5, seed=1).double()
    _randomize(pair)
    x = torch.randn(6, 16, dtype=torch.float64)
    # the frozen copy is the real block's MLP
    torch.testing.assert_close(pair.mlp(x), block.mlp(x))
    J = pair.jacobian(x, use_reconstruction=at_reconstruction)
    assert J.values.shape == (6, 5, 5)
    assert J.values.abs().max() > 1e-3  # non-trivial
    torch.testing.assert_close(J.values, _autograd_truth(pair, x, at_reconstruction), rtol=1e-9, atol=1e-10)


def test_jacobian_gated_mlp_matches_autograd():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=40, hidden_act="silu", num_attention_heads=2,
                                   num_key_value_heads=2, num_hidden_layers=1, vocab_size=10)
    mlp = transformers.models.llama.modeling_llama.LlamaMLP(cfg).double().eval()
    pair = _randomize(make_jsae_pair(mlp, layer=0, d_sae=32, k=4, seed=2).double(), seed=3)
    assert pair.mlp.gated
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(pair.mlp(x), mlp(x))
    torch.testing.assert_close(pair.jacobian(x, use_reconstruction=True).values, _autograd_truth(pair, x, True),
                               rtol=1e-9, atol=1e-10)


def test_unsupported_pairs_rejected():
    mlp = FrozenMLP(torch.randn(8, 16), torch.randn(16, 8), "relu")
    pair = make_jsae_pair(mlp, 0, 12, 3)
    from sae_hooks import make_sae

    with pytest.raises(ConfigError, match="TopK"):
        JacobianSAEPair(make_sae("relu", 8, 12), pair.sae_out, mlp, pair.cfg)
    with pytest.raises(ConfigError, match="normalize"):
        JacobianSAEPair(make_sae("topk", 8, 12, k=3, normalize="standardize"), pair.sae_out, mlp, pair.cfg)
    with pytest.raises(ConfigError, match="activation"):
        FrozenMLP(torch.randn(8, 16), torch.randn(16, 8), "softplus_9")


def test_save_load_roundtrip_exact(tmp_path):
    torch.manual_seed(0)
    mlp = FrozenMLP(torch.randn(8, 16), torch.randn(16, 8), "gelu_new", torch.randn(16), torch.randn(8))
    pair = _randomize(make_jsae_pair(mlp, 3, 12, 3, model_name="tiny"))
    pair.save(tmp_path / "pair")
    assert sorted(p.name for p in (tmp_path / "pair").iterdir()) == ["input", "mlp.safetensors", "output", "pair.json"]
    back = JacobianSAEPair.load(tmp_path / "pair")
    for a, b in ((pair.sae_in, back.sae_in), (pair.sae_out, back.sae_out), (pair.mlp, back.mlp)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert back.cfg == pair.cfg and back.mlp.act_name == "gelu_new"
    x = torch.randn(4, 8)
    assert torch.equal(back.jacobian(x).values, pair.jacobian(x).values)
    # a second save over the first is atomic and leaves no temporary folders behind
    pair.save(tmp_path / "pair")
    assert [p.name for p in tmp_path.iterdir()] == ["pair"]
    data = json.loads((tmp_path / "pair" / "pair.json").read_text())
    data["layr"] = 1
    (tmp_path / "pair" / "pair.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="layr"):
        JacobianSAEPair.load(tmp_path / "pair")
    with pytest.raises(SAEFormatError, match="pair.json"):
        JacobianSAEPair.load(tmp_path)


# On the embedded model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    try:
        from sae_hooks.app.default_model import default_model_path

        path = str(default_model_path())
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"embedded model not available: {e}")
    from transformer_lens.model_bridge import TransformerBridge

    from sae_hooks.adapters.transformer_lens import attach
    from sae_hooks.train import pack_texts

    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = attach(TransformerBridge.boot_transformers(path, device="cpu"))
    batches = pack_texts(tok, docstring_texts(), seq_len=65, batch_size=4, bos_token_id=0)
    return model, batches


def test_bridge_hook_check():
    """On a TL4 bridge ln2.hook_normalized is before the LayerNorm's affine: the check must catch it."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    from sae_hooks.train.jsae import check_mlp_input

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for block in hf.transformer.h:
            block.ln_2.weight.mul_(1.7)
            block.ln_2.bias.add_(0.3)
    model = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config)
    tokens = torch.randint(1, 100, (2, 12))
    ok = make_jsae_pair(model.blocks[1].mlp, 1, 64, 4, bridge=True)
    assert check_mlp_input(model, ok, tokens) < 1e-5
    bad = make_jsae_pair(model.blocks[1].mlp, 1, 64, 4)
    with pytest.raises(ConfigError, match="ln2.hook_out"):
        check_mlp_input(model, bad, tokens)


@pytest.mark.slow
def test_jsae_training_sparsifies_jacobian_and_attach(embedded, record_property):
    """λ > 0 makes the Jacobian sparser at every threshold while both SAEs still reconstruct.

    Measured on the embedded model (layer 2, d_sae 512, k 8, 300 steps of ~252 tokens, lr 4e-3):
    |J| counts per token (of 64) λ=0: 60.9 / 57.8 / 51.9 above 0.005 / 0.01 / 0.02, λ=3: 38.8 / 24.1 /
    10.1; CE loss recovered (in, out) λ=0 ≈ (0.67, 0.78), λ=3 ≈ (0.50, 0.55). At this budget the drop is
    mostly a shrinking of all entries paid for by the output SAE (see docs/multilayer_and_jacobian.md),
    hence the reconstruction floors below."""
    from sae_hooks.eval import hooks_splice_runner, splice_metrics
    from sae_hooks.train.jsae import check_mlp_input, jsae_batches, train_jsae

    model, batches = embedded
    layer, steps, d_sae, k, lam = 2, 300, 512, 8, 3.0
    mlp = model.blocks[layer].mlp
    probe = make_jsae_pair(mlp, layer, d_sae, k, bridge=True)
    assert check_mlp_input(model, probe, batches[0]) < 1e-4  # ln2.hook_out is this MLP's input
    train = list(jsae_batches(model, probe, batches[:60], bos_token_id=0))
    test_tokens = torch.cat(batches[-4:])
    x_test = torch.cat(list(jsae_batches(model, probe, batches[-4:], bos_token_id=0)))

    def fvu(sae, x):
        return ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()

    counts, scores, fvus = {}, {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        for lm in (0.0, lam):
            pair = make_jsae_pair(mlp, layer, d_sae, k, bridge=True, seed=0)
            hist = train_jsae(pair, train, steps, lm, lr=4e-3)
            assert len(hist) == steps and hist[0]["jacobian_coefficient"] == 0.0  # λ warm-up starts at 0
            assert hist[-1]["jacobian_coefficient"] == lm
            with torch.no_grad():
                counts[lm] = pair.jacobian(x_test).abs_counts((0.005, 0.01, 0.02))
                fvus[lm] = (fvu(pair.sae_in, x_test), fvu(pair.sae_out, pair.mlp(x_test)))
            scores[lm] = tuple(splice_metrics(hooks_splice_runner(model, site), sae, [test_tokens])["ce_loss_score"]
                               for site, sae in ((pair.cfg.hook_in, pair.sae_in), (pair.cfg.hook_out, pair.sae_out)))
    finally:
        torch.set_num_threads(threads)
    print(f"\nJSAE |J| counts per token (of {k * k}): λ=0 {counts[0.0]}  λ={lam} {counts[lam]}; "
          f"CE score (in, out) {scores}; FVU (in, out) {fvus}")
    record_property("jsae_counts", counts)
    c0, c1 = counts[0.0], counts[lam]
    assert c0[0.005] > 0.5 * k * k  # the plain pair has a dense Jacobian
    assert c1[0.005] < 0.8 * c0[0.005] and c1[0.01] < 0.55 * c0[0.01] and c1[0.02] < 0.3 * c0[0.02]
    # ... and neither SAE collapsed to buy it
    assert min(scores[0.0]) > 0.55 and min(scores[lam]) > 0.4
    assert fvus[0.0][0] < 0.4 and fvus[0.0][1] < 0.3
    assert fvus[lam][0] < 1.2 * fvus[0.0][0] and fvus[lam][1] < 0.6

    # attach: capture both latent sets and the Jacobian through the TL bridge, then splice
    tokens = batches[-1]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        x_in = cache[pair.cfg.hook_in]
        with attach_pair(model, pair) as pa:
            logits, cache2 = model.run_with_cache(tokens)
        lat_in = cache2[f"{pair.cfg.hook_in}.hook_sae_acts_post"]
        lat_out = cache2[f"{pair.cfg.hook_out}.hook_sae_acts_post"]
        torch.testing.assert_close(lat_in, pair.sae_in.encode(x_in))
        torch.testing.assert_close(lat_out, pair.sae_out.encode(pair.mlp(x_in)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pa.jacobian.values, pair.jacobian(x_in).values)
        torch.testing.assert_close(logits, model(tokens))  # capture leaves the forward unchanged
        with attach_pair(model, pair, splice="in", jacobian=False):
            _, c3 = model.run_with_cache(tokens)
        torch.testing.assert_close(c3[pair.cfg.hook_out], pair.mlp(pair.sae_in(x_in)), rtol=1e-4, atol=1e-5)
        assert not model.sae_manager.attachments
