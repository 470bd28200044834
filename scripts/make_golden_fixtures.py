#!/usr/bin/env python3
"""Build golden fixtures with the reference SAE libraries themselves.

Each reference library (SAELens, EleutherAI sparsify, dictionary_learning) gets its own
virtual environment under ``<repo>/.venv-ref-<lib>/`` (git-ignored).  ``torch==2.13.0`` is
installed first (on the project machines it resolves to the local CPU wheel) and then the
library with torch pinned by a constraints file, so pip can never swap in a CUDA build.
The generator part of this same file then runs *inside* that venv, saves tiny SAEs through
the library's own save path and records the library's own encode/decode outputs.

Usage (from the repo root)::

    python3 scripts/make_golden_fixtures.py                 # all libraries
    python3 scripts/make_golden_fixtures.py saelens sparsify # a subset
    python3 scripts/make_golden_fixtures.py --no-install     # reuse the venvs as they are

Output: ``tests/fixtures/golden/<library>/<fixture>/...`` plus
``tests/fixtures/golden/manifest.json`` (entries of libraries not regenerated are kept).

The orchestrator needs only the standard library; the ``--generate LIB`` entry point is
what runs inside each venv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "fixtures" / "golden"
TORCH_SPEC = "torch==2.13.0"

# library key -> (venv dir name, pip specs installed after torch, post-install removals)
LIBS: dict[str, dict] = {
    "saelens": {
        "venv": ".venv-ref-saelens",
        "specs": ["sae-lens==6.54.12", "transformer-lens==3.9.0"],
        "remove": [],
        "out": "saelens",
    },
    "sparsify": {
        "venv": ".venv-ref-sparsify",
        "specs": ["eai-sparsify==1.3.3"],
        "remove": [],
        "out": "sparsify",
    },
    "dictionary_learning": {
        "venv": ".venv-ref-dictlearn",
        # 0.1.0 is the only release on PyPI; it pins nnsight>=0.3,<0.4.
        "specs": ["dictionary-learning==0.1.0", "nnsight<0.4"],
        # nnsight 0.3.x depends on torchvision; the PyPI torchvision wheel does not match
        # the local torch 2.13.0+cpu build ("operator torchvision::nms does not exist"),
        # which breaks `import transformers`.  Nothing we run needs torchvision.
        "remove": ["torchvision"],
        "out": "dictionary_learning",
    },
}


# --------------------------------------------------------------------------------------
# orchestration (system python, stdlib only)
# --------------------------------------------------------------------------------------


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def _check_torch_resolution(pip: str) -> None:
    """Refuse to go on if torch==2.13.0 would resolve to anything but a CPU wheel."""
    with tempfile.TemporaryDirectory() as td:
        report = Path(td) / "report.json"
        _run([pip, "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
              "--report", str(report), TORCH_SPEC])
        data = json.loads(report.read_text())
    for item in data.get("install", []):
        if item["metadata"]["name"].lower() == "torch":
            url = item.get("download_info", {}).get("url", "")
            version = item["metadata"]["version"]
            if "+cpu" not in version and "cpu" not in url:
                raise SystemExit(
                    f"refusing to install torch: {TORCH_SPEC} resolves to {url!r} "
                    f"(version {version}), which is not a CPU wheel"
                )
            print(f"torch resolves to {version} ({url})")


def ensure_venv(lib: str, install: bool) -> Path:
    spec = LIBS[lib]
    venv = REPO / spec["venv"]
    py = venv / "bin" / "python"
    pip = str(venv / "bin" / "pip")
    marker = venv / ".golden-installed"
    wanted = json.dumps({"torch": TORCH_SPEC, "specs": spec["specs"], "remove": spec["remove"]})
    if not py.exists():
        if not install:
            raise SystemExit(f"{venv} does not exist; run without --no-install")
        _run([sys.executable, "-m", "venv", str(venv)])
    if install and (not marker.exists() or marker.read_text() != wanted):
        _check_torch_resolution(pip)
        _run([pip, "install", "--prefer-binary", TORCH_SPEC])
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as cf:
            cf.write(TORCH_SPEC + "\n")
        try:
            _run([pip, "install", "--prefer-binary", "-c", cf.name, *spec["specs"]])
        finally:
            os.unlink(cf.name)
        if spec["remove"]:
            _run([pip, "uninstall", "-y", *spec["remove"]])
        out = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"],
                             check=True, capture_output=True, text=True).stdout.strip()
        if out != "2.13.0+cpu":
            raise SystemExit(f"{venv}: torch is {out}, expected 2.13.0+cpu")
        marker.write_text(wanted)
    return py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("libs", nargs="*", help=f"subset of {sorted(LIBS)} (default: all)")
    ap.add_argument("--no-install", action="store_true", help="reuse existing venvs as they are")
    ap.add_argument("--self-check", action="store_true",
                    help="re-derive every fixture's golden outputs from the raw files with plain torch "
                         "(run with an interpreter that has torch + safetensors, e.g. .venv/bin/python)")
    ap.add_argument("--generate", metavar="LIB", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--manifest-fragment", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.self_check:
        raise SystemExit(1 if self_check() else 0)
    if args.generate:
        GENERATORS[args.generate](Path(args.out), Path(args.manifest_fragment))
        return

    aliases = {"sae_lens": "saelens", "sae-lens": "saelens", "dictlearn": "dictionary_learning",
               "dictionary-learning": "dictionary_learning", "eai-sparsify": "sparsify"}
    libs = [aliases.get(x, x) for x in (args.libs or list(LIBS))]
    for lib in libs:
        if lib not in LIBS:
            raise SystemExit(f"unknown library {lib!r}; choose from {sorted(LIBS)}")

    GOLDEN.mkdir(parents=True, exist_ok=True)
    manifest_path = GOLDEN / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.setdefault("format_version", 1)
    manifest.setdefault("environments", {})
    manifest.setdefault("fixtures", [])

    for lib in libs:
        py = ensure_venv(lib, install=not args.no_install)
        out = GOLDEN / LIBS[lib]["out"]
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        with tempfile.TemporaryDirectory() as td:
            frag = Path(td) / "fragment.json"
            env = dict(os.environ, PYTHONHASHSEED="0", WANDB_MODE="disabled",
                       HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                       SPARSIFY_DISABLE_TRITON="1", OMP_NUM_THREADS="1")
            _run([str(py), str(Path(__file__).resolve()), "--generate", lib,
                  "--out", str(out), "--manifest-fragment", str(frag)], env=env, cwd=str(REPO))
            fragment = json.loads(frag.read_text())
        manifest["environments"][lib] = fragment["environment"]
        manifest["fixtures"] = [f for f in manifest["fixtures"] if f["library"] != lib]
        manifest["fixtures"].extend(fragment["fixtures"])

    order = list(LIBS)
    manifest["fixtures"].sort(key=lambda f: (order.index(f["library"]), f["name"]))
    manifest["environments"] = {k: manifest["environments"][k] for k in order if k in manifest["environments"]}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    print(f"wrote {len(manifest['fixtures'])} fixtures; {GOLDEN} is {total / 1024:.1f} KiB")
    if total > 2 * 1024 * 1024:
        raise SystemExit("golden fixtures exceed 2 MB")


# --------------------------------------------------------------------------------------
# helpers used inside the venvs (torch + safetensors available)
# --------------------------------------------------------------------------------------

D_IN, D_SAE, D_OUT, K = 8, 16, 6, 3


def _pkg_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _environment(packages: list[str]) -> dict:
    import platform

    env = {p: _pkg_version(p) for p in packages}
    env["python"] = platform.python_version()
    return env


class Recorder:
    """Collects manifest entries and writes golden safetensors files."""

    def __init__(self, out: Path, library: str, library_version: str):
        self.out = out
        self.library = library
        self.library_version = library_version
        self.fixtures: list[dict] = []

    def save_golden(self, path: Path, tensors: dict, meta: dict | None = None) -> None:
        from safetensors.torch import save_file

        t = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
        # a single metadata key: safetensors writes metadata from a hash map, so several keys
        # come out in a random order and the file would not be byte-identical across runs
        meta = meta or {}
        save_file(t, str(path), metadata={"generated_by": f"{meta.get('library')} {meta.get('version')}"})

    def add(self, *, name: str, architecture: str, sae_dir: Path, golden: Path,
            dtype: str, notes: list[str], canonical: str, extra: dict | None = None,
            golden_tensors: dict | None = None) -> None:
        from safetensors import safe_open

        files = sorted(str(p.relative_to(sae_dir)) for p in sae_dir.rglob("*") if p.is_file()
                       and not p.name.startswith("golden"))
        shapes = {}
        with safe_open(str(golden), framework="pt") as f:
            for k in f.keys():
                tt = f.get_tensor(k)
                shapes[k] = {"shape": list(tt.shape), "dtype": str(tt.dtype).replace("torch.", "")}
        entry = {
            "name": name,
            "library": self.library,
            "library_version": self.library_version,
            "architecture": architecture,
            "canonical_architecture": canonical,
            "path": str(sae_dir.relative_to(GOLDEN_ROOT)),
            "files": files,
            "golden": str(golden.relative_to(GOLDEN_ROOT)),
            "golden_tensors": shapes,
            "dtype": dtype,
            "notes": notes,
        }
        if golden_tensors:
            entry["golden_tensor_notes"] = golden_tensors
        if extra:
            entry.update(extra)
        self.fixtures.append(entry)

    def write(self, fragment: Path, environment: dict) -> None:
        fragment.write_text(json.dumps({"environment": environment, "fixtures": self.fixtures}, indent=2))


GOLDEN_ROOT = GOLDEN


def _gen(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale=1.0):
    import torch

    return torch.randn(*shape, generator=g, dtype=torch.float32) * scale


def _uniform(g, *shape, lo=0.0, hi=1.0):
    import torch

    return torch.rand(*shape, generator=g, dtype=torch.float32) * (hi - lo) + lo


def make_x(seed: int, shape: tuple[int, ...], d: int):
    """Inputs with a shared offset so that b_dec subtraction / norm handling matter."""
    g = _gen(seed)
    offset = _randn(g, d, scale=0.7)
    return _randn(g, *shape, d) + offset


def mid_thresholds(pre, seed: int, min_thr: float = 0.02):
    """Per-latent thresholds half-way between two observed pre-activations.

    Every latent gets a threshold that some inputs pass and some do not (when the latent has
    at least two positive pre-activations), with a margin so fp32 noise cannot flip the cut.
    """
    import torch

    g = _gen(seed)
    flat = pre.reshape(-1, pre.shape[-1])
    n = flat.shape[0]
    thr = torch.empty(flat.shape[-1])
    for j in range(flat.shape[-1]):
        s = flat[:, j].sort().values
        pos = s[s > 0]
        if len(pos) >= 2:
            i = int(torch.randint(0, len(pos) - 1, (1,), generator=g))
            t = float(pos[i] + pos[i + 1]) / 2
        elif len(pos) == 1:
            t = float(pos[0]) / 2
        else:
            t = min_thr
        thr[j] = max(t, min_thr)
    margin = (flat - thr).abs().min().item()
    assert margin > 1e-4, f"threshold margin too small: {margin}"
    assert n > 0
    return thr


def topk_gap(pre, k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th largest value per row (tie safety)."""
    flat = pre.reshape(-1, pre.shape[-1])
    s = flat.sort(dim=-1, descending=True).values
    return float((s[:, k - 1] - s[:, k]).min())


# --------------------------------------------------------------------------------------
# SAELens
# --------------------------------------------------------------------------------------


def generate_saelens(out: Path, fragment: Path) -> None:
    import torch
    import sae_lens
    from sae_lens import SAE
    from sae_lens.saes.sae import SAEMetadata
    from safetensors.torch import save_file

    torch.manual_seed(0)
    rec = Recorder(out, "saelens", sae_lens.__version__)
    X_SHAPE = (5, 3)

    def metadata(transcoder: bool = False) -> SAEMetadata:
        if transcoder:
            return SAEMetadata(model_name="tiny-model", hook_name="blocks.0.ln2.hook_normalized",
                               hook_name_out="blocks.0.hook_mlp_out", context_size=16, prepend_bos=True)
        return SAEMetadata(model_name="tiny-model", hook_name="blocks.0.hook_resid_pre",
                           context_size=16, prepend_bos=True)

    def fill(sae, seed: int, dec_norm_range=(0.5, 2.0)):
        g = _gen(seed)
        with torch.no_grad():
            for name, p in sae.named_parameters():
                if name == "W_enc":
                    p.copy_(_randn(g, *p.shape, scale=1.5 / p.shape[0] ** 0.5))
                elif name == "W_dec":
                    w = _randn(g, *p.shape)
                    w = w / w.norm(dim=-1, keepdim=True)
                    w = w * _uniform(g, p.shape[0], 1, lo=dec_norm_range[0], hi=dec_norm_range[1])
                    p.copy_(w)
                elif name == "W_skip":
                    p.copy_(_randn(g, *p.shape, scale=0.2))
                elif name in ("b_enc", "b_gate", "b_mag"):
                    p.copy_(_randn(g, *p.shape, scale=0.3))
                elif name == "b_dec":
                    p.copy_(_randn(g, *p.shape, scale=0.3))
                elif name == "r_mag":
                    p.copy_(_randn(g, *p.shape, scale=0.3))
                elif name == "threshold":
                    pass  # set from observed pre-activations below
                else:
                    raise AssertionError(f"unhandled parameter {name}")

    def pre_acts(sae, x):
        with torch.no_grad():
            sae_in = sae.process_sae_in(x)
            return sae_in @ sae.W_enc + sae.b_enc

    def reference(sae_dir: Path, x) -> tuple[dict, object]:
        sae = SAE.load_from_disk(str(sae_dir), device="cpu")
        sae.eval()
        with torch.no_grad():
            latents = sae.encode(x)
            decoded = sae.decode(latents)
            recon = sae(x)
        return {"x": x, "latents": latents, "recon": recon, "decoded": decoded}, sae

    def record(name, sae_dir: Path, x, notes, canonical, extra_tensors=None, golden_notes=None,
               extra=None):
        tensors, loaded = reference(sae_dir, x)
        if extra_tensors:
            tensors.update(extra_tensors(loaded, x))
        golden = sae_dir / "golden.safetensors"
        rec.save_golden(golden, tensors, {"library": "sae_lens", "version": sae_lens.__version__})
        cfg = json.loads((sae_dir / "cfg.json").read_text())
        gn = {
            "x": "input, leading batch shape (5, 3)",
            "latents": "SAE.load_from_disk(dir).encode(x) (dense, shape (..., d_sae))",
            "decoded": "sae.decode(latents) (no skip connection term)",
            "recon": "sae(x) == forward (transcoders with W_skip add x @ W_skip.T here)",
        }
        gn.update(golden_notes or {})
        ex = {"loaded_class": type(loaded).__name__, "cfg_architecture": cfg.get("architecture")}
        ex.update(extra or {})
        rec.add(name=name, architecture=cfg.get("architecture") or f"legacy:{cfg.get('activation_fn_str', 'relu')}", sae_dir=sae_dir,
                golden=golden, dtype="float32", notes=notes, canonical=canonical,
                golden_tensors=gn, extra=ex)
        act = (tensors["latents"] > 0).float().mean().item()
        print(f"[saelens] {name}: {type(loaded).__name__} frac_active={act:.2f}")

    def build(arch: str, cfg_kwargs: dict, seed: int, training: bool = False):
        from sae_lens.registry import get_sae_class, get_sae_training_class

        cls, cfg_cls = (get_sae_training_class if training else get_sae_class)(arch)
        cfg = cfg_cls(**cfg_kwargs)
        sae = cls(cfg)
        fill(sae, seed)
        return sae

    def set_thresholds(sae, x, seed):
        with torch.no_grad():
            sae.threshold.copy_(mid_thresholds(pre_acts(sae, x), seed))

    base = dict(d_in=D_IN, d_sae=D_SAE)

    # ---- inference SAEs saved with save_model --------------------------------------
    specs = [
        ("standard", "standard", dict(apply_b_dec_to_input=False), "relu",
         ["StandardSAE: acts = relu((x - b_dec*apply_b_dec_to_input) @ W_enc + b_enc); recon = acts @ W_dec + b_dec",
          "apply_b_dec_to_input=false here"]),
        ("standard_apply_b_dec", "standard", dict(apply_b_dec_to_input=True), "relu",
         ["apply_b_dec_to_input=true: b_dec is subtracted from the input before W_enc"]),
        ("standard_layer_norm", "standard", dict(apply_b_dec_to_input=True, normalize_activations="layer_norm"), "relu",
         ["normalize_activations='layer_norm': x' = (x - mean) / (std + 1e-5) with torch.std (UNBIASED, N-1) over the last dim,"
          " applied BEFORE b_dec subtraction; decode output is de-normalised: out * std + mean (same per-token mu/std, no eps)"]),
        ("standard_constant_norm_rescale", "standard", dict(apply_b_dec_to_input=True, normalize_activations="constant_norm_rescale"), "relu",
         ["normalize_activations='constant_norm_rescale': c = sqrt(d_in) / ||x||_2 (last dim), x' = x * c before b_dec subtraction;"
          " decode output divided by c (no eps)"]),
        ("topk", "topk", dict(k=K, rescale_acts_by_decoder_norm=False), "topk",
         ["TopKSAE k=3: pre = x' @ W_enc + b_enc; acts = scatter(topk(pre, k).values.relu()) (relu AFTER selection);"
          " W_dec rows have non-unit norms (0.5..2)"]),
        ("topk_rescale", "topk", dict(k=K, rescale_acts_by_decoder_norm=True), "topk",
         ["TopKSAE k=3 with rescale_acts_by_decoder_norm=true and NON-unit W_dec rows saved with save_model (no folding):"
          " encode: pre *= ||W_dec[i]||, then topk+relu; decode: (acts / ||W_dec[i]||) @ W_dec + b_dec.",
          "latents are therefore in 'unit-decoder' units"]),
        ("jumprelu", "jumprelu", dict(apply_b_dec_to_input=False), "jumprelu",
         ["JumpReLUSAE: pre = x' @ W_enc + b_enc; acts = relu(pre) * (pre > threshold) (strict >)",
          "thresholds chosen half-way between observed pre-activations: some latents cut, some pass"]),
        ("gated", "gated", dict(apply_b_dec_to_input=True), "gated",
         ["GatedSAE: gate = (x' @ W_enc + b_gate > 0); mag = relu(x' @ (W_enc * exp(r_mag)) + b_mag); acts = gate * mag;"
          " recon = acts @ W_dec + b_dec. No b_enc tensor."]),
        ("transcoder", "transcoder", dict(d_out=D_OUT, apply_b_dec_to_input=False), "transcoder",
         ["Transcoder d_in=8 -> d_out=6: never subtracts b_dec from the input; W_dec (d_sae, d_out), b_dec (d_out)"]),
        ("skip_transcoder", "skip_transcoder", dict(d_out=D_OUT, apply_b_dec_to_input=False), "skip_transcoder",
         ["SkipTranscoder: forward = decode(encode(x)) + x @ W_skip.T with W_skip (d_out, d_in); decode() alone has NO skip term"]),
        ("jumprelu_transcoder", "jumprelu_transcoder", dict(d_out=D_OUT, apply_b_dec_to_input=False), "jumprelu_transcoder",
         ["JumpReLUTranscoder: jumprelu encode, transcoder decode"]),
        ("jumprelu_skip_transcoder", "jumprelu_skip_transcoder", dict(d_out=D_OUT, apply_b_dec_to_input=False), "jumprelu_skip_transcoder",
         ["JumpReLUSkipTranscoder: jumprelu encode; forward adds x @ W_skip.T"]),
    ]
    for i, (name, arch, kw, canonical, notes) in enumerate(specs):
        transcoder = "transcoder" in arch
        x = make_x(100 + i, X_SHAPE, D_IN)
        sae = build(arch, {**base, **kw, "metadata": metadata(transcoder)}, seed=1000 + i)
        if hasattr(sae, "threshold"):
            set_thresholds(sae, x, 2000 + i)
        if arch == "topk":
            with torch.no_grad():
                pre = pre_acts(sae, x)
                if kw["rescale_acts_by_decoder_norm"]:
                    pre = pre * sae.W_dec.norm(dim=-1)
            assert topk_gap(pre, K) > 1e-4
        d = out / name
        sae.save_model(str(d))
        record(name, d, x, notes + ["saved with SAE.save_model; reference from SAE.load_from_disk"], canonical)

    # ---- training SAEs saved with save_inference_model --------------------------------
    train_specs = [
        ("topk_training_saved_inference", "topk", dict(k=K, rescale_acts_by_decoder_norm=True), "topk",
         ["TopKTrainingSAE (rescale_acts_by_decoder_norm=true, non-unit W_dec) saved with save_inference_model:"
          " decoder norms are FOLDED on save (W_dec rows unit norm, W_enc and b_enc scaled by the norms); cfg keeps"
          " rescale_acts_by_decoder_norm=true (a no-op on unit rows)"]),
        ("batchtopk_saved_inference", "batchtopk", dict(k=float(K)), "jumprelu",
         ["BatchTopKTrainingSAE saved with save_inference_model -> cfg.architecture 'jumprelu';"
          " threshold = ones(d_sae) * topk_threshold; decoder norms folded (rescale_acts_by_decoder_norm=true by default);"
          " metadata.training_architecture = 'batchtopk'"]),
        ("matryoshka_batchtopk_saved_inference", "matryoshka_batchtopk", dict(k=float(K), matryoshka_widths=[4, 8, 16]), "jumprelu",
         ["MatryoshkaBatchTopKTrainingSAE (widths 4,8,16) saved with save_inference_model -> 'jumprelu'"
          " (same conversion as batchtopk; the matryoshka widths live only in metadata.training_architecture_details)"]),
    ]
    for i, (name, arch, kw, canonical, notes) in enumerate(train_specs):
        x = make_x(200 + i, X_SHAPE, D_IN)
        sae = build(arch, {**base, **kw, "metadata": metadata()}, seed=3000 + i, training=True)
        if arch != "topk":
            with torch.no_grad():
                pre = pre_acts(sae, x) * sae.W_dec.norm(dim=-1)
                pos = pre[pre > 0]
                vals = pos.sort().values
                m = len(vals) // 2
                sae.topk_threshold.fill_(float(vals[m - 1] + vals[m]) / 2)
        d = out / name
        sae.save_inference_model(str(d))
        record(name, d, x, notes + ["reference from SAE.load_from_disk on the saved inference folder"], canonical)

    # ---- pre-6.0 (v5-style) configs written by hand, loaded by SAELens's own loader ---
    # weights of a StandardSAE / TopKSAE written with safetensors.save_file directly, because
    # SAELens 6 cannot write the legacy flat config.
    legacy = [
        ("v5_standard", "standard", dict(apply_b_dec_to_input=True), {
            "model_name": "tiny-model", "model_class_name": "HookedTransformer",
            "hook_point": "blocks.0.hook_resid_pre", "hook_point_eval": "blocks.{layer}.attn.pattern",
            "hook_point_layer": 0, "hook_point_head_index": None,
            "dataset_path": "NeelNanda/pile-10k", "is_dataset_tokenized": False, "context_size": 16,
            "use_cached_activations": False, "cached_activations_path": None,
            "d_in": D_IN, "d_sae": D_SAE, "expansion_factor": 2, "b_dec_init_method": "geometric_median",
            "activation_fn_str": "relu", "activation_fn_kwargs": {}, "apply_b_dec_to_input": True,
            "normalize_activations": False, "noise_scale": 0.0, "device": "cpu", "seed": 42,
            "dtype": "torch.float32", "prepend_bos": True, "finetuning_scaling_factor": False,
            "sae_lens_version": "3.13.0", "sae_lens_training_version": "3.13.0",
        }, True, "relu",
         ["hand-written pre-6.0 cfg.json (sae_lens_version 3.13.0): hook_point, hook_point_layer, activation_fn_str='relu',"
          " boolean normalize_activations=false (-> 'none'), dtype 'torch.float32'",
          "weights file also holds a legacy all-ones 'scaling_factor' (d_sae) tensor that SAELens drops on load"]),
        ("v5_topk", "topk", dict(k=K, rescale_acts_by_decoder_norm=False), {
            "model_name": "tiny-model", "hook_point": "blocks.0.hook_resid_post", "hook_point_layer": 0,
            "hook_point_head_index": None, "d_in": D_IN, "d_sae": D_SAE, "expansion_factor": 2,
            "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True,
            "normalize_activations": "none", "device": "cpu", "dtype": "float32", "context_size": 16,
            "prepend_bos": True, "finetuning_scaling_factor": False,
            "sae_lens_version": "4.4.5", "sae_lens_training_version": "4.4.5",
        }, False, "topk",
         ["hand-written pre-6.0 cfg.json: activation_fn_str='topk' + activation_fn_kwargs.k=3 -> TopKSAE(k=3,"
          " rescale_acts_by_decoder_norm=false); no 'architecture' key (defaulted)"]),
        ("v5_no_version_normalize_true", "standard", dict(apply_b_dec_to_input=False), {
            "d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.0.hook_mlp_out", "hook_point_layer": 0,
            "model_name": "tiny-model", "activation_fn_str": "relu", "apply_b_dec_to_input": False,
            "normalize_activations": True, "dtype": "float32", "device": "cpu",
        }, False, "relu",
         ["hand-written minimal legacy cfg with NO sae_lens_version -> legacy path; boolean normalize_activations=true"
          " becomes 'expected_average_only_in', which is the IDENTITY inside the SAE when loaded from disk (the norm"
          " scaling factor is only folded by from_pretrained from the release YAML); apply_b_dec_to_input=false"]),
    ]
    for i, (name, arch, kw, cfg_json, scaling, canonical, notes) in enumerate(legacy):
        x = make_x(300 + i, X_SHAPE, D_IN)
        sae = build(arch, {**base, **kw, "metadata": metadata()}, seed=4000 + i)
        d = out / name
        d.mkdir(parents=True)
        sd = {k: v.detach().clone().contiguous() for k, v in sae.state_dict().items()}
        if scaling:
            sd["scaling_factor"] = torch.ones(D_SAE)
        save_file(sd, str(d / "sae_weights.safetensors"))
        (d / "cfg.json").write_text(json.dumps(cfg_json))
        record(name, d, x, notes + ["reference from SAE.load_from_disk (legacy handle_pre_6_0_config path)"],
               canonical, extra={"hand_written_config": True})

    # ---- cross-check: SAELens's own sparsify disk loader (documented, not a reference) ---
    rec.write(fragment, _environment(["sae-lens", "transformer-lens", "transformers", "torch", "safetensors"]))


# --------------------------------------------------------------------------------------
# EleutherAI sparsify
# --------------------------------------------------------------------------------------


def generate_sparsify(out: Path, fragment: Path) -> None:
    import torch
    from sparsify import SparseCoder, SparseCoderConfig, Trainer, TrainConfig
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    version = _pkg_version("eai-sparsify")
    rec = Recorder(out, "sparsify", version)
    N = 7

    def tiny_model():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32, hidden_size=D_IN, intermediate_size=16, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return LlamaForCausalLM(cfg).eval()

    def dataset():
        g = _gen(7)
        ids = torch.randint(3, 32, (16, 12), generator=g)
        return Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")

    def train(run_dir: Path, sae_cfg, **kw):
        tc = TrainConfig(sae_cfg, batch_size=4, log_to_wandb=False, save_dir=str(run_dir.parent),
                         run_name=run_dir.name, lr_warmup_steps=1, **kw)
        Trainer(tc, dataset(), tiny_model()).fit()
        # keep the SAE folders and config.json; drop the optimizer/scheduler/state pickles
        for p in run_dir.glob("*.pt"):
            p.unlink()

    def perturb_biases(sae_dir: Path, seed: int):
        """A few signum steps leave encoder.bias tiny; make every term matter, save via sparsify."""
        sae = SparseCoder.load_from_disk(sae_dir)
        g = _gen(seed)
        with torch.no_grad():
            sae.encoder.bias.add_(_randn(g, *sae.encoder.bias.shape, scale=0.2).to(sae.dtype))
            sae.b_dec.add_(_randn(g, *sae.b_dec.shape, scale=0.2).to(sae.dtype))
            if sae.W_skip is not None:
                sae.W_skip.add_(_randn(g, *sae.W_skip.shape, scale=0.1).to(sae.dtype))
        sae.save_to_disk(sae_dir)

    def reference(sae_dir: Path, x, upcast: bool = False):
        sae = SparseCoder.load_from_disk(sae_dir, device="cpu")
        if upcast:
            sae = sae.float()
        xin = x.to(sae.dtype)
        with torch.no_grad():
            top_acts, top_indices, pre_acts = sae.encode(xin)
            decoded = sae.decode(top_acts, top_indices)
            fo = sae(xin)
        dense = torch.zeros(*pre_acts.shape, dtype=top_acts.dtype).scatter_(-1, top_indices, top_acts)
        if sae.cfg.activation == "topk" and sae.dtype == torch.float32:
            srt = pre_acts.sort(dim=-1, descending=True).values
            live = srt[:, sae.cfg.k - 1] > 0  # ties among zeros do not change the dense latents
            gap = (srt[:, sae.cfg.k - 1] - srt[:, sae.cfg.k])[live]
            assert gap.numel() == 0 or gap.min() > 1e-4, f"top-k tie risk in {sae_dir}: {gap.min()}"
        assert torch.equal(fo.latent_acts, top_acts) and torch.equal(fo.latent_indices, top_indices)
        return {"x": x, "latents": dense, "top_acts": top_acts, "top_indices": top_indices,
                "pre_acts": pre_acts, "decoded": decoded, "recon": fo.sae_out}, sae

    common_golden_notes = {
        "x": "input, shape (7, d_in) float32. sparsify's decode (F.embedding_bag) only accepts 2-D inputs,"
             " so there is no leading (batch, seq) shape here",
        "latents": "dense (7, d_sae): zeros scattered with top_acts at top_indices (sparsify itself returns only values+indices)",
        "top_acts": "EncoderOutput.top_acts (7, k) from SparseCoder.encode (torch.topk sorted=False: ORDER NOT MEANINGFUL)",
        "top_indices": "EncoderOutput.top_indices (7, k) int64, same order as top_acts",
        "pre_acts": "EncoderOutput.pre_acts = relu(x' @ encoder.weight.T + encoder.bias) (post-ReLU, pre-TopK)",
        "decoded": "SparseCoder.decode(top_acts, top_indices) = embedding_bag(W_dec rows) + b_dec (no skip term)",
        "recon": "SparseCoder.forward(x).sae_out (= decoded + x @ W_skip.T when skip_connection)",
    }

    def record(name, sae_dir: Path, golden: Path, x, notes, canonical, upcast=False, extra_tensors=None,
               golden_notes=None, extra=None, dtype="float32"):
        tensors, sae = reference(sae_dir, x, upcast=upcast)
        if extra_tensors:
            tensors.update(extra_tensors(sae_dir, x))
        rec.save_golden(golden, tensors, {"library": "eai-sparsify", "version": version})
        cfg = json.loads((sae_dir / "cfg.json").read_text())
        gn = dict(common_golden_notes)
        gn.update(golden_notes or {})
        ex = {"cfg": cfg, "hookpoint_dir": sae_dir.name}
        ex.update(extra or {})
        arch = cfg.get("activation", "topk") + ("+transcode" if cfg.get("transcode") else "") + (
            "+skip" if cfg.get("skip_connection") else "")
        rec.add(name=name, architecture=arch, sae_dir=sae_dir, golden=golden, dtype=dtype, notes=notes,
                canonical=canonical, golden_tensors=gn, extra=ex)
        print(f"[sparsify] {name}: d_sae={sae.num_latents} k={sae.cfg.k} dtype={sae.dtype}")

    base_notes = ["per-hookpoint folder: cfg.json (SparseCoderConfig.to_dict() + d_in) + sae.safetensors"
                  " (safetensors.torch.save_model: encoder.weight (d_sae,d_in), encoder.bias (d_sae), W_dec (d_sae,d_in),"
                  " b_dec (d_in) [, W_skip (d_in,d_in)])",
                  "SAE encode: x' = x - b_dec; pre = relu(x' @ encoder.weight.T + encoder.bias); top-k of pre (values, indices);"
                  " decode: sum_j top_acts_j * W_dec[idx_j] + b_dec"]

    # 1. real Trainer checkpoint: two hookpoints, one seed --------------------------------
    run = out / "topk_checkpoint"
    train(run, SparseCoderConfig(expansion_factor=2, k=K), layers=[0, 1])
    for j, hp in enumerate(["layers.0", "layers.1"]):
        perturb_biases(run / hp, 50 + j)
        x = make_x(500 + j, (N,), D_IN)
        record(f"topk_checkpoint/{hp}", run / hp, run / f"golden.{hp}.safetensors", x,
               base_notes + ["real sparsify Trainer run (tiny random Llama, 4 signum steps, layers=[0,1]);"
                             " run dir holds config.json (TrainConfig) + one folder per hookpoint; the optimizer/state *.pt"
                             " pickles were deleted; encoder.bias/b_dec got a seeded random offset after training and were"
                             " re-saved with SparseCoder.save_to_disk",
                             "cfg.json has num_latents=0 -> width = d_in * expansion_factor = 16"],
               "topk", extra={"checkpoint_root": str(run.relative_to(GOLDEN_ROOT))})

    # 2. multi-seed checkpoint: <hookpoint>/seed<N>/ ----------------------------------
    run = out / "topk_multiseed_checkpoint"
    train(run, SparseCoderConfig(expansion_factor=2, k=K), layers=[0], init_seeds=[0, 1])
    for j, seed in enumerate([0, 1]):
        sd = run / "layers.0" / f"seed{seed}"
        perturb_biases(sd, 60 + j)
        x = make_x(510 + j, (N,), D_IN)
        record(f"topk_multiseed_checkpoint/layers.0/seed{seed}", sd, run / f"golden.layers.0.seed{seed}.safetensors", x,
               base_notes + ["real sparsify Trainer run with init_seeds=[0,1]: sparsify names the SAEs"
                             " '<hookpoint>/seed<N>' so the layout is layers.0/seed0/{cfg.json,sae.safetensors};"
                             " SparseCoder.load_many cannot read this layout (it only iterates top-level dirs)"],
               "topk", extra={"checkpoint_root": str(run.relative_to(GOLDEN_ROOT))})

    # 3. transcoder (and skip transcoder) from the Trainer ----------------------------
    for j, (name, skip) in enumerate([("transcoder_checkpoint", False), ("skip_transcoder_checkpoint", True)]):
        run = out / name
        train(run, SparseCoderConfig(expansion_factor=2, k=K, transcode=True, skip_connection=skip),
              hookpoints=["layers.0.mlp"])
        sd = run / "layers.0.mlp"
        perturb_biases(sd, 70 + j)
        x = make_x(520 + j, (N,), D_IN)
        notes = ["transcoder (transcode=true): input is NOT shifted by b_dec; output width == d_in (sparsify transcoders"
                 " map d_in -> d_in: W_dec (d_sae, d_in), b_dec (d_in)); trained from the MLP input to the MLP output"]
        if skip:
            notes.append("skip_connection=true: W_skip (d_in, d_in); forward adds x @ W_skip.T (W_skip.mT) to the decoder"
                         " output; decode() alone does not")
        record(f"{name}/layers.0.mlp", sd, run / "golden.layers.0.mlp.safetensors", x,
               [base_notes[0]] + notes + ["real sparsify Trainer run, hookpoints=['layers.0.mlp'] (a folder name with a dot"
                                          " inside the module path)"],
               "skip_transcoder" if skip else "transcoder",
               extra={"checkpoint_root": str(run.relative_to(GOLDEN_ROOT))})

    # 4. skip-connection SAE (not a transcoder), built directly ---------------------------
    def direct(name, cfg, seed, dtype=torch.float32, hook="layers.0"):
        torch.manual_seed(seed)
        sae = SparseCoder(D_IN, cfg, device="cpu", dtype=torch.float32)
        g = _gen(seed)
        with torch.no_grad():
            sae.encoder.weight.copy_(_randn(g, *sae.encoder.weight.shape, scale=1.5 / D_IN ** 0.5))
            sae.encoder.bias.copy_(_randn(g, *sae.encoder.bias.shape, scale=0.3))
            w = _randn(g, *sae.W_dec.shape)
            sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            sae.b_dec.copy_(_randn(g, D_IN, scale=0.3))
            if sae.W_skip is not None:
                sae.W_skip.copy_(_randn(g, D_IN, D_IN, scale=0.2))
        sae = sae.to(dtype)
        root = out / name
        sae.save_to_disk(root / hook)
        return root, root / hook

    root, sd = direct("skip_sae", SparseCoderConfig(num_latents=D_SAE, k=K, skip_connection=True), 80)
    record("skip_sae/layers.0", sd, root / "golden.layers.0.safetensors", make_x(530, (N,), D_IN),
           base_notes + ["skip_connection=true on a plain SAE (transcode=false): encode subtracts b_dec; forward adds the"
                         " ORIGINAL x @ W_skip.T (not x - b_dec)", "built directly and saved with SparseCoder.save_to_disk;"
                         " cfg.json has num_latents=16 (non-zero)"], "topk+skip")

    # 5. GroupMax -------------------------------------------------------------------
    root, sd = direct("groupmax", SparseCoderConfig(activation="groupmax", num_latents=D_SAE, k=4), 81)
    record("groupmax/layers.0", sd, root / "golden.layers.0.safetensors", make_x(540, (N,), D_IN),
           base_notes[:1] + ["activation='groupmax', k=4: pre (d_sae=16) is split into k=4 CONTIGUOUS groups of 4"
                             " (pre.unflatten(-1, (k, -1))); each group contributes its max (after ReLU, so may be 0) and the"
                             " index offset group*d_sae/k; exactly k (value, index) pairs per token",
                             "sparsify computes the offsets from preacts.shape[1], so groupmax is only correct for 2-D input"],
           "groupmax")

    # 6. bf16 weights -------------------------------------------------------------------
    root, sd = direct("bf16", SparseCoderConfig(num_latents=D_SAE, k=K), 82, dtype=torch.bfloat16)

    def bf16_native(sae_dir, x):
        t, _ = reference(sae_dir, x, upcast=False)
        return {f"{k}_bf16": v for k, v in t.items() if k != "x"}

    record("bf16/layers.0", sd, root / "golden.layers.0.safetensors", make_x(550, (N,), D_IN),
           base_notes + ["weights saved as bfloat16 by save_to_disk (SparseCoder built in fp32, random weights, .to(bfloat16));"
                         " SparseCoder.load_from_disk picks the dtype of the first tensor in the file (bf16)",
                         "latents/recon/decoded/top_*/pre_acts: sparsify on the bf16 weights UPCAST to fp32 (sae.float()) with fp32 x"
                         " -> the atol 1e-5 target for a loader that upcasts",
                         "*_bf16 tensors: sparsify run natively in bf16 on CPU (x.to(bfloat16), bf16 weights); stored as bf16;"
                         " compare with a bf16-level tolerance (~1e-2 relative)"],
           "topk", upcast=True, extra_tensors=bf16_native, dtype="bfloat16",
           golden_notes={"latents_bf16": "dense latents from the native bf16 run (bf16)",
                         "recon_bf16": "forward().sae_out from the native bf16 run (bf16)"})

    # 7. older layout: layer_<N> folder names and the old cfg.json ------------------------
    src = out / "topk_checkpoint"
    root = out / "legacy_layer_naming"
    root.mkdir()
    for j in range(2):
        dst = root / f"layer_{j}"
        dst.mkdir()
        shutil.copy(src / f"layers.{j}" / "sae.safetensors", dst / "sae.safetensors")
        old = json.loads((src / f"layers.{j}" / "cfg.json").read_text())
        # pre-2025 EleutherAI/sae cfg: no activation/multi_topk/skip_connection/transcode keys,
        # a 'signed' flag, and num_latents written out.
        legacy_cfg = {"expansion_factor": old["expansion_factor"], "normalize_decoder": True,
                      "num_latents": D_SAE, "k": old["k"], "signed": False, "d_in": old["d_in"]}
        (dst / "cfg.json").write_text(json.dumps(legacy_cfg))
        x = make_x(500 + j, (N,), D_IN)
        record(f"legacy_layer_naming/layer_{j}", dst, root / f"golden.layer_{j}.safetensors", x,
               [f"CREATED BY RENAMING: copy of topk_checkpoint/layers.{j}/sae.safetensors in a folder renamed to"
                f" layer_{j}, with a hand-written pre-2025 cfg.json (keys expansion_factor, normalize_decoder,"
                " num_latents, k, signed, d_in) as found in old EleutherAI/sae Hub revisions; sparsify 1.3.3 itself"
                " never writes this layout",
                "sparsify loads it with SparseCoderConfig.from_dict(drop_extra_fields=True): 'signed' dropped,"
                " activation defaults to 'topk', transcode/skip_connection default false",
                f"same weights and same x as topk_checkpoint/layers.{j}"],
               "topk", extra={"checkpoint_root": str(root.relative_to(GOLDEN_ROOT)), "renamed_by_script": True})

    rec.write(fragment, _environment(["eai-sparsify", "transformers", "datasets", "torch", "safetensors"]))


# --------------------------------------------------------------------------------------
# dictionary_learning
# --------------------------------------------------------------------------------------


def generate_dictionary_learning(out: Path, fragment: Path) -> None:
    import torch as t
    from dictionary_learning.training import trainSAE
    from dictionary_learning.utils import load_dictionary
    from dictionary_learning.dictionary import AutoEncoder, AutoEncoderNew
    from dictionary_learning.trainers.standard import StandardTrainer, StandardTrainerAprilUpdate
    from dictionary_learning.trainers.gdm import GatedSAETrainer
    from dictionary_learning.trainers.top_k import TopKTrainer
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer

    version = _pkg_version("dictionary-learning")
    rec = Recorder(out, "dictionary_learning", version)
    X_SHAPE = (5, 3)

    class TinyBuffer:
        """Stands in for ActivationBuffer: yields (32, d) batches and exposes the same .config keys."""

        def __init__(self, seed):
            self.g = _gen(seed)
            self.offset = _randn(self.g, D_IN, scale=0.7)

        def __iter__(self):
            return self

        def __next__(self):
            return _randn(self.g, 32, D_IN) + self.offset

        @property
        def config(self):
            return {"d_submodule": D_IN, "io": "out", "n_ctxs": 30000, "ctx_len": 128,
                    "refresh_batch_size": 512, "out_batch_size": 32, "device": "cpu"}

    common = dict(steps=3, activation_dim=D_IN, dict_size=D_SAE, layer=0, lm_name="tiny-model",
                  device="cpu", seed=0, submodule_name="resid_post_layer_0")

    def run_trainer(name, trainer_cls, **kw):
        save_dir = out / name
        cfg = {"trainer": trainer_cls, **common, **kw}
        trainSAE(data=TinyBuffer(11), trainer_configs=[cfg], steps=3, save_dir=str(save_dir), device="cpu")
        return save_dir / "trainer_0"

    def randomize(tdir: Path, seed: int, x, kind: str):
        """Overwrite ae.pt values (same keys/shapes/dtypes) with seeded non-trivial numbers."""
        sd = t.load(tdir / "ae.pt")
        g = _gen(seed)

        def colnorm(w, dim):
            w = w / w.norm(dim=dim, keepdim=True)
            n = w.shape[1 - dim] if w.dim() == 2 else w.shape[0]
            scales = _uniform(g, n, lo=0.5, hi=2.0)
            return w * (scales[None, :] if dim == 0 else scales[:, None])

        new = {}
        for k, v in sd.items():
            if k in ("encoder.weight",):
                new[k] = _randn(g, *v.shape, scale=1.5 / D_IN ** 0.5)
            elif k == "W_enc":
                new[k] = _randn(g, *v.shape, scale=1.5 / D_IN ** 0.5)
            elif k == "decoder.weight":  # nn.Linear(d_sae, d_in).weight: (d_in, d_sae), columns = latents
                new[k] = colnorm(_randn(g, *v.shape), dim=0)
            elif k == "W_dec":  # (d_sae, d_in), rows = latents
                new[k] = colnorm(_randn(g, *v.shape), dim=1)
            elif k in ("bias", "b_dec", "decoder_bias", "decoder.bias", "encoder.bias", "b_enc",
                       "gate_bias", "mag_bias", "r_mag"):
                new[k] = _randn(g, *v.shape, scale=0.3)
            elif k in ("k", "group_sizes", "threshold"):
                new[k] = v.clone()
            else:
                raise AssertionError(f"unhandled key {k}")
        # thresholds from observed activations
        if kind == "jumprelu":
            pre = x @ new["W_enc"] + new["b_enc"]  # loaded JumpReluAutoEncoder has apply_b_dec_to_input=False
            new["threshold"] = mid_thresholds(pre, seed + 1)
        elif kind in ("topk", "batchtopk", "matryoshka"):
            if "encoder.weight" in new:
                post = t.relu((x - new["b_dec"]) @ new["encoder.weight"].T + new["encoder.bias"])
            else:
                post = t.relu((x - new["b_dec"]) @ new["W_enc"] + new["b_enc"])
            vals = post[post > 0].sort().values
            m = len(vals) // 2
            thr = float(vals[m - 1] + vals[m]) / 2
            assert (post - thr).abs().min() > 1e-4
            new["threshold"] = t.tensor(thr, dtype=sd["threshold"].dtype)
            assert topk_gap(post, K) > 1e-4
        for k in sd:
            assert new[k].shape == sd[k].shape and new[k].dtype == sd[k].dtype, k
        # exactly what trainSAE does for the final save
        t.save({k: v.cpu() for k, v in new.items()}, tdir / "ae.pt")

    def record(name, tdir: Path, x, notes, canonical, extra_tensors=None, golden_notes=None, extra=None):
        t.manual_seed(0)  # AutoEncoder.normalize_decoder draws a random test input
        ae, config = load_dictionary(str(tdir), device="cpu")
        ae.eval()
        with t.no_grad():
            latents = ae.encode(x)
            decoded = ae.decode(latents)
            recon = ae(x)
        tensors = {"x": x, "latents": latents, "decoded": decoded, "recon": recon}
        if extra_tensors:
            with t.no_grad():
                tensors.update(extra_tensors(ae, x))
        golden = tdir.parent / "golden.safetensors"
        rec.save_golden(golden, tensors, {"library": "dictionary_learning", "version": version})
        gn = {"x": "input, leading batch shape (5, 3)",
              "latents": "load_dictionary(dir)[0].encode(x) with default arguments",
              "decoded": "ae.decode(latents)", "recon": "ae(x) (forward, output_features=False)"}
        gn.update(golden_notes or {})
        ex = {"dict_class": config["trainer"]["dict_class"], "trainer_class": config["trainer"]["trainer_class"],
              "loaded_class": type(ae).__name__}
        ex.update(extra or {})
        rec.add(name=name, architecture=config["trainer"]["dict_class"], sae_dir=tdir, golden=golden,
                dtype="float32", notes=notes + ["saved by dictionary_learning.training.trainSAE (3 steps on random data,"
                                                " save_dir/trainer_0/{ae.pt,config.json}); ae.pt values then overwritten"
                                                " with seeded random numbers (same keys/shapes/dtypes) via torch.save of the"
                                                " state dict, exactly as trainSAE saves it",
                                                "reference = dictionary_learning.utils.load_dictionary(trainer_dir, 'cpu')"],
                canonical=canonical, golden_tensors=gn, extra=ex)
        act = (latents > 0).float().mean().item()
        print(f"[dictionary_learning] {name}: {type(ae).__name__} frac_active={act:.2f}")

    fixtures = []

    # AutoEncoder (StandardTrainer) --------------------------------------------------
    def ae_raw(ae, x):
        sd = t.load(ae._golden_dir / "ae.pt")
        raw = AutoEncoder(D_IN, D_SAE)
        raw.load_state_dict(sd)
        return {"latents_unnormalized": raw.encode(x)}

    fixtures.append(("autoencoder", StandardTrainer, dict(warmup_steps=1, sparsity_warmup_steps=1), "relu",
                     ["AutoEncoder: keys bias (d_in) [the pre-encoder/decoder bias], encoder.weight (d_sae,d_in), encoder.bias"
                      " (d_sae), decoder.weight (d_in,d_sae) [nn.Linear(d_sae,d_in), NO decoder bias]",
                      "encode = relu(encoder(x - bias)); decode = decoder(f) + bias",
                      "load_dictionary -> AutoEncoder.from_pretrained(normalize_decoder=True): decoder COLUMNS are divided by"
                      " their norms and encoder.weight rows / encoder.bias multiplied by them, so 'latents' are in unit-decoder"
                      " units; recon is unchanged by this folding. decoder columns here have norms 0.5..2"],
                     ae_raw, {"latents_unnormalized": "encode(x) of the raw ae.pt without normalize_decoder folding"}))
    fixtures.append(("autoencoder_april_update", StandardTrainerAprilUpdate, dict(warmup_steps=1, sparsity_warmup_steps=1), "relu",
                     ["StandardTrainerAprilUpdate also saves dict_class 'AutoEncoder' (same keys and semantics as"
                      " 'autoencoder'; its decoder is not kept at unit norm during training)"],
                     ae_raw, {"latents_unnormalized": "encode(x) of the raw ae.pt without normalize_decoder folding"}))

    def new_feats(ae, x):
        return {"latents_output_features": ae(x, output_features=True)[1]}

    fixtures.append(("autoencoder_new", StandardTrainerAprilUpdate,
                     dict(dict_class=AutoEncoderNew, warmup_steps=1, sparsity_warmup_steps=1), "relu",
                     ["AutoEncoderNew: keys encoder.weight (d_sae,d_in), encoder.bias, decoder.weight (d_in,d_sae),"
                      " decoder.bias (d_in); encode = relu(encoder(x)) (NO input bias subtraction); decode = decoder(f)",
                      "forward(x, output_features=True) returns f * ||decoder column|| (see latents_output_features); encode()"
                      " does not scale",
                      "CONFIG PATCHED: trained with StandardTrainerAprilUpdate(dict_class=AutoEncoderNew), whose config"
                      " property hard-codes dict_class 'AutoEncoder'; config.json was edited to 'AutoEncoderNew' so that"
                      " load_dictionary dispatches correctly"],
                     new_feats, {"latents_output_features": "ae(x, output_features=True)[1] = encode(x) * decoder column norms"}))
    fixtures.append(("gated", GatedSAETrainer, dict(warmup_steps=1, sparsity_warmup_steps=1), "gated",
                     ["GatedAutoEncoder: keys decoder_bias (d_in), encoder.weight (d_sae,d_in) [no encoder bias], r_mag,"
                      " gate_bias, mag_bias (d_sae), decoder.weight (d_in,d_sae)",
                      "x_enc = encoder(x - decoder_bias); gate = (x_enc + gate_bias > 0); mag = relu(exp(r_mag) * x_enc +"
                      " mag_bias); f = gate * mag; decode = decoder(f) + decoder_bias"], None, None))

    def topk_extra(ae, x):
        return {"latents_use_threshold": ae.encode(x, use_threshold=True)}

    fixtures.append(("topk", TopKTrainer, dict(k=K, warmup_steps=1), "topk",
                     ["AutoEncoderTopK: keys encoder.weight (d_sae,d_in), encoder.bias (d_sae), decoder.weight (d_in,d_sae),"
                      " b_dec (d_in), buffers k (int32 scalar) and threshold (float32 scalar)",
                      "encode (default use_threshold=False): post = relu(encoder(x - b_dec)); top-k of post per row"
                      " (relu BEFORE topk) scattered dense; decode = decoder(f) + b_dec",
                      "threshold buffer set to a positive value here (a trained model gets it from the EMA after"
                      " threshold_start_step); encode(use_threshold=True) = post * (post > threshold)",
                      "config.json trainer.k must equal the k buffer (load_dictionary passes k and from_pretrained checks)"],
                     topk_extra, {"latents_use_threshold": "ae.encode(x, use_threshold=True)"}))

    def batch_extra(ae, x):
        flat = x.reshape(-1, D_IN)
        return {"x_flat": flat, "latents_batch_topk_flat": ae.encode(flat, use_threshold=False)}

    fixtures.append(("batchtopk", BatchTopKTrainer, dict(k=K, warmup_steps=1), "batchtopk",
                     ["BatchTopKSAE: same keys as AutoEncoderTopK (encoder.*, decoder.weight, b_dec, k, threshold)",
                      "inference encode DEFAULT use_threshold=True: f = post * (post > threshold) with ONE scalar threshold,"
                      " post = relu(encoder(x - b_dec))",
                      "latents_batch_topk_flat: encode(x_flat, use_threshold=False) = top (k * batch) values over the whole"
                      " flattened (15, d_sae) batch"],
                     batch_extra, {"x_flat": "x.reshape(-1, d_in)",
                                   "latents_batch_topk_flat": "ae.encode(x_flat, use_threshold=False)"}))
    fixtures.append(("matryoshka_batchtopk", MatryoshkaBatchTopKTrainer,
                     dict(k=K, warmup_steps=1, group_fractions=[0.25, 0.25, 0.5]), "batchtopk",
                     ["MatryoshkaBatchTopKSAE: keys W_enc (d_in,d_sae), b_enc, W_dec (d_sae,d_in), b_dec, buffers k,"
                      " threshold (scalar), group_sizes (int64, here [4,4,8])",
                      "encode default use_threshold=True: post = relu((x - b_dec) @ W_enc + b_enc); f = post * (post >"
                      " threshold); then f[:, group_indices[active_groups]:] = 0 (no-op when all groups are active, and"
                      " it indexes dim 1, so for 3-D input it slices the sequence dim - harmless only because"
                      " active_groups == len(group_sizes) after loading)",
                      "decode = f @ W_dec + b_dec"],
                     batch_extra, {"x_flat": "x.reshape(-1, d_in)",
                                   "latents_batch_topk_flat": "ae.encode(x_flat, use_threshold=False)"}))
    fixtures.append(("jumprelu", JumpReluTrainer, dict(warmup_steps=1, sparsity_warmup_steps=1), "jumprelu",
                     ["JumpReluAutoEncoder: keys W_enc (d_in,d_sae), b_enc, W_dec (d_sae,d_in), b_dec, threshold (d_sae)",
                      "encode: pre = x @ W_enc + b_enc (apply_b_dec_to_input is a plain attribute, False after"
                      " from_pretrained, NOT saved in ae.pt); f = relu(pre * (pre > threshold)); decode = f @ W_dec + b_dec"],
                     None, None))

    for i, (name, trainer_cls, kw, canonical, notes, extra_fn, extra_notes) in enumerate(fixtures):
        tdir = run_trainer(name, trainer_cls, **kw)
        if name == "autoencoder_new":
            cfg = json.loads((tdir / "config.json").read_text())
            cfg["trainer"]["dict_class"] = "AutoEncoderNew"
            (tdir / "config.json").write_text(json.dumps(cfg, indent=4))
        x = make_x(700 + i, X_SHAPE, D_IN)
        kind = {"topk": "topk", "batchtopk": "batchtopk", "matryoshka_batchtopk": "matryoshka",
                "jumprelu": "jumprelu"}.get(name, name)
        randomize(tdir, 7000 + 10 * i, x, kind)

        def wrapped(ae, xx, _fn=extra_fn, _dir=tdir):
            ae._golden_dir = _dir
            return _fn(ae, xx)

        record(name, tdir, x, notes, canonical, extra_tensors=wrapped if extra_fn else None,
               golden_notes=extra_notes, extra={"config_patched": name == "autoencoder_new"})

    rec.write(fragment, _environment(["dictionary-learning", "nnsight", "transformers", "torch"]))


# --------------------------------------------------------------------------------------
# --self-check: an independent plain-torch re-derivation of every fixture from the raw files
# (the formulas written down in tests/fixtures/golden/FORMAT_NOTES.md).  Needs torch and
# safetensors in the interpreter that runs it, e.g. `.venv/bin/python scripts/... --self-check`.
# --------------------------------------------------------------------------------------


def self_check() -> int:
    import math
    import torch
    from safetensors.torch import load_file

    G = GOLDEN
    m = json.loads((G / "manifest.json").read_text())
    bad = 0

    def saelens(e, g):
        d = G / e["path"]
        cfg = json.loads((d / "cfg.json").read_text())
        w = load_file(str(d / "sae_weights.safetensors"))
        w.pop("scaling_factor", None)
        ver = cfg.get("sae_lens_version") or cfg.get("metadata", {}).get("sae_lens_version")
        legacy = not ver or int(ver.split(".")[0]) < 6
        arch = cfg.get("architecture", "standard")
        k = cfg.get("k")
        if legacy and cfg.get("activation_fn_str") == "topk":
            arch, k = "topk", cfg["activation_fn_kwargs"]["k"]
        norm = cfg.get("normalize_activations")
        if isinstance(norm, bool) or norm is None:
            norm = "none"  # expected_average_only_in is identity
        apply_bdec = cfg.get("apply_b_dec_to_input", True)
        transc = "transcoder" in arch
        x = g["x"]
        st = {}
        def pin(x):
            if norm == "layer_norm":
                mu = x.mean(-1, keepdim=True); xc = x - mu; sd = xc.std(-1, keepdim=True)
                st["f"] = lambda y: y * sd + mu
                x = xc / (sd + 1e-5)
            elif norm == "constant_norm_rescale":
                c = math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True)
                st["f"] = lambda y: y / c
                x = x * c
            else:
                st["f"] = lambda y: y
            if apply_bdec and not transc:
                x = x - w["b_dec"]
            return x
        xi = pin(x)
        rescale = arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False)
        nrm = w["W_dec"].norm(dim=-1)
        if arch == "gated":
            gate = (xi @ w["W_enc"] + w["b_gate"] > 0).float()
            mag = torch.relu(xi @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
            f = gate * mag
        else:
            pre = xi @ w["W_enc"] + w["b_enc"]
            if "jumprelu" in arch:
                f = torch.relu(pre) * (pre > w["threshold"]).float()
            elif arch == "topk":
                if rescale: pre = pre * nrm
                v, i = pre.topk(k, dim=-1)
                f = torch.zeros_like(pre).scatter(-1, i, v.relu())
            else:
                f = torch.relu(pre)
        fd = f / nrm if rescale else f
        dec = st["f"](fd @ w["W_dec"] + w["b_dec"])
        rec = dec + (x @ w["W_skip"].T if "W_skip" in w else 0)
        return {"latents": f, "decoded": dec, "recon": rec}

    def sparsify(e, g):
        d = G / e["path"]
        cfg = json.loads((d / "cfg.json").read_text())
        w = {k: v.float() for k, v in load_file(str(d / "sae.safetensors")).items()}
        x = g["x"]
        xi = x if cfg.get("transcode") else x - w["b_dec"]
        pre = torch.relu(xi @ w["encoder.weight"].T + w["encoder.bias"])
        kk = cfg["k"]
        if cfg.get("activation", "topk") == "groupmax":
            v, i = pre.unflatten(-1, (kk, -1)).max(-1)
            i = i + torch.arange(0, pre.shape[-1], pre.shape[-1] // kk)
        else:
            v, i = pre.topk(kk, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, i, v)
        dec = f @ w["W_dec"] + w["b_dec"]
        rec = dec + (x @ w["W_skip"].T if "W_skip" in w else 0)
        return {"latents": f, "decoded": dec, "recon": rec, "pre_acts": pre}

    def dictlearn(e, g):
        d = G / e["path"]
        cfg = json.loads((d / "config.json").read_text())["trainer"]
        w = torch.load(d / "ae.pt")
        x = g["x"]; cls = cfg["dict_class"]
        if cls == "AutoEncoder":
            n = w["decoder.weight"].norm(dim=0)
            We, be, Wd = w["encoder.weight"] * n[:, None], w["encoder.bias"] * n, w["decoder.weight"] / n
            f = torch.relu((x - w["bias"]) @ We.T + be); dec = f @ Wd.T + w["bias"]
        elif cls == "AutoEncoderNew":
            f = torch.relu(x @ w["encoder.weight"].T + w["encoder.bias"]); dec = f @ w["decoder.weight"].T + w["decoder.bias"]
        elif cls == "GatedAutoEncoder":
            xe = (x - w["decoder_bias"]) @ w["encoder.weight"].T
            f = (xe + w["gate_bias"] > 0).float() * torch.relu(w["r_mag"].exp() * xe + w["mag_bias"])
            dec = f @ w["decoder.weight"].T + w["decoder_bias"]
        elif cls in ("AutoEncoderTopK", "BatchTopKSAE"):
            post = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
            if cls == "AutoEncoderTopK":
                v, i = post.topk(int(w["k"]), dim=-1); f = torch.zeros_like(post).scatter(-1, i, v)
            else:
                f = post * (post > w["threshold"]).float()
            dec = f @ w["decoder.weight"].T + w["b_dec"]
        elif cls == "MatryoshkaBatchTopKSAE":
            post = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
            f = post * (post > w["threshold"]).float(); dec = f @ w["W_dec"] + w["b_dec"]
        elif cls == "JumpReluAutoEncoder":
            pre = x @ w["W_enc"] + w["b_enc"]; f = torch.relu(pre * (pre > w["threshold"]).float()); dec = f @ w["W_dec"] + w["b_dec"]
        return {"latents": f, "decoded": dec, "recon": dec}

    for e in m["fixtures"]:
        g = load_file(str(G / e["golden"]))
        ours = {"saelens": saelens, "sparsify": sparsify, "dictionary_learning": dictlearn}[e["library"]](e, g)
        errs = {k: (v - g[k].float()).abs().max().item() for k, v in ours.items()}
        ok = all(v < 1e-5 for v in errs.values())
        bad += not ok
        print(("OK  " if ok else "BAD ") + e["library"] + "/" + e["name"], {k: f"{v:.1e}" for k, v in errs.items()})
    print(f"{len(m['fixtures']) - bad} passed, {bad} failed")
    return bad


GENERATORS = {
    "saelens": generate_saelens,
    "sparsify": generate_sparsify,
    "dictionary_learning": generate_dictionary_learning,
}


if __name__ == "__main__":
    main()
