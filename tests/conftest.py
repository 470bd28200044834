"""Shared fixtures: tiny models built offline (no downloads), seeded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tl_major() -> int | None:
    try:
        from importlib.metadata import version

        return int(version("transformer-lens").split(".")[0])
    except Exception:
        return None


def tiny_hf_gpt2(seed: int = 0):
    """A randomly initialised Hugging Face GPT-2 (2 layers, d_model 32) in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


SMALL = dict(vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, head_dim=8, **SMALL)


def hf_family_cases():
    """``{family: (config, model class, architecture name)}``: tiny randomly initialised HF models of every
    family the site layer translates (needs transformers)."""
    import transformers

    t = transformers
    return {
        "gpt2": (t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SMALL), t.GPT2LMHeadModel, "GPT2LMHeadModel"),
        "gpt_neox": (t.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=64, **SMALL), t.GPTNeoXForCausalLM, "GPTNeoXForCausalLM"),
        "gpt_neox_sequential": (t.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=64,
                                                use_parallel_residual=False, **SMALL),
                                t.GPTNeoXForCausalLM, "GPTNeoXForCausalLM"),
        "llama": (t.LlamaConfig(**DECODER), t.LlamaForCausalLM, "LlamaForCausalLM"),
        "mistral": (t.MistralConfig(**DECODER), t.MistralForCausalLM, "MistralForCausalLM"),
        "qwen2": (t.Qwen2Config(**DECODER), t.Qwen2ForCausalLM, "Qwen2ForCausalLM"),
        "qwen3": (t.Qwen3Config(**DECODER), t.Qwen3ForCausalLM, "Qwen3ForCausalLM"),
        "gemma2": (t.Gemma2Config(**DECODER), t.Gemma2ForCausalLM, "Gemma2ForCausalLM"),
        "gemma3_text": (t.Gemma3TextConfig(**DECODER), t.Gemma3ForCausalLM, "Gemma3ForCausalLM"),
        "bert": (t.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=64, **SMALL), t.BertForMaskedLM, "BertForMaskedLM"),
    }


def randomize_norms(model, seed: int = 0) -> None:
    """Random non-trivial norm weights and biases, so pre- and post-affine values differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm) or "Norm" in type(mod).__name__:
                w = getattr(mod, "weight", None)
                if isinstance(w, torch.Tensor):
                    w.copy_((0.0 if "Gemma" in type(mod).__name__ else 1.0) + 0.5 * torch.randn(w.shape, generator=g))
                b = getattr(mod, "bias", None)
                if isinstance(b, torch.Tensor):
                    b.copy_(0.3 * torch.randn(b.shape, generator=g))


def build_tl_model(kind: str):
    """A tiny TransformerLens model of the given kind, or skip when this TL version lacks it."""
    major = tl_major()
    if major is None:
        pytest.skip("transformer_lens is not installed")
    if kind == "bridge_native":
        if major < 4:
            pytest.skip(f"TransformerBridge.boot_native needs TransformerLens 4 (installed: {major}.x)")
        from transformer_lens.model_bridge import TransformerBridge
        import transformer_lens.model_bridge.sources  # noqa: F401 - registers boot_native

        cfg = dict(d_model=32, n_layers=2, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=100, act_fn="gelu", seed=0)
        return TransformerBridge.boot_native(cfg)
    if kind == "bridge_hf":
        if major < 4:
            pytest.skip(f"build_bridge_from_module needs TransformerLens 4 (installed: {major}.x)")
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        hf = tiny_hf_gpt2()
        return build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config)
    if kind == "hooked_transformer":
        if major >= 4:
            pytest.skip("HookedTransformer was removed in TransformerLens 4 (tested in the TL 3.x environment)")
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        torch.manual_seed(0)
        cfg = HookedTransformerConfig(
            d_model=32, n_layers=2, n_ctx=64, d_head=8, n_heads=4, d_mlp=64, d_vocab=100, act_fn="gelu",
            normalization_type="LN", seed=0,
        )
        return HookedTransformer(cfg).eval()
    raise ValueError(kind)


def word_tokenizer():
    """A word-level tokenizer for the tiny models (vocab 100): ``"t0 t5 t7"`` -> ids 0, 5, 7; ``t0`` is
    BOS/EOS/pad, ``t1`` unknown."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(100)}, unk_token="t1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t0", eos_token="t0", pad_token="t0",
                                                unk_token="t1")


def attach_copy(kind: str, hf, *, tokenizer: bool = False):
    """A deep copy of the HF causal LM ``hf`` attached through adapter ``kind``: ``"torch"``; ``"nnsight"``
    (an ``nnsight.NNsight`` wrapper, or with ``tokenizer=True`` a ``TransformersModel`` with
    :func:`word_tokenizer`); ``"transformer_lens"`` (a TransformerLens 4 bridge built from the module;
    skipped with older TransformerLens). Wrappers mutate the model, hence the copy."""
    import copy
    import warnings

    hf = copy.deepcopy(hf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "torch":
            from sae_hooks.adapters.torch import attach

            return attach(hf)
        if kind == "nnsight":
            nnsight = pytest.importorskip("nnsight")
            from sae_hooks.adapters.nnsight import attach

            if tokenizer:
                return attach(nnsight.TransformersModel(hf, task="text-generation", tokenizer=word_tokenizer()))
            return attach(nnsight.NNsight(hf))
        if kind != "transformer_lens":
            raise ValueError(f"unknown adapter {kind!r}")
        if (tl_major() or 0) < 4:
            pytest.skip("needs a TransformerLens 4 bridge")
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        from sae_hooks.adapters.transformer_lens import attach

        return attach(build_bridge_from_module(hf, type(hf).__name__, hf_config=hf.config))


def run_concurrently(run, inputs: list, n_threads: int) -> dict:
    """``{i: run(thread, inputs[i])}`` with the inputs spread over ``n_threads`` threads released together by
    a barrier (so their calls overlap); any exception in a thread fails the test."""
    import threading

    got: dict = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for i in range(t, len(inputs), n_threads):
                got[i] = run(t, inputs[i])
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert errors == [], errors
    return got


def activation_folder(folder, widths: dict[str, int] | None = None, tokens: tuple[int, ...] = (512,)):
    """A small activation folder as ``sae-hooks capture`` writes it: one ``shard_NNNNN.safetensors`` per entry
    of ``tokens`` holding ``randn(n, width)`` for each site of ``widths`` (default ``{"s": 8}``; seeded), and
    its ``manifest.json``. Returns ``folder``."""
    import json

    from safetensors.torch import save_file

    widths = widths or {"s": 8}
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    shards = []
    for i, n in enumerate(tokens):
        name = f"shard_{i:05d}.safetensors"
        save_file({site: torch.randn(n, w, generator=g) for site, w in widths.items()}, str(folder / name))
        shards.append({"file": name, "tokens": n})
    manifest = {"format": "sae_hooks.activations", "version": 1, "sites": list(widths), "widths": widths,
                "dtype": "float32", "shards": shards, "tokens": sum(tokens)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def random_relu_sae(d_in: int = 32, d_sae: int = 64, seed: int = 3):
    """A ReLU SAE with every parameter drawn from N(0, 0.3²) (not the default init), seeded."""
    from sae_hooks.saes.registry import make_sae

    torch.manual_seed(seed)
    sae = make_sae("relu", d_in, d_sae)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return sae


def token_batches(n: int, token: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` token batches ``(2, 6..10)`` (vocab 1..99) that each hold ``token`` in one column (1, 2 or 3),
    e.g. a token that ``skip_tokens`` filters, at a different position from one batch to the next."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 100, (2, 6 + i % 5), generator=g)
        ids[:, (i % 3) + 1] = token
        out.append(ids)
    return out


TL_KINDS = ["bridge_native", "bridge_hf", "hooked_transformer"]


def docstring_texts() -> list[str]:
    """Real English text for tests on the embedded model: docstrings of a few stdlib modules, in a fixed order."""
    import importlib
    import inspect

    out = []
    for name in ["collections", "json", "os", "re", "inspect", "argparse", "functools", "itertools", "logging",
                 "textwrap", "string", "datetime", "pathlib", "typing", "subprocess"]:
        mod = importlib.import_module(name)
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 80:
                    out.append(doc)
    return out


@pytest.fixture(scope="module")
def hf():
    """The tiny random HF GPT-2 of :func:`tiny_hf_gpt2` (deep-copy it before wrapping: wrappers mutate)."""
    return tiny_hf_gpt2()


@pytest.fixture(scope="module")
def sae():
    """A ReLU SAE at ``blocks.0.hook_resid_post`` of :func:`tiny_hf_gpt2`, with a non-zero encoder bias."""
    from sae_hooks import make_sae

    torch.manual_seed(3)
    s = make_sae("relu", 32, 48, sites=["blocks.0.hook_resid_post"])
    with torch.no_grad():
        s.b_enc.normal_(0, 0.3)
    return s

# Hugging Face Hub test server fixtures (tests/conftest_hub.py).
from conftest_hub import hf_offline, hub_server  # noqa: E402, F401


# Planted dictionaries: synthetic activations with known features (training recovery tests) -------

PLANTED_D_IN, PLANTED_FEATURES, PLANTED_ACTIVE = 32, 64, 3


def planted_dictionary(seed: int = 1) -> torch.Tensor:
    """``(PLANTED_FEATURES, PLANTED_D_IN)`` unit-norm random feature directions."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(PLANTED_FEATURES, PLANTED_D_IN, generator=g)
    return d / d.norm(dim=-1, keepdim=True)


def planted_batches(dictionary: torch.Tensor, n: int, batch: int, seed: int = 2):
    """``n`` batches ``(batch, d)``, each row a sum of ``PLANTED_ACTIVE`` features with magnitudes in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        idx = torch.rand(batch, PLANTED_FEATURES, generator=g).argsort(-1)[:, :PLANTED_ACTIVE]
        mag = torch.rand(batch, PLANTED_ACTIVE, generator=g) + 0.5
        yield torch.zeros(batch, PLANTED_FEATURES).scatter(1, idx, mag) @ dictionary
