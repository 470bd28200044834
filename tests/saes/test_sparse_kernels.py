"""The TopK training kernels (saes/kernels.py) against dense autograd and closed forms.

Every sparse backward is compared with autograd through the dense computation it replaces, on both
weight layouts (canonical contiguous and transposed storage) and on both encoder-gradient paths (the
CPU CSR product and the index_add path used on GPUs).
"""

from __future__ import annotations

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.saes import kernels
from sae_hooks.saes.kernels import (
    SparseDecode, encoder_weight_grad, gather_encode, normalize_rows_, remove_parallel_component_,
    sparse_decode_values, topk_select,
)
from sae_hooks.saes.topk import TopKTraining
from sae_hooks.saes.training import AuxKSettings, StepContext

N, D, L, K = 37, 12, 50, 5


def _data(seed: int, dtype=torch.float64):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    W = torch.randn(D, L, generator=g, dtype=dtype)
    b = torch.randn(L, generator=g, dtype=dtype)
    return g, x, W, b


def _layout(W: torch.Tensor, transposed: bool) -> torch.Tensor:
    return W.T.contiguous().T if transposed else W.clone()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("csr", [True, False])
def test_gather_encode_backward_matches_dense_autograd(transposed: bool, csr: bool, monkeypatch) -> None:
    if not csr:
        monkeypatch.setattr(kernels, "_use_csr", lambda t: False)
    g, x, W, b = _data(2)
    up = torch.randn(N, K, generator=g, dtype=torch.float64)
    idx = (x @ W + b).topk(K, dim=-1).indices
    xs, bs = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
    Ws = _layout(W, transposed).requires_grad_(True)
    (gather_encode(xs, Ws, bs, idx) * up).sum().backward()
    xd, Wd, bd = (t.clone().requires_grad_(True) for t in (x, W, b))
    ((xd @ Wd + bd).gather(-1, idx) * up).sum().backward()
    torch.testing.assert_close(xs.grad, xd.grad)
    torch.testing.assert_close(Ws.grad, Wd.grad)
    torch.testing.assert_close(bs.grad, bd.grad)
    # The gradient is produced in the parameter's own layout (no re-layout copy by autograd).
    assert Ws.grad.stride() == Ws.stride()


def test_encoder_weight_grad_with_repeated_latents_matches_scatter() -> None:
    g, x, W, _ = _data(3)
    idx = torch.randint(0, 4, (N, K), generator=g)  # few latents: every one is hit many times
    grad = torch.randn(N, K, generator=g, dtype=torch.float64)
    dense = torch.zeros(N, L, dtype=torch.float64).index_put((torch.arange(N)[:, None].expand(N, K), idx), grad, accumulate=True)
    torch.testing.assert_close(encoder_weight_grad(x, idx, grad, W), x.T @ dense)


@pytest.mark.parametrize("transposed", [False, True])
def test_sparse_decode_backward_matches_dense_autograd(transposed: bool) -> None:
    g = torch.Generator().manual_seed(4)
    W = torch.randn(D, L, generator=g, dtype=torch.float64).T  # (L, D) stored transposed
    W = W.contiguous() if not transposed else W
    idx = torch.randint(0, L, (N, K), generator=g)  # duplicates within a row are allowed
    val = torch.randn(N, K, generator=g, dtype=torch.float64)
    up = torch.randn(N, D, generator=g, dtype=torch.float64)
    vs, Ws = val.clone().requires_grad_(True), W.clone().requires_grad_(True)
    out = SparseDecode.apply(vs, idx, Ws)
    (out * up).sum().backward()
    vd, Wd = val.clone().requires_grad_(True), W.clone().requires_grad_(True)
    dense = torch.zeros(N, L, dtype=torch.float64).index_put((torch.arange(N)[:, None].expand(N, K), idx), vd, accumulate=True)
    torch.testing.assert_close(out, dense @ Wd)
    ((dense @ Wd) * up).sum().backward()
    torch.testing.assert_close(vs.grad, vd.grad)
    torch.testing.assert_close(Ws.grad, Wd.grad)
    assert Ws.grad.stride() == Ws.stride()


def test_sparse_decode_value_gradient_in_row_chunks(monkeypatch) -> None:
    monkeypatch.setattr(kernels, "GATHER_BLOCK_ELEMENTS", D * K * 3)  # 3 rows per chunk, ragged end
    g = torch.Generator().manual_seed(5)
    W = torch.randn(L, D, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, L, (N, K), generator=g)
    val = torch.randn(N, K, generator=g, dtype=torch.float64, requires_grad=True)
    (grad_v,) = torch.autograd.grad(sparse_decode_values(val, idx, W).square().sum(), (val,))
    expected = torch.einsum("nkd,nd->nk", W.detach()[idx], 2 * sparse_decode_values(val, idx, W).detach())
    torch.testing.assert_close(grad_v, expected)


@pytest.mark.parametrize("block", [L * 4, L * N, 1])
def test_topk_select_blocks_equal_dense_topk_and_masked_aux(block: int) -> None:
    _, x, W, b = _data(6, torch.float32)
    dead = torch.zeros(L, dtype=torch.bool)
    dead[::3] = True
    sel = topk_select(x, W, b, K, dead=dead, aux_k=4, block_elements=block)
    pre = x @ W + b
    v, i = pre.topk(K, dim=-1)
    # Same set per row (order is unspecified), same values.
    assert torch.equal(sel.indices.sort(-1).values, i.sort(-1).values)
    torch.testing.assert_close(sel.values.sort(-1).values, v.sort(-1).values)
    av, ai = pre.masked_fill(~dead, float("-inf")).topk(4, dim=-1)
    assert torch.equal(sel.aux_indices.sort(-1).values, ai.sort(-1).values)
    assert bool(dead[sel.aux_indices].all())
    torch.testing.assert_close(sel.aux_values.sort(-1).values, av.sort(-1).values)
    # No dead latent, or no AuxK: no candidates.
    assert topk_select(x, W, b, K, dead=torch.zeros(L, dtype=torch.bool), aux_k=4).aux_values is None
    assert topk_select(x, W, None, K).aux_indices is None


def test_topk_select_never_builds_more_than_one_block(monkeypatch) -> None:
    """The largest pre-activation block is ``block_elements`` (rows × d_sae), not N × d_sae."""
    _, x, W, b = _data(7, torch.float32)
    sizes: list[int] = []
    real_topk = torch.Tensor.topk

    def spy(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        sizes.append(self.numel())
        return real_topk(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "topk", spy)
    topk_select(x, W, b, K, block_elements=4 * L)
    assert max(sizes) == 4 * L and len(sizes) == -(-N // 4)


def test_remove_parallel_component_and_normalize_rows() -> None:
    g = torch.Generator().manual_seed(8)
    W = torch.randn(L, D, generator=g, dtype=torch.float64) * 3
    grad = torch.randn(L, D, generator=g, dtype=torch.float64)
    unit = W / W.norm(dim=-1, keepdim=True)
    expected = grad - (grad * unit).sum(-1, keepdim=True) * unit
    out = remove_parallel_component_(grad.clone(), W)
    torch.testing.assert_close(out, expected)
    assert (out * W).sum(-1).abs().max() < 1e-10  # orthogonal to every row
    torch.testing.assert_close(normalize_rows_(W.clone()), unit)


@pytest.mark.parametrize("b_dec_in", [False, True])
def test_topk_loss_gradients_equal_a_dense_autograd_reference(b_dec_in: bool) -> None:
    """The whole sparse TopK loss (main + AuxK) against the same loss written densely with autograd."""
    torch.manual_seed(9)
    sae = make_sae("topk", D, L, k=K, apply_b_dec_to_input=b_dec_in).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(N, D, dtype=torch.float64)
    dead = torch.zeros(L, dtype=torch.bool)
    dead[1::4] = True
    out = TopKTraining().loss(sae, x, None, AuxKSettings(aux_k=6, aux_coefficient=0.25), StepContext(dead=dead, mse_scale=0.7))
    grads = torch.autograd.grad(out.loss, list(sae.parameters()))

    # Dense reference: mask the pre-activations to the chosen sets, ReLU, dense decode.
    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    x_in = x - params["b_dec"] if b_dec_in else x
    pre = x_in @ params["W_enc"] + params["b_enc"]
    top = pre.detach().topk(K, dim=-1).indices
    f = torch.zeros_like(pre).scatter(-1, top, 1.0) * torch.relu(pre)
    x_hat = f @ params["W_dec"] + params["b_dec"]
    mse = (x_hat - x).pow(2).sum(-1).mean()
    resid = (x - x_hat).detach()
    aux_idx = pre.detach().masked_fill(~dead, float("-inf")).topk(6, dim=-1).indices
    fa = torch.zeros_like(pre).scatter(-1, aux_idx, 1.0) * torch.relu(pre)
    denom = (resid - resid.mean(0)).pow(2).sum(-1).mean()
    loss = 0.7 * mse + 0.25 * ((fa @ params["W_dec"] - resid).pow(2).sum(-1).mean() / denom)
    torch.testing.assert_close(out.loss, loss)
    expected = torch.autograd.grad(loss, list(params.values()))
    for (name, _), a, e in zip(sae.named_parameters(), grads, expected):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")


def test_latent_major_encoder_gets_gradients_in_its_layout_and_fused_adam_state_survives_a_reload(tmp_path) -> None:
    """A TopK entry stores W_enc latent-major; its gradient, Adam state and a checkpoint round trip keep
    that layout, and training continues exactly as without the reload."""
    from sae_hooks.saes.kernels import latent_major_, match_state_layout
    from sae_hooks.train import TrainEntry, Trainer, TrainSettings

    W = torch.randn(D, L)
    P = latent_major_(torch.nn.Parameter(W.clone()))
    assert torch.equal(P, W) and P.T.is_contiguous() and P.stride() == (1, D)

    def entry() -> TrainEntry:
        return TrainEntry("e", "x", make_sae("topk", D, L, k=K), TrainSettings(lr=1e-2, warmup_steps=0, init_batches=1))

    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(N, D, generator=g) for _ in range(4)]
    ta = Trainer([entry()])
    a = ta.entries[0]
    assert a.sae.W_enc.stride() == (1, D) and a.optimizer.defaults.get("fused")
    for x in xs[:2]:
        ta.step(x)
    assert a.optimizer.state[a.sae.W_enc]["exp_avg"].stride() == (1, D)
    # A checkpoint stores tensors contiguous; the resumed run gets the parameter's layout back.
    ta.save_checkpoint(tmp_path / "ck")
    tb = Trainer([entry()])
    tb.load_checkpoint(tmp_path / "ck")
    b = tb.entries[0]
    assert b.sae.W_enc.stride() == (1, D)
    assert b.optimizer.state[b.sae.W_enc]["exp_avg"].stride() == (1, D)
    for x in xs[2:]:
        ta.step(x)
        tb.step(x)
    for (name, pa), pb in zip(a.sae.named_parameters(), b.sae.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    # Without the post-hook the fused kernel would pair mismatched elements: the hook is what matters.
    opt = torch.optim.Adam([torch.nn.Parameter(W.clone().T.contiguous().T)], lr=0.1, fused=True)
    opt.register_load_state_dict_post_hook(match_state_layout)
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.randn(D, L)
    opt.step()
    opt.load_state_dict(opt.state_dict() | {"state": {0: {k: v.contiguous() for k, v in opt.state_dict()["state"][0].items()}}})
    assert opt.state[p]["exp_avg_sq"].stride() == p.stride()


def test_topk_select_keeps_the_pre_activations_only_when_they_fit_in_one_block() -> None:
    _, x, W, b = _data(11, torch.float32)
    one = topk_select(x, W, b, K, keep_pre=True)
    torch.testing.assert_close(one.pre, x @ W + b)
    assert topk_select(x, W, b, K, keep_pre=True, block_elements=4 * L).pre is None
    assert topk_select(x, W, b, K).pre is None


@pytest.mark.parametrize("b_dec_in", [False, True])
def test_topk_inference_encode_is_blocked_without_grad_and_differentiable_with_it(b_dec_in: bool, monkeypatch) -> None:
    """No-grad encode selects block by block (bounded memory) and equals ReLU(top-k(x W + b)) computed
    densely by hand; with grad enabled it is the dense, differentiable path and gives the same latents."""
    g, _, W, b = _data(11, torch.float32)
    sae = make_sae("topk", D, L, k=K, apply_b_dec_to_input=b_dec_in)
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.b_enc.copy_(b)
        sae.b_dec.copy_(torch.randn(D, generator=g))
    x = torch.randn(3, 7, D, generator=g)
    x_in = x - sae.b_dec.detach() if b_dec_in else x
    v, i = (x_in.reshape(-1, D) @ W + b).topk(K, dim=-1)
    monkeypatch.setattr(kernels, "SELECT_BLOCK_ELEMENTS", 4 * L)  # 21 tokens -> 6 blocks
    sizes: list[int] = []
    real_topk = torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda self, *a, **kw: sizes.append(self.numel()) or real_topk(self, *a, **kw))
    with torch.no_grad():
        lat, pre = sae.encode_normalized(x)
    assert max(sizes) == 4 * L and pre is None
    assert lat.values.shape == lat.indices.shape == (3, 7, K)
    flat_i, flat_v = lat.indices.reshape(-1, K), lat.values.reshape(-1, K)
    assert torch.equal(flat_i.sort(-1).values, i.sort(-1).values)
    torch.testing.assert_close(flat_v.gather(-1, flat_i.argsort(-1)), torch.relu(v).gather(-1, i.argsort(-1)))
    # Grad enabled: the dense path, same latents, gradients equal autograd through the hand computation.
    xg = x.clone().requires_grad_(True)
    lat_g, pre_g = sae.encode_normalized(xg)
    assert pre_g is not None and pre_g.shape == (3, 7, L)
    torch.testing.assert_close(lat_g.to_dense().detach(), lat.to_dense())
    w = torch.randn(3, 7, L, generator=g)
    (lat_g.to_dense() * w).sum().backward()
    xr = x.clone().requires_grad_(True)
    xr_in = xr - sae.b_dec.detach() if b_dec_in else xr
    ref_pre = xr_in @ W + b
    ref = torch.zeros_like(ref_pre).scatter(-1, ref_pre.topk(K, dim=-1).indices, 1.0) * torch.relu(ref_pre)
    (ref * w).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
