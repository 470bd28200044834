"""Amortisation-gap metrics and experiment: MCC's invariances, the generator, the gap itself."""

from __future__ import annotations

import pytest
import torch

from sae_hooks.eval.amortisation import dictionary_mcc, known_dictionary_experiment, mcc, synthetic_sparse_data

pytest.importorskip("scipy")


def test_mcc_is_one_for_permuted_and_scaled_codes() -> None:
    data = synthetic_sparse_data(16, 8, 3, 500, seed=1)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    scale = torch.linspace(-3, 5, 16).masked_fill(torch.linspace(-3, 5, 16) == 0, 1.0)
    assert mcc(data.codes, data.codes[:, perm] * scale) == pytest.approx(1.0, abs=1e-12)
    # extra inferred dimensions (wider dictionary) do not hurt; a dead one correlates 0
    wider = torch.cat([data.codes[:, perm], torch.zeros(500, 4)], 1)
    assert mcc(data.codes, wider) == pytest.approx(1.0, abs=1e-12)
    noise = torch.randn(500, 16, generator=torch.Generator().manual_seed(2))
    assert mcc(data.codes, noise) < 0.3
    assert dictionary_mcc(data.dictionary, -2.0 * data.dictionary[perm]) == pytest.approx(1.0, abs=1e-12)


def test_generator_has_k_active_sources_and_unit_atoms() -> None:
    data = synthetic_sparse_data(16, 8, 3, 400, seed=0)
    assert ((data.codes > 0).sum(-1) == 3).all() and (data.codes >= 0).all()
    torch.testing.assert_close(data.dictionary.norm(dim=-1), torch.ones(16))
    torch.testing.assert_close(data.x, data.codes @ data.dictionary)
    again = synthetic_sparse_data(16, 8, 3, 400, seed=0, dictionary=data.dictionary)
    assert torch.equal(again.dictionary, data.dictionary)


def test_solvers_close_the_amortisation_gap() -> None:
    r = known_dictionary_experiment(steps=300, ito_steps=300, mlp_hidden=(), n_train=256, n_test=256)
    assert r["FISTA"]["mcc"] > r["SAE"]["mcc"] + 0.15 and r["FISTA"]["mse"] < 0.1 * r["SAE"]["mse"]
    assert r["OMP (k=3)"]["l0"] <= 3 and r["OMP (k=3)"]["mcc"] > r["SAE"]["mcc"]


def test_unknown_dictionary_experiment_and_dictionary_learning() -> None:
    """Every method reports code/dictionary MCC, MSE and L0; the SAE + solver rows use the SAE's own
    learned dictionary; dictionary learning keeps unit atoms and moves them towards the planted ones."""
    from sae_hooks.eval.amortisation import learn_dictionary, unknown_dictionary_experiment

    r = unknown_dictionary_experiment(8, 6, 2, n_train=128, n_test=128, steps=200, ito_steps=50, mlp_hidden=(8,),
                                      dict_iters=5)
    assert set(r) == {"SAE", "SAE + ITO", "SAE + FISTA", "MLP (h=8)", "sparse coding (FISTA + BCD)"}
    for row in r.values():
        assert 0 <= row["mcc"] <= 1 and 0 <= row["dict_mcc"] <= 1 and row["mse"] >= 0 and 0 <= row["l0"] <= 8
    assert r["SAE + FISTA"]["dict_mcc"] == r["SAE + ITO"]["dict_mcc"] == r["SAE"]["dict_mcc"]  # the SAE's dictionary
    # dictionary learning: atoms stay unit-norm and improve the objective over their starting samples
    data = synthetic_sparse_data(8, 6, 2, 200, seed=3)
    D = learn_dictionary(data.x, 8, 0.005, iters=20, fista_iter=50, seed=0)
    torch.testing.assert_close(D.norm(dim=-1), torch.ones(8))
    assert dictionary_mcc(data.dictionary, D) > dictionary_mcc(data.dictionary, learn_dictionary(data.x, 8, 0.005, iters=0, seed=0))
