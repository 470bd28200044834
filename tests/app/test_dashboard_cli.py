"""``sae-hooks dashboard``: a saved SAE, the embedded model, text files or a dataset, and a Neuronpedia export
in the batch layout of SAEDashboard's NeuronpediaConverter (the keys of its NeuronpediaDashboardFeature.to_dict)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

# NeuronpediaDashboardFeature.to_dict() keys in SAEDashboard (sae_dashboard/neuronpedia/neuronpedia_dashboard.py).
FEATURE_KEYS = {
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
    "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations",
}
ACTIVATION_KEYS = {"bin_min", "bin_max", "bin_contains", "tokens", "values"}


@pytest.fixture(scope="module")
def saved_sae(tmp_path_factory):
    from sae_hooks.config import Site
    from sae_hooks.saes.registry import make_sae

    torch.manual_seed(1)
    sae = make_sae("topk", 128, 96, k=6)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)
    sae.cfg.sites = [Site(hook="blocks.1.hook_resid_post", module="transformer.h.1")]
    path = tmp_path_factory.mktemp("sae") / "sae"
    sae.save(path)
    return path, sae


def test_cli_dashboard_with_neuronpedia_export(saved_sae, tmp_path, capsys):
    from sae_hooks.app.cli import main
    from sae_hooks.app.demo import load_default_model, pydoc_texts

    path, sae = saved_sae
    docs = []
    for i, text in enumerate(pydoc_texts()[1][:6]):
        docs.append(tmp_path / f"doc{i}.txt")
        docs[-1].write_text(text)
    out = tmp_path / "dash"
    assert main(["dashboard", str(path), "--data", *map(str, docs), "--out", str(out), "--max-tokens", "3000",
                 "--no-progress", "--neuronpedia", "sae-hooks-default", "1", "res-topk"]) == 0
    assert f"open {out / 'index.html'}" in capsys.readouterr().out
    assert (out / "latent.html").is_file()
    batches = sorted((out / "neuronpedia").glob("batch-*.json"))
    feats = [f for b in batches for f in json.loads(b.read_text())["features"]]
    head = json.loads(batches[0].read_text())
    assert (head["model_id"], head["layer"], head["sae_set"]) == ("sae-hooks-default", 1, "res-topk")
    model, tok = load_default_model()
    W_U = model.lm_head.weight.T * model.transformer.ln_f.weight[:, None]  # ln_f folded in, as TransformerLens does
    for f in feats:
        assert set(f) == FEATURE_KEYS
        assert len(f["freq_hist_data_bar_values"]) == len(f["freq_hist_data_bar_heights"]) > 0  # parallel arrays
        assert len(f["logits_hist_data_bar_values"]) == len(f["logits_hist_data_bar_heights"]) == 40
        assert sum(f["logits_hist_data_bar_heights"]) == tok.vocab_size
        top = [a for a in f["activations"] if a["bin_min"] == -1]
        assert top and all(set(a) == ACTIVATION_KEYS and len(a["tokens"]) == len(a["values"]) for a in f["activations"])
        assert max(max(a["values"]) for a in top) == pytest.approx(top[0]["bin_max"], rel=2e-3)
    f = feats[0]
    effect = (sae.W_dec[f["feature_index"]] @ W_U).detach()
    assert f["pos_values"] == pytest.approx(effect.topk(10).values.tolist(), rel=1e-3)
    assert f["pos_str"] == [tok.decode([int(i)]) for i in effect.topk(10).indices]
    assert f["neuron_alignment_indices"][0] == int(sae.W_dec[f["feature_index"]].abs().argmax())


def test_cli_dashboard_from_a_parquet_dataset(saved_sae, tmp_path):
    datasets = pytest.importorskip("datasets")
    from sae_hooks.app.cli import main
    from sae_hooks.app.demo import pydoc_texts

    path, _ = saved_sae
    datasets.Dataset.from_dict({"text": pydoc_texts()[1][:8]}).to_parquet(str(tmp_path / "d.parquet"))
    out = tmp_path / "dash"
    assert main(["dashboard", str(path), "--data", str(tmp_path / "d.parquet"), "--out", str(out),
                 "--max-tokens", "2048", "--no-progress"]) == 0
    index = json.loads((out / "data" / "index.js").read_text()[len("window.DASH_INDEX = ") : -2])
    from transformers import AutoTokenizer

    from sae_hooks.app.default_model import default_model_path
    from sae_hooks.train.datasets import TokenBatches, load_dataset_any

    tok = AutoTokenizer.from_pretrained(str(default_model_path()))
    rows = torch.cat(list(TokenBatches(load_dataset_any(tmp_path / "d.parquet"), tok, 128, 16)))[:16]
    assert index["n_tokens"] == int((rows != tok.bos_token_id).sum())  # BOS (row starts, separators) left out
