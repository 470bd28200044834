"""Export dashboard data in the batch layout Neuronpedia's uploads accept.

The layout is the one SAEDashboard's ``NeuronpediaConverter`` writes (``batch-{i}.json``)::

    {"model_id": ..., "layer": ..., "sae_set": ..., "features": [{
        "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
        "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
        "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
        "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
        "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
        "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
        "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist",
        "activations": [{"bin_min", "bin_max", "bin_contains", "tokens", "values"}, ...]}]}

What we fill and from what: top activations are the group with ``bin_min = -1, bin_contains = -1``
and ``bin_max`` = the maximum activation (SAEDashboard's "TOP ACTIVATIONS" group); each activation
quantile band is an interval group (``bin_min``/``bin_max`` its lowest and highest sampled value,
``bin_contains`` its share of the firings, 1 / number of bands); the activation histogram gives
``freq_hist_*`` (bar values are bin centres, heights counts, parallel arrays); logit effects give
``pos_*``/``neg_*`` and the histogram of the latent's effect over the whole vocabulary
``logits_hist_*``; neuron alignment is the decoder row's largest entries (``l1``: their share of the
row's L1 norm). What we do not collect stays empty, as SAEDashboard leaves it when a table is off:
``correlated_neurons_*`` (needs the model's neurons), and ``correlated_features_pearson`` (we keep
co-firing shares, put in ``correlated_features_l1``), ``decoder_weights_dist`` (attention SAEs only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..._atomic import atomic_write_bytes
from .render import DictionaryView, _r, latent_records


def _hist_centres(edges: list[float]) -> list[float]:
    return [_r((a + b) / 2) for a, b in zip(edges[:-1], edges[1:])]


def neuronpedia_features(view: DictionaryView, vocab: list[str], latents: list[int], *, W_dec: Tensor,
                         W_U: Tensor | None, n_alignment: int = 3, dataset: str = "",
                         n_tokens_in_prompt: int = 0) -> list[dict[str, Any]]:
    """One Neuronpedia feature dict per latent in ``latents`` (see the module docstring)."""
    def tok(i: int) -> str:
        return vocab[i] if 0 <= i < len(vocab) else f"<{i}>"

    out = []
    for rec in latent_records(view, latents):
        i = rec["i"]
        row = W_dec[i].detach().float().cpu()
        top = row.abs().topk(min(n_alignment, row.numel()))
        activations = [{"bin_min": -1, "bin_max": rec["max"], "bin_contains": -1,
                        "tokens": [tok(t) for t in ex["t"] if t >= 0], "values": [a for t, a in zip(ex["t"], ex["a"]) if t >= 0]}
                       for ex in rec["top"]]
        for band in rec["bands"]:
            for ex in band["examples"]:
                activations.append({"bin_min": band["lo"], "bin_max": band["hi"], "bin_contains": _r(1 / len(rec["bands"])),
                                    "tokens": [tok(t) for t in ex["t"] if t >= 0],
                                    "values": [a for t, a in zip(ex["t"], ex["a"]) if t >= 0]})
        logits = rec.get("logits", {"pos": [], "neg": []})
        logit_hist: tuple[list, list] = ([], [])
        if W_U is not None and "logits" in rec:
            effect = row @ W_U.detach().float().cpu()
            heights, edges = torch.histogram(effect, bins=40)
            logit_hist = (heights.long().tolist(), _hist_centres(edges.tolist()))
        out.append({
            "feature_index": i,
            "neuron_alignment_indices": top.indices.tolist(),
            "neuron_alignment_values": [_r(float(row[j])) for j in top.indices],
            "neuron_alignment_l1": [_r(float(v) / float(row.abs().sum())) for v in top.values],
            "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
            "correlated_features_indices": [j for j, _ in rec["coactive"]],
            "correlated_features_l1": [f for _, f in rec["coactive"]],
            "correlated_features_pearson": [],
            "neg_str": [tok(t) for t, _ in logits["neg"]], "neg_values": [v for _, v in logits["neg"]],
            "pos_str": [tok(t) for t, _ in logits["pos"]], "pos_values": [v for _, v in logits["pos"]],
            "frac_nonzero": rec["density"],
            "freq_hist_data_bar_values": _hist_centres(rec["hist"]["edges"]),
            "freq_hist_data_bar_heights": rec["hist"]["counts"],
            "logits_hist_data_bar_heights": logit_hist[0],
            "logits_hist_data_bar_values": logit_hist[1],
            "n_prompts_total": view.stats.n_tokens, "n_tokens_in_prompt": n_tokens_in_prompt, "dataset": dataset,
            "decoder_weights_dist": [],
            "activations": activations,
        })
    return out


def export_neuronpedia(view: DictionaryView, vocab: list[str], folder: str | os.PathLike, *, model_id: str,
                       layer: int, sae_set: str, W_dec: Tensor, W_U: Tensor | None, batch_size: int = 128,
                       dataset: str = "", n_tokens_in_prompt: int = 0) -> list[Path]:
    """Write ``batch-{i}.json`` files (``batch_size`` live latents each) for a Neuronpedia upload."""
    folder = Path(folder)
    alive = torch.nonzero(view.stats.count > 0).squeeze(1).tolist()
    paths = []
    for b, a in enumerate(range(0, len(alive), batch_size)):
        feats = neuronpedia_features(view, vocab, alive[a : a + batch_size], W_dec=W_dec, W_U=W_U, dataset=dataset,
                                     n_tokens_in_prompt=n_tokens_in_prompt)
        batch = {"model_id": model_id, "layer": layer, "sae_set": sae_set, "features": feats}
        path = folder / f"batch-{b}.json"
        atomic_write_bytes(path, json.dumps(batch, ensure_ascii=False).encode("utf-8"))
        paths.append(path)
    return paths
