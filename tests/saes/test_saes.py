"""Each architecture's encode/decode against a hand-written formula on random weights."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sae_hooks import SAEConfig, make_sae
from sae_hooks.errors import ConfigError, ShapeMismatchError, UnknownArchitectureError
from sae_hooks.saes import SparseLatents, sparse_decode

D_IN, D_SAE, D_OUT = 6, 16, 5


def randomize(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 0.6)
    return sae


def x_batch(d=D_IN, seed=1):
    return torch.randn(3, 4, d, generator=torch.Generator().manual_seed(seed))


def np_relu(t):
    return t.clamp_min(0)


def test_relu_formula():
    sae = randomize(make_sae("relu", D_IN, D_SAE))
    x = x_batch()
    f = np_relu(x @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), f @ sae.W_dec + sae.b_dec)


def test_relu_b_dec_on_input():
    sae = randomize(make_sae("standard", D_IN, D_SAE, apply_b_dec_to_input=True))
    x = x_batch()
    f = np_relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), f)


def test_topk_formula_and_sparse_decode():
    k = 3
    sae = randomize(make_sae("topk", D_IN, D_SAE, k=k))
    x = x_batch()
    pre = x @ sae.W_enc + sae.b_enc
    # Hand-written TopK: keep the k largest per token, then ReLU, everything else 0.
    expected = torch.zeros_like(pre)
    for idx in itertools.product(*(range(n) for n in pre.shape[:-1])):
        row = pre[idx]
        order = sorted(range(D_SAE), key=lambda i: -row[i].item())[:k]
        for i in order:
            expected[idx + (i,)] = max(row[i].item(), 0.0)
    torch.testing.assert_close(sae.encode(x), expected)
    latents, _ = sae.encode_with_state(x)
    assert isinstance(latents, SparseLatents) and latents.values.shape == (3, 4, k)
    torch.testing.assert_close(sae(x), expected @ sae.W_dec + sae.b_dec)


def test_sparse_decode_matches_dense_and_autograd():
    W = torch.randn(D_SAE, D_OUT, requires_grad=True)
    idx = torch.randint(0, D_SAE, (7, 3))
    val = torch.randn(7, 3, requires_grad=True)
    lat = SparseLatents(val, idx, D_SAE)
    out = sparse_decode(lat, W)
    dense = torch.zeros(7, D_SAE).index_put((torch.arange(7)[:, None].expand(7, 3), idx), val, accumulate=True)
    torch.testing.assert_close(out, dense @ W)
    g_sparse = torch.autograd.grad(out.square().sum(), (W, val))
    g_dense = torch.autograd.grad((dense @ W).square().sum(), (W, val))
    for a, b in zip(g_sparse, g_dense):
        torch.testing.assert_close(a, b)


def test_jumprelu_formula():
    sae = randomize(make_sae("jumprelu", D_IN, D_SAE))
    x = x_batch()
    pre = x @ sae.W_enc + sae.b_enc
    f = torch.where(pre > sae.threshold, pre, torch.zeros_like(pre)).clamp_min(0)
    torch.testing.assert_close(sae.encode(x), f)
    assert 0 < (f > 0).float().mean() < (pre > 0).float().mean()  # the threshold really cuts


def test_batchtopk_inference_threshold_and_batch_selection():
    sae = randomize(make_sae("batchtopk", D_IN, D_SAE, k=2))
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    x = x_batch()
    pre = x @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.encode(x), torch.where(pre > 0.3, pre, torch.zeros_like(pre)))
    # Training selection keeps exactly k * n_tokens of the batch's largest positive activations.
    flat = pre.reshape(-1, D_SAE).clamp_min(0)
    kept = sae.batch_topk(pre).reshape(-1, D_SAE)
    n = 2 * flat.shape[0]
    cutoff = flat.flatten().sort(descending=True).values[n - 1]
    assert (kept > 0).sum() == (flat >= cutoff).sum() == n
    torch.testing.assert_close(kept, torch.where(flat >= cutoff, flat, torch.zeros_like(flat)))


def test_gated_formula():
    sae = randomize(make_sae("gated", D_IN, D_SAE, apply_b_dec_to_input=True))
    x = x_batch()
    xc = x - sae.b_dec
    gate = (xc @ sae.W_enc + sae.b_gate) > 0
    mag = np_relu(xc @ (sae.W_enc * torch.exp(sae.r_mag)) + sae.b_mag)
    torch.testing.assert_close(sae.encode(x), gate * mag)
    assert not hasattr(sae, "b_enc")


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "topk_transcoder"])
def test_transcoders(arch):
    sae = randomize(make_sae(arch, D_IN, D_SAE, d_out=D_OUT, k=4 if "topk" in arch else None))
    x = x_batch()
    f = sae.encode(x)
    expected = f @ sae.W_dec + sae.b_dec
    if "skip" in arch:
        expected = expected + x @ sae.W_skip
    out = sae(x)
    assert out.shape == (3, 4, D_OUT)
    torch.testing.assert_close(out, expected)
    assert sae.cfg.is_transcoder


def test_standardize_normalisation_is_undone():
    sae = randomize(make_sae("relu", D_IN, D_SAE, normalize="standardize"))
    x = x_batch() * 5 + 2
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    xn = (x - mu) / (std + 1e-5)
    f = np_relu(xn @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), (f @ sae.W_dec + sae.b_dec) * std + mu)  # undone without eps (SAELens, OpenAI)


def test_norm_rescale_and_constant_scale():
    x = x_batch() * 3
    sae = randomize(make_sae("relu", D_IN, D_SAE, normalize="norm_rescale"))
    n = x.norm(dim=-1, keepdim=True) / math.sqrt(D_IN)
    f = np_relu((x / n) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae(x), (f @ sae.W_dec + sae.b_dec) * n)
    sae = randomize(make_sae("relu", D_IN, D_SAE, normalize="scale", norm_scale=0.25))
    f = np_relu((x * 0.25) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae(x), (f @ sae.W_dec + sae.b_dec) / 0.25)


@pytest.mark.parametrize("sae_dtype,x_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_dtype_cast_in_and_back_out(sae_dtype, x_dtype):
    sae = randomize(make_sae("topk", D_IN, D_SAE, k=3)).to(sae_dtype)
    x = x_batch().to(x_dtype)
    out = sae(x)
    assert out.dtype == x_dtype
    ref = randomize(make_sae("topk", D_IN, D_SAE, k=3)).to(sae_dtype)(x.to(sae_dtype)).to(x_dtype)
    torch.testing.assert_close(out, ref)


def test_hook_z_reshape_roundtrip():
    sae = randomize(make_sae("relu", 8, D_SAE, reshape="hook_z"))
    z = torch.randn(2, 3, 2, 4)  # (batch, pos, n_heads, d_head)
    out = sae(z)
    assert out.shape == z.shape
    flat = z.flatten(-2)
    torch.testing.assert_close(out.flatten(-2), sae.decode(sae.encode(flat)))


def test_wrong_width_names_shapes():
    sae = make_sae("relu", D_IN, D_SAE)
    with pytest.raises(ShapeMismatchError, match=r"d_in=6.*\(2, 7\)"):
        sae(torch.randn(2, 7))


def test_registry_errors_and_config_validation():
    with pytest.raises(UnknownArchitectureError, match="topk"):
        make_sae("topkk", 4, 8, k=2)
    with pytest.raises(ConfigError, match="needs k"):
        make_sae("topk", 4, 8)
    with pytest.raises(ConfigError, match="k must be"):
        make_sae("topk", 4, 8, k=9)
    with pytest.raises(ConfigError, match="normalize"):
        SAEConfig("relu", 4, 8, normalize="layernorm")
    with pytest.raises(ConfigError, match="d_sae"):
        SAEConfig("relu", 4, 0)
