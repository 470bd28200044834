"""``sae-hooks demo``: train a TopK SAE in place on the embedded model, splice it back, report metrics.

Data: the language-reference topics that ship with Python (``pydoc_data.topics``), part of the corpus
the embedded model was trained on (see ``scripts/build_default_model.py``); every 8th topic (sorted by
name) is held out for evaluation. Needs ``transformers`` (``pip install 'sae-hooks[hf]'``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..eval import hooks_splice_runner, reconstruction_metrics, splice_metrics
from ..saes.registry import make_sae
from ..train.buffer import ShuffleBuffer
from ..train.sources import ActivationReader, LiveSource, pack_texts
from ..train.trainer import Trainer, TrainEntry, TrainSettings


@dataclass
class DemoConfig:
    site: str = "transformer.h.1"
    d_sae: int = 512
    k: int = 16
    steps: int = 200
    batch_tokens: int = 2048
    buffer_tokens: int = 2**14
    seq_len: int = 128
    seq_batch: int = 16
    lr: float = 4e-3
    seed: int = 0
    eval_batches: int = 4
    n_latents_shown: int = 5
    n_top_tokens: int = 6


def pydoc_texts() -> tuple[list[str], list[str]]:
    """``(train, held_out)`` texts: Python's pydoc language-reference topics, every 8th held out."""
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    texts = [topics.topics[k] for k in keys]
    return [t for i, t in enumerate(texts) if i % 8], [t for i, t in enumerate(texts) if i % 8 == 0]


def load_default_model() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .default_model import default_model_path

    path = str(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path)


def _cycle(batches: list[torch.Tensor]):
    def factory():
        while True:
            yield from batches

    return factory


def run_demo(cfg: DemoConfig | None = None, progress: bool = True, out_dir: str | None = None, print_fn=print) -> dict[str, Any]:
    cfg = cfg or DemoConfig()
    t0 = time.perf_counter()
    model, tok = load_default_model()
    bos = tok.bos_token_id if tok.bos_token_id is not None else 0
    train_texts, eval_texts = pydoc_texts()
    train_batches = pack_texts(tok, train_texts, cfg.seq_len, cfg.seq_batch, bos)
    eval_batches = pack_texts(tok, eval_texts, cfg.seq_len, cfg.seq_batch, bos)[: cfg.eval_batches]
    d_model = model.config.n_embd
    source = LiveSource(model, [cfg.site], _cycle(train_batches), bos_token_id=bos)
    buffer = ShuffleBuffer(source, batch_tokens=cfg.batch_tokens, size_tokens=cfg.buffer_tokens, seed=cfg.seed)
    sae = make_sae("topk", d_model, cfg.d_sae, k=cfg.k, model_name="sae_hooks default_model")
    settings = TrainSettings(lr=cfg.lr, warmup_steps=20, dead_tokens=100_000, seed=cfg.seed)
    trainer = Trainer([TrainEntry("topk", cfg.site, sae, settings)])
    t_train = time.perf_counter()
    trainer.fit(buffer, max_steps=cfg.steps, progress=progress)
    train_s = time.perf_counter() - t_train
    final = trainer.entries[0].final_sae().eval()

    reader = ActivationReader(model, [cfg.site], bos_token_id=bos)
    acts = [reader.read(b)[cfg.site] for b in eval_batches]
    rec = reconstruction_metrics(final, acts)
    run = hooks_splice_runner(model, cfg.site, bos_token_id=bos)
    down = splice_metrics(run, final, eval_batches)
    latents = _top_tokens(final, model, tok, reader, eval_batches, cfg)
    total_s = time.perf_counter() - t0
    result = {
        **rec, **down, "train_tokens": trainer.tokens_seen, "train_seconds": train_s, "total_seconds": total_s,
        "tokens_per_second": trainer.tokens_seen / max(train_s, 1e-9), "latents": latents,
    }
    if out_dir:
        trainer.save(out_dir)
    print_fn(format_report(result, cfg))
    return result


@torch.no_grad()
def _top_tokens(sae, model, tok, reader, batches, cfg) -> list[dict[str, Any]]:  # noqa: ANN001
    """For the most frequently firing latents on held-out text: the tokens that activate them most."""
    ids_all, acts_all = [], []
    for b in batches:
        keep = b != reader.bos_token_id
        ids_all.append(b[keep])
        acts_all.append(sae.encode(reader.read(b)[cfg.site]))
    ids, acts = torch.cat(ids_all), torch.cat(acts_all)
    freq = (acts > 0).float().mean(0)
    shown = []
    for j in freq.argsort(descending=True)[: cfg.n_latents_shown * 3 : 3].tolist():
        vals, rows = acts[:, j].topk(cfg.n_top_tokens)
        toks = [tok.decode([int(ids[r])]) for r in rows.tolist()]
        shown.append({"latent": j, "frequency": float(freq[j]), "top_tokens": toks, "top_values": vals.tolist()})
    return shown


def format_report(r: dict[str, Any], cfg: DemoConfig) -> str:
    lines = [
        f"TopK SAE (d_sae={cfg.d_sae}, k={cfg.k}) trained in place at {cfg.site!r} of the embedded model",
        f"  trained on {r['train_tokens']:,} tokens in {r['train_seconds']:.1f}s ({r['tokens_per_second']:,.0f} tok/s); total {r['total_seconds']:.1f}s",
        f"  held-out ({r['tokens']:,} tokens): FVU {r['fvu']:.4f}  explained variance {r['explained_variance']:.4f}  "
        f"L0 {r['l0']:.2f}  dead {100 * r['dead_fraction']:.1f}%",
        f"  CE loss: clean {r['ce_clean']:.4f}  with SAE {r['ce_sae']:.4f}  zero-ablated {r['ce_zero']:.4f}  "
        f"-> CE loss recovered {r['ce_loss_score']:.4f};  KL(clean||SAE) {r['kl_clean_sae']:.4f} nats/token",
        "  top tokens of frequent latents:",
    ]
    for lat in r["latents"]:
        toks = ", ".join(repr(t) for t in lat["top_tokens"])
        lines.append(f"    latent {lat['latent']:5d} (fires on {100 * lat['frequency']:.1f}% of tokens): {toks}")
    return "\n".join(lines)
