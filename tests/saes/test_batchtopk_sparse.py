"""BatchTopK's sparse training path (saes/kernels.py ragged kernels) against dense autograd.

The batch-level selection is compared with the dense definition (``BatchTopKSAE.batch_topk``), every
sparse backward with autograd through the dense computation it replaces (both weight layouts, the CPU
CSR path and the index_add / gather path used on GPUs), and the whole loss with the dense loss.
"""

from __future__ import annotations

import pytest
import torch

from sae_hooks import make_sae
from sae_hooks.saes import kernels
from sae_hooks.saes.base import SparseLatents, sparse_decode
from sae_hooks.saes.batchtopk import BatchTopKSettings, BatchTopKTraining
from sae_hooks.saes.kernels import batch_topk_select, crow_rows, gather_encode_ragged
from sae_hooks.saes.training import StepContext

N, D, L, K = 23, 10, 40, 4


def _data(seed: int):  # noqa: ANN202
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(D, L, generator=g, dtype=torch.float64)
    b = torch.randn(L, generator=g, dtype=torch.float64) - 0.5
    x[3] = 0.0  # with b: token 3 keeps few or no latents; ragged rows of very different lengths
    x[7] *= 4.0  # token 7 keeps many
    return g, x, W, b


def _layout(W: torch.Tensor, transposed: bool) -> torch.Tensor:
    return W.T.contiguous().T if transposed else W.clone()


def _dense_batch_topk(pre: torch.Tensor, n_keep: int) -> torch.Tensor:
    flat = torch.relu(pre).flatten()
    v, i = flat.topk(n_keep)
    return torch.zeros_like(flat).scatter(0, i, v).view_as(pre)


@pytest.mark.parametrize("block", [None, L, 3 * L, 7 * L + 5])
def test_batch_topk_select_blocks_equal_the_dense_batch_topk(block) -> None:  # noqa: ANN001
    _, x, W, b = _data(1)
    n_keep = K * N
    sel = batch_topk_select(x, W, b, n_keep, block_elements=block)
    dense = _dense_batch_topk(x @ W + b, n_keep)
    got = SparseLatents(sel.values, sel.cols, L, crow=sel.crow).to_dense()
    torch.testing.assert_close(got, dense)
    counts = sel.crow.diff()
    assert counts.sum() == (dense > 0).sum() <= n_keep
    assert counts.max() > K and counts.min() < K  # really ragged
    # token-major and sorted within each token
    rows = crow_rows(sel.crow)
    assert torch.equal((rows * L + sel.cols).sort().values, rows * L + sel.cols)


def test_batch_topk_select_drops_kept_zeros_when_few_are_positive() -> None:
    _, x, W, _ = _data(2)
    b = torch.full((L,), -50.0, dtype=torch.float64)
    b[:2] = 0.0  # only latents 0 and 1 can be positive
    sel = batch_topk_select(x, W, b, K * N)
    assert sel.values.gt(0).all() and set(sel.cols.tolist()) <= {0, 1}
    torch.testing.assert_close(SparseLatents(sel.values, sel.cols, L, crow=sel.crow).to_dense(),
                               _dense_batch_topk(x @ W + b, K * N))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("csr", [True, False])
def test_gather_encode_ragged_backward_matches_dense_autograd(transposed: bool, csr: bool, monkeypatch) -> None:
    if not csr:
        monkeypatch.setattr(kernels, "_use_csr", lambda t: False)
    g, x, W, b = _data(3)
    sel = batch_topk_select(x, W, b, K * N)
    up = torch.randn(sel.values.numel(), generator=g, dtype=torch.float64)
    xs, bs = x.clone().requires_grad_(True), b.clone().requires_grad_(True)
    Ws = _layout(W, transposed).requires_grad_(True)
    vals = gather_encode_ragged(xs, Ws, bs, sel)
    torch.testing.assert_close(vals, sel.values)
    (vals * up).sum().backward()
    xd, Wd, bd = (t.clone().requires_grad_(True) for t in (x, W, b))
    ((xd @ Wd + bd)[crow_rows(sel.crow), sel.cols] * up).sum().backward()
    torch.testing.assert_close(xs.grad, xd.grad)
    torch.testing.assert_close(Ws.grad, Wd.grad)
    torch.testing.assert_close(bs.grad, bd.grad)
    assert Ws.grad.stride() == Ws.stride()


@pytest.mark.parametrize("csr", [True, False])
def test_sparse_decode_ragged_backward_matches_dense_autograd(csr: bool, monkeypatch) -> None:
    if not csr:
        monkeypatch.setattr(kernels, "_use_csr", lambda t: False)
    g, x, W, b = _data(4)
    sel = batch_topk_select(x, W, b, K * N)
    W_dec = torch.randn(L, 7, generator=g, dtype=torch.float64)
    up = torch.randn(N, 7, generator=g, dtype=torch.float64)
    vs, Wsd = sel.values.clone().requires_grad_(True), W_dec.clone().requires_grad_(True)
    out = sparse_decode(SparseLatents(vs, sel.cols, L, crow=sel.crow), Wsd)
    (out * up).sum().backward()
    vd, Wdd = sel.values.clone().requires_grad_(True), W_dec.clone().requires_grad_(True)
    dense = torch.zeros(N, L, dtype=torch.float64).index_put((crow_rows(sel.crow), sel.cols), vd)
    ref = dense @ Wdd
    torch.testing.assert_close(out, ref)
    (ref * up).sum().backward()
    torch.testing.assert_close(vs.grad, vd.grad)
    torch.testing.assert_close(Wsd.grad, Wdd.grad)


@pytest.mark.parametrize("b_dec_in", [False, True])
def test_batchtopk_loss_gradients_and_threshold_statistic_equal_the_dense_reference(b_dec_in: bool) -> None:
    """The whole sparse BatchTopK loss (main + AuxK) and its ``min_kept`` (the inference threshold's
    EMA input) against the dense definition with autograd."""
    torch.manual_seed(5)
    sae = make_sae("batchtopk", D, L, k=K, apply_b_dec_to_input=b_dec_in).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(N, D, dtype=torch.float64)
    dead = torch.zeros(L, dtype=torch.bool)
    dead[2::5] = True
    settings = BatchTopKSettings(aux_k=6, aux_coefficient=0.25)
    out = BatchTopKTraining().loss(sae, x, None, settings, StepContext(dead=dead, mse_scale=0.7))
    grads = torch.autograd.grad(out.loss, list(sae.parameters()))

    params = {n: p.detach().clone().requires_grad_(True) for n, p in sae.named_parameters()}
    x_in = x - params["b_dec"] if b_dec_in else x
    pre = x_in @ params["W_enc"] + params["b_enc"]
    f = sae.batch_topk(pre)  # the dense definition
    x_hat = f @ params["W_dec"] + params["b_dec"]
    resid = (x - x_hat).detach()
    aux_idx = pre.detach().masked_fill(~dead, float("-inf")).topk(6, dim=-1).indices
    fa = torch.zeros_like(pre).scatter(-1, aux_idx, 1.0) * torch.relu(pre)
    denom = (resid - resid.mean(0)).pow(2).sum(-1).mean()
    loss = 0.7 * (x_hat - x).pow(2).sum(-1).mean() + 0.25 * ((fa @ params["W_dec"] - resid).pow(2).sum(-1).mean() / denom)
    torch.testing.assert_close(out.loss, loss)
    for (name, _), a, e in zip(sae.named_parameters(), grads, torch.autograd.grad(loss, list(params.values()))):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(out.updates["min_kept"], f.detach()[f.detach() > 0].min())
    torch.testing.assert_close(out.metrics["l0"], (f > 0).sum(-1).double().mean().to(out.metrics["l0"].dtype))
    assert torch.equal(out.fired, (f > 0).any(0))


def test_batchtopk_training_never_builds_a_dense_batch_by_d_sae_tensor(monkeypatch) -> None:
    """With a small selection block, no dense tensor of N * d_sae elements is created by the training loss."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(kernels, "SELECT_BLOCK_ELEMENTS", 4 * L)
    sae = make_sae("batchtopk", D, L, k=K).double()
    x = torch.randn(N, D, dtype=torch.float64)
    biggest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:  # CSR patterns are fine
                    biggest.append(t.numel())
            return out

    with Watch():
        out = BatchTopKTraining().loss(sae, x, None, BatchTopKSettings(aux_coefficient=0.0), StepContext(mse_scale=1.0))
        out.loss.backward()
    assert max(biggest) < N * L


def test_sparse_training_latents_equal_the_dense_training_encoder() -> None:
    """``encode_sparse_training`` (what the BatchTopK and Matryoshka losses use) and
    ``encode_normalized(training=True)`` (the dense definition) give the same latents."""
    torch.manual_seed(6)
    sae = make_sae("batchtopk", D, L, k=K, apply_b_dec_to_input=True).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, N, D, dtype=torch.float64)  # leading dims flatten to 2N tokens
    dense, _ = sae.encode_normalized(x, training=True)
    torch.testing.assert_close(sae.encode_sparse_training(x).to_dense(), dense.reshape(-1, L))
