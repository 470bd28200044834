"""Fuzzing every format reader over its config AND its tensors together (hypothesis).

Each example starts from a valid folder of one format (built from the documented layout), applies one
to three mutations (drop/add a tensor, change a shape or dtype, plant NaN/inf, drop or retype a config
key, huge sizes, fractional ``k`` ...), writes it and loads it. Allowed outcomes:

* a typed error (:class:`sae_hooks.errors.SAEHooksError`), or
* a loaded SAE whose forward pass on random inputs is finite and has the right shape.

Anything else fails the test: a raw exception, a loaded SAE giving non-finite outputs (a silently
corrupt load), or a load taking more than ``HANG_S`` seconds (a hang / memory bomb).
"""

from __future__ import annotations

import collections
import json
import math
import signal
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import sae_hooks
from sae_hooks.errors import SAEHooksError
from sae_hooks.saes.registry import make_sae

D, F = 6, 12
HANG_S = 20
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _r(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 31 * len(shape) + sum(shape))
    return torch.randn(*shape, generator=g) * 0.5


def _native() -> dict[str, Any]:
    torch.manual_seed(0)
    sae = make_sae("topk", D, F, k=3, sites=["blocks.0.hook_resid_post"])
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    cfg = {"format": "sae_hooks", "format_version": 1, **sae.cfg.to_dict()}
    return {"cfg_name": "cfg.json", "cfg": cfg, "tensors": dict(sae.state_dict()), "weights": "sae.safetensors"}


def _base(fmt: str) -> dict[str, Any]:
    """``{"cfg_name", "cfg", "tensors", "weights", "sub"}`` of a valid folder of ``fmt``."""
    if fmt == "sae_hooks":
        return _native()
    if fmt == "saelens":
        cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "reshape_activations": "none", "architecture": "topk", "k": 3,
               "metadata": {"sae_lens_version": "6.5.0", "model_name": "gpt2", "hook_name": "blocks.2.hook_resid_pre"}}
        ts = {"W_enc": _r(D, F), "b_enc": _r(F, seed=1), "W_dec": _r(F, D, seed=2), "b_dec": _r(D, seed=3)}
        return {"cfg_name": "cfg.json", "cfg": cfg, "tensors": ts, "weights": "sae_weights.safetensors"}
    if fmt == "sparsify":
        cfg = {"activation": "topk", "expansion_factor": 2, "normalize_decoder": True, "num_latents": 0, "k": 3,
               "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D}
        ts = {"encoder.weight": _r(F, D), "encoder.bias": _r(F, seed=1), "W_dec": _r(F, D, seed=2), "b_dec": _r(D, seed=3)}
        return {"cfg_name": "cfg.json", "cfg": cfg, "tensors": ts, "weights": "sae.safetensors", "sub": "layers.3"}
    if fmt == "gemma_scope":
        ts = {"W_enc": _r(D, F), "W_dec": _r(F, D, seed=1), "b_enc": _r(F, seed=2), "b_dec": _r(D, seed=3),
              "threshold": _r(F, seed=4).abs()}
        return {"cfg_name": None, "cfg": None, "tensors": ts, "weights": "params.npz",
                "sub": "gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_50"}
    if fmt == "gemma_scope_2":
        ts = {"w_enc": _r(D, F), "w_dec": _r(F, D, seed=1), "b_enc": _r(F, seed=2), "b_dec": _r(D, seed=3),
              "threshold": _r(F, seed=4).abs()}
        cfg = {"architecture": "jump_relu", "model_name": "google/gemma-3-1b-pt",
               "hf_hook_point_in": "model.layers.5.output", "hf_hook_point_out": "model.layers.5.output"}
        return {"cfg_name": "config.json", "cfg": cfg, "tensors": ts, "weights": "params.safetensors",
                "sub": "resid_post/layer_5_width_16k_l0_small"}
    if fmt == "llama_scope":
        cfg = {"d_model": D, "d_sae": F, "hook_point_in": "blocks.4.hook_resid_post",
               "hook_point_out": "blocks.4.hook_resid_post", "jump_relu_threshold": 0.2,
               "norm_activation": "dataset-wise", "act_fn": "jumprelu", "top_k": 5,
               "dataset_average_activation_norm": {"in": 3.0, "out": 3.0}}
        ts = {"encoder.weight": _r(F, D), "encoder.bias": _r(F, seed=1), "decoder.weight": _r(D, F, seed=2),
              "decoder.bias": _r(D, seed=3)}
        return {"cfg_name": "hyperparams.json", "cfg": cfg, "tensors": ts, "weights": "checkpoints/final.safetensors",
                "sub": "Llama3_1-8B-Base-L4R-8x"}
    if fmt == "openai":
        cfg = {"activation": "TopK", "activation_state_dict": {"k": 3, "postact_fn": "ReLU"}}
        ts = {"pre_bias": _r(D), "encoder.weight": _r(F, D, seed=1), "latent_bias": _r(F, seed=2),
              "decoder.weight": _r(D, F, seed=3)}
        return {"cfg_name": None, "cfg": cfg, "tensors": ts, "weights": "5.pt", "sub": "resid_post_mlp_v5_32k/autoencoders"}
    if fmt == "mlsae":
        cfg = {"n_inputs": D, "n_latents": F, "k": 3, "dead_steps_threshold": 1000, "standardize": True}
        ts = {"encoder.weight": _r(F, D), "decoder.weight": _r(D, F, seed=1), "pre_encoder_bias": _r(D, seed=2)}
        return {"cfg_name": "config.json", "cfg": cfg, "tensors": ts, "weights": "model.safetensors",
                "sub": "mlsae-pythia-70m-deduped-x3-k3"}
    if fmt == "dictionary_learning":
        cfg = {"trainer": {"dict_class": "AutoEncoderTopK", "activation_dim": D, "dict_size": F, "layer": 3, "k": 3,
                           "lm_name": "EleutherAI/pythia-70m-deduped"}, "buffer": {"ctx_len": 128}}
        ts = {"encoder.weight": _r(F, D), "encoder.bias": _r(F, seed=1), "decoder.weight": _r(D, F, seed=2),
              "b_dec": _r(D, seed=3), "k": torch.tensor(3), "threshold": torch.tensor(0.4)}
        return {"cfg_name": "config.json", "cfg": cfg, "tensors": ts, "weights": "ae.pt", "sub": "trainer_0"}
    raise AssertionError(fmt)


FORMATS = ["sae_hooks", "saelens", "sparsify", "gemma_scope", "gemma_scope_2", "llama_scope", "openai", "mlsae",
           "dictionary_learning"]


def _write(root: Path, spec: dict[str, Any]) -> Path:
    folder = root / spec.get("sub", "sae")
    (folder / spec["weights"]).parent.mkdir(parents=True, exist_ok=True)
    ts = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in spec["tensors"].items()}
    weights = folder / spec["weights"]
    if spec["weights"].endswith(".safetensors"):
        save_file(ts, str(weights))
    elif spec["weights"].endswith(".npz"):
        np.savez(weights, **{k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in ts.items()})
    elif spec["cfg_name"] is None:  # OpenAI: the config lives inside the .pt
        torch.save({**ts, **(spec["cfg"] or {})}, weights)
    else:
        torch.save(ts, weights)
    if spec["cfg_name"] is not None and spec["cfg"] is not None:
        (folder / spec["cfg_name"]).write_text(json.dumps(spec["cfg"], allow_nan=True))
    return weights if spec["weights"].endswith(".pt") and spec["cfg_name"] is None else folder


# Mutations -------------------------------------------------------------------------------------------

_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 40), st.sampled_from([4.7, 10**9, 10**30, 2**31, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["topk", "relu", "jumprelu", "gated", "standard", "float64", "int64", "bfloat16", "scale"]),
    st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.sampled_from(["k", "in", "out"]), st.integers(-1, 5), max_size=2),
)
_MUTATION = st.one_of(
    st.tuples(st.just("drop_tensor"), st.integers(0, 99)),
    st.tuples(st.just("dtype"), st.integers(0, 99),
              st.sampled_from([torch.int64, torch.int32, torch.bool, torch.float16, torch.float64, torch.bfloat16, torch.uint8])),
    st.tuples(st.just("poison"), st.integers(0, 99), st.sampled_from([math.nan, math.inf, -math.inf])),
    st.tuples(st.just("shape"), st.integers(0, 99), st.sampled_from(["transpose", "grow", "shrink", "flat", "scalar", "empty", "3d"])),
    st.tuples(st.just("extra_tensor"), st.sampled_from(["junk", "W_enc", "k", "threshold", "W_skip"])),
    st.tuples(st.just("cfg_del"), st.integers(0, 99)),
    st.tuples(st.just("cfg_set"), st.integers(0, 99), _VALUES),
    st.tuples(st.just("cfg_nested"), st.integers(0, 99), _VALUES),
)


def _mutate(spec: dict[str, Any], mutation: tuple) -> None:
    ts, cfg = spec["tensors"], spec["cfg"]
    names = sorted(ts)
    kind = mutation[0]
    if kind in ("drop_tensor", "dtype", "poison", "shape") and names:
        name = names[mutation[1] % len(names)]
        t = ts[name]
        if kind == "drop_tensor":
            del ts[name]
        elif kind == "dtype":
            ts[name] = (t * 3).to(mutation[2]) if mutation[2] != torch.bool else t > 0
        elif kind == "poison" and t.is_floating_point() and t.numel():
            t = t.clone()
            t.view(-1)[0] = mutation[2]
            ts[name] = t
        elif kind == "poison":
            ts[name] = torch.full_like(t, 0, dtype=torch.float32).fill_(mutation[2])
        elif kind == "shape":
            how = mutation[2]
            if how == "transpose" and t.dim() == 2:
                ts[name] = t.T.contiguous()
            elif how == "grow":
                ts[name] = torch.cat([t.reshape(-1), t.reshape(-1)[:1]]) if t.numel() else torch.zeros(1)
            elif how == "shrink" and t.dim() >= 1 and t.shape[0] > 1:
                ts[name] = t[:-1].contiguous()
            elif how == "flat":
                ts[name] = t.reshape(-1).contiguous()
            elif how == "scalar":
                ts[name] = t.reshape(-1)[:1].reshape(()).clone() if t.numel() else torch.tensor(1.0)
            elif how == "empty":
                ts[name] = t.new_zeros((0,) * max(t.dim(), 1))
            elif how == "3d":
                ts[name] = t.reshape(1, *t.shape).contiguous()
    elif kind == "extra_tensor":
        ts[mutation[1]] = _r(F, D, seed=9)
    elif kind in ("cfg_del", "cfg_set", "cfg_nested") and isinstance(cfg, dict) and cfg:
        target = cfg
        if kind == "cfg_nested":  # one level down, where formats nest (metadata, trainer, activation_state_dict)
            nested = [k for k, v in cfg.items() if isinstance(v, dict) and v]
            if not nested:
                return
            target = cfg[nested[mutation[1] % len(nested)]]
        keys = sorted(target)
        key = keys[mutation[1] % len(keys)]
        if kind == "cfg_del":
            del target[key]
        else:
            target[key] = mutation[2]


class _Hang(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise _Hang


def _load_and_classify(fmt: str, spec: dict[str, Any], detect: bool) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        target = _write(Path(tmp), spec)
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(HANG_S)
        try:
            sae = sae_hooks.load(target, format=None if detect else fmt)
        except _Hang:
            return "hang"
        except SAEHooksError:
            return "typed"
        except Exception as e:  # noqa: BLE001 - the thing under test: no raw error may escape
            return f"raw {type(e).__name__}: {e}"[:300]
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    x = torch.randn(5, sae.cfg.d_in, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = sae(x)
    if y.shape != (5, sae.cfg.output_dim) or not bool(torch.isfinite(y).all()):
        return f"silent: loaded but forward gives shape {tuple(y.shape)}, finite={bool(torch.isfinite(y).all())}"
    return "loaded"


@pytest.mark.parametrize("fmt", FORMATS)
def test_unmutated_base_loads(fmt: str) -> None:
    """The starting points are valid (else the fuzzing below would only test refusals)."""
    assert _load_and_classify(fmt, _base(fmt), detect=True) == "loaded"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutations=st.lists(_MUTATION, min_size=1, max_size=3), detect=st.booleans())
def test_mutated_folders_give_typed_errors_or_sane_saes(fmt: str, mutations: list, detect: bool) -> None:
    spec = _base(fmt)
    for m in mutations:
        _mutate(spec, m)
    outcome = _load_and_classify(fmt, spec, detect)
    OUTCOMES[fmt][outcome.split(":")[0]] += 1
    assert outcome in ("typed", "loaded"), (fmt, mutations, outcome)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if OUTCOMES:
        total = collections.Counter()
        for c in OUTCOMES.values():
            total.update(c)
        print(f"\nfuzz outcomes: {dict(total)} by format: { {k: dict(v) for k, v in OUTCOMES.items()} }")
