"""``sae-hooks train`` for every objective: several at once in one forward pass (``--sae`` groups, a
``--config`` file), multi-layer SAEs over ``*`` sites, Jacobian pairs, and ``--framework``; each checkpointed
and resumed bit-identically from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_hooks.app.cli import build_parser, main
from sae_hooks.app.train_plan import check_group, expand_site, groups_from_args, plan
from sae_hooks.errors import ConfigError

SMALL = ["--seq-len", "32", "--batch-size", "4", "--batch-tokens", "64", "--buffer-tokens", "256", "--no-progress",
         "--d-sae", "64", "--k", "4"]
GROUPS = [
    "--sae", "site=blocks.1.hook_resid_post,arch=topk",
    "--sae", "site=blocks.0.ln2.hook_out,site_out=blocks.0.hook_mlp_out,arch=topk,k=8",  # a transcoder
    "--sae", "arch=mlsae,site=blocks.*.hook_resid_post",  # one MLSAE over every layer
    "--sae", "objective=jsae,layer=1",  # a Jacobian pair around block 1's MLP
    "--sae", "site=transformer.h.1,arch=matryoshka,matryoshka_widths=16 32",
]
NAMES = {"blocks.1.hook_resid_post-topk-s0", "blocks.0.ln2.hook_out-topk-tc-s0", "mlsae-blocks.0.hook_resid_post-x4-s0",
         "jsae-L1-s0", "transformer.h.1-matryoshka-s0"}


def _parse(argv: list[str]):
    ap = build_parser()
    args = ap.parse_args(["train", "--out", "/tmp/unused", *argv])
    sub = next(a for a in ap._actions if a.dest == "command").choices["train"]
    return args, sub


def _groups(argv: list[str]):
    args, sub = _parse(argv)
    groups = groups_from_args(args, sub)
    for g in groups:
        check_group(g)
    return groups


# Parsing (no model) ------------------------------------------------------------------------------------


def test_sae_groups_take_flag_defaults_and_their_own_keys() -> None:
    g1, g2 = _groups(["--k", "16", "--lr", "0.001", "--sae", "site=a,arch=relu,l1=2", "--sae", "site=b c,k=8,seeds=1 2"])
    assert (g1["site"], g1["arch"], g1["k"], g1["l1"], g1["lr"]) == (["a"], "relu", 16, 2.0, 0.001)
    assert (g2["site"], g2["k"], g2["seeds"], g2["arch"]) == (["b", "c"], 8, [1, 2], "topk")
    assert g2.given == {"site": ["b", "c"], "k": 8, "seeds": [1, 2]}
    names = [p.name for p in plan([g1, g2], lambda s: True)]
    assert names == ["a-relu-s0", "b-topk-s1", "b-topk-s2", "c-topk-s1", "c-topk-s2"]


def test_a_config_file_is_the_same_as_sae_flags(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('k = 16\n\n[[sae]]\nsite = "blocks.1.hook_resid_post"\narch = "relu"\nl1 = 2.0\n\n'
                    '[[sae]]\narch = "mlsae"\nsite = ["blocks.*.hook_resid_post"]\nseeds = [3]\n\n'
                    '[[sae]]\nobjective = "jsae"\nlayer = 1\nname = "pair"\n')
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"k": 16, "sae": [
        {"site": "blocks.1.hook_resid_post", "arch": "relu", "l1": 2.0},
        {"arch": "mlsae", "site": ["blocks.*.hook_resid_post"], "seeds": [3]},
        {"objective": "jsae", "layer": 1, "name": "pair"}]}))
    flags = _groups(["--k", "16", "--sae", "site=blocks.1.hook_resid_post,arch=relu,l1=2.0",
                     "--sae", "arch=mlsae,site=blocks.*.hook_resid_post,seeds=3", "--sae", "objective=jsae,layer=1,name=pair"])
    layers = [f"blocks.{i}.hook_resid_post" for i in range(3)]
    exists = layers.__contains__
    want = [(p.name, p.objective, p.sites, p.site_out, p.seed) for p in plan(flags, exists)]
    assert want == [("blocks.1.hook_resid_post-relu-s0", "sae", ["blocks.1.hook_resid_post"], None, 0),
                    ("mlsae-blocks.0.hook_resid_post-x3-s3", "mlsae", layers, None, 3),
                    ("pair", "jsae", ["blocks.1.ln2.hook_out"], "blocks.1.hook_mlp_out", 0)]
    for path in (toml, as_json):
        groups = _groups(["--config", str(path)])
        assert [g.values for g in groups] == [g.values for g in flags]
        assert [(p.name, p.objective, p.sites, p.site_out, p.seed) for p in plan(groups, exists)] == want


@pytest.mark.parametrize("argv, words", [
    (["--sae", "site=a,kk=3"], ["unknown key 'kk'", "'k'"]),
    (["--sae", "site=a,steps=3"], ["setting of the whole run", "--steps"]),
    (["--sae", "site=a,seed=3"], ["seeds="]),
    (["--sae", "site=a,k=0"], ["k='0'", "--k"]),
    (["--sae", "site=a,arch=sparse"], ["'sparse'", "--arch"]),
    (["--sae", "site=a,k"], ["not key=value"]),
    (["--sae", "site=a,k=3,k=4"], ["given twice"]),
    (["--sae", "site=a,d_sae=4,k=8"], ["--k (8)", "--d-sae (4)"]),
    (["--sae", "objective=jsae"], ["--layer"]),
    (["--sae", "objective=jsae,layer=1,arch=relu"], ["two TopK SAEs"]),
    (["--sae", "arch=mlsae,optimizer=pam-sgd"], ["adam"]),
    (["--sae", "site=a,layer=2"], ["--layer", "jsae"]),
    (["--site", "a", "--sae", "site=b"], ["inside each --sae group"]),
])
def test_bad_groups_are_refused_naming_the_key(argv: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        _groups(argv)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_colliding_names_take_the_keys_their_group_set() -> None:
    groups = _groups(["--sae", "site=a,k=8", "--sae", "site=a,k=16"])
    assert [p.name for p in plan(groups, lambda s: True)] == ["a-topk-s0-k8", "a-topk-s0-k16"]
    with pytest.raises(ConfigError, match="name="):
        plan(_groups(["--sae", "site=a", "--sae", "site=a"]), lambda s: True)


def test_star_is_every_layer_index() -> None:
    have = {"blocks.0.x", "blocks.1.x", "blocks.2.x", "blocks.4.x"}
    assert expand_site("blocks.*.x", have.__contains__) == ["blocks.0.x", "blocks.1.x", "blocks.2.x"]
    assert expand_site("blocks.4.x", have.__contains__) == ["blocks.4.x"]
    with pytest.raises(Exception, match="no site matches"):
        expand_site("layers.*.x", have.__contains__)


# Training on the embedded model ----------------------------------------------------------------------------


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{f.relative_to(folder)}/{k}": v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
def test_every_objective_in_one_forward_pass_resumes_bit_identically(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    from sae_hooks.app import models
    from sae_hooks.train.sources import ActivationReader

    forwards, reads = [], []
    load = models.load_causal_lm

    def counting_load(*a, **k):  # noqa: ANN002, ANN003, ANN202
        model, tok = load(*a, **k)
        model.register_forward_pre_hook(lambda *_: forwards.append(1))
        return model, tok

    read = ActivationReader.read

    def counting_read(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        reads.append(tuple(self.sites))
        return read(self, *a, **k)

    monkeypatch.setattr(models, "load_causal_lm", counting_load)
    monkeypatch.setattr(ActivationReader, "read", counting_read)
    ck = tmp_path / "ck"  # the state at step 3 of the 5-step run: what a run stopped there leaves
    assert main(["train", *SMALL, *GROUPS, "--steps", "5", "--checkpoint-dir", str(ck), "--checkpoint-every", "3",
                 "--out", str(tmp_path / "full")]) == 0
    assert {p.name for p in (tmp_path / "full").iterdir()} == NAMES
    # ONE forward pass per batch for all five models: each read runs the model once, and the source's
    # reader holds every site all models need
    assert len(forwards) == len(reads)
    everything = max(reads, key=len)
    assert set(everything) == {"blocks.1.hook_resid_post", "blocks.0.ln2.hook_out", "blocks.0.hook_mlp_out",
                               *(f"blocks.{i}.hook_resid_post" for i in range(4)), "blocks.1.ln2.hook_out",
                               "transformer.h.1"}
    assert reads.count(everything) >= 3  # 5 steps x 64 tokens, batches of 4 x 31 tokens (BOS dropped)
    assert json.loads((ck / "trainer.json").read_text())["step"] == 3
    assert main(["train", *SMALL, *GROUPS, "--steps", "5", "--resume", str(ck), "--out", str(tmp_path / "resumed")]) == 0
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    assert full.keys() == resumed.keys() and len(full) == 4 + 4 + 3 + 4 + 4 + 4 + 5  # tc, sae, mlsae, pair (2 SAEs + MLP), matryoshka
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    from sae_hooks import load_native
    from sae_hooks.saes.jacobian import JacobianSAEPair

    mlsae = load_native(tmp_path / "full" / "mlsae-blocks.0.hook_resid_post-x4-s0")
    assert mlsae.cfg.architecture == "mlsae" and mlsae.layers == [0, 1, 2, 3]
    pair = JacobianSAEPair.load(tmp_path / "full" / "jsae-L1-s0")
    assert (pair.cfg.layer, pair.cfg.hook_in, pair.cfg.hook_out) == (1, "blocks.1.ln2.hook_out", "blocks.1.hook_mlp_out")
    assert pair.cfg.metadata["training"]["steps"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["transformer-lens", "nnsight"])
def test_framework_runs_train_the_same_sae_as_torch(tmp_path: Path, framework: str) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("transformer_lens" if framework == "transformer-lens" else "nnsight")
    args = [*SMALL, "--site", "blocks.1.hook_resid_post", "--steps", "4"]
    assert main(["train", *args, "--out", str(tmp_path / "torch")]) == 0
    assert main(["train", *args, "--framework", framework, "--out", str(tmp_path / "fw")]) == 0
    ref, got = _weights(tmp_path / "torch"), _weights(tmp_path / "fw")
    assert ref.keys() == got.keys() and ref
    for k in ref:  # the bridge runs its own attention kernel: float rounding only (relative to each tensor's norm)
        rel = (got[k] - ref[k]).norm() / ref[k].norm()
        assert rel < 1e-4, (framework, k, rel.item())  # another site or data: ~1


def test_the_documented_groups_and_config_plan(tmp_path: Path) -> None:
    """docs/training.md's multi-objective command and TOML config parse and plan as documented."""
    import re
    import shlex

    doc = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    bash = re.search(r"sae-hooks train --k 32 \\\n(.*?)--out runs/", doc, flags=re.S).group(1)
    argv = ["--k", "32", *shlex.split(bash.replace("\\\n", " "))]
    layers = [f"blocks.{i}.hook_resid_post" for i in range(4)]
    exists = {*layers, "blocks.0.ln2.hook_out", "blocks.0.hook_mlp_out"}.__contains__
    names = [p.name for p in plan(_groups(argv), exists)]
    assert names == ["blocks.1.hook_resid_post-topk-s0", "blocks.1.hook_resid_post-jumprelu-s0",
                     "blocks.0.ln2.hook_out-topk-tc-s0", "mlsae-blocks.0.hook_resid_post-x4-s0", "jsae-L2-s0", "jsae-L2-s1"]
    toml = tmp_path / "sweep.toml"
    toml.write_text(re.search(r"```toml\n(.*?)```", doc, flags=re.S).group(1))
    planned = plan(_groups(["--config", str(toml)]), exists)
    assert [p.name for p in planned] == [f"{s}-topk-s0" for s in layers] + ["mlsae-blocks.0.hook_resid_post-x4-s0", "pair-l2"]
    assert {p.group["k"] for p in planned} == {32} and {p.group["expansion"] for p in planned} == {16}


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "llama"])
def test_cli_pairs_take_gemmas_post_mlp_norm(family: str) -> None:
    """``--objective jsae --layer L`` on a Gemma model: the pair's output site ``hook_mlp_out`` is after the
    post-MLP norm, so the frozen MLP the CLI builds must be that norm after the MLP (elsewhere: the MLP). Truth:
    the model's own activations at the pair's sites, read by forward hooks."""
    pytest.importorskip("transformers")
    from conftest import hf_family_cases, randomize_norms
    from sae_hooks.app.commands.train import _pair_mlps
    from sae_hooks.saes.jacobian import make_jsae_pair
    from sae_hooks.sites import ModuleSites
    from sae_hooks.train.jsae import check_mlp_input

    cfg, cls, _ = hf_family_cases()[family]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    randomize_norms(model, seed=3)  # the post-MLP norm's scale is far from 1
    planned = plan(_groups(["--objective", "jsae", "--layer", "1"]), lambda s: True)
    mlps = _pair_mlps(model, planned)
    frozen = mlps[planned[0].name]
    assert bool(frozen.post_norm) == family.startswith("gemma")
    sites = ModuleSites(model)
    acts = {}
    handles = []
    for site in (planned[0].sites[0], planned[0].site_out):
        module, _, side = sites.module_site(site)
        assert side == "output"
        handles.append(module.register_forward_hook(lambda m, i, o, s=site: acts.__setitem__(s, o)))
    tokens = torch.randint(1, 100, (2, 12))
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    got = frozen(acts[planned[0].sites[0]])
    want = acts[planned[0].site_out]
    assert (got - want).norm() / want.norm() < 1e-5
    pair = make_jsae_pair(frozen, 1, 64, 4, hook_in=planned[0].sites[0], hook_out=planned[0].site_out)
    assert check_mlp_input(model, pair, tokens) < 1e-3
