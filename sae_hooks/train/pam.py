"""PAM-SGD (Budd et al. 2025, "SplInterp", arXiv 2505.11836): alternate a closed-form decoder step and
SGD steps on the encoder alone.

* **Decoder step** (encoder frozen): with codes ``Z (N, d_sae)`` of inputs ``X (N, d)``, solve the ridge
  least squares ``W_dec = argmin ||Z W − X||² + r²||W||²`` (the paper's code stacks ``[Z; r·I] W = [X; 0]``
  and calls ``lstsq``), then ``b_dec = mean(X − Z W_dec)`` (the intercept is not solved jointly, as in the
  paper). With the paper's optional "stay close" terms, rows ``√α_w·I → 0`` and ``√μ_dec·I → √μ_dec·W_prev``
  join the system and ``b_dec ← (b_dec + ν_dec·b_prev)/(1 + ν_dec)/(1 + β_b)``.
* **Encoder step**: the architecture's loss with the decoder fixed, plus
  ``μ_enc ||W_enc − W_enc,prev||²_F + ν_enc ||b_enc − b_enc,prev||²`` (prev = at the start of the round).

The decoder step never needs the codes in memory: :class:`DecoderStats` accumulates the sufficient
statistics ``ZᵀZ``, ``ZᵀX``, ``Σz``, ``Σx`` and ``N`` over streamed batches. The normal equations are
``(ZᵀZ + λI) W = ZᵀX + μ_dec W_prev`` with ``λ = r² + α_w + μ_dec``. Two solvers:

* ``"cholesky"``: ``ZᵀZ`` as a dense ``(d_sae, d_sae)`` float64 matrix, solved exactly by Cholesky. The
  default when ``d_sae <= DENSE_MAX`` (4096: a 128 MiB matrix).
* ``"cg"``: ``ZᵀZ`` accumulated as a **sparse** COO matrix (sparse codes: a token with ``k`` active latents
  adds at most ``k²`` entries; never ``d_sae²`` dense), solved by Jacobi-preconditioned conjugate
  gradient run on all ``d`` right-hand sides at once (each column its own step sizes), warm-started from
  the current decoder. Only sparse-times-dense products are needed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from typing import Any

from ..errors import ConfigError, ShapeMismatchError
from ..saes.base import SAE, SparseLatents
from ..saes.training import ArchSettings, LossOutput, StepContext
from .objectives import SAEObjective
from .trainer import register_optimizer

DENSE_MAX = 4096
SOLVERS = ("auto", "cholesky", "cg")


class DecoderStats:
    """Running ``ZᵀZ``, ``ZᵀX``, ``Σz``, ``Σx``, ``N`` for the ridge decoder solve (float64).

    Args:
        d_sae, d_out: code and target widths.
        sparse: keep ``ZᵀZ`` as a sparse COO matrix (``None``: sparse iff ``d_sae > DENSE_MAX``).
    """

    def __init__(self, d_sae: int, d_out: int, sparse: bool | None = None, device: torch.device | str = "cpu"):
        self.d_sae, self.d_out = d_sae, d_out
        self.sparse = d_sae > DENSE_MAX if sparse is None else sparse
        self.device = torch.device(device)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.ZtX = torch.zeros(d_sae, d_out, **f64)
        self.z_sum = torch.zeros(d_sae, **f64)
        self.x_sum = torch.zeros(d_out, **f64)
        self.n = 0
        self._ZtZ_dense = None if self.sparse else torch.zeros(d_sae, d_sae, **f64)
        self._ZtZ_parts: list[Tensor] = []  # sparse batches, merged lazily
        self._pending = 0

    def reset(self) -> None:
        self.__init__(self.d_sae, self.d_out, self.sparse, self.device)  # type: ignore[misc]

    @torch.no_grad()
    def add(self, z: Tensor | SparseLatents, x: Tensor) -> None:
        """Add a batch: codes ``z`` (``(N, d_sae)`` dense, or sparse latents ``(N, k)``) and targets ``x (N, d_out)``."""
        x = x.reshape(-1, x.shape[-1]).to(self.device, torch.float64)
        if x.shape[-1] != self.d_out:
            raise ShapeMismatchError(f"DecoderStats expects targets (N, {self.d_out}), got {tuple(x.shape)}")
        if isinstance(z, SparseLatents):
            v = z.values.reshape(-1, z.values.shape[-1]).to(self.device, torch.float64)
            idx = z.indices.reshape(-1, z.indices.shape[-1]).to(self.device)
            rows = torch.arange(v.shape[0], device=self.device).repeat_interleave(v.shape[1])
            keep = v.reshape(-1) != 0
            n_rows = v.shape[0]
            coo = torch.sparse_coo_tensor(
                torch.stack([rows[keep], idx.reshape(-1)[keep]]), v.reshape(-1)[keep], (n_rows, self.d_sae),
                check_invariants=False,
            ).coalesce()
            zd = None
        else:
            zd = z.reshape(-1, z.shape[-1]).to(self.device, torch.float64)
            if zd.shape[-1] != self.d_sae:
                raise ShapeMismatchError(f"DecoderStats expects codes (N, {self.d_sae}), got {tuple(zd.shape)}")
            n_rows = zd.shape[0]
            coo = zd.to_sparse() if self.sparse else None
        if n_rows != x.shape[0]:
            raise ShapeMismatchError(f"codes have {n_rows} rows but targets {x.shape[0]}")
        if coo is None:
            assert zd is not None
            self._ZtZ_dense += zd.T @ zd  # type: ignore[operator]
            self.ZtX += zd.T @ x
            self.z_sum += zd.sum(0)
        else:
            zt = coo.t().coalesce()
            self.ZtX += torch.sparse.mm(zt, x)
            self.z_sum += torch.sparse.sum(zt, dim=1).to_dense()
            with warnings.catch_warnings():  # torch warns that its internal CSR path is "beta"
                warnings.simplefilter("ignore", UserWarning)
                gram = torch.sparse.mm(zt, coo)
            if self.sparse:
                self._ZtZ_parts.append(gram.coalesce())
                self._pending += gram._nnz()
                if len(self._ZtZ_parts) > 1 and self._pending > 4 * self._ZtZ_parts[0]._nnz():
                    self._merge()
            else:
                self._ZtZ_dense += gram.to_dense()  # type: ignore[operator]
        self.x_sum += x.sum(0)
        self.n += x.shape[0]

    def _merge(self) -> None:
        if len(self._ZtZ_parts) > 1:
            total = self._ZtZ_parts[0]
            for part in self._ZtZ_parts[1:]:
                total = total + part
            self._ZtZ_parts = [total.coalesce()]
        self._pending = 0

    @property
    def gram(self) -> Tensor:
        """``ZᵀZ``: dense ``(d_sae, d_sae)``, or a coalesced sparse COO matrix in sparse mode."""
        if not self.sparse:
            return self._ZtZ_dense  # type: ignore[return-value]
        self._merge()
        if not self._ZtZ_parts:
            return torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.float64),
                                           (self.d_sae, self.d_sae), device=self.device,
                                           check_invariants=False).coalesce()
        return self._ZtZ_parts[0]

    def merge_from(self, other: DecoderStats) -> None:
        """Add another accumulator's statistics (e.g. from another rank after an all-reduce)."""
        self.ZtX += other.ZtX
        self.z_sum += other.z_sum
        self.x_sum += other.x_sum
        self.n += other.n
        if self.sparse:
            self._ZtZ_parts.append(other.gram)
            self._merge()
        else:
            g = other.gram
            self._ZtZ_dense += g.to_dense() if g.is_sparse else g  # type: ignore[operator]

    def solve(
        self,
        decoder_reg: float = 1e-5,
        *,
        alpha_w: float = 0.0,
        mu_dec: float = 0.0,
        W_prev: Tensor | None = None,
        solver: str = "auto",
        tol: float = 1e-8,
        max_iter: int = 1000,
    ) -> tuple[Tensor, Tensor]:
        """``(W_dec (d_sae, d_out), b_dec (d_out))`` in float64.

        ``W = argmin ||ZW − X||² + r²||W||² + α_w||W||² + μ_dec||W − W_prev||²`` with ``r = decoder_reg``
        (the paper's ``DECODER_REG``, the coefficient of the stacked identity rows), then
        ``b = (Σx − (Σz) W) / N``. ``solver="cg"`` stops when every column's residual norm is below
        ``tol`` times its right-hand side's norm, or after ``max_iter`` iterations (then the solution is
        approximate; warm-started from ``W_prev``, later rounds keep improving it). CG converges fast when
        the latents fire often relative to the ridge; latents seen once or twice make the Gram nearly
        singular and CG slow (e.g. 23 iterations at ``r = 1`` but 177 at ``r = 0.1`` for 8192 latents
        firing ~8 times each).
        """
        if solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if self.n == 0:
            raise ConfigError("DecoderStats.solve: no batches were added")
        lam = decoder_reg**2 + alpha_w + mu_dec
        rhs = self.ZtX
        if mu_dec:
            if W_prev is None:
                raise ConfigError("mu_dec > 0 needs W_prev (the decoder before this step)")
            rhs = rhs + mu_dec * W_prev.to(rhs)
        if solver == "auto":
            solver = "cg" if self.sparse else "cholesky"
        if solver == "cholesky":
            g = self.gram
            A = (g.to_dense() if g.is_sparse else g).clone()
            A.diagonal().add_(lam)
            if lam == 0:
                W = torch.linalg.lstsq(A, rhs).solution
            else:
                L, info = torch.linalg.cholesky_ex(A)
                W = torch.cholesky_solve(rhs, L) if int(info) == 0 else torch.linalg.lstsq(A, rhs).solution
        else:
            W = conjugate_gradient(self.gram, lam, rhs, x0=W_prev, tol=tol, max_iter=max_iter)
        b = (self.x_sum - self.z_sum @ W) / self.n
        return W, b


def _gram_matvec(gram: Tensor, lam: float, V: Tensor) -> Tensor:
    return gram @ V + lam * V


@torch.no_grad()
def conjugate_gradient(
    gram: Tensor, lam: float, rhs: Tensor, x0: Tensor | None = None, tol: float = 1e-10, max_iter: int = 1000,
) -> Tensor:
    """Solve ``(gram + lam·I) W = rhs`` column by column (all columns at once) by Jacobi-preconditioned CG.

    ``gram`` may be sparse (COO) or dense, symmetric positive semi-definite; ``lam > 0`` makes the system
    positive definite. Latents that never fired have a zero row/column: CG leaves their rows of ``W`` at
    ``rhs/lam`` = 0 (no ``μ_dec``), as the exact solution does.
    """
    diag = (gram.diagonal() if not gram.is_sparse else _sparse_diag(gram)) + lam
    if gram.is_sparse:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            gram = gram.coalesce().to_sparse_csr()  # CSR products are ~2x faster than COO on CPU
    inv_diag = 1.0 / diag.clamp_min(1e-300)
    W = torch.zeros_like(rhs) if x0 is None else x0.to(rhs).clone()
    R = rhs - _gram_matvec(gram, lam, W)
    Zp = inv_diag[:, None] * R
    P = Zp.clone()
    rz = (R * Zp).sum(0)
    target = tol * rhs.norm(dim=0).clamp_min(1e-300)
    conjugate_gradient.iterations = 0  # type: ignore[attr-defined]
    for _ in range(max_iter):
        if bool((R.norm(dim=0) <= target).all()):
            break
        conjugate_gradient.iterations += 1  # type: ignore[attr-defined]
        AP = _gram_matvec(gram, lam, P)
        alpha = rz / (P * AP).sum(0).clamp_min(1e-300)
        W += alpha * P
        R -= alpha * AP
        Zp = inv_diag[:, None] * R
        rz_new = (R * Zp).sum(0)
        P = Zp + (rz_new / rz.clamp_min(1e-300)) * P
        rz = rz_new
    return W


def _sparse_diag(g: Tensor) -> Tensor:
    g = g.coalesce()
    i, j = g.indices()
    on = i == j
    out = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    return out.index_add_(0, i[on], g.values()[on])


@dataclass
class PAMSettings(ArchSettings):
    """PAM-SGD hyper-parameters (names and defaults of the paper's LLM script, ``exp_e3``).

    Attributes:
        round_steps: encoder SGD steps between two decoder steps (the paper: one epoch).
        decoder_reg: ``r`` of the stacked ridge rows ``r·I`` (``DECODER_REG`` = 1e-5).
        mu_enc, nu_enc: encoder "stay close" weights on ``||W_enc − W_prev||²_F`` / ``||b_enc − b_prev||²``.
        decoder_stay_close: enable ``alpha_w``, ``mu_dec``, ``nu_dec``, ``beta_b`` (off in the paper's runs).
        solver: ``auto`` | ``cholesky`` | ``cg`` (see the module docstring).
        sparse_stats: accumulate ``ZᵀZ`` sparsely (``None``: iff ``d_sae > 4096``).
        cg_tol, cg_max_iter: the CG solver's relative residual and iteration cap (warm-started each round).
    """

    round_steps: int = 50
    decoder_reg: float = 1e-5
    mu_enc: float = 1e-3
    nu_enc: float = 1e-3
    decoder_stay_close: bool = False
    mu_dec: float = 1e-3
    nu_dec: float = 1e-3
    alpha_w: float = 1e-6
    beta_b: float = 1e-6
    solver: str = "auto"
    sparse_stats: bool | None = None
    cg_tol: float = 1e-6
    cg_max_iter: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.round_steps < 1:
            raise ConfigError(f"PAM-SGD round_steps must be >= 1, got {self.round_steps}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"PAM-SGD solver must be one of {SOLVERS}, got {self.solver!r}")


@torch.no_grad()
def decoder_step(sae, stats: DecoderStats, settings: PAMSettings) -> None:  # noqa: ANN001 - an SAE
    """Replace ``sae.W_dec``/``sae.b_dec`` by the ridge solution from ``stats`` (in the SAE's dtype)."""
    s = settings
    W_prev = sae.W_dec.detach().double()
    b_prev = sae.b_dec.detach().double()
    close = s.decoder_stay_close
    W, b = stats.solve(
        s.decoder_reg, alpha_w=s.alpha_w if close else 0.0, mu_dec=s.mu_dec if close else 0.0,
        W_prev=W_prev if (close or stats.sparse) else None, solver=s.solver, tol=s.cg_tol, max_iter=s.cg_max_iter,
    )
    if close:
        b = (b + s.nu_dec * b_prev) / (1 + s.nu_dec) / (1 + s.beta_b)
    sae.W_dec.copy_(W.to(sae.W_dec.dtype))
    sae.b_dec.copy_(b.to(sae.b_dec.dtype))


def encoder_parameters(sae) -> list[Tensor]:  # noqa: ANN001
    """The parameters PAM-SGD trains by SGD: everything but ``W_dec`` and ``b_dec``."""
    return [p for n, p in sae.named_parameters() if n not in ("W_dec", "b_dec") and p.requires_grad]


def proximal_penalty(sae, prev: dict[str, Tensor], settings: PAMSettings) -> Tensor:  # noqa: ANN001
    """``μ_enc ||W_enc − prev||²_F + ν_enc ||b_enc − prev||²`` (0 before the first round)."""
    out = sae.W_enc.new_zeros(())
    if not prev:
        return out
    if settings.mu_enc:
        out = out + settings.mu_enc * (sae.W_enc - prev["W_enc"]).pow(2).sum()
    if settings.nu_enc and "b_enc" in prev:
        out = out + settings.nu_enc * (sae.b_enc - prev["b_enc"]).pow(2).sum()
    return out


def snapshot_encoder(sae) -> dict[str, Tensor]:  # noqa: ANN001
    out = {"W_enc": sae.W_enc.detach().clone()}
    if getattr(sae, "has_encoder_bias", True) and hasattr(sae, "b_enc"):
        out["b_enc"] = sae.b_enc.detach().clone()
    return out


PAM_ARCHS = ("signed_topk", "topk", "relu")


class PAMObjective(SAEObjective):
    """PAM-SGD for one SAE in the streaming trainer (``TrainSettings(optimizer="pam-sgd")``).

    ``W_dec`` and ``b_dec`` are taken out of the optimiser (``requires_grad=False``): the trainer's Adam moves
    the encoder only, on the architecture's loss plus the proximal terms towards the encoder of the start of
    the round. After each step the batch's codes under the updated encoder join the round's statistics;
    after ``round_steps`` steps the decoder is solved from them and a new round starts. The first batches
    (the trainer's ``init_batches``, used for the data statistics) also give an immediate decoder solve, so
    the encoder never trains against a random decoder. No unit-norm constraint (the closed-form decoder is
    unconstrained). (The paper's epoch loop computes a round's codes with the encoder frozen; a live stream
    cannot be replayed, so here each batch's codes come from the encoder right after its step —
    :func:`pam_fit` follows the paper exactly for in-memory data.)
    """

    def __init__(self, sae: SAE, site: str, site_out: str | None = None, settings: PAMSettings | dict | None = None):
        if sae.cfg.architecture not in PAM_ARCHS or sae.cfg.skip:
            raise ConfigError(
                f"PAM-SGD is implemented for {', '.join(PAM_ARCHS)} without a skip path, not {sae.cfg.architecture!r}"
            )
        super().__init__(sae, site, site_out)
        self.pam = PAMSettings.from_dict(settings)
        sae.W_dec.requires_grad_(False)
        sae.b_dec.requires_grad_(False)
        self.stats = self._new_stats()
        self.prev: dict[str, Tensor] = {}
        self.step_in_round = 0
        self.decoder_steps = 0

    def _new_stats(self) -> DecoderStats:
        cfg = self.sae.cfg
        return DecoderStats(cfg.d_sae, cfg.output_dim, sparse=self.pam.sparse_stats, device=self.sae.device)

    def decoders(self) -> list[Tensor]:
        return []

    @torch.no_grad()
    def _observe(self, inputs: dict[str, Tensor]) -> None:
        x, y = self.normalise(inputs)
        self.stats.add(self.sae.encode_normalized(x)[0], x if y is None else y)

    def _solve(self) -> None:
        decoder_step(self.sae, self.stats, self.pam)
        self.stats = self._new_stats()
        self.prev = snapshot_encoder(self.sae)
        self.decoder_steps += 1
        self.step_in_round = 0

    @torch.no_grad()
    def prepare(self, batches: list[dict[str, Tensor]], settings: Any) -> None:
        super().prepare(batches, settings)
        for b in batches:
            self._observe(b)
        self._solve()

    def loss(self, inputs: dict[str, Tensor], ctx: StepContext, arch: ArchSettings) -> LossOutput:
        out = super().loss(inputs, ctx, arch)
        out.loss = out.loss + proximal_penalty(self.sae, self.prev, self.pam)
        return out

    def after_step(self, inputs: dict[str, Tensor], out: LossOutput, arch: ArchSettings, first: bool) -> None:
        super().after_step(inputs, out, arch, first)
        self._observe(inputs)
        self.step_in_round += 1
        if self.step_in_round >= self.pam.round_steps:
            self._solve()

    # State -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pam": {"n": self.stats.n, "sparse": self.stats.sparse,
                                                "step_in_round": self.step_in_round, "decoder_steps": self.decoder_steps}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "pam" not in state:
            raise ConfigError("this checkpoint entry was not trained with PAM-SGD (no PAM state)")
        p = state["pam"]
        self.step_in_round, self.decoder_steps = int(p["step_in_round"]), int(p["decoder_steps"])
        self.stats = DecoderStats(self.sae.cfg.d_sae, self.sae.cfg.output_dim, sparse=bool(p["sparse"]), device=self.sae.device)
        self.stats.n = int(p["n"])

    def tensor_state(self) -> dict[str, Tensor]:
        s = self.stats
        out = {"ZtX": s.ZtX, "z_sum": s.z_sum, "x_sum": s.x_sum, **{f"prev.{k}": v for k, v in self.prev.items()}}
        g = s.gram
        if g.is_sparse:
            out["gram_indices"], out["gram_values"] = g.indices(), g.values()
        else:
            out["gram"] = g
        return out

    def load_tensor_state(self, tensors: dict[str, Tensor]) -> None:
        s, dev = self.stats, self.sae.device
        s.ZtX, s.z_sum, s.x_sum = (tensors[k].to(dev) for k in ("ZtX", "z_sum", "x_sum"))
        if s.sparse:
            s._ZtZ_parts = []
            if tensors["gram_values"].numel():
                s._ZtZ_parts = [torch.sparse_coo_tensor(tensors["gram_indices"].to(dev), tensors["gram_values"].to(dev),
                                                        (s.d_sae, s.d_sae), check_invariants=True).coalesce()]
        else:
            s._ZtZ_dense = tensors["gram"].to(dev)
        self.prev = {k[len("prev."):]: v.to(dev) for k, v in tensors.items() if k.startswith("prev.")}

    def final(self, settings: Any, state: Any, metadata: dict[str, Any]) -> SAE:
        sae = super().final(settings, state, metadata)
        sae.W_dec.requires_grad_(True)
        sae.b_dec.requires_grad_(True)
        return sae


register_optimizer(
    "pam-sgd", lambda params, s: torch.optim.Adam(params, lr=1.0, betas=s.betas, eps=s.eps),
    objective=lambda sae, site, site_out, settings: PAMObjective(sae, site, site_out, settings),
)


def pam_fit(
    sae,  # noqa: ANN001 - an SAE
    x: Tensor,
    loss_fn,  # noqa: ANN001 - (sae, x_batch) -> scalar Tensor, the encoder's objective
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    settings: PAMSettings | None = None,
    decoder_batch: int = 2048,
    grad_clip: float | None = 1.0,
    seed: int = 0,
    on_epoch=None,  # noqa: ANN001 - callback(epoch, sae)
):  # noqa: ANN201
    """PAM-SGD on an in-memory data set ``x (N, d_in)``, epoch by epoch as the paper's ``train_em``:
    a decoder step over the whole set (codes with the encoder frozen, statistics streamed in chunks of
    ``decoder_batch``), then one pass of encoder minibatch steps (Adam, ``grad_clip`` on the encoder,
    proximal terms towards the encoder of the start of the epoch). Returns ``sae``."""
    s = settings or PAMSettings()
    opt = torch.optim.Adam(encoder_parameters(sae), lr=lr)
    g = torch.Generator().manual_seed(seed)
    prev = snapshot_encoder(sae)
    for epoch in range(epochs):
        stats = DecoderStats(sae.cfg.d_sae, sae.cfg.output_dim, sparse=s.sparse_stats, device=sae.device)
        with torch.no_grad():
            for a in range(0, x.shape[0], decoder_batch):
                chunk = x[a:a + decoder_batch]
                codes, _ = sae.encode_with_state(chunk)
                stats.add(codes, sae.normalize_input(sae.flatten_input(chunk).to(sae.dtype))[0])
        decoder_step(sae, stats, s)
        perm = torch.randperm(x.shape[0], generator=g)
        for a in range(0, x.shape[0], batch_size):
            xb = x[perm[a:a + batch_size]]
            loss = loss_fn(sae, xb) + proximal_penalty(sae, prev, s)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            params = encoder_parameters(sae)
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sae.W_dec.grad = None
            sae.b_dec.grad = None
        prev = snapshot_encoder(sae)
        if on_epoch is not None:
            on_epoch(epoch, sae)
    return sae
