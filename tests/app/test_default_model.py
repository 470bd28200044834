"""The small trained causal LM shipped in sae_hooks/data/default_model (see sae_hooks.app.default_model)."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sae_hooks.app.default_model import default_model_path, default_model_report  # noqa: E402

MAX_BYTES = 8 * 1024 * 1024
TEXT = "Return the cosine of x (measured in radians). The result is between -1 and 1."


@pytest.fixture(scope="module")
def path():
    return default_model_path()


@pytest.fixture(scope="module")
def report():
    return default_model_report()


@pytest.fixture(scope="module")
def hf_tokenizer(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def hf_model(path):
    transformers = pytest.importorskip("transformers")
    # eager attention: the TransformerLens bridge forces it, so logits compare exactly
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()


# ---------------------------------------------------------------------------------------------
# (a) files and size
# ---------------------------------------------------------------------------------------------


def test_folder_exists_and_is_small(path):
    names = {p.name for p in path.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "training_report.json"):
        assert required in names, required
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, f"default model folder is {size} bytes (> 8 MiB)"


def test_module_imports_no_framework():
    code = (
        "import sys, sae_hooks.app.default_model as m; m.default_model_path(); "
        "bad = [n for n in ('transformers', 'transformer_lens', 'nnsight') if n in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_special_tokens_inside_vocab(path):
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2"
    for key in ("bos_token_id", "eos_token_id"):
        assert 0 <= cfg[key] < cfg["vocab_size"], key


# ---------------------------------------------------------------------------------------------
# (b) the report and a recomputation of its numbers
# ---------------------------------------------------------------------------------------------


def test_report_model_beats_unigram(report):
    ev = report["eval"]
    assert ev["units"] == "nats/token"
    assert math.isfinite(ev["heldout_loss"]) and math.isfinite(ev["unigram_heldout_loss"])
    assert ev["heldout_loss"] < ev["unigram_heldout_loss"] - 1.0, ev
    assert report["model"]["params"] > 0 and report["training"]["steps"] > 0
    assert report["corpus"]["tokens"] == report["split"]["train_tokens"] + report["split"]["heldout_tokens"]


def test_report_params_match_weights(report, hf_model):
    assert sum(p.numel() for p in hf_model.parameters()) == report["model"]["params"]


def test_heldout_samples_recompute(report, hf_tokenizer, hf_model):
    samples = report["heldout_samples"]
    assert len(samples) >= 2
    held_ids = set(report["split"]["heldout_doc_ids"])
    counts = torch.tensor(report["unigram_train_counts"], dtype=torch.float64)
    log_uni = torch.log((counts + 1) / (counts.sum() + len(counts)))
    model_total = uni_total = n_total = 0.0
    for s in samples:
        assert s["doc_id"] in held_ids  # samples come from held-out documents only
        ids = hf_tokenizer(s["text"])["input_ids"][: hf_model.config.n_positions]
        assert ids == s["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = hf_model(input_ids=x).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, x[0, 1:]).item()
        assert loss == pytest.approx(s["loss"], abs=1e-3)
        n = len(ids) - 1
        model_total += loss * n
        uni_total += -log_uni[x[0, 1:]].sum().item()
        n_total += n
    # on these held-out texts too, the model is far better than the unigram baseline
    assert model_total / n_total < uni_total / n_total - 1.0


# ---------------------------------------------------------------------------------------------
# (c) transformers
# ---------------------------------------------------------------------------------------------


def test_tokenizer_prepends_bos(hf_tokenizer, path):
    cfg = json.loads((path / "config.json").read_text())
    ids = hf_tokenizer(TEXT)["input_ids"]
    assert ids[0] == cfg["bos_token_id"] == hf_tokenizer.bos_token_id
    assert ids.count(cfg["bos_token_id"]) == 1
    assert hf_tokenizer.pad_token_id == cfg["bos_token_id"]
    assert hf_tokenizer.decode(ids[1:]) == TEXT
    batch = hf_tokenizer([TEXT, "short"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, len(ids))
    assert batch["attention_mask"][1].sum().item() == len(hf_tokenizer("short")["input_ids"])


def test_loads_with_transformers_and_predicts(hf_tokenizer, hf_model):
    x = hf_tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = hf_model(input_ids=x, labels=x)
    assert out.logits.shape == (1, x.shape[1], hf_model.config.vocab_size)
    assert out.loss.item() < 5.0  # uniform would be log(4096) = 8.3
    gen = hf_model.generate(x[:, :5], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 10)


# ---------------------------------------------------------------------------------------------
# (d) TransformerLens 4
# ---------------------------------------------------------------------------------------------


def _bridge_cls():
    tl = pytest.importorskip("transformer_lens")
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        pytest.skip(f"TransformerBridge needs TransformerLens 4 (installed: {getattr(tl, '__version__', '?')})")
    importlib.import_module("transformer_lens.model_bridge.sources")  # registers the boot_* sources
    return TransformerBridge


def test_transformer_lens_bridge_matches_hf(path, hf_tokenizer, hf_model):
    TransformerBridge = _bridge_cls()
    bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
    x = hf_tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert torch.equal(bridge.to_tokens(TEXT).cpu(), x)  # same tokenizer, one BOS
    with torch.no_grad():
        ref = hf_model(input_ids=x).logits
        got = bridge(x)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    _, cache = bridge.run_with_cache(x)
    resid = cache["blocks.0.hook_resid_pre"]
    assert resid.shape == (1, x.shape[1], hf_model.config.n_embd)


def test_transformer_lens_bridge_from_loaded_hf_model(path, hf_tokenizer, hf_model):
    TransformerBridge = _bridge_cls()
    bridge = TransformerBridge.boot_transformers(str(path), hf_model=hf_model, tokenizer=hf_tokenizer, device="cpu")
    x = hf_tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(bridge(x), hf_model(input_ids=x).logits, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# (e) nnsight
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:LanguageModel is deprecated")
def test_nnsight_language_model_trace(path, hf_tokenizer, hf_model):
    nnsight = pytest.importorskip("nnsight")
    # tokenizer passed explicitly: see sae_hooks.app.default_model (nnsight 0.8.1 + transformers 5)
    lm = nnsight.LanguageModel(str(path), tokenizer=hf_tokenizer)
    with lm.trace(TEXT):
        h0 = lm.transformer.h[0].output.save()
        logits = lm.lm_head.output.save()
    h0 = h0[0] if isinstance(h0, tuple) else h0
    x = hf_tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert h0.shape == (1, x.shape[1], hf_model.config.n_embd)
    with torch.no_grad():
        torch.testing.assert_close(logits.detach(), hf_model(input_ids=x).logits, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:LanguageModel is deprecated")
def test_nnsight_language_model_path_only(path, hf_model):
    """``LanguageModel(path)`` with no tokenizer: works where nnsight can find the tokenizer."""
    nnsight = pytest.importorskip("nnsight")
    try:
        lm = nnsight.LanguageModel(str(path))
    except Exception as exc:  # noqa: BLE001
        if "Impossible to guess which tokenizer" in str(exc):
            pytest.xfail("nnsight 0.8.1 with transformers 5.x cannot infer the tokenizer of a "
                         "local path; pass tokenizer= (see sae_hooks.app.default_model)")
        raise
    with lm.trace(TEXT):
        h0 = lm.transformer.h[0].output.save()
    h0 = h0[0] if isinstance(h0, tuple) else h0
    assert h0.shape[-1] == hf_model.config.n_embd
