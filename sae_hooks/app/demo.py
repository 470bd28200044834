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
    dashboard_tokens: int = 2**16


def pydoc_texts() -> tuple[list[str], list[str]]:
    """``(train, held_out)`` texts: Python's pydoc language-reference topics, every 8th held out."""
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    texts = [topics.topics[k] for k in keys]
    return [t for i, t in enumerate(texts) if i % 8], [t for i, t in enumerate(texts) if i % 8 == 0]


def load_default_model() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .default_model import default_model_path

    path = str(default_model_path())
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 1.35M-parameter model loads instantly; its bar is noise here
    try:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path)


def _with_mask(batches: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Token batches with an explicit attention mask (Hugging Face models warn without one when BOS = PAD)."""
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches]


def _cycle(batches: list[Any]):
    def factory():
        while True:
            yield from batches

    return factory


def run_demo(cfg: DemoConfig | None = None, progress: bool = True, out_dir: str | None = "sae-hooks-demo",
             print_fn=print, dashboard: bool = True) -> dict[str, Any]:
    """Train, evaluate, save the SAE to ``out_dir/sae`` and its dashboard to ``out_dir/dashboard``."""
    cfg = cfg or DemoConfig()
    t0 = time.perf_counter()
    model, tok = load_default_model()
    bos = tok.bos_token_id if tok.bos_token_id is not None else 0
    train_texts, eval_texts = pydoc_texts()
    train_batches = _with_mask(pack_texts(tok, train_texts, cfg.seq_len, cfg.seq_batch, bos))
    eval_batches = _with_mask(pack_texts(tok, eval_texts, cfg.seq_len, cfg.seq_batch, bos)[: cfg.eval_batches])
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
    acts = [reader.read(b["input_ids"], b["attention_mask"])[cfg.site] for b in eval_batches]
    rec = reconstruction_metrics(final, acts)
    run = hooks_splice_runner(model, cfg.site, bos_token_id=bos)
    down = splice_metrics(run, final, eval_batches)
    result: dict[str, Any] = {
        **rec, **down, "train_tokens": trainer.tokens_seen, "train_seconds": train_s,
        "tokens_per_second": trainer.tokens_seen / max(train_s, 1e-9),
    }
    if out_dir:
        from pathlib import Path

        out = Path(out_dir)
        final.save(out / "sae")
        result["sae_path"] = str(out / "sae")
        if dashboard:
            from ..eval.dashboard import CollectorSettings, build_dashboard

            # Every pydoc topic, held-out ones included: the dashboard is for looking, not for scoring.
            build_dashboard(final, model, train_texts + eval_texts, out / "dashboard", tokenizer=tok, site=cfg.site,
                            seq_len=cfg.seq_len, batch_size=cfg.seq_batch, max_tokens=cfg.dashboard_tokens,
                            settings=CollectorSettings(), title="Demo: TopK SAE on the embedded model",
                            progress=progress)
            result["dashboard_path"] = str(out / "dashboard")
    result["total_seconds"] = time.perf_counter() - t0
    print_fn(format_report(result, cfg))
    return result


def format_report(r: dict[str, Any], cfg: DemoConfig) -> str:
    """The demo's summary: what was trained, the metrics with what each means, what was written, what next."""
    lines = [
        "",
        f"Trained a TopK SAE (d_sae={cfg.d_sae}, k={cfg.k}) in place at {cfg.site!r} of the embedded model",
        f"  on {r['train_tokens']:,} tokens in {r['train_seconds']:.1f}s ({r['tokens_per_second']:,.0f} tokens/s); "
        f"total {r['total_seconds']:.1f}s",
        "",
        f"Held-out metrics ({r['tokens']:,} tokens of pydoc topics the SAE never saw):",
        f"  FVU                {r['fvu']:8.4f}   fraction of the activations' variance the SAE does not reconstruct (0 is perfect)",
        f"  L0                 {r['l0']:8.2f}   latents active per token",
        f"  dead latents       {100 * r['dead_fraction']:7.1f}%   latents that never fired on the held-out tokens",
        f"  CE loss recovered  {r['ce_loss_score']:8.4f}   share of the loss gap between zero-ablating the site and the clean model "
        "that splicing in the SAE closes (1 is perfect)",
        f"  CE loss            {r['ce_sae']:8.4f}   next-token loss with the SAE spliced in (clean {r['ce_clean']:.4f}, "
        f"zero-ablated {r['ce_zero']:.4f}; nats/token)",
        f"  KL(clean || SAE)   {r['kl_clean_sae']:8.4f}   how far splicing moves the next-token distribution (nats/token)",
    ]
    if "sae_path" in r:
        lines += ["", "Wrote:", f"  the SAE      {r['sae_path']}/   (sae_hooks.load({r['sae_path']!r}))"]
        if "dashboard_path" in r:
            lines.append(f"  a dashboard  {r['dashboard_path']}/index.html   (open it in a browser: every latent's top contexts)")
        lines += ["", "Next:", f"  sae-hooks eval {r['sae_path']}",
                  f"  sae-hooks dashboard {r['sae_path']} --max-tokens 1000000 --out my-dashboard"]
    return "\n".join(lines)
