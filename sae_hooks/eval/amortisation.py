"""The amortisation gap (O'Neill, Gumran & Klindt, arXiv 2411.13117): how much better sparse codes a
solver finds than the SAE's one-pass encoder, given the same decoder.

* :func:`synthetic_sparse_data`: ``N`` sources, ``M`` measurement dimensions, ``K`` active sources per
  sample (``|N(0, 1)|`` values on a uniformly drawn support), a Gaussian dictionary with unit-norm rows,
  ``x = s @ D`` -- the paper's generator (``experiments/utils.generate_data``).
* :func:`mcc`: mean absolute Pearson correlation between true and inferred code dimensions after a
  Hungarian matching (``scipy.optimize.linear_sum_assignment``; constant columns correlate 0);
  :func:`dictionary_mcc`: the same on dictionary rows with absolute cosine similarity.
* :func:`known_dictionary_experiment`: the paper's known-``D`` setting: every encoder decodes with the
  true ``D``; the SAE encoder (``ReLU(W x + b)``) and MLP encoders are trained on ``MSE + λ·mean|s|``
  (Adam, lr 1e-3), ITO optimises the test codes directly; reports test MCC, MSE and L0.
* :func:`unknown_dictionary_experiment`: the paper's unknown-dictionary setting: the SAE, MLP encoders
  and sparse coding each learn their own dictionary; reports code MCC, dictionary MCC, test MSE and L0
  (:func:`fit_autoencoder`, :func:`learn_dictionary`).
* :func:`model_table`: on a real model, an SAE against the same SAE with inference-time encoders at
  (approximately) matched L0: MSE, FVU, L0 and ``ce_loss_score`` with each spliced in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..saes.base import SAE


@dataclass
class SyntheticData:
    codes: Tensor  # (n, N)
    dictionary: Tensor  # (N, M), unit-norm rows
    x: Tensor  # (n, M)


def synthetic_sparse_data(n_sources: int = 16, n_dims: int = 8, k: int = 3, n_samples: int = 2048, *,
                          seed: int = 20240625, dictionary: Tensor | None = None) -> SyntheticData:
    """``n_samples`` codes with exactly ``k`` of ``n_sources`` active (``|N(0,1)|``), a dictionary
    ``(n_sources, n_dims)`` (Gaussian, unit-norm rows; or the one given) and ``x = codes @ dictionary``."""
    g = torch.Generator().manual_seed(seed)
    support = torch.rand(n_samples, n_sources, generator=g).argsort(-1)[:, :k]
    codes = torch.zeros(n_samples, n_sources).scatter_(1, support, torch.randn(n_samples, k, generator=g).abs())
    if dictionary is None:
        dictionary = torch.randn(n_sources, n_dims, generator=g)
        dictionary = dictionary / dictionary.norm(dim=-1, keepdim=True)
    return SyntheticData(codes, dictionary, codes @ dictionary)


def _abs_corr(a: Tensor, b: Tensor) -> Tensor:
    """``|Pearson(a[:, i], b[:, j])|`` as an ``(A, B)`` matrix; columns with no variance give 0."""
    a, b = a.double() - a.double().mean(0), b.double() - b.double().mean(0)
    na, nb = a.norm(dim=0), b.norm(dim=0)
    c = (a.T @ b) / (na[:, None] * nb[None, :])
    c[(na < 1e-12)[:, None].expand_as(c) | (nb < 1e-12)[None, :].expand_as(c)] = 0
    return c.abs().nan_to_num(0.0)


def _hungarian_mean(sim: Tensor) -> float:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(sim.cpu().numpy(), maximize=True)
    return float(sim[rows, cols].mean())


def mcc(true_codes: Tensor, inferred: Tensor) -> float:
    """Mean correlation coefficient after Hungarian matching of code dimensions, codes ``(n, N)``,
    ``(n, F)``: 1 for any permutation and positive or negative rescaling of the true codes."""
    return _hungarian_mean(_abs_corr(true_codes.reshape(-1, true_codes.shape[-1]), inferred.reshape(-1, inferred.shape[-1])))


def dictionary_mcc(true_dict: Tensor, learned: Tensor) -> float:
    """Mean ``|cos|`` between dictionary rows ``(N, M)`` and ``(F, M)`` after Hungarian matching."""
    a = true_dict.double() / true_dict.double().norm(dim=-1, keepdim=True)
    b = learned.double() / learned.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return _hungarian_mean((a @ b.T).abs())


def _paper_loss(x: Tensor, x_hat: Tensor, s: Tensor, l1_weight: float) -> Tensor:
    return (x_hat - x).pow(2).mean() + l1_weight * s.abs().mean()


def fit_sae_encoder(sae: SAE, x: Tensor, *, steps: int = 20_000, lr: float = 1e-3, l1_weight: float = 0.05) -> SAE:
    """Train only the encoder (``W_enc``, ``b_enc``) of ``sae`` on full-batch ``x (n, d_in)`` with the
    decoder frozen, on the paper's loss ``mean((x̂ − x)²) + l1_weight · mean|s|``."""
    params = [p for n, p in sae.named_parameters() if n in ("W_enc", "b_enc")]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            s = sae.encode(x)
            loss = _paper_loss(x, sae.decode(s), s, l1_weight)
            opt.zero_grad()
            loss.backward()
        opt.step()
    return sae


def _decoder_sae(dictionary: Tensor, seed: int) -> SAE:
    from ..saes.registry import make_sae

    torch.manual_seed(seed)
    sae = make_sae("relu", dictionary.shape[1], dictionary.shape[0])
    with torch.no_grad():
        sae.W_dec.copy_(dictionary)
        sae.W_enc.copy_(torch.randn_like(sae.W_enc) / dictionary.shape[1] ** 0.5)
    sae.W_dec.requires_grad_(False)
    sae.b_dec.requires_grad_(False)
    return sae


def known_dictionary_experiment(
    n_sources: int = 16, n_dims: int = 8, k: int = 3, *, n_train: int = 1024, n_test: int = 1024,
    steps: int = 20_000, ito_steps: int = 20_000, l1_weight: float = 0.05, mlp_hidden: Sequence[int] = (32, 256),
    seed: int = 20240625, progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """One run of the known-dictionary comparison; returns ``{method: {"mcc", "mse", "l0"}}`` on the
    test set. ``l1_weight`` is the paper's ``λ`` in ``MSE + λ·mean|s|`` (means over entries); the
    solvers get the equivalent per-token coefficient ``λ · M / (2N)`` of ``0.5||x − sD||² + λ'||s||₁``."""
    from ..encoders import with_encoder
    from ..encoders.core import fit_mlp_encoder

    data = synthetic_sparse_data(n_sources, n_dims, k, n_train + n_test, seed=seed)
    x_tr, x_te, s_te = data.x[:n_train], data.x[n_train:], data.codes[n_train:]
    lam = l1_weight * n_dims / (2 * n_sources)
    say = progress or (lambda _m: None)
    out: dict[str, dict[str, float]] = {}

    def record(name: str, sae: SAE) -> None:
        with torch.no_grad():
            codes = sae.encode(x_te)
            out[name] = {"mcc": mcc(s_te, codes), "mse": float((sae(x_te) - x_te).pow(2).mean()),
                         "l0": float((codes > 1e-6).sum(-1).float().mean())}
        say(f"{name}: {out[name]}")

    sae = fit_sae_encoder(_decoder_sae(data.dictionary, seed), x_tr, steps=steps, l1_weight=l1_weight)
    record("SAE", sae)
    for h in mlp_hidden:
        base = _decoder_sae(data.dictionary, seed)
        enc = fit_mlp_encoder(base, [x_tr], hidden=h, steps=steps, l1_coefficient=l1_weight, seed=seed)
        record(f"MLP (h={h})", with_encoder(base, enc))
    record("SAE + ITO", with_encoder(sae, "ito", l1_coefficient=lam, max_iter=ito_steps, lr=1e-3, tol=0, init="sae"))
    record("ITO (from zero)", with_encoder(sae, "ito", l1_coefficient=lam, max_iter=ito_steps, lr=1e-3, tol=0, init="zero"))
    record("FISTA", with_encoder(sae, "fista", l1_coefficient=lam, max_iter=ito_steps, tol=1e-8))
    record(f"OMP (k={k})", with_encoder(sae, "omp", k=k))
    return out


def _unit_rows(W: Tensor) -> Tensor:
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def fit_autoencoder(encoder: torch.nn.Module, x: Tensor, n_atoms: int, *, steps: int = 40_000, lr: float = 1e-3,
                    l1_weight: float = 0.01, seed: int = 0) -> Tensor:
    """Train ``encoder`` (``(n, d) → (n, n_atoms)`` codes) and a dictionary ``(n_atoms, d)`` jointly on
    full-batch ``x``, the paper's unknown-dictionary setting: Adam on ``mean((s D − x)²) + l1_weight ·
    mean|s|``, dictionary rows renormalised to unit norm before every step. Returns the dictionary."""
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.Parameter(_unit_rows(torch.randn(n_atoms, x.shape[1], generator=g)))
    opt = torch.optim.Adam([*encoder.parameters(), D], lr=lr)
    for _ in range(steps):
        with torch.no_grad():
            D.copy_(_unit_rows(D))
        with torch.enable_grad():
            s = encoder(x)
            loss = _paper_loss(x, s @ D, s, l1_weight)
            opt.zero_grad()
            loss.backward()
        opt.step()
    return _unit_rows(D.detach())


@torch.no_grad()
def learn_dictionary(x: Tensor, n_atoms: int, l1_coefficient: float, *, iters: int = 200, fista_iter: int = 200,
                     seed: int = 0, nonnegative: bool = True) -> Tensor:
    """Sparse dictionary learning by alternating minimisation of ``Σ_n 0.5·||x_n − s_n D||² +
    λ·||s_n||₁`` over the codes and a dictionary ``D (n_atoms, d)`` with rows in the unit ball: codes by
    FISTA (warm-started), then one block-coordinate sweep over the atoms (each atom the exact minimiser
    given the others, projected onto the unit ball; Mairal et al. 2009). Atoms start on random samples
    (a random Gaussian start stalls in poor local minima here); an atom no code uses restarts on the
    worst-reconstructed sample. Returns unit rows."""
    from ..encoders.solvers import fista

    g = torch.Generator().manual_seed(seed)
    x = x.double()
    D = _unit_rows(x[torch.randperm(x.shape[0], generator=g)[:n_atoms]])
    s: Tensor | None = None
    for _ in range(iters):
        s = fista(x, D, l1_coefficient, init=s, max_iter=fista_iter, tol=1e-7, nonnegative=nonnegative)
        A, B = s.T @ s, s.T @ x  # (n_atoms, n_atoms), (n_atoms, d)
        D = D.clone()
        for j in range(n_atoms):
            if A[j, j] <= 1e-12:
                worst = (x - s @ D).pow(2).sum(-1).argmax()
                D[j] = x[worst] / x[worst].norm().clamp_min(1e-12)
                continue
            u = D[j] + (B[j] - A[j] @ D) / A[j, j]
            D[j] = u / u.norm().clamp_min(1.0)
    return _unit_rows(D).float()


def unknown_dictionary_experiment(
    n_sources: int = 16, n_dims: int = 8, k: int = 3, *, n_train: int = 1024, n_test: int = 1024,
    steps: int = 40_000, ito_steps: int = 10_000, l1_weight: float = 0.01, mlp_hidden: Sequence[int] = (32, 256),
    sc_l1_weight: float = 0.05, dict_iters: int = 200, sklearn: bool = False, seed: int = 20240625,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, float]]:
    """One run of the paper's unknown-dictionary comparison (``experiments/unknown_Z_D.py``): nothing but
    ``x`` is given. Returns ``{method: {"mcc", "dict_mcc", "mse", "l0"}}`` on the test set:

    * ``SAE``: ``ReLU(W x)`` and a unit-row dictionary trained jointly (:func:`fit_autoencoder`,
      ``MSE + l1_weight·mean|s|``, ``steps`` full-batch Adam steps, lr 1e-3);
    * ``SAE + ITO`` / ``SAE + FISTA``: the SAE's learned dictionary, test codes optimised per sample
      (ITO from zero, ``ito_steps`` Adam steps; FISTA to convergence) at the same penalty;
    * ``MLP (h=…)``: the MLP encoder trained jointly with its dictionary in the same way;
    * ``sparse coding (FISTA + BCD)``: :func:`learn_dictionary` on the training set at penalty
      ``sc_l1_weight`` (``dict_iters`` alternations), test codes by FISTA;
    * ``sklearn DictionaryLearning`` (``sklearn=True``; needs scikit-learn): an independent solver of
      the same objective (``alpha`` = the per-sample penalty, ``positive_code=True``), test codes by
      its own ``lasso_cd`` transform (``fit_algorithm="cd"``: positive codes need coordinate descent).

    Penalties ``*_l1_weight`` are in the paper's units (``λ`` of ``mean(r²) + λ·mean|s|``); the
    per-sample solvers get the equivalent ``λ · M / (2N)`` of ``0.5||x − sD||² + λ'||s||₁``."""
    from ..encoders import with_encoder
    from ..encoders.core import MLPEncoder
    from ..encoders.solvers import fista

    data = synthetic_sparse_data(n_sources, n_dims, k, n_train + n_test, seed=seed)
    x_tr, x_te, s_te = data.x[:n_train], data.x[n_train:], data.codes[n_train:]
    per_sample = n_dims / (2 * n_sources)
    say = progress or (lambda _m: None)
    out: dict[str, dict[str, float]] = {}

    def record(name: str, codes: Tensor, D: Tensor) -> None:
        codes, D = codes.float(), D.float()
        out[name] = {"mcc": mcc(s_te, codes), "dict_mcc": dictionary_mcc(data.dictionary, D),
                     "mse": float((codes @ D - x_te).pow(2).mean()), "l0": float((codes.abs() > 1e-6).sum(-1).float().mean())}
        say(f"{name}: {out[name]}")

    torch.manual_seed(seed)
    linear = torch.nn.Linear(n_dims, n_sources, bias=False)
    encoder = torch.nn.Sequential(linear, torch.nn.ReLU())
    D_sae = fit_autoencoder(encoder, x_tr, n_sources, steps=steps, l1_weight=l1_weight, seed=seed)
    sae = _decoder_sae(D_sae, seed)
    with torch.no_grad():
        sae.W_enc.copy_(linear.weight.detach().T)
        sae.b_enc.zero_()
        record("SAE", sae.encode(x_te), D_sae)
        lam = l1_weight * per_sample
        record("SAE + ITO", with_encoder(sae, "ito", l1_coefficient=lam, max_iter=ito_steps, lr=1e-3, tol=0, init="zero").encode(x_te), D_sae)
        record("SAE + FISTA", fista(x_te, D_sae, lam, max_iter=20_000, tol=1e-9), D_sae)
    for h in mlp_hidden:
        mlp = MLPEncoder(n_dims, n_sources, h, seed)
        D_mlp = fit_autoencoder(mlp, x_tr, n_sources, steps=steps, l1_weight=l1_weight, seed=seed)
        with torch.no_grad():
            record(f"MLP (h={h})", mlp(x_te), D_mlp)
    lam_sc = sc_l1_weight * per_sample
    D_sc = learn_dictionary(x_tr, n_sources, lam_sc, iters=dict_iters, seed=seed)
    record("sparse coding (FISTA + BCD)", fista(x_te, D_sc, lam_sc, max_iter=20_000, tol=1e-9), D_sc)
    if sklearn:
        try:
            from sklearn.decomposition import DictionaryLearning
        except ImportError as e:
            raise ImportError("unknown_dictionary_experiment(sklearn=True) needs scikit-learn: pip install scikit-learn") from e
        dl = DictionaryLearning(n_components=n_sources, alpha=lam_sc, fit_algorithm="cd", transform_algorithm="lasso_cd", transform_alpha=lam_sc,
                                positive_code=True, random_state=seed % 2**32, max_iter=1000)
        dl.fit(x_tr.double().numpy())
        record("sklearn DictionaryLearning", torch.as_tensor(dl.transform(x_te.double().numpy())),
               torch.as_tensor(dl.components_))
    return out


def calibrate_l1(sae: SAE, encoder: str, x: Tensor, target_l0: float, *, lo: float = 1e-4, hi: float = 10.0,
                 iters: int = 12, **options: Any) -> float:
    """The ``l1_coefficient`` at which ``with_encoder(sae, encoder, ...)`` has L0 ≈ ``target_l0`` on
    ``x`` (geometric bisection; L0 falls as the coefficient grows)."""
    from ..encoders import with_encoder

    for _ in range(iters):
        mid = (lo * hi) ** 0.5
        with torch.no_grad():
            l0 = float((with_encoder(sae, encoder, l1_coefficient=mid, **options).encode(x) != 0).sum(-1).float().mean())
        lo, hi = (mid, hi) if l0 > target_l0 else (lo, mid)
    return (lo * hi) ** 0.5


@torch.no_grad()
def model_table(
    model: Any, sae: SAE, site: str, batches: Sequence[Any], *, bos_token_id: int | None = None,
    encoders: dict[str, tuple[str, dict[str, Any]]] | None = None, hooks: Any = None, calibration_tokens: int = 512,
) -> dict[str, dict[str, float]]:
    """SAE vs inference-time encoders on ``model``'s activations at ``site``: ``mse`` (per element),
    ``fvu``, ``l0`` and ``ce_loss_score`` / ``kl_clean_sae`` with each spliced in.

    ``encoders``: ``{label: (name, options)}``; an ``l1_coefficient="match"`` option is replaced by the
    coefficient that matches the SAE's L0 on the first ``calibration_tokens`` tokens
    (:func:`calibrate_l1`). Default: OMP and MP with ``k`` = the SAE's L0, FISTA and warm-started ITO
    at matched L0 (100 iterations each)."""
    from ..encoders import with_encoder
    from ..train.sources import ActivationReader
    from .reconstruction import fvu as fvu_of
    from .splice import hooks_splice_runner, splice_metrics

    reader = ActivationReader(model, [site], bos_token_id=bos_token_id)
    x = torch.cat([reader.read(b)[site] for b in batches])
    run = hooks_splice_runner(model, site, hooks=hooks, bos_token_id=bos_token_id)
    rows: dict[str, dict[str, float]] = {}

    def row(label: str, s: SAE) -> None:
        lat, state = s.encode_with_state(x)  # one encode for the reconstruction metrics ...
        x_hat = s.reconstruct(x, lat, state).to(x.dtype)
        dense = lat.to_dense() if hasattr(lat, "to_dense") else lat
        down = splice_metrics(run, s, batches)  # ... and one inside the splice
        rows[label] = {"mse": float((x_hat - x).pow(2).mean()), "fvu": fvu_of(x, x_hat),
                       "l0": float((dense != 0).sum(-1).float().mean()),
                       "ce_loss_score": down["ce_loss_score"], "kl_clean_sae": down["kl_clean_sae"]}

    row("SAE", sae)
    base_l0 = rows["SAE"]["l0"]
    k = max(1, round(base_l0))
    encoders = encoders or {
        f"SAE + OMP (k={k})": ("omp", {"k": k}),
        f"SAE + MP (k={k})": ("mp", {"k": k}),
        "SAE + FISTA (matched L0)": ("fista", {"l1_coefficient": "match", "max_iter": 100}),
        "SAE + ITO (matched L0)": ("ito", {"l1_coefficient": "match", "max_iter": 100, "lr": 1e-2, "init": "sae"}),
    }
    for label, (name, options) in encoders.items():
        options = dict(options)
        if options.get("l1_coefficient") == "match":
            rest = {k_: v for k_, v in options.items() if k_ != "l1_coefficient"}
            options["l1_coefficient"] = calibrate_l1(sae, name, x[:calibration_tokens], base_l0, iters=8, **rest)
        row(label, with_encoder(sae, name, **options))
    return rows


def format_table(rows: dict[str, dict[str, float]], columns: Iterable[str] | None = None) -> str:
    """A Markdown table of ``{row: {column: value}}``."""
    cols = list(columns or next(iter(rows.values())).keys())
    lines = ["| method | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")
    return "\n".join(lines)
